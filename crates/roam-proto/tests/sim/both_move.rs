//! Both ends of a stream moving at once: forwarding pointers (`Moved`, PROTOCOL.md §5.4) and the
//! tie-break between simultaneous re-associations (§5.5).

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use roam_proto::frame::Moved;
use roam_proto::{EndpointId, Epoch, Frame, RefuseReason, SessionId, StreamImage, MAX_REDIRECTS};

use super::{assert_linked, pair, settle, MS};

/// Like `assert_linked`, but the side that dialed last may not know the other's new endpoint
/// id (an `Accept` does not carry it; PROTOCOL.md §5.5): only its contact address is checked.
fn assert_joined(w: &World, l: NodeId, r: NodeId, epoch: Epoch) {
    let (sl, sr) = (w.sr(l), w.sr(r));
    assert!(sl.link().is_some(), "{} has a link", w.nodes[l].name);
    assert_eq!(sl.link(), sr.link(), "same connection");
    assert_eq!((sl.epoch(), sr.epoch()), (epoch, epoch), "epochs");
    assert_eq!(sl.key_fingerprint(), sr.key_fingerprint(), "keys");
    assert_eq!(sl.peer().contact, w.nodes[r].local.contact);
    assert_eq!(sr.peer().contact, w.nodes[l].local.contact);
    let link = sl.link().unwrap();
    assert_eq!(w.established(l).last(), Some(&(link, epoch)));
    assert_eq!(w.established(r).last(), Some(&(link, epoch)));
}
use crate::util::{Flow, NodeId, World};

const HIGH: EndpointId = EndpointId([0xee; 16]);
const LOW: EndpointId = EndpointId([0x11; 16]);

/// A faulty or unusual interleaving applied after both images are thawed.
#[derive(Debug, Clone, Copy)]
enum Twist {
    /// Both thaw at the same instant with equal latencies: the two `Reassoc`s cross.
    Crossing,
    /// The winner's `Accept` is lost with its connection.
    AcceptLost,
    /// The winning connection dies before the `Confirm` reaches the listener.
    ConfirmLost,
    /// The loser (lower id) thaws this much later.
    LowLater(Duration),
    /// The high end thaws this much later.
    HighLater(Duration),
    /// The low end's connections are slow (its abandoned request arrives late).
    SlowLow(Duration),
}

/// A and B associate and exchange data, freeze at once, and are thawed on C (A's image) and D
/// (B's image); A's and B's hosts forward the session to them. `c_high` gives C the greater
/// endpoint id. Returns the world, C, D and the two flows (A→B continues as C→D).
fn both_move(seed: u64, c_high: bool, twist: Twist) -> (World, NodeId, NodeId, Flow, Flow) {
    let (mut w, a, b, _) = pair(seed, 5 * MS);
    let mut ab = Flow::new("A→B", seed ^ 1);
    let mut ba = Flow::new("B→A", seed ^ 2);
    ab.write(w.s(a), 90_000).unwrap();
    ba.write(w.s(b), 70_000).unwrap();
    w.run_for(3 * MS);
    ab.read_all(w.s(b));
    let now = w.now;
    w.s(a).freeze(now).unwrap();
    w.s(b).freeze(now).unwrap();
    w.drive_until(|w| w.sr(a).is_frozen() && w.sr(b).is_frozen());
    let ia = w.finish_freeze(a);
    let ib = w.finish_freeze(b);
    let sid: SessionId = StreamImage::from_bytes(&ia).unwrap().session_id();
    let c = w.add_host("C");
    let d = w.add_host("D");
    let (hc, hd) = if c_high { (HIGH, LOW) } else { (LOW, HIGH) };
    w.nodes[c].local.endpoint = hc;
    w.nodes[d].local.endpoint = hd;
    let (high, low) = if c_high { (c, d) } else { (d, c) };
    let (cc, dc) = (w.nodes[c].local.contact, w.nodes[d].local.contact);
    w.forward(a, sid, cc);
    w.forward(b, sid, dc);
    let (ia_first, later) = match twist {
        Twist::LowLater(t) => (low == d, Some(t)),
        Twist::HighLater(t) => (high == d, Some(t)),
        _ => (true, None),
    };
    match twist {
        Twist::AcceptLost => w.kill_before.push((high, "Accept")),
        Twist::ConfirmLost => w.kill_before.push((low, "Confirm")),
        Twist::SlowLow(t) => w.nodes[low].dial_latency = Some(t),
        _ => {}
    }
    let (first, second) = if ia_first {
        ((&ia, c), (&ib, d))
    } else {
        ((&ib, d), (&ia, c))
    };
    w.thaw_on(first.0, first.1);
    if let Some(t) = later {
        w.run_for(t);
    }
    w.thaw_on(second.0, second.1);
    w.drive_until(|w| {
        w.sr(c).link().is_some() && w.sr(c).link() == w.sr(d).link() && w.in_flight() == 0
    });
    (w, c, d, ab, ba)
}

/// C and D converged: one connection, same epoch and key, each knowing the other; no failure
/// and no protocol violation anywhere; every byte delivered once, in order, both ways (also
/// bytes written after the move, and across one more reconnection under the agreed key).
fn assert_converged(w: &mut World, c: NodeId, d: NodeId, mut cd: Flow, mut dc: Flow) {
    w.drive();
    for n in [c, d] {
        assert!(
            w.sr(n).failure().is_none(),
            "{}: {:?}",
            w.nodes[n].name,
            w.sr(n)
        );
    }
    let epoch = w.sr(c).epoch();
    assert_joined(w, c, d, epoch);
    cd.write(w.s(c), 40_000).unwrap();
    dc.write(w.s(d), 50_000).unwrap();
    settle(w, c, d, &mut cd, &mut dc);
    // The agreed key works: a reconnection re-associates.
    let l = w.sr(c).link().unwrap();
    w.kill(l);
    cd.write(w.s(c), 10_000).unwrap();
    settle(w, c, d, &mut cd, &mut dc);
    assert_joined(w, c, d, epoch.next());
    cd.assert_delivered();
    dc.assert_delivered();
    for n in &w.nodes {
        assert!(n.violations.is_empty(), "{}: {:?}", n.name, n.violations);
    }
}

#[test]
fn both_ends_move_at_once_and_find_each_other_through_forwarding() {
    for c_high in [true, false] {
        let (mut w, c, d, cd, dc) = both_move(40, c_high, Twist::Crossing);
        let (high, low) = if c_high { (c, d) } else { (d, c) };
        // Each dialed the other's old host and was sent on.
        assert!(!w.nodes[c].moved_received.is_empty());
        assert!(!w.nodes[d].moved_received.is_empty());
        assert!(w.nodes[0].moved_sent >= 1 && w.nodes[1].moved_sent >= 1);
        // The requests crossed: the higher id refused the lower's; the lower answered.
        assert_eq!(w.nodes[high].refusals_sent, [RefuseReason::Busy]);
        assert!(w.nodes[low].refusals_sent.is_empty());
        // Exactly one re-association completed.
        assert_eq!(w.sr(c).epoch(), Epoch(1), "c_high={c_high}");
        assert!(w.established(low).iter().all(|(_, e)| *e == Epoch(1)));
        assert_eq!(w.established(high).len(), 1);
        assert_converged(&mut w, c, d, cd, dc);
    }
}

#[test]
fn simultaneous_dials_under_faults_and_interleavings_converge() {
    let twists = [
        Twist::Crossing,
        Twist::AcceptLost,
        Twist::ConfirmLost,
        Twist::LowLater(3 * MS),
        Twist::LowLater(12 * MS),
        Twist::HighLater(3 * MS),
        Twist::HighLater(12 * MS),
        Twist::SlowLow(40 * MS),
    ];
    for (i, twist) in twists.into_iter().enumerate() {
        for c_high in [true, false] {
            let (mut w, c, d, cd, dc) = both_move(50 + i as u64, c_high, twist);
            assert!(
                w.sr(c).epoch() >= Epoch(1),
                "{twist:?} c_high={c_high}: {:?}",
                w.sr(c)
            );
            assert_converged(&mut w, c, d, cd, dc);
        }
    }
}

#[test]
fn a_redirect_loop_is_bounded_and_the_peer_still_finds_the_mover() {
    // B's old host forwards to X and X back to B's old host: C follows at most MAX_REDIRECTS
    // redirects in a row at once, then backs off. D (B's image) finds C through A's host.
    let (mut w, a, b, _) = pair(60, 5 * MS);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 30_000).unwrap();
    ba.write(w.s(b), 30_000).unwrap();
    w.drive();
    let now = w.now;
    w.s(a).freeze(now).unwrap();
    w.s(b).freeze(now).unwrap();
    w.drive_until(|w| w.sr(a).is_frozen() && w.sr(b).is_frozen());
    let ia = w.finish_freeze(a);
    let ib = w.finish_freeze(b);
    let sid = StreamImage::from_bytes(&ia).unwrap().session_id();
    let x = w.add_host("X");
    let (bc, xc) = (w.nodes[b].local.contact, w.nodes[x].local.contact);
    w.forward(b, sid, xc);
    w.forward(x, sid, bc);
    let c = w.thaw(&ia, "C");
    w.run_for(Duration::from_secs(5));
    let dials = w.nodes[c].dials.len();
    let moved = w.nodes[c].moved_received.len();
    assert!(moved > MAX_REDIRECTS as usize, "{moved} redirects followed");
    // Immediate redirects, then the redial backoff (10 ms doubling to 1 s, jittered into the
    // upper half of each wait): about 15-20 in 5 s.
    assert!(dials <= 30, "{dials} dials in 5 s");
    assert!(w.sr(c).failure().is_none());
    // D dials A's old host, which forwards to C.
    let cc = w.nodes[c].local.contact;
    w.forward(a, sid, cc);
    let d = w.thaw(&ib, "D");
    w.drive_until(|w| w.sr(c).link().is_some() && w.sr(c).link() == w.sr(d).link());
    w.drive();
    assert_converged(&mut w, c, d, ab, ba);
}

#[test]
fn forged_moved_only_delays() {
    // Only A moves (to C); B stays. An on-path attacker answers C's Reassoc first with a forged
    // Moved: to a host without the session, to nowhere, to C itself, or naming another session.
    // C ends up re-associated with B at B's own address every time.
    let (mut w, a, b, _) = pair(70, 5 * MS);
    let m = w.add_host("Mallory");
    let (bc, mc) = (w.nodes[b].local.contact, w.nodes[m].local.contact);
    let mut ab = Flow::new("A→B", 1);
    let mut ba = Flow::new("B→A", 2);
    ab.write(w.s(a), 20_000).unwrap();
    ba.write(w.s(b), 20_000).unwrap();
    let mut left = a;
    let nowhere = "127.0.0.250:9".parse().unwrap();
    for (i, kind) in ["mallory", "nowhere", "self", "other-session"]
        .into_iter()
        .enumerate()
    {
        let image = w.freeze(left);
        let sid = StreamImage::from_bytes(&image).unwrap().session_id();
        let c = w.thaw(&image, &format!("C{i}"));
        let own = w.nodes[c].local.contact;
        let (session, contact) = match kind {
            "mallory" => (sid, mc),
            "nowhere" => (sid, nowhere),
            "self" => (sid, own),
            _ => (SessionId([7; 16]), mc),
        };
        w.drive_until(|w| !w.nodes[c].dials.is_empty());
        let conn = *w.open_conns_of(c).last().unwrap();
        w.answer_first(conn, &Frame::Moved(Moved { session, contact }));
        w.drive();
        assert_eq!(w.nodes[c].moved_received.len(), 1, "{kind}");
        assert!(w.sr(c).failure().is_none(), "{kind}: {:?}", w.sr(c));
        assert_linked(&w, c, b, w.sr(b).epoch());
        assert_eq!(w.sr(c).peer().contact, bc, "{kind}");
        assert_eq!(w.sr(c).key_fingerprint(), w.sr(b).key_fingerprint());
        // The delay is bounded by a few redial backoffs.
        assert!(
            w.nodes[c].dials.len() <= 4,
            "{kind}: {:?}",
            w.nodes[c].dials
        );
        left = c;
    }
    settle(&mut w, left, b, &mut ab, &mut ba);
    ab.assert_delivered();
    ba.assert_delivered();
}

#[test]
fn a_forwarding_entry_does_not_disturb_a_live_session() {
    // B's host holds a (stale) pointer for the session it still hosts: the live session answers.
    let (mut w, a, b, _) = pair(80, 5 * MS);
    let sid = w.sr(b).id();
    let nowhere = "127.0.0.251:9".parse().unwrap();
    w.forward(b, sid, nowhere);
    let c = w.migrate(a, "C");
    assert_eq!(w.nodes[b].moved_sent, 0);
    assert_linked(&w, c, b, Epoch(1));
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    c_high: bool,
    latency_c: u64,
    latency_d: u64,
    delay_ms: u64,
    delay_c: bool,
    fault: u8,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        any::<bool>(),
        0u64..30,
        0u64..30,
        0u64..25,
        any::<bool>(),
        0u8..6,
    )
        .prop_map(
            |(seed, c_high, latency_c, latency_d, delay_ms, delay_c, fault)| Case {
                seed,
                c_high,
                latency_c,
                latency_d,
                delay_ms,
                delay_c,
                fault,
            },
        )
}

/// Random latencies per dialing host, a random head start, and at most one killed handshake.
fn run_case(k: &Case) {
    let (mut w, a, b, _) = pair(k.seed, 5 * MS);
    let mut ab = Flow::new("A→B", k.seed ^ 1);
    let mut ba = Flow::new("B→A", k.seed ^ 2);
    ab.write(w.s(a), 60_000).unwrap();
    ba.write(w.s(b), 60_000).unwrap();
    w.run_for(2 * MS);
    let now = w.now;
    w.s(a).freeze(now).unwrap();
    w.s(b).freeze(now).unwrap();
    w.drive_until(|w| w.sr(a).is_frozen() && w.sr(b).is_frozen());
    let ia = w.finish_freeze(a);
    let ib = w.finish_freeze(b);
    let sid = StreamImage::from_bytes(&ia).unwrap().session_id();
    let c = w.add_host("C");
    let d = w.add_host("D");
    let (hc, hd) = if k.c_high { (HIGH, LOW) } else { (LOW, HIGH) };
    w.nodes[c].local.endpoint = hc;
    w.nodes[d].local.endpoint = hd;
    w.nodes[c].dial_latency = Some(Duration::from_millis(k.latency_c));
    w.nodes[d].dial_latency = Some(Duration::from_millis(k.latency_d));
    let (cc, dc) = (w.nodes[c].local.contact, w.nodes[d].local.contact);
    w.forward(a, sid, cc);
    w.forward(b, sid, dc);
    match k.fault {
        1 => w.kill_before.push((c, "Accept")),
        2 => w.kill_before.push((d, "Accept")),
        3 => w.kill_before.push((c, "Confirm")),
        4 => w.kill_before.push((d, "Confirm")),
        _ => {}
    }
    let (first, second) = if k.delay_c {
        ((&ib, d), (&ia, c))
    } else {
        ((&ia, c), (&ib, d))
    };
    w.thaw_on(first.0, first.1);
    w.run_for(Duration::from_millis(k.delay_ms));
    w.thaw_on(second.0, second.1);
    w.drive_until(|w| {
        w.sr(c).link().is_some() && w.sr(c).link() == w.sr(d).link() && w.in_flight() == 0
    });
    assert_converged(&mut w, c, d, ab, ba);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: RngSeed::Fixed(0x626f_7468),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn both_ends_moving_under_random_interleavings_converge(k in case()) {
        run_case(&k);
    }
}
