//! Issue 5 on the simulated network: encrypted and authenticated `Data`, the replay window and
//! its counters across a migration, path validation of re-associating addresses (success,
//! failure, the anti-amplification bound, a spoofed `Reassoc`), and bounded half-open
//! associations under a `Hello` flood.

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam_proto::datagram::{dkind, Packet};
use roam_proto::{DatagramConfig, DatagramEvent, SocketId};

use crate::net::{addr, received_from, Rule, MS};
use crate::{is_moved, star, Traffic, SETTLE};

const M: usize = 0;

#[test]
fn tampered_data_is_dropped_and_counted_never_delivered() {
    let mut net = star(200, 1);
    // The genuine packet never arrives; the attacker delivers every one-bit alteration of it.
    net.rules.push(Rule::drop_next(dkind::DATA, 1));
    let dest = net.nodes[1].first_addr();
    net.send(M, dest, b"the genuine payload").unwrap();
    assert!(net.settle(SETTLE));
    let genuine = net
        .captured(dkind::DATA, Some(M))
        .last()
        .unwrap()
        .bytes
        .clone();
    let before = net.sock(1).stats();
    for i in 1..genuine.len() {
        for bit in [0x01, 0x80] {
            let mut v = genuine.to_vec();
            v[i] ^= bit;
            net.deliver_now(1, net.nodes[M].first_addr(), Bytes::from(v));
        }
    }
    let after = net.sock(1).stats();
    assert!(net.nodes[1].got.is_empty(), "nothing altered is delivered");
    let n = 2 * (genuine.len() as u64 - 1);
    // Association id bits: an unknown association; every other bit: the tag fails (or a
    // counter bit names a counter already received: the replay window drops it first).
    let replayed = after.replayed - before.replayed;
    assert_eq!(after.refused - before.refused + replayed, n);
    assert_eq!(after.auth_failed - before.auth_failed + replayed, n - 16);
    // The genuine packet itself is delivered, once.
    net.deliver_now(1, net.nodes[M].first_addr(), genuine.clone());
    net.deliver_now(1, net.nodes[M].first_addr(), genuine);
    assert_eq!(net.nodes[1].got.len(), 1);
    assert_eq!(&net.nodes[1].got[0].1[..], b"the genuine payload");
    let mut t = Traffic::default();
    t.send(&mut net, M, 1);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
}

#[test]
fn replay_window_drops_duplicates_and_old_counters_and_accepts_reordering() {
    let mut net = star(201, 1);
    let mut t = Traffic::default();
    for _ in 0..1100 {
        t.send(&mut net, M, 1);
    }
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    let data: Vec<Bytes> = net
        .captured(dkind::DATA, Some(M))
        .into_iter()
        .map(|s| s.bytes)
        .collect();
    let before = net.sock(1).stats().replayed;
    // Recent (inside the window) and old (below it) replays alike.
    for d in data.iter().rev().take(10).chain(data.iter().take(10)) {
        net.deliver_now(1, addr(66, 6666), d.clone());
    }
    assert_eq!(net.sock(1).stats().replayed, before + 20);
    t.assert_exact(&net);
}

#[test]
fn counters_and_replay_window_survive_a_migration() {
    let mut net = star(202, 1);
    let mut t = Traffic::default();
    for _ in 0..5 {
        t.send(&mut net, M, 1);
        t.send(&mut net, 1, M);
    }
    assert!(net.settle(SETTLE));
    let to_m: Vec<Bytes> = net
        .captured(dkind::DATA, Some(1))
        .into_iter()
        .map(|s| s.bytes)
        .collect();
    let counter = |b: &Bytes| u64::from_be_bytes(b[9..17].try_into().unwrap());
    let last_before = counter(
        net.captured(dkind::DATA, Some(M))
            .last()
            .map(|s| &s.bytes)
            .unwrap(),
    );
    net.migrate(M, addr(90, 4000));
    assert!(net.settle(SETTLE));
    t.send(&mut net, M, 1);
    assert!(net.settle(SETTLE));
    // The moved socket continues its counter (never reusing a nonce under the same key) ...
    let first_after = counter(&net.captured(dkind::DATA, Some(M)).last().unwrap().bytes);
    assert_eq!(first_after, last_before + 1);
    // ... and still refuses what it received before the move.
    let before = net.sock(M).stats().replayed;
    for d in &to_m {
        net.deliver_now(M, addr(66, 6666), d.clone());
    }
    assert_eq!(net.sock(M).stats().replayed, before + to_m.len() as u64);
    t.assert_exact(&net);
}

#[test]
fn path_challenge_succeeds_from_the_new_address() {
    let mut net = star(203, 1);
    let mut t = Traffic::default();
    let image = net.freeze(M);
    t.send(&mut net, 1, M);
    net.thaw(M, &image, addr(91, 4000));
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    assert_eq!(net.captured(dkind::PATH_CHALLENGE, Some(1)).len(), 1);
    assert_eq!(net.captured(dkind::PATH_RESPONSE, Some(M)).len(), 1);
    let ch = &net.captured(dkind::PATH_CHALLENGE, Some(1))[0];
    assert_eq!(
        ch.to,
        addr(91, 4000),
        "challenged where the Reassoc came from"
    );
    // Nothing but the challenge went to the new address before the response.
    let resp_at = net.captured(dkind::PATH_RESPONSE, Some(M))[0].at;
    assert!(net
        .log
        .iter()
        .filter(|s| s.node == Some(1) && s.to == addr(91, 4000) && s.at < resp_at)
        .all(|s| s.kind() == dkind::PATH_CHALLENGE));
    assert_eq!(net.sock(1).peers()[0].addr, addr(91, 4000));
}

#[test]
fn path_challenge_fails_when_the_new_address_cannot_answer_and_nothing_moves() {
    let mut net = star(204, 1);
    let image = net.freeze(M);
    // Every PathResponse is lost: the new address never proves it can be reached.
    net.rules
        .push(Rule::drop_all(Some(dkind::PATH_RESPONSE), None, None));
    net.thaw(M, &image, addr(92, 4000));
    net.run_for(5_000 * MS);
    let row = &net.sock(1).peers()[0];
    assert_eq!((row.addr, row.peer_epoch), (net.nodes[M].first_addr(), 0));
    assert!(row.migrating, "still holding");
    assert_eq!(net.nodes[1].count_events(is_moved), 0);
    assert!(!net
        .log
        .iter()
        .any(|s| s.node == Some(1) && s.to == addr(92, 4000) && s.kind() != dkind::PATH_CHALLENGE));
}

#[test]
fn amplification_to_an_unvalidated_address_stays_within_three_times() {
    let mut net = star(205, 1);
    let image = net.freeze(M);
    net.rules
        .push(Rule::drop_all(Some(dkind::PATH_RESPONSE), None, None));
    let new = addr(93, 4000);
    net.thaw(M, &image, new);
    assert!(net.settle(SETTLE));
    let got: usize = net
        .log
        .iter()
        .filter(|s| s.node == Some(M) && s.from == new && s.to == net.nodes[1].first_addr())
        .filter(|s| s.kind() == dkind::REASSOC)
        .map(|s| s.bytes.len())
        .sum();
    let sent: usize = net
        .log
        .iter()
        .filter(|s| s.node == Some(1) && s.to == new)
        .map(|s| s.bytes.len())
        .sum();
    assert!(sent > 0);
    assert!(sent <= 3 * got, "sent {sent} bytes for {got} received");
    // Challenges were resent on the timer only as far as the budget allowed.
    assert!(net.captured(dkind::PATH_CHALLENGE, Some(1)).len() > 8);
}

#[test]
fn spoofed_reassoc_replayed_from_another_address_never_redirects() {
    let mut net = star(206, 1);
    let eve = addr(66, 6666);
    let image = net.freeze(M);
    // The genuine request is delayed (its first copy lost); Eve replays it from her address
    // first.
    net.rules.push(Rule::drop_next(dkind::REASSOC, 1));
    net.thaw(M, &image, addr(94, 4000));
    let genuine = net.captured(dkind::REASSOC, Some(M))[0].bytes.clone();
    net.inject(eve, net.nodes[1].first_addr(), genuine);
    let mut t = Traffic::default();
    t.send(&mut net, 1, M);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    assert_eq!(net.sock(1).peers()[0].addr, addr(94, 4000));
    let to_eve: Vec<u8> = net
        .log
        .iter()
        .filter(|s| s.to == eve && s.node.is_some())
        .map(|s| s.kind())
        .collect();
    assert!(!to_eve.is_empty() && to_eve.iter().all(|k| *k == dkind::PATH_CHALLENGE));
    assert!(net.nodes[1]
        .events
        .iter()
        .all(|e| !matches!(e, DatagramEvent::PeerMoved { now_at, .. } if *now_at == eve)));
}

#[test]
fn hello_flood_keeps_half_open_associations_bounded_and_established_ones_intact() {
    let mut net = star(207, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(207);
    let max = DatagramConfig::default().max_half_open;
    for k in 0..3000u32 {
        let mut s = [0u8; 16];
        let mut eph = [0u8; 32];
        rng.fill_bytes(&mut s);
        rng.fill_bytes(&mut eph);
        let hello = Packet::Hello {
            socket: SocketId(s),
            eph,
            nonce: [0; 16],
            suites: vec![2, 1],
        };
        net.inject(
            addr(100 + (k % 50) as u8, 5000 + k as u16),
            net.nodes[M].first_addr(),
            hello.encode(),
        );
        if k % 100 == 99 {
            net.run_for(100 * MS);
        }
    }
    net.run_for(100 * MS);
    let s = net.sock(M).stats();
    assert!(net.sock(M).peers().len() <= 1 + max);
    assert!(s.half_open_evicted > 0 || s.hello_limited > 0, "{s:?}");
    let mut t = Traffic::default();
    t.send(&mut net, 1, M);
    t.send(&mut net, M, 1);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    assert_eq!(received_from(&net, 1, M).0, [0]);
}
