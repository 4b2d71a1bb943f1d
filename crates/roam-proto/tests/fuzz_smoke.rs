//! The fuzz targets of `fuzz/` on stable Rust: proptest feeds random bytes and mutated valid
//! encodings to `Frame::decode` and `StreamImage::from_bytes`, and random operation sequences to
//! the two-session driver. The properties and the driver are the fuzz targets' own files,
//! included here, so `cargo test` checks the same things a fuzzing run does, only briefly.
//!
//! `ROAM_WRITE_CORPUS=1 cargo test -p roam-proto --test fuzz_smoke write_seed_corpus` rewrites
//! the seed corpora under `fuzz/corpus/`.

#[path = "../../../fuzz/src/checks.rs"]
mod checks;
#[path = "../../../fuzz/src/datagram_checks.rs"]
mod datagram_checks;
#[path = "../../../fuzz/src/secure_checks.rs"]
mod secure_checks;
#[path = "../../../fuzz/src/session_driver.rs"]
mod session_driver;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;
use roam_proto::datagram::{dkind, Packet};
use roam_proto::frame::{Accept, Confirm, Hello, Moved, Reassoc, Welcome};
use roam_proto::{
    Associating, ConnId, EndpointId, Entropy, Epoch, Frame, LocalInfo, Offset, PublicKey,
    RefuseReason, Session, SessionConfig, SessionId, StreamImage, Suite,
};
use roam_proto::{DatagramConfig, DatagramImage, DatagramSocket, SocketId};
use session_driver::{decode_ops, encode_ops, Harness, Op};

// ------------------------------------------------------------------------------ generators

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
    ]
}

fn off() -> impl Strategy<Value = Offset> {
    prop_oneof![any::<u64>(), 0..100_000u64].prop_map(Offset)
}

fn refuse() -> impl Strategy<Value = RefuseReason> {
    prop_oneof![
        Just(RefuseReason::UnknownSession),
        Just(RefuseReason::StaleEpoch),
        Just(RefuseReason::BadProof),
        Just(RefuseReason::Busy),
        Just(RefuseReason::Version),
        Just(RefuseReason::Closed),
        Just(RefuseReason::Protocol),
        Just(RefuseReason::Unauthorized),
        Just(RefuseReason::SecurityMismatch),
    ]
}

/// Flags of a Hello / Welcome: insecure, psk, and an optional static key.
fn hello_flags() -> impl Strategy<Value = (bool, bool, Option<PublicKey>)> {
    (
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(any::<[u8; 32]>().prop_map(PublicKey)),
    )
}

/// An offer of suite codes (known or not; empty: a dialer from before negotiation).
fn offer() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=roam_proto::frame::MAX_OFFERED_SUITES)
}

/// A chosen suite, or none.
fn chosen() -> impl Strategy<Value = Option<Suite>> {
    proptest::option::of(prop_oneof![
        Just(Suite::ChaCha20Poly1305),
        Just(Suite::Aes256Gcm)
    ])
}

/// Any valid frame.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<[u8; 16]>(),
            addr(),
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            hello_flags(),
            offer(),
        )
            .prop_map(
                |(e, contact, eph, nonce, (insecure, psk, identity), suites)| {
                    Frame::Hello(Hello {
                        endpoint: EndpointId(e),
                        contact,
                        eph,
                        nonce,
                        insecure,
                        psk,
                        identity,
                        suites,
                    })
                }
            ),
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            addr(),
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            hello_flags(),
            chosen(),
        )
            .prop_map(
                |(s, e, contact, eph, nonce, mac, (insecure, psk, identity), suite)| {
                    Frame::Welcome(Welcome {
                        session: SessionId(s),
                        endpoint: EndpointId(e),
                        contact,
                        eph,
                        nonce,
                        insecure,
                        psk,
                        identity,
                        suite,
                        mac,
                    })
                }
            ),
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            addr(),
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            off(),
            any::<[u8; 32]>()
        )
            .prop_map(|(s, epoch, e, contact, eph, nonce, recv, mac)| {
                Frame::Reassoc(Reassoc {
                    session: SessionId(s),
                    epoch: Epoch(epoch),
                    endpoint: EndpointId(e),
                    contact,
                    eph,
                    nonce,
                    recv,
                    mac,
                })
            }),
        (
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            off(),
            any::<[u8; 32]>()
        )
            .prop_map(|(eph, nonce, recv, mac)| Frame::Accept(Accept {
                eph,
                nonce,
                recv,
                mac
            })),
        any::<[u8; 32]>().prop_map(|mac| Frame::Confirm(Confirm { mac })),
        refuse().prop_map(Frame::Refuse),
        (any::<[u8; 16]>(), addr()).prop_map(|(s, contact)| Frame::Moved(Moved {
            session: SessionId(s),
            contact
        })),
        (
            off(),
            off(),
            off(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(offset, ack, limit, p)| Frame::Data {
                offset,
                ack,
                limit,
                payload: Bytes::from(p)
            }),
        (off(), off()).prop_map(|(ack, limit)| Frame::Ack { ack, limit }),
        off().prop_map(|offset| Frame::Fin { offset }),
        off().prop_map(|ack| Frame::Freeze { ack }),
        off().prop_map(|ack| Frame::FreezeAck { ack }),
        Just(Frame::Ping),
        proptest::collection::vec(any::<u8>(), 21..200)
            .prop_map(|b| Frame::Sealed(bytes::BytesMut::from(&b[..]))),
    ]
}

/// A mutation of a byte string: flip bits, overwrite, insert, delete, truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = b.len();
        match m {
            Mutation::Flip(i, bit) if len > 0 => b[i % len] ^= 1 << bit,
            Mutation::Set(i, v) if len > 0 => b[i % len] = *v,
            Mutation::Insert(i, v) => {
                let at = i % (len + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i % len;
                b.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(n) => b.truncate(n % (len + 1)),
            _ => {}
        }
    }
    b
}

fn local(n: u8) -> LocalInfo {
    LocalInfo {
        endpoint: EndpointId([n; 16]),
        contact: SocketAddr::from(([127, 0, 0, n], 7000)),
    }
}

/// A genuine image: a session pair that exchanged `a` and `b`, with one side frozen (the
/// other side's unread bytes and its own unacknowledged ones inside).
fn genuine_image(a: &[u8], b: &[u8], seed: u8) -> Vec<u8> {
    let now = Instant::now();
    let ent = |x: u8| Entropy {
        secret: [x; 32],
        nonce: [x; 16],
    };
    let (dialing, hello) = Associating::new(local(2), &ent(seed));
    let Frame::Hello(hello) = hello else {
        unreachable!()
    };
    let (mut l, welcome) = Session::accept_hello(
        now,
        ConnId(1),
        &hello,
        SessionId([seed; 16]),
        local(3),
        &ent(seed.wrapping_add(1)),
        SessionConfig::default(),
    )
    .unwrap();
    let mut d = dialing
        .handle(now, ConnId(1), welcome, SessionConfig::default())
        .unwrap();
    d.write(a).unwrap();
    l.write(b).unwrap();
    while let Some(t) = l.poll_transmit(now) {
        let f = Frame::decode_exact(&t.to_vec()).unwrap();
        d.handle_frame(now, ConnId(1), f).unwrap();
    }
    d.freeze(now).unwrap();
    // The peer never answers: the freeze times out and the image keeps everything.
    d.handle_timeout(now + SessionConfig::default().freeze_timeout);
    d.image().expect("frozen").to_bytes()
}

// ----------------------------------------------------------------------------- properties

const CASES: u32 = 2000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_bytes_never_panic_the_frame_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        checks::check_frames(&data);
    }

    #[test]
    fn valid_frames_round_trip_and_mutations_are_errors_or_frames(
        frames in proptest::collection::vec(frame(), 1..6),
        ms in proptest::collection::vec(mutation(), 0..4),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&f.to_bytes());
        }
        // Unmutated, a stream of frames decodes to exactly those frames.
        prop_assert_eq!(checks::check_frames(&stream), frames.len());
        checks::check_frames(&mutate(stream, &ms));
    }

    #[test]
    fn random_bytes_are_never_an_image(data in proptest::collection::vec(any::<u8>(), 0..512), sealed: bool) {
        if sealed {
            // Past the digest: the field decoders and consistency checks see random input.
            checks::check_image(&checks::seal_image(&data));
        } else {
            prop_assert!(!checks::check_image(&data));
        }
    }

    #[test]
    fn mutated_images_are_typed_errors_or_round_trip(
        a in proptest::collection::vec(any::<u8>(), 0..2000),
        b in proptest::collection::vec(any::<u8>(), 0..2000),
        seed: u8,
        ms in proptest::collection::vec(mutation(), 1..4),
        reseal: bool,
    ) {
        let image = genuine_image(&a, &b, seed);
        prop_assert!(checks::check_image(&image));
        let mut bad = mutate(image.clone(), &ms);
        if reseal && bad.len() >= 46 {
            // Recompute the digest and length, as a forger would.
            bad = checks::seal_image(&bad[14..bad.len() - 32]);
        }
        let decoded = checks::check_image(&bad);
        if !reseal && bad != image {
            // Without a new digest, any change is caught.
            prop_assert!(!decoded);
            prop_assert!(StreamImage::from_bytes(&bad).is_err());
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    let side = 0..2u8;
    prop_oneof![
        6 => (side.clone(), 0..20_000u16).prop_map(|(side, len)| Op::Write { side, len }),
        4 => (side.clone(), 0..40_000u16).prop_map(|(side, max)| Op::Read { side, max }),
        8 => (side.clone(), prop_oneof![0..100u16, 0..u16::MAX])
            .prop_map(|(side, max)| Op::Deliver { side, max }),
        6 => Just(Op::Pump),
        3 => prop_oneof![0..50u16, 0..10_000u16].prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::KillLink),
        2 => side.clone().prop_map(|side| Op::Freeze { side }),
        2 => side.clone().prop_map(|side| Op::Thaw { side }),
        1 => (side.clone(), any::<u16>(), any::<u8>())
            .prop_map(|(side, pos, val)| Op::TamperImage { side, pos, val }),
        1 => side.clone().prop_map(|side| Op::Shutdown { side }),
        2 => (side.clone(), any::<bool>(), prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                (frame(), proptest::collection::vec(mutation(), 0..2))
                    .prop_map(|(f, ms)| mutate(f.to_bytes().to_vec(), &ms)),
            ])
            .prop_map(|(side, on_link, bytes)| Op::FeedRaw { side, on_link, bytes }),
        1 => (side, any::<u8>()).prop_map(|(side, mac)| Op::Replay { side, mac }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn two_sessions_survive_random_operations(ops in proptest::collection::vec(op(), 0..60)) {
        Harness::run(&ops);
    }

    #[test]
    fn operation_encoding_round_trips(ops in proptest::collection::vec(op(), 0..40)) {
        // Sides and raw-byte lengths are within what the encoding carries.
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|op| match op {
                Op::FeedRaw { side, on_link, mut bytes } => {
                    bytes.truncate(127);
                    Op::FeedRaw { side, on_link, bytes }
                }
                op => op,
            })
            .collect();
        prop_assert_eq!(decode_ops(&encode_ops(&ops)), ops);
    }

    #[test]
    fn arbitrary_bytes_as_operations_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        Harness::run(&decode_ops(&data));
    }
}

/// Regression (found by `image_decode`): a forged image with a valid digest and a counter near
/// 2^64 made the thawed session's first read overflow `bytes_read`. Offsets and counters that
/// no real session reaches are now refused when the image is decoded.
#[test]
fn forged_images_with_huge_offsets_or_counters_are_inconsistent() {
    use roam_proto::ImageError;
    let image = genuine_image(b"abc", b"defg", 9);
    let body = &image[14..image.len() - 32];
    let reseal = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = body.to_vec();
        edit(&mut b);
        checks::seal_image(&b)
    };
    // The last field of the body is eight u64 counters; tx_acked follows the security mode,
    // the suite, the (absent) peer identity and the two (IPv4) contacts.
    const TX_ACKED: usize = 16 + 8 + 32 + 1 + 1 + 1 + 16 + 7 + 16 + 7;
    let n = body.len();
    for v in [u64::MAX, 1 << 62] {
        for at in (n - 64..n).step_by(8) {
            let forged = reseal(&|b| b[at..at + 8].copy_from_slice(&v.to_be_bytes()));
            assert_eq!(
                StreamImage::from_bytes(&forged),
                Err(ImageError::Inconsistent("counters out of range"))
            );
            assert!(!checks::check_image(&forged));
        }
        let forged = reseal(&|b| b[TX_ACKED..TX_ACKED + 8].copy_from_slice(&v.to_be_bytes()));
        assert!(matches!(
            StreamImage::from_bytes(&forged),
            Err(ImageError::Inconsistent(_))
        ));
    }
    // Just below the bound is still an image, and a session thawed from it does not panic.
    let forged = reseal(&|b| b[n - 48..n - 40].copy_from_slice(&((1u64 << 62) - 1).to_be_bytes()));
    assert!(checks::check_image(&forged));
    // The fuzzer's reproducer.
    let crash = include_bytes!("../../../fuzz/corpus/image_decode/regress-stats-overflow");
    assert!(!checks::check_image(&checks::seal_image(&crash[1..])));
}

// ------------------------------------------------------------------- scenarios and corpus

/// Hand-written scenarios: each is a seed of the `session_ops` corpus and runs here too.
fn scenarios() -> Vec<(&'static str, Vec<Op>)> {
    use Op::*;
    let exchange = |n| {
        vec![
            Write { side: 0, len: n },
            Write {
                side: 1,
                len: n / 2 + 1,
            },
            Pump,
            Deliver {
                side: 1,
                max: u16::MAX,
            },
            Deliver {
                side: 0,
                max: u16::MAX,
            },
            Pump,
            Read {
                side: 0,
                max: u16::MAX,
            },
            Read {
                side: 1,
                max: u16::MAX,
            },
        ]
    };
    let mut migrate = exchange(5000);
    migrate.extend([
        Freeze { side: 0 },
        Pump,
        Deliver { side: 1, max: 1000 },
        Pump,
        Deliver { side: 0, max: 1000 },
        Thaw { side: 0 },
        Pump,
    ]);
    migrate.extend(exchange(3000));
    let mut kill = exchange(40_000);
    kill.extend([KillLink, Advance { ms: 30 }]);
    kill.extend(exchange(100));
    let mut attack = exchange(700);
    attack.extend([
        FeedRaw {
            side: 1,
            on_link: false,
            bytes: Frame::Ping.to_bytes().to_vec(),
        },
        FeedRaw {
            side: 1,
            on_link: true,
            bytes: b"GET / HTTP/1.1\r\n".to_vec(),
        },
        Advance { ms: 100 },
    ]);
    attack.extend(exchange(700));
    let mut replay = exchange(10);
    replay.extend([
        Freeze { side: 1 },
        Pump,
        Deliver { side: 0, max: 9999 },
        Pump,
    ]);
    replay.extend([Deliver { side: 1, max: 9999 }, Thaw { side: 1 }, Pump]);
    replay.extend([Replay { side: 0, mac: 0 }, Replay { side: 1, mac: 7 }]);
    replay.extend(exchange(10));
    let mut tamper = exchange(10);
    tamper.extend([
        Freeze { side: 0 },
        Advance { ms: 3000 },
        TamperImage {
            side: 0,
            pos: 30,
            val: 9,
        },
        Thaw { side: 0 },
        Pump,
    ]);
    tamper.extend(exchange(10));
    let mut both = exchange(2000);
    both.extend([Freeze { side: 0 }, Freeze { side: 1 }]);
    for _ in 0..3 {
        both.extend([
            Pump,
            Deliver { side: 0, max: 500 },
            Deliver { side: 1, max: 500 },
        ]);
    }
    both.extend([Thaw { side: 1 }, Thaw { side: 0 }, Shutdown { side: 0 }]);
    both.extend(exchange(2000));
    vec![
        ("exchange", exchange(1000)),
        ("migrate", migrate),
        ("kill", kill),
        ("attack", attack),
        ("replay", replay),
        ("tamper", tamper),
        ("both_frozen", both),
    ]
}

#[test]
fn scenarios_deliver_every_byte() {
    for (name, ops) in scenarios() {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.finish();
        // The encoded seed replays the same scenario.
        assert_eq!(decode_ops(&encode_ops(&ops)), ops, "{name}");
    }
}

/// Writes the seed corpora of the three fuzz targets (only with `ROAM_WRITE_CORPUS=1`).
#[test]
fn write_seed_corpus() {
    if std::env::var_os("ROAM_WRITE_CORPUS").is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let frames = [
        Frame::Hello(Hello {
            endpoint: EndpointId([1; 16]),
            contact: "127.0.0.2:7000".parse().unwrap(),
            eph: [2; 32],
            nonce: [3; 16],
            insecure: false,
            psk: false,
            identity: Some(PublicKey([18; 32])),
            suites: vec![2, 1],
        }),
        Frame::Welcome(Welcome {
            session: SessionId([4; 16]),
            endpoint: EndpointId([5; 16]),
            contact: "[::1]:9".parse().unwrap(),
            eph: [6; 32],
            nonce: [7; 16],
            insecure: false,
            psk: true,
            identity: None,
            suite: Some(Suite::Aes256Gcm),
            mac: [8; 32],
        }),
        Frame::Reassoc(Reassoc {
            session: SessionId([9; 16]),
            epoch: Epoch(3),
            endpoint: EndpointId([10; 16]),
            contact: "127.0.0.3:7001".parse().unwrap(),
            eph: [11; 32],
            nonce: [12; 16],
            recv: Offset(1234),
            mac: [13; 32],
        }),
        Frame::Accept(Accept {
            eph: [14; 32],
            nonce: [15; 16],
            recv: Offset(99),
            mac: [16; 32],
        }),
        Frame::Confirm(Confirm { mac: [17; 32] }),
        Frame::Refuse(RefuseReason::StaleEpoch),
        Frame::Data {
            offset: Offset(77),
            ack: Offset(88),
            limit: Offset(99),
            payload: Bytes::from_static(b"hello"),
        },
        Frame::Ack {
            ack: Offset(5),
            limit: Offset(6),
        },
        Frame::Fin { offset: Offset(6) },
        Frame::Freeze { ack: Offset(7) },
        Frame::FreezeAck { ack: Offset(8) },
        Frame::Ping,
        Frame::Moved(Moved {
            session: SessionId([18; 16]),
            contact: "127.0.0.4:7001".parse().unwrap(),
        }),
    ];
    let mut all = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let b = f.to_bytes();
        write("frame_decode", &format!("frame-{i:02}"), &b);
        all.extend_from_slice(&b);
    }
    write("frame_decode", "all-frames", &all);

    let images = [
        ("image-empty", genuine_image(b"", b"", 1)),
        ("image-small", genuine_image(b"hello", b"world!", 2)),
        (
            "image-buffers",
            genuine_image(&[0xab; 3000], &[0xcd; 1500], 3),
        ),
    ];
    for (name, img) in &images {
        write("image_decode", name, img);
        // The sealed mode: an odd first byte, then the image body.
        let mut sealed = vec![1u8];
        sealed.extend_from_slice(&img[14..img.len() - 32]);
        write("image_decode", &format!("{name}-sealed"), &sealed);
    }

    for (name, ops) in scenarios() {
        write("session_ops", name, &encode_ops(&ops));
    }
}

/// Found by `session_ops`: an `Ack` injected on the connection (data-path frames are not
/// authenticated) acknowledges bytes the peer never received. The re-association that follows
/// used to succeed, and the sender then replayed from beyond what the receiver holds: a gap,
/// the connection dropped, an immediate redial, and so on forever. A re-association whose
/// received offset is below what that side already acknowledged is now refused.
#[test]
fn reassociation_below_the_acknowledged_offset_is_refused_not_looped() {
    // Sealed sessions refuse injected frames outright (PROTOCOL.md §3.1); the insecure
    // plaintext mode still relies on this check.
    let now = Instant::now();
    let ent = |x: u8| Entropy {
        secret: [x; 32],
        nonce: [x; 16],
    };
    let plain = roam_proto::Security::new().with_insecure_plaintext(true);
    let (dialing, hello) = Associating::with_security(local(2), &ent(1), &plain);
    let Frame::Hello(hello) = hello else {
        unreachable!()
    };
    let (mut l, welcome) = Session::accept_hello_with(
        now,
        ConnId(1),
        &hello,
        SessionId([1; 16]),
        local(3),
        &ent(2),
        SessionConfig::default(),
        &plain,
    )
    .unwrap();
    let mut d = dialing
        .handle(now, ConnId(1), welcome, SessionConfig::default())
        .unwrap();
    let confirm = d.poll_transmit(now).unwrap();
    l.handle_frame(
        now,
        ConnId(1),
        Frame::decode_exact(&confirm.to_vec()).unwrap(),
    )
    .unwrap();
    // The listener sends 100 bytes that are lost with the connection; an injected Ack claims
    // the dialer got 60 of them.
    l.write(&[7; 100]).unwrap();
    while l.poll_transmit(now).is_some() {}
    let lie = Frame::Ack {
        ack: Offset(60),
        limit: Offset(1 << 20),
    };
    l.handle_frame(now, ConnId(1), lie).unwrap();
    l.handle_connection_lost(now, ConnId(1));
    d.handle_connection_lost(now, ConnId(1));
    // The dialer comes back having received nothing.
    d.handle_timeout(now);
    while d.poll_event().is_some() {}
    let Frame::Reassoc(req) = d.start_reassoc(now, ConnId(2), &ent(3)) else {
        unreachable!()
    };
    assert_eq!(req.recv, Offset(0));
    assert_eq!(
        l.handle_reassoc(now, ConnId(2), &req, &ent(4)),
        Err(RefuseReason::Protocol)
    );
    // The dialer takes that refusal as final: the session fails instead of redialing forever.
    assert!(d
        .handle_accept(now, ConnId(2), Frame::Refuse(RefuseReason::Protocol))
        .is_err());
    assert!(d.failure().is_some());
}

// ------------------------------------------------------- datagram sockets: packets and images
//
// The stable equivalents of the `packet_decode` and `datagram_image_decode` fuzz targets; the
// properties are `fuzz/src/datagram_checks.rs`.

/// Any valid datagram-socket packet.
fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        (
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            proptest::collection::vec(any::<u8>(), 1..=roam_proto::frame::MAX_OFFERED_SUITES)
        )
            .prop_map(|(s, eph, nonce, suites)| {
                Packet::Hello {
                    socket: SocketId(s),
                    eph,
                    nonce,
                    suites,
                }
            }),
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            prop_oneof![Just(Suite::ChaCha20Poly1305), Just(Suite::Aes256Gcm)],
            any::<[u8; 32]>()
        )
            .prop_map(|(s, to, eph, nonce, suite, mac)| Packet::Welcome {
                socket: SocketId(s),
                to: SocketId(to),
                eph,
                nonce,
                suite,
                mac
            }),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 16..300)
        )
            .prop_map(|(assoc, counter, p)| Packet::Data {
                assoc,
                counter,
                sealed: Bytes::from(p),
            }),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(assoc, counter, p)| Packet::PlainData {
                assoc,
                counter,
                payload: Bytes::from(p),
            }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(assoc, epoch, nonce, mac)| Packet::Reassoc {
                assoc,
                epoch,
                nonce,
                mac
            }),
        (any::<u64>(), any::<[u8; 16]>(), any::<[u8; 32]>())
            .prop_map(|(assoc, data, mac)| Packet::PathChallenge { assoc, data, mac }),
        (any::<u64>(), any::<[u8; 16]>(), any::<[u8; 32]>())
            .prop_map(|(assoc, data, mac)| Packet::PathResponse { assoc, data, mac }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(assoc, epoch, mac)| Packet::ReassocAck { assoc, epoch, mac }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(assoc, epoch, mac)| Packet::Freezing { assoc, epoch, mac }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(assoc, epoch, mac)| Packet::FreezingAck { assoc, epoch, mac }),
    ]
}

/// Deliver everything the sockets want to send to whichever socket is bound at the address.
fn pump_datagrams(now: Instant, socks: &mut [&mut DatagramSocket]) {
    for _ in 0..100 {
        let mut moved = false;
        for i in 0..socks.len() {
            while let Some((to, bytes)) = socks[i].poll_transmit() {
                moved = true;
                let from = socks[i].local_addr();
                if let Some(j) = socks.iter().position(|s| s.local_addr() == to) {
                    socks[j].handle(now, from, bytes);
                }
            }
        }
        if !moved {
            return;
        }
    }
    panic!("no quiescence");
}

/// A genuine datagram image of a socket with two peers: `unread` datagrams from one of them in
/// its receive queue, `held` datagrams it holds for the other (which is frozen), and, with
/// `pending`, a datagram waiting for a first contact that never completes.
fn genuine_datagram_image(
    seed: u8,
    unread: &[Vec<u8>],
    held: &[Vec<u8>],
    pending: bool,
) -> Vec<u8> {
    let now = Instant::now();
    let cfg = DatagramConfig::default();
    let at = |h: u8| SocketAddr::from(([127, 0, 0, h], 4000));
    let mut a = DatagramSocket::new(cfg.clone(), at(2), [seed; 32]);
    let mut b = DatagramSocket::new(cfg.clone(), at(3), [seed.wrapping_add(1); 32]);
    let mut c = DatagramSocket::new(cfg.clone(), at(4), [seed.wrapping_add(2); 32]);
    b.send_to(now, at(2), b"from b").unwrap();
    c.send_to(now, at(2), b"from c").unwrap();
    pump_datagrams(now, &mut [&mut a, &mut b, &mut c]);
    for d in unread {
        b.send_to(now, at(2), d).unwrap();
    }
    pump_datagrams(now, &mut [&mut a, &mut b, &mut c]);
    c.freeze(now).unwrap();
    pump_datagrams(now, &mut [&mut a, &mut b, &mut c]);
    assert!(c.is_frozen());
    for d in held {
        a.send_to(now, at(4), d).unwrap();
    }
    if pending {
        a.send_to(now, at(9), b"to nobody").unwrap();
    }
    a.freeze(now).unwrap();
    pump_datagrams(now, &mut [&mut a, &mut b, &mut c]);
    // The frozen peer never acknowledges: the freeze completes at its timeout.
    a.handle_timeout(now + cfg.freeze_timeout);
    assert!(a.is_frozen());
    a.image().expect("frozen").to_bytes()
}

/// Two associated sockets and a genuine encrypted `Data` packet from the first to the second
/// (not yet delivered): `(receiver, sender's address, packet)`.
fn genuine_data_packet(seed: u8, payload: &[u8]) -> (DatagramSocket, SocketAddr, Bytes) {
    let now = Instant::now();
    let cfg = DatagramConfig::default();
    let at = |h: u8| SocketAddr::from(([127, 0, 0, h], 4000));
    let mut a = DatagramSocket::new(cfg.clone(), at(2), [seed; 32]);
    let mut b = DatagramSocket::new(cfg, at(3), [seed.wrapping_add(1); 32]);
    a.send_to(now, at(3), b"first").unwrap();
    pump_datagrams(now, &mut [&mut a, &mut b]);
    assert!(b.recv().is_some());
    a.send_to(now, at(3), payload).unwrap();
    let (_, p) = a.poll_transmit().expect("the data packet");
    assert_eq!(p[0], dkind::DATA);
    (b, at(2), p)
}

fn datagrams() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_bytes_never_panic_the_packet_decoder(
        mut data in proptest::collection::vec(any::<u8>(), 0..200),
        ty in dkind::HELLO..=dkind::PLAIN_DATA,
        typed: bool,
    ) {
        if typed && !data.is_empty() {
            data[0] = ty;
        }
        datagram_checks::check_packet(&data);
    }

    #[test]
    fn valid_packets_round_trip_and_mutations_are_errors_or_packets(
        p in packet(),
        ms in proptest::collection::vec(mutation(), 0..4),
    ) {
        let b = p.encode();
        prop_assert!(datagram_checks::check_packet(&b));
        prop_assert_eq!(Packet::decode(b.clone()).ok(), Some(p));
        datagram_checks::check_packet(&mutate(b.to_vec(), &ms));
    }

    #[test]
    fn altered_encrypted_data_is_never_delivered_and_replays_never_twice(
        seed: u8,
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        ms in proptest::collection::vec(mutation(), 1..4),
    ) {
        let (mut b, from, genuine) = genuine_data_packet(seed, &payload);
        let now = Instant::now();
        let bad = mutate(genuine.to_vec(), &ms);
        datagram_checks::check_packet(&bad);
        b.handle(now, from, Bytes::from(bad.clone()));
        let first = std::iter::from_fn(|| b.recv()).count();
        // A mutation may leave the bytes as they were (then it is the genuine packet).
        let unchanged = bad[..] == genuine[..];
        prop_assert_eq!(first, usize::from(unchanged), "an altered packet was delivered");
        // The genuine packet is delivered once, its replays never.
        let before = b.stats().replayed;
        for _ in 0..3 {
            b.handle(now, from, genuine.clone());
        }
        let got = std::iter::from_fn(|| b.recv()).count();
        prop_assert_eq!(first + got, 1);
        prop_assert_eq!(b.stats().replayed, before + 3 - got as u64);
    }

    #[test]
    fn random_bytes_are_never_a_datagram_image(
        data in proptest::collection::vec(any::<u8>(), 0..512),
        sealed: bool,
    ) {
        if sealed {
            datagram_checks::check_datagram_image(&datagram_checks::seal_datagram_image(&data));
        } else {
            prop_assert!(!datagram_checks::check_datagram_image(&data));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn mutated_datagram_images_are_typed_errors_or_round_trip(
        unread in datagrams(),
        held in datagrams(),
        seed: u8,
        pending: bool,
        ms in proptest::collection::vec(mutation(), 1..4),
        reseal: bool,
    ) {
        let image = genuine_datagram_image(seed, &unread, &held, pending);
        prop_assert!(datagram_checks::check_datagram_image(&image));
        let decoded = DatagramImage::from_bytes(&image).unwrap();
        // The first contacts' datagrams are unread too.
        prop_assert_eq!(decoded.buffered_datagrams(), unread.len() + 2);
        prop_assert_eq!(decoded.peer_count(), 2);
        let mut bad = mutate(image.clone(), &ms);
        if reseal {
            // Recompute the digest and length, as a forger would.
            if let Some(body) = datagram_checks::datagram_image_body(&bad) {
                bad = datagram_checks::seal_datagram_image(body);
            }
        }
        let ok = datagram_checks::check_datagram_image(&bad);
        if !reseal && bad != image {
            // Without a new digest, any change is caught.
            prop_assert!(!ok);
        }
    }
}

/// Writes the seed corpora of `packet_decode` and `datagram_image_decode` (only with
/// `ROAM_WRITE_CORPUS=1`).
#[test]
fn write_datagram_seed_corpus() {
    if std::env::var_os("ROAM_WRITE_CORPUS").is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let packets = [
        (
            "hello",
            Packet::Hello {
                socket: SocketId([1; 16]),
                eph: [2; 32],
                nonce: [3; 16],
                suites: vec![2, 1],
            },
        ),
        (
            "welcome",
            Packet::Welcome {
                socket: SocketId([4; 16]),
                to: SocketId([1; 16]),
                eph: [5; 32],
                nonce: [6; 16],
                suite: Suite::Aes256Gcm,
                mac: [7; 32],
            },
        ),
        (
            "data",
            Packet::Data {
                assoc: 0x0102_0304_0506_0708,
                counter: 3,
                sealed: Bytes::from_static(b"hello, and a 16-byte tag"),
            },
        ),
        (
            "data-empty",
            Packet::Data {
                assoc: 9,
                counter: 0,
                sealed: Bytes::from_static(&[0xaa; 16]),
            },
        ),
        (
            "plain-data",
            Packet::PlainData {
                assoc: 9,
                counter: 1,
                payload: Bytes::from_static(b"hello"),
            },
        ),
        (
            "reassoc",
            Packet::Reassoc {
                assoc: 9,
                epoch: 1,
                nonce: [8; 16],
                mac: [9; 32],
            },
        ),
        (
            "path-challenge",
            Packet::PathChallenge {
                assoc: 9,
                data: [15; 16],
                mac: [16; 32],
            },
        ),
        (
            "path-response",
            Packet::PathResponse {
                assoc: 9,
                data: [15; 16],
                mac: [17; 32],
            },
        ),
        (
            "reassoc-ack",
            Packet::ReassocAck {
                assoc: 9,
                epoch: 2,
                mac: [12; 32],
            },
        ),
        (
            "freezing",
            Packet::Freezing {
                assoc: 9,
                epoch: 2,
                mac: [13; 32],
            },
        ),
        (
            "freezing-ack",
            Packet::FreezingAck {
                assoc: 9,
                epoch: 2,
                mac: [14; 32],
            },
        ),
    ];
    for (name, p) in &packets {
        write("packet_decode", name, &p.encode());
    }

    let images = [
        ("dgimage-plain", genuine_datagram_image(1, &[], &[], false)),
        (
            "dgimage-full",
            genuine_datagram_image(
                2,
                &[b"unread one".to_vec(), vec![0xab; 700]],
                &[b"held".to_vec(), Vec::new()],
                true,
            ),
        ),
    ];
    for (name, img) in &images {
        write("datagram_image_decode", name, img);
        // The sealed mode: an odd first byte, then the image body.
        let mut sealed = vec![1u8];
        sealed.extend_from_slice(datagram_checks::datagram_image_body(img).unwrap());
        write("datagram_image_decode", &format!("{name}-sealed"), &sealed);
    }
}

/// The seeds of `packet_decode` and `datagram_image_decode` are valid inputs (so the fuzzers
/// start past the decoders' first checks); regenerate them with `write_datagram_seed_corpus`
/// when a format changes.
#[test]
fn datagram_seed_corpora_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let files = |target: &str| {
        let mut v: Vec<_> = std::fs::read_dir(root.join(target))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let packets = files("packet_decode");
    assert!(packets.len() >= 7);
    for f in packets {
        assert!(
            datagram_checks::check_packet(&std::fs::read(&f).unwrap()),
            "{f:?}"
        );
    }
    let images = files("datagram_image_decode");
    assert!(images.len() >= 2);
    for f in images {
        let b = std::fs::read(&f).unwrap();
        let ok = if f.to_string_lossy().ends_with("-sealed") {
            datagram_checks::check_datagram_image(&datagram_checks::seal_datagram_image(&b[1..]))
        } else {
            datagram_checks::check_datagram_image(&b)
        };
        assert!(ok, "{f:?}");
    }
}

// ------------------------------------------------------------------ handshake and sealed frames

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The `handshake` fuzz target's property, on random settings and mutations.
    #[test]
    fn mutated_handshakes_with_identities_never_panic_and_agree_when_they_complete(
        sel in any::<u8>(),
        suite_sel in any::<u8>(),
        hmask in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => any::<u8>()], 0..8),
        wmask in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => any::<u8>()], 0..8),
    ) {
        let n = hmask.len().max(wmask.len());
        let mut data = vec![sel, suite_sel];
        data.extend(hmask.iter().copied().chain(std::iter::repeat(0)).take(n));
        data.extend(wmask.iter().copied().chain(std::iter::repeat(0)).take(n));
        secure_checks::check_handshake(&data);
    }

    /// The `sealed_decode` fuzz target's property: mutated sealed frames never deliver altered
    /// bytes.
    #[test]
    fn mutated_sealed_frames_never_deliver_altered_bytes(
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        secure_checks::check_sealed(&data);
    }
}

#[test]
fn compatible_handshakes_complete_and_mismatches_do_not() {
    // Same settings both sides (no pinning, which needs the other's identity): complete.
    for sel in [0x00u8, 0x11, 0x44, 0x88, 0x55] {
        assert!(secure_checks::check_handshake(&[sel]), "{sel:#04x}");
    }
    // Both pinning each other, with identities.
    assert!(secure_checks::check_handshake(&[0x33]));
    // Mode mismatch, psk on one side, pinning a peer without identity: refused.
    for sel in [0x08u8, 0x80, 0x04, 0x40, 0x02, 0x20] {
        assert!(!secure_checks::check_handshake(&[sel]), "{sel:#04x}");
    }
    // Suite lists (dialer in bits 0-1, listener in bits 2-3): any pair with a suite in
    // common completes (on the dialer's first preference, which check_handshake asserts);
    // AES-256-GCM only against ChaCha20-Poly1305 only is refused.
    for suites in 0..16u8 {
        let (d, l) = (suites & 3, suites >> 2);
        let disjoint = matches!((d, l), (2, 3) | (3, 2));
        assert_eq!(
            secure_checks::check_handshake(&[0x00, suites]),
            !disjoint,
            "{suites:#04x}"
        );
    }
    // Unmodified sealed traffic is delivered whole, with either suite.
    assert_eq!(secure_checks::check_sealed(&[0, 100]), 100);
    assert_eq!(secure_checks::check_sealed(&[0, 101]), 101);
}
