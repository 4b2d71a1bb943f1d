//! Sealed frames (PROTOCOL.md §3.1) driven by hand: encryption and decryption, nonce counters
//! across re-association, and tamper, replay and reorder detection. Deterministic: fixed
//! entropy, one virtual instant.

use std::time::Instant;

use bytes::BytesMut;
use roam_proto::frame::kind;
use roam_proto::{
    Associating, ConnId, Event, Frame, Identity, PeerPolicy, RefuseReason, Security, Session,
    SessionConfig, SessionId,
};

use crate::util::{ent, local, World};

const MARKER: &[u8; 32] = b"--roam sealed-frame test marker-";

/// Dialer and listener associated over `ConnId(1)` under `dsec` / `lsec`, the listener
/// confirmed.
fn pair_with(dsec: &Security, lsec: &Security) -> (Session, Session, Instant) {
    let now = Instant::now();
    let (assoc, hello) = Associating::with_security(local(2), &ent(1), dsec);
    let Frame::Hello(hello) = hello else {
        unreachable!()
    };
    let (mut l, welcome) = Session::accept_hello_with(
        now,
        ConnId(1),
        &hello,
        SessionId([9; 16]),
        local(3),
        &ent(2),
        SessionConfig::default(),
        lsec,
    )
    .expect("hello accepted");
    let mut d = assoc
        .handle(now, ConnId(1), welcome, SessionConfig::default())
        .expect("welcome verified");
    assert!(!l.is_confirmed());
    assert!(
        l.poll_transmit(now).is_none(),
        "nothing before the confirmation"
    );
    // The dialer's first frame is its key confirmation, in the clear.
    let first = d.poll_transmit(now).expect("confirmation");
    let f = Frame::decode_exact(&first.to_vec()).unwrap();
    assert!(matches!(f, Frame::Confirm(_)));
    l.handle_frame(now, ConnId(1), f).unwrap();
    assert!(l.is_confirmed());
    (d, l, now)
}

fn pair() -> (Session, Session, Instant) {
    pair_with(&Security::default(), &Security::default())
}

/// Everything `from` has to send, as wire bytes.
fn wire(from: &mut Session, now: Instant) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(t) = from.poll_transmit(now) {
        out.extend_from_slice(&t.to_vec());
    }
    out
}

/// Feed wire bytes to `to` on `conn`; the first error, if any.
fn feed(to: &mut Session, conn: ConnId, now: Instant, bytes: &[u8]) -> Result<(), String> {
    let mut b = BytesMut::from(bytes);
    while let Some(f) = Frame::decode(&mut b).map_err(|e| e.to_string())? {
        to.handle_frame(now, conn, f).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut b = BytesMut::from(bytes);
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(_f) = Frame::decode(&mut b).unwrap() {
        let used = bytes.len() - at - b.len();
        out.push(bytes[at..at + used].to_vec());
        at += used;
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sealed_frames_round_trip_and_never_show_the_payload() {
    let (mut d, mut l, now) = pair();
    for _ in 0..8 {
        d.write(MARKER).unwrap();
    }
    let bytes = wire(&mut d, now);
    assert!(!contains(&bytes, MARKER));
    for f in frames(&bytes) {
        assert_eq!(f[0], kind::SEALED);
    }
    feed(&mut l, ConnId(1), now, &bytes).unwrap();
    let mut buf = [0u8; 256];
    assert_eq!(l.read(&mut buf), Ok(256));
    assert!(buf.chunks(32).all(|c| c == MARKER));
    let (tx, _) = d.frame_counters().unwrap();
    let (_, rx) = l.frame_counters().unwrap();
    assert_eq!(tx, rx, "one nonce per frame, in step");
}

#[test]
fn a_flipped_bit_anywhere_in_a_sealed_frame_is_detected_and_nothing_is_delivered() {
    let (d0, _, _) = pair();
    drop(d0);
    let mut positions = Vec::new();
    {
        let (mut d, _l, now) = pair();
        d.write(MARKER).unwrap();
        let bytes = wire(&mut d, now);
        positions.extend(0..bytes.len());
    }
    for pos in positions {
        let (mut d, mut l, now) = pair();
        d.write(MARKER).unwrap();
        let mut bytes = wire(&mut d, now);
        bytes[pos] ^= 0x01;
        let r = feed(&mut l, ConnId(1), now, &bytes);
        // A longer length in the clear header only makes the frame look incomplete (the
        // connection then waits, and is dropped at the idle timeout); everything else fails.
        assert!(
            r.is_err() || (1..5).contains(&pos),
            "flip at {pos} went unnoticed"
        );
        let mut buf = [0u8; 64];
        assert!(l.read(&mut buf).is_err(), "flip at {pos}: bytes delivered");
        if pos >= 5 {
            // Past the clear header, the tag check is what catches it (the type and length
            // before it fail the decoder, which makes the driver drop the connection).
            assert_eq!(l.stats().auth_failures, 1, "flip at {pos}");
            assert_eq!(l.link(), None, "the connection is dropped");
        }
    }
}

#[test]
fn replayed_reordered_and_plaintext_frames_are_refused() {
    // Replay.
    let (mut d, mut l, now) = pair();
    d.write(b"one").unwrap();
    let first = wire(&mut d, now);
    feed(&mut l, ConnId(1), now, &first).unwrap();
    assert!(feed(&mut l, ConnId(1), now, &first).is_err());
    assert_eq!(l.stats().auth_failures, 1);
    // Reorder: the second frame before the first.
    let (mut d, mut l, now) = pair();
    d.write(b"one").unwrap();
    let a = wire(&mut d, now);
    d.write(b"two").unwrap();
    let b = wire(&mut d, now);
    assert!(feed(&mut l, ConnId(1), now, &b).is_err());
    let _ = a;
    assert_eq!(l.stats().auth_failures, 1);
    // A plaintext frame on a sealed session.
    let (_d, mut l, now) = pair();
    let ping = Frame::Ping.to_bytes();
    assert!(feed(&mut l, ConnId(1), now, &ping).is_err());
}

/// Lose `ConnId(old)` at both ends and re-associate over `ConnId(new)` by hand.
fn reassociate(d: &mut Session, l: &mut Session, now: Instant, old: u64, new: u64, seed: u8) {
    d.handle_connection_lost(now, ConnId(old));
    l.handle_connection_lost(now, ConnId(old));
    d.handle_timeout(now);
    while let Some(e) = d.poll_event() {
        let _ = matches!(e, Event::Dial(_));
    }
    let Frame::Reassoc(r) = d.start_reassoc(now, ConnId(new), &ent(seed)) else {
        unreachable!()
    };
    let accept = l
        .handle_reassoc(now, ConnId(new), &r, &ent(seed + 1))
        .unwrap();
    let confirm = d.handle_accept(now, ConnId(new), accept).unwrap();
    l.handle_confirm(now, ConnId(new), confirm).unwrap();
}

#[test]
fn nonce_counters_restart_under_fresh_keys_at_every_reassociation() {
    let (mut d, mut l, now) = pair();
    d.write(b"epoch zero").unwrap();
    let old_wire = wire(&mut d, now);
    feed(&mut l, ConnId(1), now, &old_wire).unwrap();
    let fp0 = d.key_fingerprint();
    let mut fps = vec![fp0];
    for (i, conn) in (2..6u64).enumerate() {
        reassociate(&mut d, &mut l, now, conn - 1, conn, 10 + 2 * i as u8);
        assert_eq!(d.epoch(), l.epoch());
        assert_eq!(d.key_fingerprint(), l.key_fingerprint());
        assert!(!fps.contains(&d.key_fingerprint()), "a fresh key per epoch");
        fps.push(d.key_fingerprint());
        // Counters start again at 0 on the new connection.
        assert_eq!(d.frame_counters(), Some((0, 0)));
        assert_eq!(l.frame_counters(), Some((0, 0)));
        d.write(b"more").unwrap();
        let w = wire(&mut d, now);
        feed(&mut l, ConnId(conn), now, &w).unwrap();
        let back = wire(&mut l, now);
        feed(&mut d, ConnId(conn), now, &back).unwrap();
        let (dtx, drx) = d.frame_counters().unwrap();
        let (ltx, lrx) = l.frame_counters().unwrap();
        assert_eq!((dtx, drx), (lrx, ltx));
    }
    // A frame recorded on the first connection, replayed on the current one: its nonce (0)
    // comes round again, but under other keys.
    let cur = ConnId(5);
    assert!(feed(&mut l, cur, now, &frames(&old_wire)[0]).is_err());
    assert_eq!(l.stats().auth_failures, 1);
    let mut buf = [0u8; 64];
    let n = l.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"epoch zeromoremoremoremore");
}

#[test]
fn identities_pinning_and_pre_shared_keys_in_the_association() {
    let id_d = Identity::from_secret_bytes([21; 32]);
    let id_l = Identity::from_secret_bytes([22; 32]);
    let dsec = Security::new()
        .with_identity(id_d.clone())
        .with_policy(PeerPolicy::Pinned(vec![id_l.public_key()]));
    let lsec = Security::new()
        .with_identity(id_l.clone())
        .with_policy(PeerPolicy::Pinned(vec![id_d.public_key()]));
    let (d, l, _) = pair_with(&dsec, &lsec);
    assert_eq!(d.peer_identity(), Some(id_l.public_key()));
    assert_eq!(l.peer_identity(), Some(id_d.public_key()));
    assert_eq!(d.key_fingerprint(), l.key_fingerprint());
    // The listener refuses an unpinned dialer before doing any DH work.
    let stranger = Security::new().with_identity(Identity::from_secret_bytes([23; 32]));
    let now = Instant::now();
    let (_, hello) = Associating::with_security(local(2), &ent(1), &stranger);
    let Frame::Hello(hello) = hello else {
        unreachable!()
    };
    let r = Session::accept_hello_with(
        now,
        ConnId(1),
        &hello,
        SessionId([9; 16]),
        local(3),
        &ent(2),
        SessionConfig::default(),
        &lsec,
    );
    assert_eq!(
        r.err().map(|e| e.refuse_reason()),
        Some(RefuseReason::Unauthorized)
    );
    // An impostor announcing the pinned key without its secret: the listener's Welcome goes
    // out, but the impostor's confirmation (made with the wrong secret) is refused.
    let impostor = Security::new().with_identity(Identity::from_secret_bytes([24; 32]));
    let (assoc, hello) = Associating::with_security(local(2), &ent(1), &impostor);
    let Frame::Hello(mut hello) = hello else {
        unreachable!()
    };
    hello.identity = Some(id_d.public_key());
    let (mut l, welcome) = Session::accept_hello_with(
        now,
        ConnId(1),
        &hello,
        SessionId([9; 16]),
        local(3),
        &ent(2),
        SessionConfig::default(),
        &lsec,
    )
    .unwrap();
    // The impostor's own view of the handshake: its key differs from the listener's, so the
    // listener's Welcome MAC does not verify for it.
    assert!(assoc
        .handle(now, ConnId(1), welcome, SessionConfig::default())
        .is_err());
    let forged = Frame::Confirm(roam_proto::frame::Confirm { mac: [0; 32] });
    assert!(l.handle_frame(now, ConnId(1), forged).is_err());
    assert!(!l.is_confirmed());
    assert!(l.is_finished(), "an unconfirmed association is abandoned");
}

#[test]
fn encrypted_sessions_migrate_and_reconnect_on_the_simulated_network() {
    let mut w = World::new(77);
    let a = w.add_host("A");
    let b = w.add_host("B");
    let c = w.associate(a, b);
    assert!(w.sr(a).is_secure() && w.sr(b).is_secure());
    let mut f = crate::util::Flow::new("a->b", 1);
    let settle = |w: &mut World, f: &mut crate::util::Flow, from, to| {
        for _ in 0..400 {
            w.drive();
            f.read_all(w.s(to));
            if f.outstanding() == 0 {
                return;
            }
            f.write_some(w.s(from), 0);
            w.run_for(std::time::Duration::from_millis(10));
        }
    };
    f.write_some(w.s(a), 50_000);
    settle(&mut w, &mut f, a, b);
    w.kill(c);
    w.run_for(std::time::Duration::from_millis(200));
    f.write_some(w.s(a), 50_000);
    settle(&mut w, &mut f, a, b);
    let a2 = w.migrate(a, "A2");
    f.write_some(w.s(a2), 50_000);
    settle(&mut w, &mut f, a2, b);
    f.assert_delivered();
    assert!(w.sr(b).epoch().0 >= 2);
    assert_eq!(w.sr(b).stats().auth_failures, 0);
    assert_eq!(
        w.seen("Sealed"),
        0,
        "the sim sees frames after the session opened them"
    );
}
