//! Planned migration of one socket with several peers (claims 10, 11, 21-27, 38-43).

use roam_proto::datagram::dkind;
use roam_proto::{DatagramEvent, DatagramImage};

use crate::net::{addr, Net, MS};
use crate::{is_moved, is_reassociated, star, Traffic, SETTLE};

const M: usize = 0;

/// Every peer's table maps the mover's first address to `now_at`, at `epoch`, and the mover has
/// no re-association outstanding.
fn assert_tables(net: &Net, peers: usize, now_at: std::net::SocketAddr, epoch: u64) {
    let first = net.nodes[M].first_addr();
    for p in 1..=peers {
        let rows = net.sock(p).peers();
        assert_eq!(rows.len(), 1, "peer {p} knows one socket");
        let r = &rows[0];
        assert_eq!(
            r.known_addr, first,
            "peer {p}: known address is the first one"
        );
        assert_eq!(r.addr, now_at, "peer {p}: translated to the new address");
        assert_eq!(r.peer_epoch, epoch);
        assert_eq!(r.socket, net.sock(M).id());
        assert!(!r.migrating && !r.reassociating);
    }
    for r in net.sock(M).peers() {
        assert!(!r.reassociating, "{:?}", r);
        assert!(!r.migrating);
    }
    assert_eq!(net.sock(M).epoch(), epoch);
}

/// One planned move of node `M` to `to` in the middle of steady traffic: datagrams in flight
/// towards the old address when the freeze starts, datagrams sent by the peers while the mover
/// is frozen (held), and traffic again after the thaw.
fn move_under_traffic(net: &mut Net, t: &mut Traffic, peers: usize, to: std::net::SocketAddr) {
    // Steady traffic both ways.
    for _ in 0..5 {
        for p in 1..=peers {
            t.send(net, p, M);
            t.send(net, M, p);
        }
        net.run_for(3 * MS);
    }
    // Freeze: the Freezing packets go out; what the peers send before they arrive is in flight
    // to the old address and lands in the receive queue while the freeze drains.
    let now = net.now;
    net.sock_mut(M).freeze(now).unwrap();
    net.flush(M);
    for p in 1..=peers {
        t.send(net, p, M);
    }
    assert!(!t.send(net, M, 1), "a freezing socket refuses to send");
    let done = net.run_until_or(net.now + SETTLE, |n| n.sock(M).is_frozen());
    assert!(done);
    // Every peer acknowledged the freeze, long before the freeze timeout.
    assert!(net.now - now < 20 * MS);
    let image = net.sock(M).image().unwrap().to_bytes();
    for p in 1..=peers {
        assert!(net.sock(p).peers()[0].migrating, "peer {p} holds");
    }
    // While frozen, what the peers send is held at the peers: nothing goes to the mover.
    let data_before = net.captured(dkind::DATA, None).len();
    for _ in 0..4 {
        for p in 1..=peers {
            t.send(net, p, M);
        }
        net.run_for(7 * MS);
    }
    assert_eq!(net.captured(dkind::DATA, None).len(), data_before);
    assert_eq!(
        DatagramImage::from_bytes(&image).unwrap().peer_count(),
        peers
    );
    net.thaw(M, &image, to);
    assert!(net.settle(SETTLE));
    // And after: the applications keep using the first addresses.
    for _ in 0..3 {
        for p in 1..=peers {
            t.send(net, p, M);
            t.send(net, M, p);
        }
        net.run_for(2 * MS);
    }
    assert!(net.settle(SETTLE));
}

#[test]
fn mover_with_three_peers_migrates_twice_without_losing_a_datagram() {
    const PEERS: usize = 3;
    let mut net = star(10, PEERS);
    let mut t = Traffic::default();
    let first = net.nodes[M].first_addr();
    let moves = [addr(20, 5000), addr(21, 6001)];
    for (k, &to) in moves.iter().enumerate() {
        let epoch = k as u64 + 1;
        move_under_traffic(&mut net, &mut t, PEERS, to);
        assert_tables(&net, PEERS, to, epoch);
        // One Reassoc per peer, accepted once, one PeerMoved each.
        let reassocs = net
            .captured(dkind::REASSOC, Some(M))
            .into_iter()
            .filter(|s| s.from == to)
            .count();
        assert_eq!(reassocs, PEERS, "no resend on a loss-free network");
        for p in 1..=PEERS {
            assert_eq!(net.nodes[p].count_events(is_moved), k + 1);
            assert_eq!(
                net.nodes[p].events.iter().rfind(|e| is_moved(e)),
                Some(&DatagramEvent::PeerMoved {
                    peer: first,
                    now_at: to
                })
            );
            let s = net.sock(p).stats();
            assert_eq!(s.reassoc_accepted, epoch);
            assert_eq!(s.held_and_sent, 4 * epoch, "held while frozen: {s:?}");
            assert_eq!(s.refused, 0);
        }
        assert_eq!(net.nodes[M].count_events(is_reassociated), PEERS * (k + 1));
    }
    t.assert_exact(&net);
    for p in 1..=PEERS {
        assert_eq!((t.sent(p, M), t.sent(M, p)), (26, 16));
    }
    // Every datagram arrived: nothing dropped anywhere, counters carried across both moves.
    for i in 0..=PEERS {
        let s = net.sock(i).stats();
        assert_eq!(
            s.dropped_hold + s.dropped_recv + s.dropped_unreachable,
            0,
            "node {i}: {s:?}"
        );
    }
    let s = net.sock(M).stats();
    assert_eq!(s.migrations, 2);
    assert_eq!(s.reassoc_sent, 2 * PEERS as u64);
    assert_eq!(s.reassoc_resent_on_data, 0);
    assert_eq!(
        s.received,
        (1..=PEERS)
            .map(|p| u64::from(t.sent(p, M)) + 1)
            .sum::<u64>()
    );
    // The only packets to a dead address are none at all: the peers held instead.
    assert_eq!(net.stats.to_nowhere, 0);
}

#[test]
fn datagrams_unread_at_the_freeze_travel_in_the_image_and_come_first() {
    let mut net = star(11, 2);
    let mut t = Traffic::default();
    net.nodes[M].auto_recv = false;
    for _ in 0..3 {
        t.send(&mut net, 1, M);
        t.send(&mut net, 2, M);
    }
    net.run_for(MS);
    // Freeze with those still in flight: the drain puts them in the receive queue.
    let image = net.freeze(M);
    let img = DatagramImage::from_bytes(&image).unwrap();
    assert_eq!(img.buffered_datagrams(), 6);
    assert_eq!(img.epoch(), 0);
    assert_eq!(img.peer_count(), 2);
    assert_eq!(img.socket_id(), net.sock(M).id());
    // Held at the peers while frozen.
    for _ in 0..2 {
        t.send(&mut net, 1, M);
        t.send(&mut net, 2, M);
    }
    net.thaw(M, &image, addr(30, 4000));
    assert!(
        net.sock_mut(M).take_wake_recv(),
        "buffered input wakes the reader"
    );
    // Before any packet arrives, the image's datagrams are readable at the new place.
    let mut early = Vec::new();
    while let Some(d) = net.sock_mut(M).recv() {
        early.push(d);
    }
    assert_eq!(early.len(), 6);
    net.nodes[M].got.extend(early);
    net.nodes[M].auto_recv = true;
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
}

#[test]
fn a_peer_that_also_talks_to_others_keeps_its_other_associations_untouched() {
    // Nodes 1 and 2 also talk to each other; node 0 moving changes nothing between them.
    let mut net = star(12, 2);
    let mut t = Traffic::default();
    t.send(&mut net, 1, 2);
    assert!(net.settle(SETTLE));
    net.migrate(M, addr(40, 4000));
    assert!(net.settle(SETTLE));
    t.send(&mut net, 2, 1);
    t.send(&mut net, 1, 2);
    t.send(&mut net, 1, M);
    t.send(&mut net, M, 2);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    let rows = net.sock(1).peers();
    assert_eq!(rows.len(), 2);
    let other = rows
        .iter()
        .find(|r| r.known_addr == net.nodes[2].first_addr())
        .unwrap();
    assert_eq!(other.addr, net.nodes[2].first_addr());
    assert_eq!(other.peer_epoch, 0);
}
