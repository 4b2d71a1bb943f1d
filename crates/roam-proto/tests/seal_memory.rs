//! Memory a session holds for sealing (PROTOCOL.md §3.1) once it has nothing more to send:
//! RELIABILITY.md finding 3. Sealed frames are cut from a block; a session used to keep a
//! 256 KiB block for its whole life, so 1,000 sessions that had each sent a few KiB held 250 MiB
//! of blocks, and an allocator's resident memory grew round after round as sessions came and
//! went (`roam`'s `soak_memory_levels_off`). A block is now sized to the data waiting to be
//! sent and let go of once nothing more waits.
//!
//! Counted by the global allocator (bytes allocated and not freed), so this binary holds this
//! one test: another running at the same time would be counted too.

use std::alloc::System;
use std::time::Instant;

use bytes::BytesMut;
use roam_proto::{
    Associating, ConnId, EndpointId, Entropy, Frame, LocalInfo, Security, Session, SessionConfig,
    SessionId,
};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed.
fn live_heap() -> usize {
    let s = HEAP.stats();
    s.bytes_allocated.saturating_sub(s.bytes_deallocated)
}

fn local(n: u8) -> LocalInfo {
    LocalInfo {
        endpoint: EndpointId([n; 16]),
        contact: format!("127.0.0.{n}:7000").parse().unwrap(),
    }
}

fn ent(n: u8) -> Entropy {
    Entropy {
        secret: [n; 32],
        nonce: [n; 16],
    }
}

/// Dialer and listener of session `id`, associated and confirmed over `ConnId(1)`.
fn pair(id: u8, now: Instant) -> (Session, Session) {
    let (assoc, hello) = Associating::with_security(local(2), &ent(1), &Security::default());
    let Frame::Hello(hello) = hello else {
        unreachable!("Associating starts with a Hello")
    };
    let (mut l, welcome) = Session::accept_hello_with(
        now,
        ConnId(1),
        &hello,
        SessionId([id; 16]),
        local(3),
        &ent(2),
        SessionConfig::default(),
        &Security::default(),
    )
    .expect("hello accepted");
    let mut d = assoc
        .handle(now, ConnId(1), welcome, SessionConfig::default())
        .expect("welcome verified");
    let confirm = d.poll_transmit(now).expect("confirmation");
    let f = Frame::decode_exact(&confirm.to_vec()).expect("a frame");
    l.handle_frame(now, ConnId(1), f).expect("confirmed");
    (d, l)
}

/// Move everything `from` has to send to `to` (the frames are dropped once delivered, as a
/// driver drops them once written); how many bytes.
fn pump(from: &mut Session, to: &mut Session, now: Instant) -> usize {
    let mut wire = Vec::new();
    while let Some(t) = from.poll_transmit(now) {
        wire.extend_from_slice(&t.to_vec());
    }
    let mut b = BytesMut::from(&wire[..]);
    while let Some(f) = Frame::decode(&mut b).expect("frames decode") {
        to.handle_frame(now, ConnId(1), f).expect("frames open");
    }
    wire.len()
}

/// Pump both ways until neither side has anything to send (bounded).
fn settle(d: &mut Session, l: &mut Session, now: Instant) {
    for _ in 0..16 {
        if pump(d, l, now) + pump(l, d, now) == 0 {
            return;
        }
    }
    panic!("still sending after 16 rounds");
}

/// Bytes held per session since `before`.
fn held_per_session(before: usize, sessions: usize) -> usize {
    live_heap().saturating_sub(before) / sessions
}

#[test]
fn a_session_that_sent_little_or_went_idle_holds_no_seal_block() {
    const PAIRS: usize = 32;
    let start = Instant::now();
    let mut pairs: Vec<(Session, Session)> = (0..PAIRS).map(|i| pair(i as u8, start)).collect();
    let before = live_heap();
    let mut buf = vec![0u8; 64 * 1024];

    // A few KiB each way, every byte read, every frame delivered and dropped, all at once.
    for (d, l) in &mut pairs {
        assert_eq!(d.write(&[1u8; 3000]), Ok(3000));
        settle(d, l, start);
        assert_eq!(l.read(&mut buf), Ok(3000));
        assert_eq!(l.write(&[2u8; 2000]), Ok(2000));
        settle(d, l, start);
        assert_eq!(d.read(&mut buf), Ok(2000));
    }
    // What is left is what a session must keep (unacknowledged bytes: acknowledgements are
    // delayed), nothing near a 256 KiB block (every session kept one before).
    let held = held_per_session(before, 2 * PAIRS);
    assert!(
        held < 16 * 1024,
        "after a few KiB, each session holds {held} bytes more"
    );

    // A bulk transfer (its frames cut from 256 KiB blocks), then quiet: once the keepalives
    // went out, nothing is held.
    let bulk = 768 * 1024;
    for (d, l) in &mut pairs {
        let (mut sent, mut read) = (0, 0);
        for _ in 0..1000 {
            if read == bulk {
                break;
            }
            sent += d.write(&buf[..(bulk - sent).min(buf.len())]).unwrap_or(0);
            settle(d, l, start);
            while let Ok(k) = l.read(&mut buf) {
                if k == 0 {
                    break;
                }
                read += k;
            }
        }
        assert_eq!(read, bulk);
    }
    let later = start + SessionConfig::default().keepalive_interval;
    for (d, l) in &mut pairs {
        settle(d, l, later);
    }
    let held = held_per_session(before, 2 * PAIRS);
    assert!(
        held < 16 * 1024,
        "after a bulk transfer and a keepalive interval, each session holds {held} bytes more"
    );
}
