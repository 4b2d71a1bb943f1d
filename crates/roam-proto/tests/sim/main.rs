//! Deterministic tests of the protocol core on a simulated network (see `util.rs`).
//!
//! Every test is a plain `#[test]` on a seeded [`World`]: a virtual clock, hosts with their own
//! contact addresses, and connections made of two byte pipes with latency. They cover
//! association, data and acknowledgements, flow control, planned migration (freeze, image,
//! thaw, re-association), connection loss and redial, timeouts, closing, and the refusals that
//! keep a stale or forged re-association out.

mod assoc_confirm;
mod both_move;
mod sealed;
mod util;

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use roam_proto::frame::{Confirm, Reassoc};
use roam_proto::{
    ConnId, Epoch, Event, Frame, FreezeError, Offset, ReadError, RefuseReason, SessionError,
    StreamImage, WriteError,
};
use util::{Flow, NodeId, World};

const MS: Duration = Duration::from_millis(1);

/// A world with hosts A and B, A having associated with B over the returned connection.
fn pair(seed: u64, latency: Duration) -> (World, NodeId, NodeId, ConnId) {
    let mut w = World::new(seed);
    w.latency = latency;
    let a = w.add_host("A");
    let b = w.add_host("B");
    let c = w.associate(a, b);
    (w, a, b, c)
}

/// Drive, read everything on both sides and redial until both flows are fully delivered and
/// acknowledged over one shared connection.
fn settle(w: &mut World, l: NodeId, r: NodeId, lr: &mut Flow, rl: &mut Flow) {
    for _ in 0..400 {
        w.drive();
        lr.read_all(w.s(r));
        rl.read_all(w.s(l));
        w.drive();
        lr.assert_prefix();
        rl.assert_prefix();
        let (sl, sr) = (w.sr(l), w.sr(r));
        if lr.outstanding() == 0
            && rl.outstanding() == 0
            && sl.unacked() == 0
            && sr.unacked() == 0
            && sl.link().is_some()
            && sl.link() == sr.link()
        {
            return;
        }
        w.run_for(500 * MS);
    }
    panic!(
        "did not settle: {:?} / {:?}; {} and {} bytes outstanding",
        w.sr(l),
        w.sr(r),
        lr.outstanding(),
        rl.outstanding()
    );
}

/// Both hosts' sessions share the current connection at `epoch`, each knowing the other.
fn assert_linked(w: &World, l: NodeId, r: NodeId, epoch: Epoch) {
    let (sl, sr) = (w.sr(l), w.sr(r));
    assert!(sl.link().is_some(), "{} has a link", w.nodes[l].name);
    assert_eq!(sl.link(), sr.link(), "same connection");
    assert_eq!(sl.epoch(), epoch, "{} epoch", w.nodes[l].name);
    assert_eq!(sr.epoch(), epoch, "{} epoch", w.nodes[r].name);
    assert_eq!(sl.id(), sr.id());
    assert_eq!(sl.peer().contact, w.nodes[r].local.contact);
    assert_eq!(sl.peer().endpoint, w.nodes[r].local.endpoint);
    assert_eq!(sr.peer().contact, w.nodes[l].local.contact);
    assert_eq!(sr.peer().endpoint, w.nodes[l].local.endpoint);
    let link = sl.link().unwrap();
    assert_eq!(w.established(l).last(), Some(&(link, epoch)));
    assert_eq!(w.established(r).last(), Some(&(link, epoch)));
}

fn decode_reassoc(bytes: &[u8]) -> Reassoc {
    match Frame::decode_exact(bytes).expect("a frame") {
        Frame::Reassoc(r) => r,
        other => panic!("not a Reassoc: {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// 1. Association, data, acknowledgements, flow control.

#[test]
fn association_data_acks_and_backpressure() {
    let (mut w, a, b, c) = pair(1, 2 * MS);
    assert_eq!(w.seen("Hello"), 1);
    assert_eq!(w.seen("Welcome"), 1);
    assert_eq!(w.established(a), vec![(c, Epoch(0))]);
    assert_eq!(w.established(b), vec![(c, Epoch(0))]);
    assert_linked(&w, a, b, Epoch(0));

    let mut ab = Flow::new("A→B", 10);
    let mut ba = Flow::new("B→A", 20);
    assert_eq!(ab.write(w.s(a), 100_000), Ok(100_000));
    assert_eq!(ba.write(w.s(b), 70_000), Ok(70_000));
    assert_eq!(w.sr(a).unacked(), 100_000);
    w.drive();
    // Acknowledgements trim the retention buffers even before the application reads.
    assert_eq!(w.sr(a).unacked(), 0);
    assert_eq!(w.sr(b).unacked(), 0);
    assert_eq!(w.sr(b).readable_bytes(), 100_000);
    assert_eq!(w.sr(a).readable_bytes(), 70_000);
    ab.read_all(w.s(b));
    ba.read_all(w.s(a));
    ab.assert_delivered();
    ba.assert_delivered();
    assert!(w.partial_reads > 0, "frames arrived split across reads");
    assert!(w.seen("Data") >= 100_000 / w.config.max_frame_payload);

    // Backpressure: B stops reading. A writes until its send buffer is full.
    let send_cap = w.config.send_capacity as u64;
    let recv_cap = w.config.recv_capacity as u64;
    loop {
        let n = ab.write_some(w.s(a), 40_000);
        w.drive();
        if n == 0 {
            break;
        }
    }
    assert_eq!(w.s(a).write(b"x"), Err(WriteError::Blocked));
    assert_eq!(w.sr(a).unacked(), send_cap);
    // B holds exactly one window of unread bytes and acknowledged all of it.
    assert_eq!(w.sr(b).readable_bytes(), recv_cap);
    w.run_for(Duration::from_secs(5));
    assert_eq!(
        w.s(a).write(b"x"),
        Err(WriteError::Blocked),
        "still blocked"
    );
    assert_eq!(w.sr(a).link(), Some(c), "keep-alives kept the link");

    // Reading half a window re-opens it; the writer resumes.
    assert_eq!(
        ab.read(w.s(b), recv_cap as usize / 2),
        Ok(recv_cap as usize / 2)
    );
    w.drive();
    assert!(w.sr(a).unacked() < send_cap);
    assert!(ab.write_some(w.s(a), 40_000) > 0);
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    let (sa, sb) = (w.sr(a).stats(), w.sr(b).stats());
    assert_eq!(sa.bytes_written, ab.sent.len() as u64);
    assert_eq!(sb.bytes_read, ab.received.len() as u64);
    assert_eq!(sa.bytes_replayed + sb.bytes_replayed, 0);
    assert_eq!(sa.bytes_duplicate + sb.bytes_duplicate, 0);
    assert_eq!(sa.connections_lost + sb.connections_lost, 0);
}

// ------------------------------------------------------------------------------------------
// 2. Planned migration with data in flight both ways and unread input on the freezing side.

#[test]
fn planned_migration_keeps_in_flight_and_unread_bytes() {
    let mut w = World::new(2);
    w.latency = 10 * MS;
    w.config.recv_capacity = 512 * 1024;
    let a = w.add_host("A");
    let b = w.add_host("B");
    let l0 = w.associate(a, b);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 50_000).unwrap();
    ba.write(w.s(b), 50_000).unwrap();
    w.drive();
    ab.read_all(w.s(b));
    ba.read_all(w.s(a));

    // B→A: a first batch arrives and is partly read; a second batch is on the wire.
    ba.write(w.s(b), 100_000).unwrap();
    w.run_for(12 * MS);
    assert_eq!(w.sr(a).readable_bytes(), 100_000);
    ba.read(w.s(a), 5_000).unwrap();
    ba.write(w.s(b), 100_000).unwrap();
    // A→B: one batch on the wire, one still unsent when the freeze starts.
    ab.write(w.s(a), 60_000).unwrap();
    w.run_for(MS);
    assert!(w.in_flight_from(l0, a) && w.in_flight_from(l0, b));
    ab.write(w.s(a), 40_000).unwrap();

    let now = w.now;
    w.s(a).freeze(now).unwrap();
    assert!(w.sr(a).is_freezing());
    assert_eq!(w.s(a).write(b"x"), Err(WriteError::Frozen));
    assert_eq!(w.s(a).freeze(now), Err(FreezeError::AlreadyFrozen));
    assert_eq!(
        w.sr(a).image(),
        None,
        "no image before the freeze completes"
    );
    let image = w.finish_freeze(a);
    assert_eq!(w.seen("Freeze"), 1);
    assert_eq!(w.seen("FreezeAck"), 1);
    let img = StreamImage::from_bytes(&image).unwrap();
    assert_eq!(img.epoch(), Epoch(0));
    assert_eq!(img.origin(), w.nodes[a].local);
    assert_eq!(img.peer().contact, w.nodes[b].local.contact);
    // The FreezeAck acknowledged everything sent before the Freeze: only the unsent 40 000
    // bytes remain, and everything B sent before it (both batches) is the synchronization buffer.
    assert_eq!(img.unacked_bytes(), 40_000);
    assert_eq!(img.buffered_input_bytes(), 195_000);
    assert_eq!(w.nodes[a].retired[0].readable_bytes(), 195_000);

    // B lost the link on purpose: it waits (it does not dial) and keeps accepting writes up to
    // its bound; reads wait.
    w.drive();
    assert_eq!(w.sr(b).link(), None);
    assert!(w.nodes[b].dials.is_empty());
    assert_eq!(
        w.sr(b).stats().connections_lost,
        0,
        "a planned migration is no loss"
    );
    ab.read_all(w.s(b));
    let mut more = 0;
    loop {
        let k = ba.write_some(w.s(b), 30_000);
        if k == 0 {
            break;
        }
        more += k;
    }
    assert!(more > 0);
    assert_eq!(w.sr(b).unacked() as usize, w.config.send_capacity);
    assert_eq!(w.s(b).read(&mut [0; 16]), Err(ReadError::Blocked));
    // The image travels for a while.
    w.run_for(500 * MS);
    assert_eq!(w.sr(b).link(), None);
    assert!(!w.sr(b).is_finished());

    let c = w.thaw(&image, "C");
    assert_eq!(
        w.sr(c).readable_bytes(),
        195_000,
        "unread input is there at once"
    );
    w.drive();
    assert_linked(&w, c, b, Epoch(1));
    assert_eq!(w.seen("Reassoc"), 1);
    assert_eq!(w.seen("Accept"), 1);
    assert_eq!(w.seen("Confirm"), 1);
    // New bytes from B arrived too, but the synchronization buffer is read first (claim 7).
    assert!(w.sr(c).readable_bytes() > 195_000);
    let at = ba.received.len();
    assert_eq!(ba.read(w.s(c), 195_000), Ok(195_000));
    assert_eq!(ba.received[at..], ba.sent[at..at + 195_000]);
    settle(&mut w, c, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    let (sc, sb) = (w.sr(c).stats(), w.sr(b).stats());
    assert_eq!((sc.migrations, sb.migrations), (1, 1));
    assert_eq!((sc.reassociations, sb.reassociations), (1, 1));
    assert_eq!(
        sc.bytes_written,
        ab.sent.len() as u64,
        "stats travel with the image"
    );
    assert_eq!(sc.bytes_duplicate + sb.bytes_duplicate, 0);
}

// ------------------------------------------------------------------------------------------
// 3. The peer freezes while this side is in the middle of a large write.

#[test]
fn freeze_while_peer_is_mid_write() {
    let mut w = World::new(3);
    w.latency = 5 * MS;
    w.config.recv_capacity = 64 * 1024;
    let a = w.add_host("A");
    let b = w.add_host("B");
    w.associate(a, b);
    let mut ab = Flow::new("A→B", 3);
    let mut ba = Flow::new("B→A", 4);
    // B writes four times A's window and sixteen frames' worth; A does not read.
    assert_eq!(ba.write(w.s(b), 256 * 1024), Ok(256 * 1024));
    ab.write(w.s(a), 20_000).unwrap();
    w.run_for(3 * MS);
    let now = w.now;
    w.s(a).freeze(now).unwrap();
    let image = w.finish_freeze(a);
    let img = StreamImage::from_bytes(&image).unwrap();
    assert_eq!(img.buffered_input_bytes(), 64 * 1024, "one full window");
    // B stays mid-write: nothing is acknowledged yet (the Freeze's acknowledgement predates
    // B's first bytes; A sent nothing after it), most of it is still unsent.
    assert_eq!(w.sr(b).unacked(), 256 * 1024);
    let c = w.thaw(&image, "C");
    w.drive();
    assert_linked(&w, c, b, Epoch(1));
    // Keep the writer going until a mebibyte went through.
    while ba.sent.len() < 1 << 20 {
        let want = (1 << 20) - ba.sent.len();
        ba.write_some(w.s(b), want.min(100_000));
        w.drive();
        ba.read_all(w.s(c));
    }
    settle(&mut w, c, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    // A planned migration loses nothing on the wire: nothing is sent twice.
    let (sc, sb) = (w.sr(c).stats(), w.sr(b).stats());
    assert_eq!(sc.bytes_replayed + sb.bytes_replayed, 0);
    assert_eq!(sc.bytes_duplicate + sb.bytes_duplicate, 0);
}

// ------------------------------------------------------------------------------------------
// 4. Several migrations of both ends; the epoch advances by one each time.

#[test]
fn repeated_migrations_advance_the_epoch() {
    let (mut w, a, b, _) = pair(4, 3 * MS);
    let mut lr = Flow::new("L→R", 5);
    let mut rl = Flow::new("R→L", 6);
    let (mut left, mut right) = (a, b);
    let plan = [true, false, true, true, false, false];
    for (i, &move_left) in plan.iter().enumerate() {
        lr.write_some(w.s(left), 30_000 + 1_000 * i);
        rl.write_some(w.s(right), 20_000 + 3_000 * i);
        w.run_for(4 * MS);
        lr.read(w.s(right), 7_000).unwrap();
        if move_left {
            left = w.migrate(left, &format!("L{}", i + 1));
        } else {
            right = w.migrate(right, &format!("R{}", i + 1));
        }
        let epoch = Epoch(i as u64 + 1);
        assert_linked(&w, left, right, epoch);
        assert_eq!(w.sr(left).stats().migrations, i as u64 + 1);
        assert_eq!(w.sr(right).stats().migrations, i as u64 + 1);
    }
    settle(&mut w, left, right, &mut lr, &mut rl);
    lr.assert_delivered();
    rl.assert_delivered();
    assert_eq!(w.sr(left).stats().reassociations, plan.len() as u64);
    assert_eq!(w.sr(right).stats().reassociations, plan.len() as u64);
    // Every old host turned its session away; no stale session answers any more.
    for n in 0..w.nodes.len() {
        if n != left && n != right {
            assert!(w.nodes[n].session.is_none());
        }
    }
}

// ------------------------------------------------------------------------------------------
// 5. Abrupt connection loss: replay, redial with backoff, freeze across a loss.

#[test]
fn connection_kill_replays_and_redials_with_backoff() {
    let (mut w, a, b, l0) = pair(5, 5 * MS);
    let mut ab = Flow::new("A→B", 7);
    let mut ba = Flow::new("B→A", 8);
    ab.write(w.s(a), 200_000).unwrap();
    ba.write(w.s(b), 200_000).unwrap();
    // One window of each direction is on the wire (5 ms latency).
    w.run_for(3 * MS);
    let (ua, ub) = (w.sr(a).unacked(), w.sr(b).unacked());
    assert!(ua > 0 && ub > 0, "bytes in flight at the kill");
    // The first three dials to B are refused (connection refused).
    w.nodes[b].refuse_dials = 3;
    let t0 = w.now;
    w.kill(l0);
    assert_eq!(w.sr(a).link(), None);
    assert_eq!(w.sr(b).link(), None);
    w.drive();
    let dials: Vec<Duration> = w.nodes[a].dials.iter().map(|t| *t - t0).collect();
    assert_eq!(dials.len(), 4, "{dials:?}");
    assert_eq!(dials[0], Duration::ZERO, "the first redial goes at once");
    // Then a doubling backoff of 10, 20, 40 ms, each wait jittered into its upper half
    // (PROTOCOL.md §8).
    let gaps: Vec<Duration> = dials.windows(2).map(|p| p[1] - p[0]).collect();
    for (g, b) in gaps.iter().zip([10 * MS, 20 * MS, 40 * MS]) {
        assert!(
            *g >= b / 2 && *g <= b,
            "doubling backoff with jitter: {gaps:?}"
        );
    }
    assert_eq!(w.nodes[a].dials_refused, 3);
    assert!(
        w.nodes[b].dials.is_empty(),
        "only the side that dialed redials"
    );
    assert_linked(&w, a, b, Epoch(1));
    assert_ne!(w.sr(a).link(), Some(l0));
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    let (sa, sb) = (w.sr(a).stats(), w.sr(b).stats());
    assert_eq!((sa.connections_lost, sb.connections_lost), (1, 1));
    assert_eq!((sa.reassociations, sb.reassociations), (1, 1));
    // Bytes lost on the wire were sent again, and only those: the offsets exchanged in
    // Reassoc/Accept are exact, so nothing arrives twice.
    assert!(sa.bytes_replayed > 0 && sa.bytes_replayed <= ua);
    assert!(sb.bytes_replayed > 0 && sb.bytes_replayed <= ub);
    assert_eq!(sa.bytes_duplicate + sb.bytes_duplicate, 0);
}

#[test]
fn kill_during_freeze_still_freezes_and_thaws() {
    for (seed, freeze_arrives) in [(50, false), (51, true)] {
        let (mut w, a, b, l0) = pair(seed, 5 * MS);
        let mut ab = Flow::new("A→B", seed);
        let mut ba = Flow::new("B→A", seed + 100);
        ab.write(w.s(a), 100_000).unwrap();
        ba.write(w.s(b), 100_000).unwrap();
        w.run_for(3 * MS);
        let now = w.now;
        w.s(a).freeze(now).unwrap();
        w.run_for(if freeze_arrives { 6 * MS } else { MS });
        assert!(w.sr(a).is_freezing());
        assert_eq!(w.seen("Freeze"), usize::from(freeze_arrives));
        assert_eq!(w.seen("FreezeAck"), 0);
        let unacked = w.sr(a).unacked();
        assert!(unacked > 0);
        w.kill(l0);
        assert!(
            w.sr(a).is_frozen(),
            "losing the connection completes the freeze"
        );
        let image = w.finish_freeze(a);
        let img = StreamImage::from_bytes(&image).unwrap();
        assert_eq!(
            img.unacked_bytes() as u64,
            unacked,
            "the image keeps every unacked byte"
        );
        w.drive();
        assert_eq!(w.sr(b).link(), None);
        assert!(w.nodes[b].dials.is_empty());
        // B counts a loss only when it was not told of the migration.
        let lost = u64::from(!freeze_arrives);
        assert_eq!(w.sr(b).stats().connections_lost, lost);
        let c = w.thaw(&image, "C");
        w.drive();
        assert_linked(&w, c, b, Epoch(1));
        settle(&mut w, c, b, &mut ab, &mut ba);
        ab.assert_delivered();
        ba.assert_delivered();
        assert_eq!(
            w.sr(c).stats().bytes_duplicate + w.sr(b).stats().bytes_duplicate,
            0
        );
    }
}

#[test]
fn listener_frozen_across_a_kill_is_found_again_by_its_thaw() {
    // B (the side that did not dial) freezes; the connection dies mid-freeze. A redials B's old
    // address and is turned away (unknown session) until B's image, thawed on D, dials A.
    let (mut w, a, b, l0) = pair(52, 4 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 80_000).unwrap();
    ba.write(w.s(b), 80_000).unwrap();
    w.run_for(2 * MS);
    let now = w.now;
    w.s(b).freeze(now).unwrap();
    w.run_for(MS);
    w.kill(l0);
    let image = w.finish_freeze(b);
    w.run_for(200 * MS);
    assert!(w.nodes[a].dials.len() >= 3, "A redials");
    assert!(!w.nodes[a].accept_errors.is_empty());
    assert!(w.nodes[a]
        .accept_errors
        .iter()
        .all(|r| *r == RefuseReason::UnknownSession));
    assert!(w.nodes[b]
        .refusals_sent
        .iter()
        .all(|r| *r == RefuseReason::UnknownSession));
    assert!(
        w.sr(a).failure().is_none(),
        "an unknown session is a transient refusal"
    );
    let d = w.thaw(&image, "D");
    w.drive();
    assert_linked(&w, a, d, Epoch(1));
    settle(&mut w, a, d, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    // A stopped dialing once D re-associated.
    let dials = w.nodes[a].dials.len();
    w.run_for(Duration::from_secs(3));
    assert_eq!(w.nodes[a].dials.len(), dials);
}

#[test]
fn freeze_without_a_connection_completes_at_once() {
    let (mut w, a, b, l0) = pair(53, 2 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 30_000).unwrap();
    w.run_for(MS);
    w.kill(l0);
    let now = w.now;
    w.s(a).freeze(now).unwrap();
    assert!(w.sr(a).is_frozen());
    let image = w.finish_freeze(a);
    assert_eq!(
        StreamImage::from_bytes(&image).unwrap().unacked_bytes(),
        30_000
    );
    assert!(
        w.nodes[a].dials.is_empty(),
        "a frozen session does not redial"
    );
    ba.write(w.s(b), 10_000).unwrap();
    let c = w.thaw(&image, "C");
    w.drive();
    assert_linked(&w, c, b, Epoch(1));
    settle(&mut w, c, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
}

#[test]
fn freeze_times_out_when_the_peer_is_silent() {
    let (mut w, a, b, l0) = pair(54, 2 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 30_000).unwrap();
    ba.write(w.s(b), 30_000).unwrap();
    w.drive();
    w.blackhole(l0);
    ab.write(w.s(a), 20_000).unwrap();
    ba.write(w.s(b), 20_000).unwrap();
    w.run_for(MS);
    let t0 = w.now;
    w.s(a).freeze(t0).unwrap();
    let freeze_timeout = w.config.freeze_timeout;
    w.run_for(freeze_timeout - MS);
    assert!(w.sr(a).is_freezing());
    w.run_for(MS);
    assert!(w.sr(a).is_frozen(), "frozen at the freeze timeout");
    let image = w.finish_freeze(a);
    assert_eq!(
        StreamImage::from_bytes(&image).unwrap().unacked_bytes(),
        20_000
    );
    // B never heard of the freeze and still holds the black-holed connection when the thawed
    // session re-associates; it switches over.
    assert_eq!(w.sr(b).link(), Some(l0));
    let c = w.thaw(&image, "C");
    w.drive();
    assert_linked(&w, c, b, Epoch(1));
    assert!(w.saw(b, |e| *e == Event::CloseConnection(l0)));
    settle(&mut w, c, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    assert!(w.sr(b).stats().bytes_replayed >= 20_000);
}

#[test]
fn freeze_timeout_longer_than_keepalive_does_not_spin() {
    // Regression: while freezing no keep-alive is sent, so its timer must not stay armed (a
    // driver would spin on an expired timer until the freeze deadline).
    let mut w = World::new(55);
    w.config.freeze_timeout = Duration::from_secs(5);
    let a = w.add_host("A");
    let b = w.add_host("B");
    let l0 = w.associate(a, b);
    w.blackhole(l0);
    let t0 = w.now;
    w.s(a).freeze(t0).unwrap();
    w.run_for(Duration::from_secs(5) - MS);
    assert!(w.sr(a).is_freezing());
    assert!(w.sr(a).poll_timeout().is_some_and(|t| t > w.now));
    w.run_for(MS);
    assert!(w.sr(a).is_frozen());
}

// ------------------------------------------------------------------------------------------
// 6. Idle timeout and session timeout.

#[test]
fn idle_timeout_detects_a_black_hole_and_redials() {
    let (mut w, a, b, l0) = pair(6, 2 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 10_000).unwrap();
    w.drive();
    // Quiet but healthy: keep-alives hold the connection well past the idle timeout.
    w.run_for(Duration::from_secs(10));
    assert!(w.seen("Ping") > 0);
    assert_eq!(w.sr(a).link(), Some(l0));
    assert_eq!(w.sr(a).stats().connections_lost, 0);

    let t0 = w.now;
    w.blackhole(l0);
    ab.write(w.s(a), 20_000).unwrap();
    ba.write(w.s(b), 20_000).unwrap();
    let idle = w.config.idle_timeout;
    let keepalive = w.config.keepalive_interval;
    w.run_for(idle + Duration::from_secs(1));
    let dial = w.nodes[a].dials[0] - t0;
    assert!(
        dial >= idle - keepalive && dial <= idle,
        "lost link noticed after {dial:?}"
    );
    assert_linked(&w, a, b, Epoch(1));
    assert_eq!(w.sr(a).stats().connections_lost, 1);
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    assert!(w.sr(a).stats().bytes_replayed >= 20_000);
    assert!(w.sr(b).stats().bytes_replayed >= 20_000);
}

#[test]
fn session_timeout_fails_the_session() {
    let (mut w, a, b, l0) = pair(7, 2 * MS);
    let mut ab = Flow::new("A→B", 1);
    ab.write(w.s(a), 10_000).unwrap();
    w.drive();
    ab.read_all(w.s(b));
    w.nodes[b].reachable = false;
    let t0 = w.now;
    w.kill(l0);
    let st = w.config.session_timeout;
    w.run_for(st - MS);
    assert!(w.sr(a).failure().is_none() && w.sr(b).failure().is_none());
    w.run_for(Duration::from_secs(1));
    let timed_out = SessionError::TimedOut(st);
    for n in [a, b] {
        let failed: Vec<_> = w.nodes[n]
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Failed(_)))
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].1, Event::Failed(timed_out.clone()));
        assert_eq!(
            failed[0].0 - t0,
            st,
            "failed exactly at the session timeout"
        );
        let s = w.s(n);
        assert!(s.is_finished());
        assert_eq!(s.failure(), Some(&timed_out));
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.write(b"x"), Err(WriteError::Failed(timed_out.clone())));
        assert_eq!(
            s.read(&mut [0; 8]),
            Err(ReadError::Failed(timed_out.clone()))
        );
        assert_eq!(
            s.freeze(t0 + st),
            Err(FreezeError::Failed(timed_out.clone()))
        );
    }
    // A kept redialing, backing off from 10 ms up to the 1 s cap, each wait jittered between
    // half the backoff and all of it (PROTOCOL.md §8).
    let dials = &w.nodes[a].dials;
    assert!(dials.len() > 20);
    let gaps: Vec<Duration> = dials.windows(2).map(|p| p[1] - p[0]).collect();
    let max = w.config.redial_max;
    let backoffs = (0..gaps.len() as u32).map(|i| (10 * MS * 2u32.pow(i.min(10))).min(max));
    for (g, b) in gaps.iter().zip(backoffs) {
        assert!(
            *g >= b / 2 && *g <= b,
            "{g:?} for a backoff of {b:?}: {gaps:?}"
        );
    }
    // Not in lockstep: the waits at the cap differ.
    let capped: Vec<&Duration> = gaps.iter().filter(|g| **g >= max / 2).collect();
    assert!(capped.windows(2).any(|p| p[0] != p[1]), "{gaps:?}");
    assert!(w.nodes[b].dials.is_empty());
}

// ------------------------------------------------------------------------------------------
// 7. An image can be thawed once.

#[test]
fn second_thaw_of_an_image_is_refused_as_stale() {
    let (mut w, a, b, _) = pair(8, 2 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 40_000).unwrap();
    ba.write(w.s(b), 40_000).unwrap();
    w.run_for(MS);
    let image = w.freeze(a);
    let c = w.thaw(&image, "C");
    w.drive();
    assert_linked(&w, c, b, Epoch(1));
    let link = w.sr(b).link();

    let d = w.thaw(&image, "D");
    w.drive();
    let stale = SessionError::Refused(RefuseReason::StaleEpoch);
    assert_eq!(w.nodes[b].refusals_sent, [RefuseReason::StaleEpoch]);
    assert_eq!(w.nodes[d].accept_errors, [RefuseReason::StaleEpoch]);
    assert_eq!(w.sr(d).failure(), Some(&stale));
    assert!(w.saw(d, |e| *e == Event::Failed(stale.clone())));
    assert_eq!(w.s(d).write(b"x"), Err(WriteError::Failed(stale.clone())));
    assert_eq!(
        w.nodes[d].dials.len(),
        1,
        "a stale epoch is final: no retry"
    );
    // The genuine session did not notice.
    assert_eq!(w.sr(b).link(), link);
    assert_linked(&w, c, b, Epoch(1));
    ab.write_some(w.s(c), 10_000);
    ba.write_some(w.s(b), 10_000);
    settle(&mut w, c, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    assert_linked(&w, c, b, Epoch(1));
}

// ------------------------------------------------------------------------------------------
// 8. Forged and replayed re-association requests.

#[test]
fn forged_and_replayed_reassoc_are_refused() {
    let (mut w, a, b, l0) = pair(9, 2 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 20_000).unwrap();
    ba.write(w.s(b), 20_000).unwrap();
    w.drive();
    // One genuine re-association, captured: r0 is a Reassoc at epoch 0.
    w.kill(l0);
    w.drive();
    assert_linked(&w, a, b, Epoch(1));
    let l1 = w.sr(b).link().unwrap();
    assert_eq!(w.captured_reassoc.len(), 1);
    let r0_bytes = w.captured_reassoc[0].1.clone();
    let r0 = decode_reassoc(&r0_bytes);
    assert_eq!(r0.epoch, Epoch(0));

    let m = w.add_host("Mallory");
    let b_addr = w.nodes[b].local.contact;
    let expect_refused = |w: &mut World, z: ConnId, reason: RefuseReason| {
        w.drive();
        assert_eq!(w.raw_frames(z), [Frame::Refuse(reason)]);
        assert!(!w.conn_open(z), "refused connections are closed");
        assert_linked(w, a, b, Epoch(1));
        assert_eq!(w.sr(b).link(), Some(l1));
    };

    // (a) A current-epoch request under a key Mallory made up.
    let forged = Reassoc {
        session: w.sr(b).id(),
        epoch: Epoch(1),
        endpoint: w.nodes[m].local.endpoint,
        contact: w.nodes[m].local.contact,
        eph: r0.eph,
        nonce: [7; 16],
        recv: Offset(0),
        mac: [0x5a; 32],
    };
    let z = w.inject(m, b_addr, &Frame::Reassoc(forged).to_bytes());
    expect_refused(&mut w, z, RefuseReason::BadProof);

    // (b) The captured request, replayed verbatim and with a flipped MAC byte: stale.
    let z = w.inject(m, b_addr, &r0_bytes);
    expect_refused(&mut w, z, RefuseReason::StaleEpoch);
    let mut flipped = r0_bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let z = w.inject(m, b_addr, &flipped);
    expect_refused(&mut w, z, RefuseReason::StaleEpoch);
    // An unknown session id is refused as such.
    let mut other = r0.clone();
    other.session.0[0] ^= 1;
    let z = w.inject(m, b_addr, &Frame::Reassoc(other).to_bytes());
    expect_refused(&mut w, z, RefuseReason::UnknownSession);

    // (c) A current-epoch request. A sees its connection reset (B does not: half-open) and
    // redials; Mallory captures that Reassoc (epoch 1) and the genuine copy is lost.
    w.reset_one_end(l1, a);
    w.drive_until(|w| w.captured_reassoc.len() == 2);
    let (x2, r1_bytes) = w.captured_reassoc[1].clone();
    w.blackhole(x2);
    assert_eq!(decode_reassoc(&r1_bytes).epoch, Epoch(1));
    // With a flipped MAC byte: bad proof.
    let mut flipped = r1_bytes.clone();
    *flipped.last_mut().unwrap() ^= 0x80;
    let z = w.inject(m, b_addr, &flipped);
    w.run_for(10 * MS);
    assert_eq!(w.raw_frames(z), [Frame::Refuse(RefuseReason::BadProof)]);
    // Verbatim: B accepts it (it cannot tell yet) but nothing changes without a Confirm, which
    // needs the fresh DH secret only A has.
    let z = w.inject(m, b_addr, &r1_bytes);
    w.run_for(10 * MS);
    assert!(matches!(w.raw_frames(z)[..], [Frame::Accept(_)]));
    assert_eq!(w.sr(b).link(), Some(l1));
    assert_eq!(w.sr(b).epoch(), Epoch(1));
    w.send_raw(z, &Frame::Confirm(Confirm { mac: [1; 32] }).to_bytes());
    w.run_for(10 * MS);
    assert!(!w.conn_open(z));
    assert_eq!(
        w.sr(b).link(),
        Some(l1),
        "a forged Confirm switches nothing"
    );
    assert_eq!(w.sr(b).epoch(), Epoch(1));
    assert_eq!(w.sr(b).peer().contact, w.nodes[a].local.contact);
    assert_eq!(
        w.nodes[b].refusals_sent,
        [
            RefuseReason::BadProof,
            RefuseReason::StaleEpoch,
            RefuseReason::StaleEpoch,
            RefuseReason::UnknownSession,
            RefuseReason::BadProof,
            RefuseReason::BadProof,
        ]
    );

    // A's own attempt times out in the driver; it redials and re-associates for real.
    ab.write(w.s(a), 10_000).unwrap();
    ba.write(w.s(b), 10_000).unwrap();
    w.drive_until(|w| w.sr(a).epoch() == Epoch(2) && w.sr(b).epoch() == Epoch(2));
    w.drive();
    assert_linked(&w, a, b, Epoch(2));
    assert_ne!(w.sr(a).link(), Some(x2));
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();

    // Afterwards both captured requests are stale.
    for bytes in [r0_bytes, r1_bytes] {
        let z = w.inject(m, b_addr, &bytes);
        w.drive();
        assert_eq!(w.raw_frames(z), [Frame::Refuse(RefuseReason::StaleEpoch)]);
    }
    assert_linked(&w, a, b, Epoch(2));
    assert!(w.nodes[a].violations.is_empty() && w.nodes[b].violations.is_empty());
}

// ------------------------------------------------------------------------------------------
// 9. The Confirm is lost: the dialer already moved to the next epoch.

#[test]
fn lost_confirm_is_recovered_through_the_pending_key() {
    let (mut w, a, b, l0) = pair(10, 5 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 50_000).unwrap();
    ba.write(w.s(b), 50_000).unwrap();
    w.run_for(6 * MS);
    w.kill(l0);
    // Stop when A has the Accept (and has sent its Confirm, still on the wire).
    w.drive_until(|w| w.sr(a).link().is_some());
    let x = w.sr(a).link().unwrap();
    assert_eq!(w.sr(a).epoch(), Epoch(1), "the dialer ratcheted");
    assert_eq!(w.sr(b).epoch(), Epoch(0));
    assert_eq!(w.sr(b).link(), None);
    assert!(w.in_flight_from(x, a), "the Confirm is on the wire");
    assert_eq!(w.seen("Confirm"), 0);
    w.kill(x);
    w.drive();
    // A redialed at epoch 1; B verified it under the key it had accepted but not confirmed.
    assert_eq!(decode_reassoc(&w.captured_reassoc[1].1).epoch, Epoch(1));
    assert!(w.nodes[b].refusals_sent.is_empty());
    assert!(w.sr(a).failure().is_none());
    assert_linked(&w, a, b, Epoch(2));
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
}

#[test]
fn listener_freezing_before_the_confirm_arrives_is_thawed_at_the_old_epoch() {
    // Regression (found by the property test): B accepts A's Reassoc and freezes before A's
    // Confirm arrives. A has ratcheted to epoch 1; B's image is at epoch 0. A steps back to the
    // epoch it has not seen confirmed, once, so B's thawed session is not refused as stale.
    let (mut w, a, b, l0) = pair(13, 5 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 40_000).unwrap();
    ba.write(w.s(b), 40_000).unwrap();
    w.run_for(2 * MS);
    w.kill(l0);
    w.drive_until(|w| w.seen("Reassoc") == 1);
    assert_eq!(w.sr(b).link(), None);
    let image = w.freeze(b);
    assert_eq!(StreamImage::from_bytes(&image).unwrap().epoch(), Epoch(0));
    w.run_for(30 * MS);
    assert_eq!(w.sr(a).epoch(), Epoch(1), "A had the Accept and ratcheted");
    // B's host turned away A's Confirm and A's redials: the session is no longer there.
    assert!(!w.nodes[b].refusals_sent.is_empty());
    assert!(w.nodes[b]
        .refusals_sent
        .iter()
        .all(|r| *r == RefuseReason::UnknownSession));
    let d = w.thaw(&image, "D");
    w.drive();
    assert!(
        w.sr(d).failure().is_none(),
        "{:?}",
        w.nodes[d].accept_errors
    );
    assert_linked(&w, a, d, Epoch(1));
    settle(&mut w, a, d, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
    // The image still thaws only once.
    let e = w.thaw(&image, "E");
    w.drive();
    assert_eq!(
        w.sr(e).failure(),
        Some(&SessionError::Refused(RefuseReason::StaleEpoch))
    );
    assert_linked(&w, a, d, Epoch(1));
}

#[test]
fn own_reassoc_reflected_back_is_stale() {
    // While A waits for proof that B installed the new connection it keeps the previous key;
    // its own Reassoc (made under that key) reflected back at it must not make it step back.
    let (mut w, a, b, l0) = pair(14, 5 * MS);
    w.kill(l0);
    w.drive_until(|w| w.sr(a).link().is_some());
    assert_eq!(w.sr(a).epoch(), Epoch(1));
    let m = w.add_host("Mallory");
    let own = w.captured_reassoc[0].1.clone();
    let a_addr = w.nodes[a].local.contact;
    let z = w.inject(m, a_addr, &own);
    w.drive();
    assert_eq!(w.raw_frames(z), [Frame::Refuse(RefuseReason::StaleEpoch)]);
    assert_linked(&w, a, b, Epoch(1));
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 10_000).unwrap();
    ba.write(w.s(b), 10_000).unwrap();
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
}

#[test]
fn replays_cannot_push_out_the_pending_key() {
    // Regression: pending keys were dropped oldest-first, so replaying one captured Reassoc a
    // few times evicted the key a dialer with a lost Confirm needs, and the session failed.
    let (mut w, a, b, l0) = pair(15, 5 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 30_000).unwrap();
    ba.write(w.s(b), 30_000).unwrap();
    w.kill(l0);
    w.drive_until(|w| w.sr(a).link().is_some());
    let x = w.sr(a).link().unwrap();
    w.kill(x);
    let m = w.add_host("Mallory");
    let r = w.captured_reassoc[0].1.clone();
    let b_addr = w.nodes[b].local.contact;
    let max = w.config.max_pending_reassoc;
    let zs: Vec<ConnId> = (0..=max).map(|_| w.inject(m, b_addr, &r)).collect();
    w.drive();
    for z in zs {
        assert_eq!(w.raw_frames(z), [Frame::Refuse(RefuseReason::Busy)]);
    }
    assert!(w.sr(a).failure().is_none());
    assert_linked(&w, a, b, Epoch(2));
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();

    // A replay that overtakes the genuine request gets the Accept; the genuine copy is then
    // turned away as busy, and the dialer simply tries again with a fresh request.
    w.latency = 50 * MS;
    let l = w.sr(a).link().unwrap();
    w.kill(l);
    w.drive_until(|w| w.captured_reassoc.len() == 3);
    let r = w.captured_reassoc[2].1.clone();
    w.latency = MS;
    let z = w.inject(m, b_addr, &r);
    w.drive();
    assert!(matches!(w.raw_frames(z)[..], [Frame::Accept(_)]));
    assert_eq!(w.nodes[a].accept_errors, [RefuseReason::Busy]);
    assert_linked(&w, a, b, Epoch(3));
    settle(&mut w, a, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
}

// ------------------------------------------------------------------------------------------
// 10. Graceful close.

#[test]
fn graceful_close_reads_eof_then_closes_both() {
    let (mut w, a, b, l0) = pair(11, 2 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 100_000).unwrap();
    ba.write(w.s(b), 60_000).unwrap();
    w.s(a).shutdown_write();
    w.s(b).shutdown_write();
    assert_eq!(w.s(a).write(b"x"), Err(WriteError::Finished));
    w.drive();
    assert!(!w.sr(a).at_eof(), "unread bytes come before the end");
    ab.read_all(w.s(b));
    ba.read_all(w.s(a));
    ab.assert_delivered();
    ba.assert_delivered();
    for n in [a, b] {
        assert!(w.sr(n).at_eof());
        assert_eq!(w.s(n).read(&mut [0; 8]), Ok(0));
        assert_eq!(w.sr(n).unacked(), 0);
    }
    assert_eq!(w.seen("Fin"), 2);
    assert!(!w.saw(a, |e| *e == Event::Closed));
    let now = w.now;
    w.s(a).detach(now);
    w.s(b).detach(now);
    w.drive();
    for n in [a, b] {
        assert!(
            w.saw(n, |e| *e == Event::Closed),
            "{} closed",
            w.nodes[n].name
        );
        let s = w.s(n);
        assert!(s.is_finished());
        assert_eq!(s.link(), None);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.write(b"x"), Err(WriteError::Finished));
        assert_eq!(s.freeze(now), Err(FreezeError::Closed));
        assert!(s.failure().is_none());
    }
    assert!(!w.conn_open(l0));
    assert!(
        w.nodes[a].dials.is_empty(),
        "a closed session does not redial"
    );
    w.run_for(Duration::from_secs(60));
    assert!(w.nodes[a].dials.is_empty());
}

// ------------------------------------------------------------------------------------------
// 11. Both ends freeze at once.

#[test]
fn simultaneous_freeze_of_both_ends() {
    let (mut w, a, b, _) = pair(12, 5 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 100_000).unwrap();
    ba.write(w.s(b), 90_000).unwrap();
    w.run_for(3 * MS);
    ab.read_all(w.s(b));
    let now = w.now;
    w.s(a).freeze(now).unwrap();
    w.s(b).freeze(now).unwrap();
    // The two Freezes cross; each side answers the other's with a FreezeAck.
    w.drive_until(|w| w.sr(a).is_frozen() && w.sr(b).is_frozen());
    let ia = StreamImage::from_bytes(&w.finish_freeze(a)).unwrap();
    let ib = StreamImage::from_bytes(&w.finish_freeze(b)).unwrap();
    assert_eq!(w.seen("Freeze"), 2);
    assert_eq!(w.seen("FreezeAck"), 2);
    assert_eq!((ia.epoch(), ib.epoch()), (Epoch(0), Epoch(0)));
    assert_eq!(ia.peer().contact, w.nodes[b].local.contact);
    assert_eq!(ib.peer().contact, w.nodes[a].local.contact);
    // Nothing is lost: what one side wrote is either acknowledged by the other (read by its
    // application or in its image's input buffer) or still in the writer's image. With the
    // FreezeAcks crossing, the acknowledgement covers exactly what arrived.
    for (flow, wi, ri) in [(&ab, &ia, &ib), (&ba, &ib, &ia)] {
        let written = wi.stats().bytes_written;
        assert_eq!(written, flow.sent.len() as u64);
        let acked = written - wi.unacked_bytes() as u64;
        let received = ri.stats().bytes_read + ri.buffered_input_bytes() as u64;
        assert_eq!(ri.stats().bytes_read, flow.received.len() as u64);
        assert_eq!(received, acked, "{}", flow.name);
    }
    // Without forwarding pointers (PROTOCOL.md §5.4; see `both_move.rs` for the rendezvous) each
    // image only knows the other's old address, so two thawed sessions look for each other in
    // vain until the session timeout.
    let c = w.thaw(&ia.to_bytes(), "C");
    let d = w.thaw(&ib.to_bytes(), "D");
    w.run_for(w.config.session_timeout + Duration::from_secs(1));
    for n in [c, d] {
        assert!(w.nodes[n]
            .accept_errors
            .iter()
            .all(|r| *r == RefuseReason::UnknownSession));
        assert_eq!(
            w.sr(n).failure(),
            Some(&SessionError::TimedOut(w.config.session_timeout))
        );
    }
}

// ------------------------------------------------------------------------------------------
// 12. Random operation sequences: byte-exact delivery both ways.

#[derive(Debug, Clone)]
enum Op {
    Write { left: bool, len: usize },
    Read { left: bool, len: usize },
    Kill { left: bool },
    Migrate { left: bool },
    Advance { ms: u64 },
    Drive,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 1usize..120_000).prop_map(|(left, len)| Op::Write { left, len }),
        3 => (any::<bool>(), 1usize..120_000).prop_map(|(left, len)| Op::Read { left, len }),
        1 => any::<bool>().prop_map(|left| Op::Kill { left }),
        1 => any::<bool>().prop_map(|left| Op::Migrate { left }),
        2 => (0u64..40).prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::Drive),
    ]
}

fn run_ops(seed: u64, latency_ms: u64, ops: &[Op]) {
    let (mut w, a, b, _) = pair(seed, Duration::from_millis(latency_ms));
    let mut lr = Flow::new("L→R", seed ^ 1);
    let mut rl = Flow::new("R→L", seed ^ 2);
    let (mut left, mut right) = (a, b);
    let mut moves = 0;
    for op in ops {
        match *op {
            Op::Write { left: l, len } => {
                let (n, flow) = if l { (left, &mut lr) } else { (right, &mut rl) };
                match flow.write(w.s(n), len) {
                    Ok(_) | Err(WriteError::Blocked) => {}
                    Err(e) => panic!("{op:?}: {e}"),
                }
            }
            Op::Read { left: l, len } => {
                let (n, flow) = if l { (left, &mut rl) } else { (right, &mut lr) };
                match flow.read(w.s(n), len) {
                    Ok(_) | Err(ReadError::Blocked) => {}
                    Err(e) => panic!("{op:?}: {e}"),
                }
            }
            Op::Kill { left: l } => {
                let n = if l { left } else { right };
                match w.sr(n).link() {
                    Some(c) => w.kill(c),
                    // No current connection: kill a handshake in progress, if any.
                    None => {
                        if let Some(c) = w.open_conns_of(n).last() {
                            w.kill(*c);
                        }
                    }
                }
            }
            Op::Migrate { left: l } => {
                moves += 1;
                let name = format!("H{moves}");
                if l {
                    left = w.migrate(left, &name);
                } else {
                    right = w.migrate(right, &name);
                }
            }
            Op::Advance { ms } => w.run_for(Duration::from_millis(ms)),
            Op::Drive => w.drive(),
        }
        lr.assert_prefix();
        rl.assert_prefix();
        for n in [left, right] {
            assert!(w.sr(n).failure().is_none(), "{op:?}: {:?}", w.sr(n));
        }
    }
    settle(&mut w, left, right, &mut lr, &mut rl);
    lr.assert_delivered();
    rl.assert_delivered();
    assert_eq!(w.sr(left).epoch(), w.sr(right).epoch());
    // A side counts its own freezes and the peer's announced ones (a freeze without a
    // connection is announced to nobody).
    assert!(w.sr(left).stats().migrations <= moves);
    assert!(w.sr(right).stats().migrations <= moves);
    for n in &w.nodes {
        assert!(n.violations.is_empty(), "{}: {:?}", n.name, n.violations);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: RngSeed::Fixed(0x726f_616d),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_deliver_every_byte_exactly_once(
        seed in any::<u64>(),
        latency_ms in 0u64..6,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run_ops(seed, latency_ms, &ops);
    }
}

/// A sender whose send buffer is smaller than the receiver's acknowledgement threshold must not
/// wait out the receiver's ack delay each time it fills: blocking elicits an acknowledgement
/// (regression: throughput fell to one buffer per ack delay).
#[test]
fn blocked_writer_elicits_an_immediate_acknowledgement() {
    let mut w = World::new(31);
    w.latency = MS;
    w.config.send_capacity = 8 * 1024;
    w.config.ack_threshold = 64 * 1024;
    w.config.ack_delay = 200 * MS;
    let a = w.add_host("A");
    let b = w.add_host("B");
    w.associate(a, b);
    w.drive();
    let mut ab = Flow::new("A→B", 5);
    let start = w.elapsed();
    let mut rounds = 0;
    while ab.sent.len() < 64 * 1024 {
        ab.write_some(w.s(a), 64 * 1024);
        assert_eq!(ab.write(w.s(a), 1), Err(WriteError::Blocked));
        w.drive_until(|w| w.sr(a).unacked() == 0);
        rounds += 1;
    }
    let took = w.elapsed() - start;
    assert!(rounds >= 8);
    // Each round trip is ~2 ms of virtual time; waiting for the ack delay would take 200 ms.
    assert!(took < 200 * MS, "{rounds} rounds took {took:?}");
    ab.read_all(w.s(b));
    ab.assert_delivered();
}
