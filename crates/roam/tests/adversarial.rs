//! Adversarial loopback tests: every kind of bad input gives a typed error or is refused, and the
//! genuine session carries on undisturbed.
//!
//! Each test is named after the attack it shows. After every attack the genuine stream pair
//! exchanges fresh random bytes in both directions and checks them byte-exact. Hosts are distinct
//! loopback addresses (127.0.0.x). Timeouts only bound waiting (or assert that nothing happens);
//! synchronisation uses events.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::proto::frame::{kind, Hello, Reassoc, HEADER_LEN};
use roam::proto::image::IMAGE_VERSION;
use roam::proto::{
    Associating, ConnId, EndpointId, Entropy, Epoch, Frame, FrameError, LocalInfo, Offset, Session,
};
use roam::{
    ConnectError, Endpoint, EndpointConfig, ImageError, RefuseReason, SessionConfig, SessionId,
    Stream, StreamImage, ThawError,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Longest any single step may take before the test fails.
const BOUND: Duration = Duration::from_secs(10);

fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Await `f`, failing the test if it takes longer than [`BOUND`].
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {BOUND:?}"),
    }
}

/// Wait until `cond` holds. Used only for counters, which have no event to wait on.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

/// Two endpoints on distinct hosts with an associated stream pair: `s` dialed from `a`, `t`
/// accepted on `b`.
async fn pair(a: u8, b: u8) -> (Endpoint, Endpoint, Stream, Stream) {
    let a = Endpoint::bind(host(a)).await.unwrap();
    let b = Endpoint::bind(host(b)).await.unwrap();
    let (s, t) = connect(&a, &b).await;
    (a, b, s, t)
}

async fn connect(a: &Endpoint, b: &Endpoint) -> (Stream, Stream) {
    let s = within("connect", a.connect(b.local_addr())).await.unwrap();
    let t = within("accept", b.accept()).await.unwrap();
    assert_eq!(s.session_id(), t.session_id());
    (s, t)
}

/// Send fresh random bytes both ways at once and check both arrive byte-exact.
async fn exchange(s: &mut Stream, t: &mut Stream, rng: &mut ChaCha8Rng) {
    let n = rng.gen_range(1..100_000);
    let m = rng.gen_range(1..100_000);
    let mut to_t = vec![0u8; n];
    let mut to_s = vec![0u8; m];
    rng.fill_bytes(&mut to_t);
    rng.fill_bytes(&mut to_s);
    let s_side = async {
        s.write_all(&to_t).await?;
        let mut got = vec![0u8; m];
        s.read_exact(&mut got).await?;
        Ok::<_, io::Error>(got)
    };
    let t_side = async {
        t.write_all(&to_s).await?;
        let mut got = vec![0u8; n];
        t.read_exact(&mut got).await?;
        Ok::<_, io::Error>(got)
    };
    let (at_s, at_t) = within("exchange", async { tokio::join!(s_side, t_side) }).await;
    assert!(at_s.unwrap() == to_s, "bytes to s differ");
    assert!(at_t.unwrap() == to_t, "bytes to t differ");
}

/// Read until the peer closes the socket; a reset counts as closed too.
async fn assert_closed(raw: &mut TcpStream) {
    within("peer closes the raw socket", async {
        let mut buf = [0u8; 4096];
        loop {
            match raw.read(&mut buf).await {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("unexpected error on raw socket: {e}"),
            }
        }
    })
    .await
}

/// Read one frame the peer sends on a raw socket.
async fn read_reply(raw: &mut TcpStream) -> Frame {
    within("reply frame", async {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            if let Some(f) = Frame::decode(&mut buf).expect("reply decodes") {
                return f;
            }
            let n = raw.read_buf(&mut buf).await.expect("read reply");
            assert!(n > 0, "closed without a reply");
        }
    })
    .await
}

/// Send `bytes` on a fresh raw connection to `to` and return the one frame it answers with.
async fn raw_request(to: SocketAddr, bytes: &[u8]) -> (Frame, TcpStream) {
    let mut raw = TcpStream::connect(to).await.unwrap();
    raw.write_all(bytes).await.unwrap();
    let reply = read_reply(&mut raw).await;
    (reply, raw)
}

// ------------------------------------------------------------------------------------- images

/// Recompute an image's trailing SHA-256 after editing its body.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 32;
    let digest = Sha256::digest(&bytes[..n]);
    bytes[n..].copy_from_slice(&digest);
}

/// Byte offsets inside an image (IPv4 contacts): prefix 14, session 16, epoch 8, key 32.
const IMG_EPOCH: usize = 14 + 16;
const IMG_KEY: usize = IMG_EPOCH + 8;
/// After the key: the security mode (1 byte), the suite (1 byte) and the peer identity flag (1
/// byte, none here).
const IMG_LOCAL_CONTACT: usize = IMG_KEY + 32 + 3 + 16;

#[tokio::test]
async fn corrupted_truncated_and_foreign_images_are_typed_errors() {
    let mut r = rng(1);
    let (_a, _b, mut s, mut t) = pair(10, 11).await;
    exchange(&mut s, &mut t, &mut r).await;
    // Leave unread input on both sides so the image carries both buffers.
    t.write_all(b"unread by s").await.unwrap();
    s.write_all(b"unacked maybe").await.unwrap();
    let image = within("freeze", s.freeze()).await.unwrap();
    let bytes = image.to_bytes();
    assert_eq!(StreamImage::from_bytes(&bytes).unwrap(), image);

    // Truncated at every length (all of the header, then a sample of the rest).
    let mut cuts: Vec<usize> = (0..64.min(bytes.len())).collect();
    cuts.extend((0..200).map(|_| r.gen_range(0..bytes.len())));
    cuts.push(bytes.len() - 1);
    for cut in cuts {
        assert_eq!(
            StreamImage::from_bytes(&bytes[..cut]),
            Err(ImageError::Truncated),
            "cut at {cut}"
        );
    }

    // A flipped bit anywhere: the header's fields are checked first, the digest covers the rest.
    let mut positions: Vec<usize> = (0..14).collect();
    positions.extend((0..300).map(|_| r.gen_range(0..bytes.len())));
    positions.extend(bytes.len() - 32..bytes.len());
    for i in positions {
        let mut b = bytes.clone();
        b[i] ^= 1 << r.gen_range(0..8);
        let got = StreamImage::from_bytes(&b);
        match i {
            0..8 => assert_eq!(got, Err(ImageError::Foreign), "bit in magic at {i}"),
            8..10 => assert!(
                matches!(got, Err(ImageError::UnsupportedVersion(v)) if v != IMAGE_VERSION),
                "bit in version at {i}: {got:?}"
            ),
            10..14 => assert!(
                matches!(got, Err(ImageError::Truncated | ImageError::Trailing(_))),
                "bit in length at {i}: {got:?}"
            ),
            _ => assert_eq!(got, Err(ImageError::Corrupt), "bit at {i}"),
        }
    }

    // Foreign bytes.
    let mut random = vec![0u8; 512];
    r.fill_bytes(&mut random);
    random[0] = b'X';
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0";
    let foreign: [&[u8]; 4] = [&random, b"hello world", png, &[0u8; 100]];
    for f in foreign {
        assert_eq!(StreamImage::from_bytes(f), Err(ImageError::Foreign));
    }
    // Nothing at all, or only part of the magic, is a truncated image (shorter than the header).
    assert_eq!(StreamImage::from_bytes(&[]), Err(ImageError::Truncated));
    assert_eq!(StreamImage::from_bytes(b"ROAM"), Err(ImageError::Truncated));

    // Another format version, even with a valid digest.
    for v in [0u16, 1, 4, 0xffff] {
        let mut b = bytes.clone();
        b[8..10].copy_from_slice(&v.to_be_bytes());
        reseal(&mut b);
        assert_eq!(
            StreamImage::from_bytes(&b),
            Err(ImageError::UnsupportedVersion(v))
        );
    }

    // Trailing bytes.
    for extra in [1usize, 7, 4096] {
        let mut b = bytes.clone();
        b.extend(std::iter::repeat_n(0u8, extra));
        assert_eq!(
            StreamImage::from_bytes(&b),
            Err(ImageError::Trailing(extra))
        );
    }

    // A resealed (digest-valid) image with a malformed field is still a typed error.
    let mut b = bytes.clone();
    b[IMG_LOCAL_CONTACT] = 9; // address tag: neither 4 nor 6
    reseal(&mut b);
    assert!(matches!(
        StreamImage::from_bytes(&b),
        Err(ImageError::Malformed(_))
    ));

    // None of this touched the genuine session: the real image thaws and carries on.
    let c = Endpoint::bind(host(12)).await.unwrap();
    let mut s = within("thaw", c.thaw(StreamImage::from_bytes(&bytes).unwrap()))
        .await
        .unwrap();
    let mut unread = [0u8; 11];
    within("read", s.read_exact(&mut unread)).await.unwrap();
    assert_eq!(&unread, b"unread by s");
    let mut unacked = [0u8; 13];
    within("read", t.read_exact(&mut unacked)).await.unwrap();
    assert_eq!(&unacked, b"unacked maybe");
    exchange(&mut s, &mut t, &mut r).await;
}

#[tokio::test]
async fn forged_image_with_a_valid_digest_but_the_wrong_key_is_refused_by_the_peer() {
    let mut r = rng(2);
    let (_a, b, mut s, mut t) = pair(13, 14).await;
    exchange(&mut s, &mut t, &mut r).await;
    let image = within("freeze", s.freeze()).await.unwrap();
    let bytes = image.to_bytes();
    let c = Endpoint::bind(host(15)).await.unwrap();
    let rejected = b.stats().handshakes_rejected;

    // The digest only detects damage; anyone can reseal. The key is what the peer checks.
    let mut forged = bytes.clone();
    forged[IMG_KEY] ^= 0x80;
    reseal(&mut forged);
    let forged = StreamImage::from_bytes(&forged).unwrap();
    let got = within("thaw forged", c.thaw(forged)).await;
    assert!(
        matches!(got, Err(ThawError::Refused(RefuseReason::BadProof))),
        "{got:?}"
    );
    // A forged future epoch does not help either.
    let mut forged = bytes.clone();
    forged[IMG_EPOCH + 7] = 1;
    reseal(&mut forged);
    let forged = StreamImage::from_bytes(&forged).unwrap();
    let d = Endpoint::bind(host(16)).await.unwrap();
    let got = within("thaw forged epoch", d.thaw(forged)).await;
    assert!(
        matches!(got, Err(ThawError::Refused(RefuseReason::BadProof))),
        "{got:?}"
    );
    eventually("rejections counted", || {
        b.stats().handshakes_rejected == rejected + 2
    })
    .await;
    assert_eq!(t.epoch(), Epoch(0));

    // The genuine image still thaws (on a third host) and the session continues.
    let e = Endpoint::bind(host(17)).await.unwrap();
    let mut s = within("thaw", e.thaw(StreamImage::from_bytes(&bytes).unwrap()))
        .await
        .unwrap();
    exchange(&mut s, &mut t, &mut r).await;
    assert_eq!(t.epoch(), Epoch(1));
    assert_eq!(t.peer().contact, e.contact_addr());
}

// ------------------------------------------------------------------ garbage on the listener

fn hello_bytes() -> Vec<u8> {
    Frame::Hello(Hello {
        endpoint: EndpointId([7; 16]),
        contact: "127.0.0.99:1".parse().unwrap(),
        eph: [9; 32],
        nonce: [3; 16],
        insecure: false,
        psk: false,
        identity: None,
        suites: vec![2, 1],
    })
    .to_bytes()
    .to_vec()
}

/// Connect raw to `to`, send `bytes` (optionally then close the write half), and check the
/// endpoint drops the connection without answering.
async fn garbage(to: SocketAddr, bytes: &[u8], close_after: bool) {
    let mut raw = TcpStream::connect(to).await.unwrap();
    // The endpoint may drop the connection before it has read everything: ignore write errors.
    let _ = raw.write_all(bytes).await;
    if close_after {
        let _ = raw.shutdown().await;
    }
    assert_closed(&mut raw).await;
}

#[tokio::test]
async fn garbage_on_the_listening_port_is_rejected_and_sessions_carry_on() {
    let mut r = rng(3);
    let (a, b, mut s, mut t) = pair(20, 21).await;
    exchange(&mut s, &mut t, &mut r).await;

    let mut random = vec![0u8; 8192];
    r.fill_bytes(&mut random);
    let hello = hello_bytes();
    let mut huge = vec![kind::HELLO];
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    // A length under the frame limit but far beyond any handshake: never buffered whole.
    let mut big = vec![kind::HELLO];
    big.extend_from_slice(&1_000_000u32.to_be_bytes());
    big.extend(std::iter::repeat_n(0u8, 6000));
    // A Hello header claiming 10 body bytes: the frame is whole, its body is cut short.
    let mut short_body = vec![kind::HELLO, 0, 0, 0, 10];
    short_body.extend_from_slice(&hello[HEADER_LEN..HEADER_LEN + 10]);
    let mut bad_magic = hello.clone();
    bad_magic[HEADER_LEN] = b'X';
    let mut bad_version = hello.clone();
    bad_version[HEADER_LEN + 5] = 9;
    // A Hello whose ephemeral key is a low-order point (all zeros).
    let mut weak_key = hello.clone();
    let eph_at = hello.len() - 16 - 32;
    weak_key[eph_at..eph_at + 32].fill(0);
    let ping = Frame::Ping.to_bytes().to_vec();
    let data = Frame::Data {
        offset: Offset(0),
        ack: Offset(0),
        limit: Offset(0),
        payload: bytes::Bytes::from_static(b"unsolicited"),
    }
    .to_bytes()
    .to_vec();

    let attacks: Vec<(&str, &[u8], bool)> = vec![
        ("random bytes", &random, false),
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: roam\r\n\r\n",
            false,
        ),
        ("huge length header", &huge, false),
        ("big length, body never ends", &big, false),
        ("half a Hello, then close", &hello[..hello.len() / 2], true),
        ("header only, then close", &hello[..HEADER_LEN], true),
        ("Hello header with truncated body", &short_body, false),
        ("Hello with bad magic", &bad_magic, false),
        ("Hello with unknown version", &bad_version, false),
        ("Hello with a weak key", &weak_key, false),
        ("Ping as first frame", &ping, false),
        ("Data as first frame", &data, false),
        ("nothing, then close", &[], true),
    ];
    for (i, (what, bytes, close)) in attacks.into_iter().enumerate() {
        let before = b.stats();
        within(what, garbage(b.local_addr(), bytes, close)).await;
        eventually(what, || {
            b.stats().handshakes_rejected == before.handshakes_rejected + 1
        })
        .await;
        assert_eq!(b.stats().associations, before.associations, "{what}");
        assert_eq!(b.session_count(), 1, "{what}");
        exchange(&mut s, &mut t, &mut r).await;
        // The dialing endpoint listens too: it must shrug off the same attack.
        if i % 3 == 0 {
            let before = a.stats().handshakes_rejected;
            within(what, garbage(a.local_addr(), bytes, close)).await;
            eventually(what, || a.stats().handshakes_rejected == before + 1).await;
            exchange(&mut s, &mut t, &mut r).await;
        }
    }
    assert_eq!(s.epoch(), Epoch(0));
    assert_eq!(t.stats().connections_lost, 0);

    // New associations still work afterwards, alongside the old session.
    let (mut s2, mut t2) = connect(&a, &b).await;
    exchange(&mut s2, &mut t2, &mut r).await;
    exchange(&mut s, &mut t, &mut r).await;
    assert_eq!(b.session_count(), 2);
}

// ----------------------------------------------------------------- forged re-association

fn forged_reassoc(session: SessionId, epoch: Epoch, r: &mut ChaCha8Rng) -> Vec<u8> {
    Frame::Reassoc(Reassoc {
        session,
        epoch,
        endpoint: EndpointId(r.gen()),
        contact: "127.0.0.66:6666".parse().unwrap(),
        eph: r.gen(),
        nonce: r.gen(),
        recv: Offset(0),
        mac: r.gen(),
    })
    .to_bytes()
    .to_vec()
}

/// A well-formed `Reassoc` for `session`, signed with a key of its own: an in-memory association
/// that reused the session id.
fn reassoc_under_wrong_key(session: SessionId, r: &mut ChaCha8Rng) -> Vec<u8> {
    let now = std::time::Instant::now();
    let me = LocalInfo {
        endpoint: EndpointId(r.gen()),
        contact: "127.0.0.66:6666".parse().unwrap(),
    };
    let entropy = |r: &mut ChaCha8Rng| Entropy {
        secret: r.gen(),
        nonce: r.gen(),
    };
    let (_dialing, hello) = Associating::new(me, &entropy(r));
    let Frame::Hello(hello) = hello else {
        unreachable!("Associating::new returns a Hello")
    };
    let (mut fake, _welcome) = Session::accept_hello(
        now,
        ConnId(1),
        &hello,
        session,
        me,
        &entropy(r),
        SessionConfig::default(),
    )
    .unwrap();
    let f = fake.start_reassoc(now, ConnId(2), &entropy(r));
    assert!(matches!(&f, Frame::Reassoc(x) if x.session == session && x.epoch == Epoch(0)));
    f.to_bytes().to_vec()
}

#[tokio::test]
async fn forged_reassociation_is_refused_with_bad_proof() {
    let mut r = rng(4);
    let (a, b, mut s, mut t) = pair(30, 31).await;
    exchange(&mut s, &mut t, &mut r).await;
    let id = s.session_id();
    let epoch = s.epoch();
    let peer_of_t = t.peer();

    let attacks = [
        ("random mac", forged_reassoc(id, epoch, &mut r)),
        (
            "random mac, next epoch",
            forged_reassoc(id, epoch.next(), &mut r),
        ),
        (
            "random mac, far epoch",
            forged_reassoc(id, Epoch(u64::MAX), &mut r),
        ),
        ("wrong key", reassoc_under_wrong_key(id, &mut r)),
    ];
    for (what, bytes) in &attacks {
        // Against both ends: each endpoint accepts re-associations for the session.
        for ep in [&b, &a] {
            let before = ep.stats().handshakes_rejected;
            let (reply, mut raw) = raw_request(ep.local_addr(), bytes).await;
            assert_eq!(reply, Frame::Refuse(RefuseReason::BadProof), "{what}");
            assert_closed(&mut raw).await;
            eventually(what, || ep.stats().handshakes_rejected == before + 1).await;
            assert_eq!(s.epoch(), epoch, "{what}");
            assert_eq!(t.epoch(), epoch, "{what}");
            assert_eq!(t.peer(), peer_of_t, "{what}: no redirect");
            exchange(&mut s, &mut t, &mut r).await;
        }
    }
    // A re-association for a session nobody has.
    let mut other = [0u8; 16];
    r.fill_bytes(&mut other);
    let (reply, _raw) = raw_request(
        b.local_addr(),
        &forged_reassoc(SessionId(other), epoch, &mut r),
    )
    .await;
    assert_eq!(reply, Frame::Refuse(RefuseReason::UnknownSession));

    assert_eq!(b.stats().reassociations_accepted, 0);
    assert_eq!(a.stats().reassociations_accepted, 0);
    assert_eq!(s.stats().reassociations, 0);
    assert_eq!(t.stats().connections_lost, 0);
    exchange(&mut s, &mut t, &mut r).await;
}

// ------------------------------------------------------------------- replayed re-association

/// A TCP proxy that forwards every connection to `upstream` and reports the first frame each
/// connection sent upstream (as raw bytes).
fn recording_proxy(
    listener: TcpListener,
    upstream: SocketAddr,
) -> mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let tx = tx.clone();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                let _ = cw.shutdown().await;
            });
            tokio::spawn(async move {
                let mut recorded: Option<Vec<u8>> = Some(Vec::new());
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(rec) = recorded.as_mut() {
                        rec.extend_from_slice(&buf[..n]);
                        if rec.len() >= HEADER_LEN {
                            let len = (&rec[1..5]).get_u32() as usize;
                            if rec.len() >= HEADER_LEN + len {
                                rec.truncate(HEADER_LEN + len);
                                let _ = tx.send(recorded.take().unwrap_or_default());
                            }
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
            });
        }
    });
    rx
}

#[tokio::test]
async fn replayed_reassociation_is_refused_and_does_not_redirect() {
    let mut r = rng(5);
    // The peer endpoint advertises the proxy as its contact; the proxy needs the endpoint's
    // address, so it is bound first and started after.
    let proxy = TcpListener::bind(host(40)).await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let mut cfg = EndpointConfig::default();
    cfg.contact = Some(proxy_addr);
    let b = Endpoint::bind_with(host(41), cfg).await.unwrap();
    let mut first_frames = recording_proxy(proxy, b.local_addr());
    let a = Endpoint::bind(host(42)).await.unwrap();
    let (mut s, mut t) = connect(&a, &b).await;
    assert_eq!(s.peer().contact, proxy_addr);
    exchange(&mut s, &mut t, &mut r).await;

    // Migrate s to c: the re-association passes through the proxy, which records it.
    let image = within("freeze", s.freeze()).await.unwrap();
    let c = Endpoint::bind(host(43)).await.unwrap();
    let mut s = within("thaw", c.thaw(image)).await.unwrap();
    let captured = within("captured Reassoc", first_frames.recv())
        .await
        .unwrap();
    let Frame::Reassoc(genuine) = Frame::decode_exact(&captured).unwrap() else {
        panic!("first frame of the thawed connection is not a Reassoc")
    };
    assert_eq!(genuine.session, s.session_id());
    assert_eq!(genuine.epoch, Epoch(0));
    // Data flowing both ways means the peer has confirmed the re-association.
    exchange(&mut s, &mut t, &mut r).await;
    assert_eq!(t.epoch(), Epoch(1));
    assert_eq!(b.stats().reassociations_accepted, 1);
    let peer_of_t = t.peer();
    assert_eq!(peer_of_t.contact, c.contact_addr());

    // Replay it, directly and through the proxy, several times.
    for to in [b.local_addr(), proxy_addr, b.local_addr()] {
        let before = b.stats().handshakes_rejected;
        let (reply, mut raw) = raw_request(to, &captured).await;
        assert_eq!(reply, Frame::Refuse(RefuseReason::StaleEpoch));
        assert_closed(&mut raw).await;
        eventually("rejection counted", || {
            b.stats().handshakes_rejected == before + 1
        })
        .await;
        assert_eq!(t.epoch(), Epoch(1));
        assert_eq!(s.epoch(), Epoch(1));
        assert_eq!(t.peer(), peer_of_t, "no redirect");
        assert_eq!(b.stats().reassociations_accepted, 1);
        exchange(&mut s, &mut t, &mut r).await;
    }
    // The replayed request, with the whole rest of the genuine connection's first bytes
    // appended, is refused just the same.
    let mut with_tail = captured.clone();
    with_tail.extend_from_slice(&Frame::Ping.to_bytes());
    let (reply, _raw) = raw_request(b.local_addr(), &with_tail).await;
    assert_eq!(reply, Frame::Refuse(RefuseReason::StaleEpoch));
    exchange(&mut s, &mut t, &mut r).await;
}

// ------------------------------------------------------------------------- thawing twice

#[tokio::test]
async fn double_thaw_of_one_image_is_refused_as_stale() {
    let mut r = rng(6);
    let (_a, b, mut s, mut t) = pair(50, 51).await;
    exchange(&mut s, &mut t, &mut r).await;
    let bytes = within("freeze", s.freeze()).await.unwrap().to_bytes();

    let c = Endpoint::bind(host(52)).await.unwrap();
    let mut s = within(
        "thaw on c",
        c.thaw(StreamImage::from_bytes(&bytes).unwrap()),
    )
    .await
    .unwrap();
    exchange(&mut s, &mut t, &mut r).await;

    let mut cfg = EndpointConfig::default();
    cfg.session.session_timeout = Duration::from_secs(3);
    let d = Endpoint::bind_with(host(53), cfg).await.unwrap();
    let rejected = b.stats().handshakes_rejected;
    let got = within(
        "thaw on d",
        d.thaw(StreamImage::from_bytes(&bytes).unwrap()),
    )
    .await;
    assert!(
        matches!(got, Err(ThawError::Refused(RefuseReason::StaleEpoch))),
        "second thaw must be refused as stale, got {got:?}"
    );
    drop(got);
    eventually("rejection counted", || {
        b.stats().handshakes_rejected == rejected + 1
    })
    .await;
    eventually("d let go of the session", || d.session_count() == 0).await;
    // No fork: t still talks to c, at the same epoch.
    assert_eq!(t.peer().contact, c.contact_addr());
    assert_eq!(t.epoch(), Epoch(1));
    exchange(&mut s, &mut t, &mut r).await;
    exchange(&mut s, &mut t, &mut r).await;
}

#[tokio::test]
async fn thaw_where_the_session_already_runs_is_refused_locally() {
    let mut r = rng(7);
    let (_a, b, mut s, mut t) = pair(55, 56).await;
    exchange(&mut s, &mut t, &mut r).await;
    let id = s.session_id();
    let bytes = within("freeze", s.freeze()).await.unwrap().to_bytes();
    let image = || StreamImage::from_bytes(&bytes).unwrap();

    // The peer's own endpoint hosts the session (its other end).
    let got = b.thaw(image()).await;
    assert!(
        matches!(got, Err(ThawError::AlreadyRunning(x)) if x == id),
        "{got:?}"
    );

    let c = Endpoint::bind(host(57)).await.unwrap();
    let mut s = within("thaw on c", c.thaw(image())).await.unwrap();
    // Thawed here already.
    let got = c.thaw(image()).await;
    assert!(
        matches!(got, Err(ThawError::AlreadyRunning(x)) if x == id),
        "{got:?}"
    );
    assert_eq!(c.session_count(), 1);
    assert_eq!(b.session_count(), 1);
    exchange(&mut s, &mut t, &mut r).await;
    // Data both ways: the peer confirmed the one genuine re-association.
    assert_eq!(t.epoch(), Epoch(1));
}

// --------------------------------------------------------------------- bad connect targets

/// Serve raw TCP on a fresh loopback host: run `serve` on each accepted connection.
async fn raw_server<F, Fut>(n: u8, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind(host(n)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

#[tokio::test]
async fn connect_to_a_closed_port_is_an_io_error() {
    let l = TcpListener::bind(host(60)).await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let a = Endpoint::bind(host(61)).await.unwrap();
    let got = within("connect", a.connect(addr)).await;
    assert!(
        matches!(&got, Err(ConnectError::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused),
        "{got:?}"
    );
}

#[tokio::test]
async fn connect_to_a_server_speaking_another_protocol_is_a_frame_error() {
    let addr = raw_server(62, |mut tcp| async move {
        let _ = tcp.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        let mut sink = [0u8; 1024];
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let a = Endpoint::bind(host(63)).await.unwrap();
    let got = within("connect", a.connect(addr)).await;
    assert!(
        matches!(got, Err(ConnectError::Frame(FrameError::UnknownType(b'S')))),
        "{got:?}"
    );
    // An endless stream of bytes that looks like the start of a frame is cut off, not buffered.
    let addr = raw_server(64, |mut tcp| async move {
        let mut header = vec![kind::WELCOME];
        header.extend_from_slice(&1_000_000u32.to_be_bytes());
        let _ = tcp.write_all(&header).await;
        let junk = vec![0u8; 64 * 1024];
        for _ in 0..16 {
            if tcp.write_all(&junk).await.is_err() {
                return;
            }
        }
    })
    .await;
    let got = within("connect", a.connect(addr)).await;
    assert!(
        matches!(got, Err(ConnectError::Frame(FrameError::TooLong(_)))),
        "{got:?}"
    );
    assert_eq!(a.session_count(), 0);
}

#[tokio::test]
async fn connect_to_a_silent_server_times_out() {
    let (hold_tx, mut hold_rx) = mpsc::unbounded_channel::<TcpStream>();
    let addr = raw_server(65, move |tcp| {
        // Keep the connection open, say nothing.
        let _ = hold_tx.send(tcp);
        async {}
    })
    .await;
    let mut cfg = EndpointConfig::default();
    cfg.handshake_timeout = Duration::from_millis(300);
    let a = Endpoint::bind_with(host(66), cfg).await.unwrap();
    let got = within("connect", a.connect(addr)).await;
    assert!(
        matches!(got, Err(ConnectError::TimedOut(d)) if d == Duration::from_millis(300)),
        "{got:?}"
    );
    assert!(
        hold_rx.try_recv().is_ok(),
        "the silent server saw the connection"
    );
}

#[tokio::test]
async fn connect_to_a_server_that_refuses_or_cannot_prove_the_key_is_a_handshake_error() {
    use roam::error::HandshakeError;
    let a = Endpoint::bind(host(67)).await.unwrap();

    // Answers every Hello with Refuse(Busy).
    let addr = raw_server(68, |mut tcp| async move {
        let mut buf = BytesMut::new();
        while Frame::decode(&mut buf).ok().flatten().is_none() {
            if !matches!(tcp.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
        }
        let _ = tcp
            .write_all(&Frame::Refuse(RefuseReason::Busy).to_bytes())
            .await;
    })
    .await;
    let got = within("connect", a.connect(addr)).await;
    assert!(
        matches!(
            got,
            Err(ConnectError::Handshake(HandshakeError::Refused(
                RefuseReason::Busy
            )))
        ),
        "{got:?}"
    );

    // Answers with a Welcome under a key it does not have (a man in the middle without keys).
    let addr = raw_server(69, |mut tcp| async move {
        let mut buf = BytesMut::new();
        let hello = loop {
            match Frame::decode(&mut buf) {
                Ok(Some(Frame::Hello(h))) => break h,
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => {}
            }
            if !matches!(tcp.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
        };
        let me = LocalInfo {
            endpoint: EndpointId([1; 16]),
            contact: "127.0.0.69:1".parse().unwrap(),
        };
        let (_, welcome) = Session::accept_hello(
            std::time::Instant::now(),
            ConnId(1),
            &hello,
            SessionId([2; 16]),
            me,
            &Entropy {
                secret: [3; 32],
                nonce: [4; 16],
            },
            SessionConfig::default(),
        )
        .unwrap();
        let Frame::Welcome(mut w) = welcome else {
            return;
        };
        w.mac[0] ^= 1;
        let _ = tcp.write_all(&Frame::Welcome(w).to_bytes()).await;
        let mut sink = [0u8; 64];
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let got = within("connect", a.connect(addr)).await;
    assert!(
        matches!(got, Err(ConnectError::Handshake(HandshakeError::BadProof))),
        "{got:?}"
    );

    // Closes at once.
    let addr = raw_server(70, |tcp| async move { drop(tcp) }).await;
    let got = within("connect", a.connect(addr)).await;
    assert!(
        matches!(&got, Err(ConnectError::Io(e)) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)),
        "{got:?}"
    );
    assert_eq!(a.session_count(), 0);
    assert_eq!(a.stats().associations, 0);

    // And the endpoint still associates with a real peer.
    let b = Endpoint::bind(host(71)).await.unwrap();
    let (mut s, mut t) = connect(&a, &b).await;
    exchange(&mut s, &mut t, &mut rng(8)).await;
}

/// Regression: a refused thaw used to leave its session id registered until the driver task
/// next ran, so retrying at once (on a multi-threaded runtime) reported `AlreadyRunning`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_image_thawed_repeatedly_is_refused_every_time_then_the_real_one_thaws() {
    let mut r = rng(9);
    let (_a, b, mut s, mut t) = pair(80, 81).await;
    exchange(&mut s, &mut t, &mut r).await;
    let bytes = within("freeze", s.freeze()).await.unwrap().to_bytes();
    let mut forged = bytes.clone();
    forged[IMG_KEY + 31] ^= 0x01;
    reseal(&mut forged);
    let c = Endpoint::bind(host(82)).await.unwrap();
    for i in 0..100 {
        let got = within(
            "thaw forged",
            c.thaw(StreamImage::from_bytes(&forged).unwrap()),
        )
        .await;
        assert!(
            matches!(got, Err(ThawError::Refused(RefuseReason::BadProof))),
            "attempt {i}: {got:?}"
        );
        assert_eq!(c.session_count(), 0, "attempt {i}");
    }
    let mut s = within("thaw", c.thaw(StreamImage::from_bytes(&bytes).unwrap()))
        .await
        .unwrap();
    exchange(&mut s, &mut t, &mut r).await;
    assert_eq!(t.epoch(), Epoch(1));
    assert_eq!(b.stats().reassociations_accepted, 1);
}
