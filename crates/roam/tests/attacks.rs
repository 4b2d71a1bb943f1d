//! Attacks by an in-path adversary on stream sessions (issue 5, PROTOCOL.md §3.1, §5.1, §7.1,
//! §9). Each test is named after the attack it shows.
//!
//! Most tests put a `roam_testkit::Mitm` between the two endpoints: it sees every byte and can
//! drop, replay, modify and inject frames. The listener advertises the relay as its contact
//! address, so re-associations go through it too. Data is random and checked with SHA-256 at
//! the receiver: a session either delivers exactly the bytes written, or fails cleanly.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roam::proto::frame::{kind, HEADER_LEN};
use roam::{
    ConnectError, Endpoint, EndpointConfig, Identity, ImageError, PeerPolicy, PreSharedKey,
    RefuseReason, SealImage, Stream, StreamImage, Suite, ThawError,
};
use roam_testkit::{Dir, Mitm, Verdict};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{host, random_bytes, sha, transfer, within};

/// A 32-byte marker that must never appear on the wire in clear.
fn marker() -> [u8; 32] {
    Sha256::digest(b"roam attacks.rs: payload marker").into()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Endpoints `a` (dialer) and `b` (listener, reachable only through `mitm`), and the stream
/// pair `s` (at `a`) / `t` (at `b`).
struct Setup {
    a: Endpoint,
    b: Endpoint,
    mitm: Mitm,
    s: Stream,
    t: Stream,
}

async fn through_mitm(mut ca: EndpointConfig, mut cb: EndpointConfig) -> Setup {
    let mitm = Mitm::bind(host(9)).await.unwrap();
    cb.contact = Some(mitm.local_addr());
    let b = Endpoint::bind_with(host(3), cb).await.unwrap();
    mitm.set_target(b.local_addr());
    ca.contact = None;
    let a = Endpoint::bind_with(host(2), ca).await.unwrap();
    let s = within("connect", a.connect(mitm.local_addr()))
        .await
        .unwrap();
    let t = within("accept", b.accept()).await.unwrap();
    Setup { a, b, mitm, s, t }
}

/// Data with the marker inside every 4 KiB.
fn marked(seed: u64, n: usize) -> Vec<u8> {
    let mut v = random_bytes(seed, n);
    let m = marker();
    for off in (0..n.saturating_sub(32)).step_by(4096) {
        v[off..off + 32].copy_from_slice(&m);
    }
    v
}

fn frame_type(frame: &[u8]) -> u8 {
    frame[0]
}

#[tokio::test]
async fn eavesdropper_never_sees_payload_bytes_in_clear() {
    let mut x = through_mitm(EndpointConfig::default(), EndpointConfig::default()).await;
    assert!(x.s.is_secure() && x.t.is_secure());
    let up = marked(1, 512 * 1024);
    let down = marked(2, 512 * 1024);
    assert_eq!(transfer(&mut x.s, &mut x.t, &up).await, sha(&up));
    assert_eq!(transfer(&mut x.t, &mut x.s, &down).await, sha(&down));
    let m = marker();
    let (cu, cd) = (x.mitm.captured(Dir::Up), x.mitm.captured(Dir::Down));
    assert!(cu.len() > 512 * 1024 && cd.len() > 512 * 1024);
    assert!(!contains(&cu, &m), "marker in clear, client to server");
    assert!(!contains(&cd, &m), "marker in clear, server to client");
    // After the handshake every frame on the wire is sealed.
    for (_, _, f) in x.mitm.frames() {
        let t = frame_type(&f);
        assert!(
            t == kind::SEALED || t <= kind::MOVED,
            "unsealed frame type {t:#04x} after the handshake"
        );
    }
    drop(x.a);
    drop(x.b);
}

#[tokio::test]
async fn eavesdropper_reads_everything_in_insecure_plaintext_mode() {
    // The control for the test above: the harness does see payload bytes when they are clear.
    let mut ca = EndpointConfig::default();
    ca.insecure_plaintext = true;
    let cb = ca.clone();
    let mut x = through_mitm(ca, cb).await;
    assert!(!x.s.is_secure());
    let up = marked(3, 64 * 1024);
    assert_eq!(transfer(&mut x.s, &mut x.t, &up).await, sha(&up));
    assert!(contains(&x.mitm.captured(Dir::Up), &marker()));
}

/// A hook that applies `f` to the `nth` sealed frame in direction `dir` on connection 0, once.
fn once_on_sealed(
    dir: Dir,
    nth: u64,
    f: impl Fn(&[u8]) -> Verdict + Send + Sync + 'static,
) -> impl Fn(&roam_testkit::FrameEvent<'_>) -> Verdict + Send + Sync + 'static {
    let seen = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    move |e| {
        if e.dir != dir || e.conn != 0 || frame_type(e.frame) != kind::SEALED {
            return Verdict::Forward;
        }
        if seen.fetch_add(1, Ordering::Relaxed) == nth && !done.swap(true, Ordering::Relaxed) {
            return f(e.frame);
        }
        Verdict::Forward
    }
}

#[tokio::test]
async fn tampered_payload_bit_flip_is_detected_and_the_stream_survives_byte_exact() {
    let mut x = through_mitm(EndpointConfig::default(), EndpointConfig::default()).await;
    x.mitm.set_hook(once_on_sealed(Dir::Up, 20, |f| {
        let mut f = f.to_vec();
        let i = f.len() / 2;
        f[i] ^= 0x10;
        Verdict::Replace(f)
    }));
    let data = random_bytes(4, 4 << 20);
    assert_eq!(transfer(&mut x.s, &mut x.t, &data).await, sha(&data));
    let st = x.t.stats();
    assert_eq!(st.auth_failures, 1, "the altered frame was detected once");
    assert!(st.reassociations >= 1, "the session redialed: {st:?}");
    assert!(x.mitm.connections() >= 2);
    // And the other direction still works.
    let back = random_bytes(5, 256 * 1024);
    assert_eq!(transfer(&mut x.t, &mut x.s, &back).await, sha(&back));
}

#[tokio::test]
async fn tampered_frame_header_length_is_detected_and_the_stream_survives() {
    let mut x = through_mitm(EndpointConfig::default(), EndpointConfig::default()).await;
    // Rewrite the clear header: claim a shorter frame (the rest becomes the next "frame").
    x.mitm.set_hook(once_on_sealed(Dir::Down, 3, |f| {
        let mut f = f.to_vec();
        let len = u32::from_be_bytes([f[1], f[2], f[3], f[4]]) - 1;
        f[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        Verdict::Replace(f)
    }));
    let data = random_bytes(6, 2 << 20);
    assert_eq!(transfer(&mut x.t, &mut x.s, &data).await, sha(&data));
    assert!(x.s.stats().auth_failures >= 1 || x.s.stats().connections_lost >= 1);
}

#[tokio::test]
async fn replayed_data_frame_is_refused_and_the_stream_survives_byte_exact() {
    let mut x = through_mitm(EndpointConfig::default(), EndpointConfig::default()).await;
    x.mitm
        .set_hook(once_on_sealed(Dir::Up, 10, |_| Verdict::Duplicate));
    let data = random_bytes(7, 4 << 20);
    assert_eq!(transfer(&mut x.s, &mut x.t, &data).await, sha(&data));
    let st = x.t.stats();
    assert_eq!(
        st.auth_failures, 1,
        "the replayed frame failed authentication"
    );
    assert!(st.reassociations >= 1);
}

#[tokio::test]
async fn dropped_data_frame_is_detected_and_the_stream_survives_byte_exact() {
    let mut x = through_mitm(EndpointConfig::default(), EndpointConfig::default()).await;
    x.mitm
        .set_hook(once_on_sealed(Dir::Up, 10, |_| Verdict::Drop));
    let data = random_bytes(8, 4 << 20);
    assert_eq!(transfer(&mut x.s, &mut x.t, &data).await, sha(&data));
    // The frame after the dropped one carries the wrong counter: it fails authentication.
    assert_eq!(x.t.stats().auth_failures, 1);
}

#[tokio::test]
async fn injected_forged_frames_are_detected_and_the_stream_survives_byte_exact() {
    let mut x = through_mitm(EndpointConfig::default(), EndpointConfig::default()).await;
    let warm = random_bytes(9, 64 * 1024);
    assert_eq!(transfer(&mut x.s, &mut x.t, &warm).await, sha(&warm));
    // A sealed frame of random bytes, then (on the next connection) a plaintext Data frame.
    let mut forged = vec![kind::SEALED, 0, 0, 0, 64];
    forged.extend_from_slice(&random_bytes(10, 64));
    assert!(x.mitm.inject(0, Dir::Up, forged));
    let data = random_bytes(11, 1 << 20);
    assert_eq!(transfer(&mut x.s, &mut x.t, &data).await, sha(&data));
    assert_eq!(x.t.stats().auth_failures, 1);
    let conn = x.mitm.connections() - 1;
    let mut plain = roam::proto::frame::data_header(
        roam::proto::Offset(x.t.stats().bytes_read),
        roam::proto::Offset(0),
        roam::proto::Offset(0),
        4,
    )
    .to_vec();
    plain.extend_from_slice(b"evil");
    assert!(x.mitm.inject(conn, Dir::Up, plain));
    let more = random_bytes(12, 1 << 20);
    assert_eq!(transfer(&mut x.s, &mut x.t, &more).await, sha(&more));
    assert!(x.t.stats().connections_lost >= 1);
}

/// Read one frame from a raw connection (the reply to a handshake frame).
async fn read_reply(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut hdr = [0u8; HEADER_LEN];
    tcp.read_exact(&mut hdr).await.ok()?;
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    let mut body = vec![0u8; len.min(4096)];
    tcp.read_exact(&mut body).await.ok()?;
    let mut f = hdr.to_vec();
    f.extend_from_slice(&body);
    Some(f)
}

async fn send_raw(to: SocketAddr, frames: &[&[u8]]) -> Option<Vec<u8>> {
    let mut tcp = TcpStream::connect(to).await.ok()?;
    for f in frames {
        tcp.write_all(f).await.ok()?;
    }
    within("reply", read_reply(&mut tcp)).await
}

#[tokio::test]
async fn replayed_and_forged_reassociations_are_refused() {
    let mut x = through_mitm(EndpointConfig::default(), EndpointConfig::default()).await;
    let d1 = random_bytes(13, 128 * 1024);
    assert_eq!(transfer(&mut x.s, &mut x.t, &d1).await, sha(&d1));
    // A planned migration through the relay: the attacker records the Reassoc and Confirm.
    let image = within("freeze", x.s.freeze()).await.unwrap();
    let c = Endpoint::bind(host(4)).await.unwrap();
    let mut s = within("thaw", c.thaw(image)).await.unwrap();
    // The thaw returns at the Accept; its Confirm follows on the wire.
    within("the Confirm", async {
        while !x
            .mitm
            .frames()
            .iter()
            .any(|(d, conn, f)| *d == Dir::Up && *conn > 0 && f[0] == kind::CONFIRM)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let frames = x.mitm.frames();
    let reassoc = frames
        .iter()
        .find(|(d, _, f)| *d == Dir::Up && frame_type(f) == kind::REASSOC)
        .map(|(_, conn, f)| (*conn, f.clone()))
        .expect("a Reassoc went through the relay");
    let confirm = frames
        .iter()
        .find(|(d, conn, f)| *d == Dir::Up && *conn == reassoc.0 && frame_type(f) == kind::CONFIRM)
        .map(|(_, _, f)| f.clone())
        .expect("its Confirm");
    let epoch = x.t.epoch();
    // Replay: Reassoc (and its Confirm) again, straight to the listener.
    let reply = send_raw(x.b.local_addr(), &[&reassoc.1, &confirm])
        .await
        .expect("a reply");
    assert_eq!(
        frame_type(&reply),
        kind::REFUSE,
        "replayed Reassoc was not refused"
    );
    assert_eq!(reply[HEADER_LEN], 2, "refused as a stale epoch");
    // Forgery: the session id (in clear in the Reassoc) with a made-up proof, at the current
    // epoch.
    let mut forged = reassoc.1.clone();
    let epoch_at = HEADER_LEN + 6 + 16;
    forged[epoch_at..epoch_at + 8].copy_from_slice(&epoch.0.to_be_bytes());
    let n = forged.len();
    forged[n - 32..].copy_from_slice(&[0x55; 32]);
    let reply = send_raw(x.b.local_addr(), &[&forged])
        .await
        .expect("a reply");
    assert_eq!(frame_type(&reply), kind::REFUSE);
    assert_eq!(reply[HEADER_LEN], 3, "refused as a bad proof");
    assert_eq!(x.t.epoch(), epoch, "the session did not move");
    // The genuine session carries on, byte-exact.
    let d2 = random_bytes(14, 256 * 1024);
    assert_eq!(transfer(&mut s, &mut x.t, &d2).await, sha(&d2));
    assert_eq!(transfer(&mut x.t, &mut s, &d2).await, sha(&d2));
}

#[tokio::test]
async fn stolen_sealed_image_cannot_be_thawed_without_the_destination_key() {
    let mut cfg_c = EndpointConfig::default();
    cfg_c.identity = Some(Identity::from_secret_bytes(
        random_bytes(20, 32).try_into().unwrap(),
    ));
    let mut cfg_d = EndpointConfig::default();
    cfg_d.identity = Some(Identity::from_secret_bytes(
        random_bytes(21, 32).try_into().unwrap(),
    ));
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let mut s = within("connect", a.connect(b.local_addr())).await.unwrap();
    let mut t = within("accept", b.accept()).await.unwrap();
    let warm = random_bytes(22, 4096);
    assert_eq!(transfer(&mut s, &mut t, &warm).await, sha(&warm));
    // Bytes in flight towards the freezing side land in its image (unread input).
    t.write_all(&marked(23, 8192)).await.unwrap();
    t.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let image = within("freeze", s.freeze()).await.unwrap();
    assert!(image.buffered_input_bytes() > 0);
    assert!(
        contains(&image.to_bytes(), &marker()),
        "the plain image holds the input"
    );
    let c = Endpoint::bind_with(host(4), cfg_c).await.unwrap();
    let d = Endpoint::bind_with(host(5), cfg_d).await.unwrap();
    let sealed = image.seal(&c.public_key().unwrap());
    assert!(
        !contains(&sealed, &marker()),
        "a sealed image discloses nothing"
    );
    // The thief: another identity, no identity, a plain decoder, an altered copy.
    assert!(matches!(
        d.thaw_sealed(&sealed).await,
        Err(ThawError::Image(ImageError::WrongRecipient(_)))
    ));
    let plain = Endpoint::bind(host(6)).await.unwrap();
    assert!(matches!(
        plain.thaw_sealed(&sealed).await,
        Err(ThawError::Image(ImageError::NoIdentity))
    ));
    assert_eq!(StreamImage::from_bytes(&sealed), Err(ImageError::Sealed));
    let mut altered = sealed.clone();
    let i = altered.len() / 2;
    altered[i] ^= 1;
    assert!(matches!(
        c.thaw_sealed(&altered).await,
        Err(ThawError::Image(ImageError::Tampered))
    ));
    // Re-addressed to the thief: the recipient is authenticated.
    let mut readdressed = sealed.clone();
    readdressed[10..42].copy_from_slice(&d.public_key().unwrap().0);
    assert!(matches!(
        d.thaw_sealed(&readdressed).await,
        Err(ThawError::Image(ImageError::Tampered))
    ));
    // The destination thaws it, and nothing was lost.
    let mut s = within("thaw", c.thaw_sealed(&sealed)).await.unwrap();
    let mut got = vec![0u8; 8192];
    within("read", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, marked(23, 8192));
    let d2 = random_bytes(24, 64 * 1024);
    assert_eq!(transfer(&mut s, &mut t, &d2).await, sha(&d2));
}

fn identity(seed: u64) -> Identity {
    Identity::from_secret_bytes(random_bytes(seed, 32).try_into().unwrap())
}

#[tokio::test]
async fn unpinned_peer_is_refused_and_pinned_peer_is_accepted() {
    let (ia, ib, other) = (identity(30), identity(31), identity(32));
    // b pins a key that is not a's.
    let mut cb = EndpointConfig::default();
    cb.identity = Some(ib.clone());
    cb.peer_policy = PeerPolicy::Pinned(vec![other.public_key()]);
    let b = Endpoint::bind_with(host(3), cb.clone()).await.unwrap();
    let mut ca = EndpointConfig::default();
    ca.identity = Some(ia.clone());
    let a = Endpoint::bind_with(host(2), ca.clone()).await.unwrap();
    let r = within("connect", a.connect(b.local_addr())).await;
    assert!(
        matches!(
            r,
            Err(ConnectError::Handshake(
                roam::error::HandshakeError::Refused(RefuseReason::Unauthorized)
            ))
        ),
        "{r:?}"
    );
    // a pins a key that is not b's: refused on a's side.
    let mut ca2 = ca.clone();
    ca2.peer_policy = PeerPolicy::Pinned(vec![other.public_key()]);
    let mut cb2 = EndpointConfig::default();
    cb2.identity = Some(ib.clone());
    let b2 = Endpoint::bind_with(host(4), cb2).await.unwrap();
    let a2 = Endpoint::bind_with(host(2), ca2).await.unwrap();
    let r = within("connect", a2.connect(b2.local_addr())).await;
    assert!(
        matches!(
            r,
            Err(ConnectError::Handshake(
                roam::error::HandshakeError::Unauthorized
            ))
        ),
        "{r:?}"
    );
    // Both pinned: accepted, and each sees the other's proven key.
    let mut cb3 = EndpointConfig::default();
    cb3.identity = Some(ib.clone());
    cb3.peer_policy = PeerPolicy::Pinned(vec![ia.public_key()]);
    let mut ca3 = EndpointConfig::default();
    ca3.identity = Some(ia.clone());
    ca3.peer_policy = PeerPolicy::Pinned(vec![ib.public_key()]);
    let b3 = Endpoint::bind_with(host(5), cb3).await.unwrap();
    let a3 = Endpoint::bind_with(host(2), ca3).await.unwrap();
    let mut s = within("connect", a3.connect(b3.local_addr()))
        .await
        .unwrap();
    let mut t = within("accept", b3.accept()).await.unwrap();
    assert_eq!(s.peer_identity(), Some(ib.public_key()));
    assert_eq!(t.peer_identity(), Some(ia.public_key()));
    let d = random_bytes(33, 64 * 1024);
    assert_eq!(transfer(&mut s, &mut t, &d).await, sha(&d));
}

#[tokio::test]
async fn impostor_presenting_a_pinned_key_without_its_secret_is_refused() {
    use roam::proto::{Associating, EndpointId, Entropy, Frame, LocalInfo, Security};
    let victim = identity(40);
    let mut cb = EndpointConfig::default();
    cb.peer_policy = PeerPolicy::Pinned(vec![victim.public_key()]);
    let b = Endpoint::bind_with(host(3), cb).await.unwrap();
    // The impostor has its own secret but announces the victim's public key.
    let me = LocalInfo {
        endpoint: EndpointId([7; 16]),
        contact: "127.0.0.8:1".parse().unwrap(),
    };
    let ent = Entropy {
        secret: [1; 32],
        nonce: [2; 16],
    };
    let sec = Security::new().with_identity(identity(41));
    let (_assoc, hello) = Associating::with_security(me, &ent, &sec);
    let Frame::Hello(mut hello) = hello else {
        unreachable!()
    };
    hello.identity = Some(victim.public_key());
    let mut tcp = TcpStream::connect(b.local_addr()).await.unwrap();
    tcp.write_all(&Frame::Hello(hello).to_bytes())
        .await
        .unwrap();
    let welcome = within("welcome", read_reply(&mut tcp)).await.unwrap();
    assert_eq!(frame_type(&welcome), kind::WELCOME);
    // It cannot compute k_0 (it lacks the victim's secret): any confirmation is wrong.
    let confirm = Frame::Confirm(roam::proto::frame::Confirm { mac: [9; 32] });
    tcp.write_all(&confirm.to_bytes()).await.unwrap();
    let mut buf = [0u8; 1];
    let r = within("close", tcp.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "connection closed");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.accept())
            .await
            .is_err(),
        "no stream was handed to the application"
    );
    assert!(b.stats().handshakes_rejected >= 1);
}

#[tokio::test]
async fn trust_on_first_use_is_the_default_and_pre_shared_keys_must_match() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let mut s = within("connect", a.connect(b.local_addr())).await.unwrap();
    let mut t = within("accept", b.accept()).await.unwrap();
    assert!(s.is_secure() && s.peer_identity().is_none() && t.peer_identity().is_none());
    let d = random_bytes(50, 32 * 1024);
    assert_eq!(transfer(&mut s, &mut t, &d).await, sha(&d));
    let psk = |b: u8| {
        let mut c = EndpointConfig::default();
        c.peer_policy = PeerPolicy::PreShared(PreSharedKey([b; 32]));
        c
    };
    let b1 = Endpoint::bind_with(host(4), psk(1)).await.unwrap();
    let a1 = Endpoint::bind_with(host(2), psk(2)).await.unwrap();
    let r = within("connect", a1.connect(b1.local_addr())).await;
    assert!(
        matches!(
            r,
            Err(ConnectError::Handshake(
                roam::error::HandshakeError::BadProof
            ))
        ),
        "{r:?}"
    );
    let a0 = Endpoint::bind(host(2)).await.unwrap();
    let r = within("connect", a0.connect(b1.local_addr())).await;
    assert!(
        matches!(
            r,
            Err(ConnectError::Handshake(
                roam::error::HandshakeError::Refused(RefuseReason::Unauthorized)
            ))
        ),
        "{r:?}"
    );
    let a2 = Endpoint::bind_with(host(2), psk(1)).await.unwrap();
    let mut s = within("connect", a2.connect(b1.local_addr()))
        .await
        .unwrap();
    let mut t = within("accept", b1.accept()).await.unwrap();
    assert_eq!(transfer(&mut s, &mut t, &d).await, sha(&d));
}

#[tokio::test]
async fn downgrade_to_insecure_plaintext_is_refused_with_a_typed_error() {
    let mut insecure = EndpointConfig::default();
    insecure.insecure_plaintext = true;
    let b = Endpoint::bind(host(3)).await.unwrap();
    let a = Endpoint::bind_with(host(2), insecure.clone())
        .await
        .unwrap();
    let r = within("connect", a.connect(b.local_addr())).await;
    assert!(
        matches!(
            r,
            Err(ConnectError::Handshake(
                roam::error::HandshakeError::Refused(RefuseReason::SecurityMismatch)
            ))
        ),
        "{r:?}"
    );
    // An attacker flipping the flag in the Hello cannot make the listener go plaintext either:
    // the secure dialer checks the Welcome's flag (covered by the MAC).
    let mitm = Mitm::bind(host(9)).await.unwrap();
    let b2 = Endpoint::bind(host(4)).await.unwrap();
    mitm.set_target(b2.local_addr());
    mitm.set_hook(|e| {
        if e.dir == Dir::Up && frame_type(e.frame) == kind::HELLO {
            let mut f = e.frame.to_vec();
            // The flags byte follows magic, version, endpoint id, contact (v4), eph, nonce.
            let at = HEADER_LEN + 6 + 16 + 7 + 32 + 16;
            f[at] |= 1;
            return Verdict::Replace(f);
        }
        Verdict::Forward
    });
    let a2 = Endpoint::bind(host(2)).await.unwrap();
    let r = within("connect", a2.connect(mitm.local_addr())).await;
    assert!(r.is_err(), "a downgraded association must fail: {r:?}");
    // And images of the other mode are refused at thaw.
    let (ai, bi) = (
        Endpoint::bind_with(host(5), insecure.clone())
            .await
            .unwrap(),
        Endpoint::bind_with(host(6), insecure).await.unwrap(),
    );
    let s = within("connect", ai.connect(bi.local_addr()))
        .await
        .unwrap();
    let _t = within("accept", bi.accept()).await.unwrap();
    let image = within("freeze", s.freeze()).await.unwrap();
    assert!(!image.is_secure());
    assert!(matches!(
        b.thaw(image).await,
        Err(ThawError::SecurityMismatch)
    ));
}

/// The offset of a default endpoint's `Hello` flags byte (no identity): after the frame header,
/// magic, version, endpoint id, contact (v4), eph and nonce. The suite offer follows it.
const HELLO_FLAGS_AT: usize = HEADER_LEN + 6 + 16 + 7 + 32 + 16;

/// Connect a default dialer to a default listener through an attacker running `hook`.
async fn connect_through(
    hook: impl Fn(&roam_testkit::FrameEvent<'_>) -> Verdict + Send + Sync + 'static,
) -> Result<Stream, ConnectError> {
    let mitm = Mitm::bind(host(9)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    mitm.set_target(b.local_addr());
    mitm.set_hook(hook);
    let a = Endpoint::bind(host(2)).await.unwrap();
    within("connect", a.connect(mitm.local_addr())).await
}

#[tokio::test]
async fn suite_downgrade_on_the_path_is_detected() {
    // Unaltered, two default endpoints settle on AES-256-GCM through the relay.
    let s = connect_through(|_| Verdict::Forward).await.unwrap();
    assert_eq!(s.suite(), Suite::Aes256Gcm);
    let bad_proof = |r: &Result<Stream, ConnectError>| {
        matches!(
            r,
            Err(ConnectError::Handshake(
                roam::error::HandshakeError::BadProof
            ))
        )
    };
    // 1. The offer rewritten to ChaCha20-Poly1305 only (same length: [2, 1] → [1, 1]).
    let r = connect_through(|e| {
        if e.dir == Dir::Up && frame_type(e.frame) == kind::HELLO {
            let mut f = e.frame.to_vec();
            assert_eq!(&f[HELLO_FLAGS_AT + 1..], &[2, 2, 1]);
            f[HELLO_FLAGS_AT + 2] = 1;
            return Verdict::Replace(f);
        }
        Verdict::Forward
    })
    .await;
    assert!(bad_proof(&r), "{r:?}");
    // 2. The offer stripped: the Hello of a dialer from before negotiation (ChaCha20 only).
    let r = connect_through(|e| {
        if e.dir == Dir::Up && frame_type(e.frame) == kind::HELLO {
            let mut f = e.frame.to_vec();
            f.truncate(HELLO_FLAGS_AT + 1);
            f[HELLO_FLAGS_AT] &= !roam::proto::frame::flags::SUITES;
            let len = (f.len() - HEADER_LEN) as u32;
            f[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
            return Verdict::Replace(f);
        }
        Verdict::Forward
    })
    .await;
    assert!(bad_proof(&r), "{r:?}");
    // 3. The listener's choice rewritten to ChaCha20-Poly1305 (which the dialer did offer).
    let r = connect_through(|e| {
        if e.dir == Dir::Down && frame_type(e.frame) == kind::WELCOME {
            let mut f = e.frame.to_vec();
            let at = f.len() - roam::proto::frame::MAC_LEN - 1;
            assert_eq!(f[at], Suite::Aes256Gcm.code());
            f[at] = Suite::ChaCha20Poly1305.code();
            return Verdict::Replace(f);
        }
        Verdict::Forward
    })
    .await;
    assert!(bad_proof(&r), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_10000_garbage_connections_leaves_an_established_session_intact() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let mut s = within("connect", a.connect(b.local_addr())).await.unwrap();
    let mut t = within("accept", b.accept()).await.unwrap();
    let chunk = random_bytes(60, 8 << 20);
    // Throughput before the flood.
    let t0 = Instant::now();
    assert_eq!(transfer(&mut s, &mut t, &chunk).await, sha(&chunk));
    let before = chunk.len() as f64 / t0.elapsed().as_secs_f64();
    // The flood: 10,000 connections, 128 at a time, each sending garbage (or nothing, or a
    // hostile header) and closing.
    let target = b.local_addr();
    let done = Arc::new(AtomicU64::new(0));
    // The attacker is another program: its own thread and runtime, so its 128 tasks compete
    // with the endpoint for the CPUs (as they would on one machine), not for the endpoint's
    // task scheduler. It ends by itself after its 10,000 connections.
    let flood = {
        let done = done.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sem = Arc::new(tokio::sync::Semaphore::new(128));
                let mut tasks = Vec::new();
                for i in 0..10_000u32 {
                    let permit = sem.clone().acquire_owned().await.unwrap();
                    let done = done.clone();
                    tasks.push(tokio::spawn(async move {
                        if let Ok(mut tcp) = TcpStream::connect(target).await {
                            let junk: Vec<u8> = match i % 4 {
                                0 => random_bytes(u64::from(i), 64),
                                1 => vec![kind::HELLO, 0xff, 0xff, 0xff, 0xff],
                                2 => vec![kind::SEALED, 0, 0, 0, 40, 1, 2, 3],
                                _ => Vec::new(),
                            };
                            let _ = tcp.write_all(&junk).await;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        drop(permit);
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })
    };
    // Throughput during the flood (repeat transfers until the flood is over, at least one).
    let mut moved = 0usize;
    let t1 = Instant::now();
    loop {
        assert_eq!(transfer(&mut s, &mut t, &chunk).await, sha(&chunk));
        moved += chunk.len();
        if flood.is_finished() {
            break;
        }
    }
    let during = moved as f64 / t1.elapsed().as_secs_f64();
    flood.join().unwrap();
    assert_eq!(done.load(Ordering::Relaxed), 10_000);
    let ratio = during / before;
    eprintln!(
        "flood: before {:.1} MiB/s, during {:.1} MiB/s, ratio {ratio:.2}",
        before / (1 << 20) as f64,
        during / (1 << 20) as f64
    );
    // Issue 5: "within the same order of magnitude". With the attacker's tasks on the
    // endpoint's own runtime (as this test first had it) the scheduler, not roam, set the
    // figure: 0.08-0.29 depending on the suite. On its own runtime: 0.59-0.62 here.
    assert!(
        ratio > 0.1,
        "throughput during the flood fell to {ratio:.3} of before"
    );
    let st = s.stats();
    assert_eq!(
        st.connections_lost, 0,
        "the established session never noticed"
    );
    assert_eq!(t.stats().auth_failures, 0);
    // The endpoint still associates new sessions afterwards.
    let mut s2 = within("connect", a.connect(b.local_addr())).await.unwrap();
    let mut t2 = within("accept", b.accept()).await.unwrap();
    let d = random_bytes(61, 64 * 1024);
    assert_eq!(transfer(&mut s2, &mut t2, &d).await, sha(&d));
    assert!(b.stats().handshakes_rejected > 5_000);
}
