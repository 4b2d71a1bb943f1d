//! The end of the association handshake (PROTOCOL.md §5.1 step 5) driven by hand: the dialer's
//! session is established only once the listener has answered its `Confirm`, and a connection
//! lost in between either re-associates (the listener got the `Confirm`) or fails the session at
//! once (it did not). Regression tests for RELIABILITY.md finding 2 (a handshake cut after
//! `connect` returned left a session the listener never registered). Deterministic: fixed
//! entropy, one virtual instant.

use std::time::Instant;

use bytes::BytesMut;
use roam_proto::{
    Associating, ConnId, Epoch, Event, Frame, RefuseReason, Session, SessionConfig, SessionError,
    SessionId,
};

use crate::util::{ent, local};

/// Everything `from` has to send now, as frames.
fn out(from: &mut Session, now: Instant) -> Vec<Frame> {
    let mut bytes = BytesMut::new();
    while let Some(t) = from.poll_transmit(now) {
        bytes.extend_from_slice(&t.to_vec());
    }
    let mut frames = Vec::new();
    while let Some(f) = Frame::decode(&mut bytes).expect("own frames decode") {
        frames.push(f);
    }
    frames
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn established(ev: &[Event]) -> Vec<(ConnId, Epoch)> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Established { conn, epoch } => Some((*conn, *epoch)),
            _ => None,
        })
        .collect()
}

/// Hello and Welcome over `ConnId(1)`: the dialer's session (its `Confirm` not yet sent) and
/// the listener's (not yet confirmed).
fn welcomed() -> (Session, Session, Instant) {
    let now = Instant::now();
    let (assoc, hello) = Associating::new(local(2), &ent(1));
    let Frame::Hello(hello) = hello else {
        unreachable!("Associating::new returns a Hello")
    };
    let (l, welcome) = Session::accept_hello(
        now,
        ConnId(1),
        &hello,
        SessionId([9; 16]),
        local(3),
        &ent(2),
        SessionConfig::default(),
    )
    .expect("hello accepted");
    let d = assoc
        .handle(now, ConnId(1), welcome, SessionConfig::default())
        .expect("welcome verified");
    (d, l, now)
}

/// The dialer's connection is gone: it redials at once and sends a `Reassoc` on `conn`.
fn redial(d: &mut Session, now: Instant, conn: ConnId) -> Frame {
    d.handle_connection_lost(now, ConnId(1));
    d.handle_timeout(now);
    assert!(
        events(d).iter().any(|e| matches!(e, Event::Dial(_))),
        "the dialer redials"
    );
    assert!(d.is_dialing());
    d.start_reassoc(now, conn, &ent(7))
}

#[test]
fn the_dialer_is_established_only_once_the_listener_answers_its_confirm() {
    let (mut d, mut l, now) = welcomed();
    assert!(!d.is_confirmed() && !l.is_confirmed());
    let confirm = out(&mut d, now);
    assert!(matches!(confirm[..], [Frame::Confirm(_), ..]));
    assert_eq!(
        established(&events(&mut d)),
        vec![],
        "not before the answer"
    );

    for f in confirm {
        l.handle_frame(now, ConnId(1), f).unwrap();
    }
    assert!(l.is_confirmed());
    // The listener answers at once, sealed, although it has nothing to send.
    let answer = out(&mut l, now);
    assert!(!answer.is_empty(), "the listener answers the Confirm");
    assert!(answer.iter().all(|f| matches!(f, Frame::Sealed(_))));

    // A plaintext frame in its place (an on-path forgery) is not an answer: it drops the
    // connection and establishes nothing.
    let (mut d2, _l2, _) = welcomed();
    let _ = out(&mut d2, now);
    let forged = Frame::Ack {
        ack: roam_proto::Offset(0),
        limit: roam_proto::Offset(1 << 20),
    };
    assert!(d2.handle_frame(now, ConnId(1), forged).is_err());
    assert!(!d2.is_confirmed());
    assert_eq!(established(&events(&mut d2)), vec![]);

    for f in answer {
        d.handle_frame(now, ConnId(1), f).unwrap();
    }
    assert!(d.is_confirmed());
    assert_eq!(established(&events(&mut d)), vec![(ConnId(1), Epoch(0))]);
    // Data flows both ways on the association's connection.
    d.write(b"ping").unwrap();
    for f in out(&mut d, now) {
        l.handle_frame(now, ConnId(1), f).unwrap();
    }
    let mut buf = [0u8; 8];
    assert_eq!(l.read(&mut buf), Ok(4));
    assert_eq!(&buf[..4], b"ping");
}

/// The connection dies after the Welcome reached the dialer and before its `Confirm` reached
/// the listener, which therefore never registered the session (a driver drops an unconfirmed
/// association). The dialer's re-association is refused `unknown session`: the session fails
/// at once instead of retrying until its session timeout.
#[test]
fn a_confirm_lost_with_the_connection_fails_the_association_at_once() {
    let (mut d, l, now) = welcomed();
    let _lost = out(&mut d, now);
    drop(l);
    let reassoc = redial(&mut d, now, ConnId(2));
    assert!(matches!(&reassoc, Frame::Reassoc(r) if r.epoch == Epoch(0)));
    let refused = d.handle_accept(now, ConnId(2), Frame::Refuse(RefuseReason::UnknownSession));
    assert_eq!(refused, Err(RefuseReason::UnknownSession));
    assert!(d.is_finished());
    assert_eq!(
        d.failure(),
        Some(&SessionError::Refused(RefuseReason::UnknownSession))
    );
    let ev = events(&mut d);
    assert_eq!(established(&ev), vec![]);
    assert!(ev.contains(&Event::Failed(SessionError::Refused(
        RefuseReason::UnknownSession
    ))));
}

/// The control case: once the listener answered, `unknown session` is what PROTOCOL.md §8
/// says it is for an established session (the peer may be mid-migration), and is retried.
#[test]
fn after_the_answer_unknown_session_is_retried_as_before() {
    let (mut d, mut l, now) = welcomed();
    for f in out(&mut d, now) {
        l.handle_frame(now, ConnId(1), f).unwrap();
    }
    for f in out(&mut l, now) {
        d.handle_frame(now, ConnId(1), f).unwrap();
    }
    assert!(d.is_confirmed());
    let _ = events(&mut d);
    let _ = redial(&mut d, now, ConnId(2));
    let _ = d.handle_accept(now, ConnId(2), Frame::Refuse(RefuseReason::UnknownSession));
    assert!(!d.is_finished(), "retried, not failed");
    assert!(d.poll_timeout().is_some(), "a redial is scheduled");
}

/// The connection dies after the listener verified the `Confirm` (and registered the session)
/// but before its answer reached the dialer. The dialer's re-association under `k_0` reaches the
/// session, and completing it (the `Accept`, made under the ratcheted key) establishes the
/// dialer; both continue at epoch 1 and carry data.
#[test]
fn an_answer_lost_with_the_connection_is_recovered_by_re_association() {
    let (mut d, mut l, now) = welcomed();
    for f in out(&mut d, now) {
        l.handle_frame(now, ConnId(1), f).unwrap();
    }
    assert!(l.is_confirmed());
    let _lost = out(&mut l, now);
    l.handle_connection_lost(now, ConnId(1));
    let Frame::Reassoc(r) = redial(&mut d, now, ConnId(2)) else {
        panic!("a Reassoc")
    };
    let accept = l.handle_reassoc(now, ConnId(2), &r, &ent(8)).unwrap();
    // A replay of the same request is refused: it cannot push the genuine pending key out.
    assert_eq!(
        l.handle_reassoc(now, ConnId(3), &r, &ent(9)),
        Err(RefuseReason::Busy)
    );
    assert_eq!(established(&events(&mut d)), vec![]);
    let confirm = d.handle_accept(now, ConnId(2), accept).unwrap();
    assert!(d.is_confirmed());
    assert_eq!(established(&events(&mut d)), vec![(ConnId(2), Epoch(1))]);
    l.handle_confirm(now, ConnId(2), confirm).unwrap();
    assert_eq!((d.epoch(), l.epoch()), (Epoch(1), Epoch(1)));
    assert_eq!(d.key_fingerprint(), l.key_fingerprint());
    d.write(b"after").unwrap();
    for f in out(&mut d, now) {
        l.handle_frame(now, ConnId(2), f).unwrap();
    }
    let mut buf = [0u8; 8];
    assert_eq!(l.read(&mut buf), Ok(5));
    assert_eq!(&buf[..5], b"after");
}

/// A re-association forged without `k_0` (here: under another association's key) is refused
/// by the registered session and does not move it.
#[test]
fn a_forged_re_association_of_an_unanswered_association_is_refused() {
    let (mut d, mut l, now) = welcomed();
    for f in out(&mut d, now) {
        l.handle_frame(now, ConnId(1), f).unwrap();
    }
    // Another association (other entropy) gives another key; its request names our session.
    let (assoc, hello) = Associating::new(local(4), &ent(11));
    let Frame::Hello(hello) = hello else {
        unreachable!()
    };
    let (_, welcome) = Session::accept_hello(
        now,
        ConnId(5),
        &hello,
        SessionId([9; 16]),
        local(3),
        &ent(12),
        SessionConfig::default(),
    )
    .unwrap();
    let mut other = assoc
        .handle(now, ConnId(5), welcome, SessionConfig::default())
        .unwrap();
    other.handle_connection_lost(now, ConnId(5));
    other.handle_timeout(now);
    let Frame::Reassoc(forged) = other.start_reassoc(now, ConnId(6), &ent(13)) else {
        unreachable!()
    };
    assert_eq!(forged.session, l.id());
    assert_eq!(
        l.handle_reassoc(now, ConnId(6), &forged, &ent(14)),
        Err(RefuseReason::BadProof)
    );
    assert_eq!(l.link(), Some(ConnId(1)));
    assert_eq!(l.epoch(), Epoch(0));
}

/// The listener moves (`Endpoint::rebind`, PROTOCOL.md §8.1) right after verifying the
/// `Confirm`, before its answer reached the dialer: its own re-association, verified under the
/// association's key, establishes the dialer as well.
#[test]
fn a_re_association_from_the_listener_establishes_the_dialer() {
    let (mut d, mut l, now) = welcomed();
    for f in out(&mut d, now) {
        l.handle_frame(now, ConnId(1), f).unwrap();
    }
    let _lost = out(&mut l, now);
    l.rebind(now, "127.0.0.33:7000".parse().unwrap());
    l.handle_timeout(now);
    assert!(events(&mut l).iter().any(|e| matches!(e, Event::Dial(_))));
    let Frame::Reassoc(r) = l.start_reassoc(now, ConnId(2), &ent(20)) else {
        panic!("a Reassoc")
    };
    let accept = d.handle_reassoc(now, ConnId(2), &r, &ent(21)).unwrap();
    let confirm = l.handle_accept(now, ConnId(2), accept).unwrap();
    assert_eq!(established(&events(&mut d)), vec![]);
    d.handle_confirm(now, ConnId(2), confirm).unwrap();
    assert!(d.is_confirmed());
    assert_eq!(established(&events(&mut d)), vec![(ConnId(2), Epoch(1))]);
    assert_eq!(d.peer().contact, "127.0.0.33:7000".parse().unwrap());
}
