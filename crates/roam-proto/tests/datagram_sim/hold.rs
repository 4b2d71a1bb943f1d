//! Hold queues of a peer whose socket is migrating: bounded, oldest dropped first, and dropped
//! after `hold_timeout` if the socket never comes back.

use std::time::Duration;

use roam_proto::datagram::dkind;
use roam_proto::{DatagramConfig, DatagramEvent};

use crate::net::{addr, received_from, Net, MS};
use crate::{star, Traffic, SETTLE};

const M: usize = 0;

#[test]
fn hold_queue_drops_the_oldest_beyond_capacity_and_delivers_the_rest() {
    // A small capacity on the peer (configs are per socket; the peer's is what counts).
    let mut net = Net::new(50);
    let mut cfg = DatagramConfig::default();
    cfg.hold_capacity = 8;
    net.add("m", addr(2, 4000), DatagramConfig::default());
    net.add("p", addr(3, 4000), cfg);
    net.send(1, addr(2, 4000), b"hi").unwrap();
    assert!(net.settle(SETTLE));
    let image = net.freeze(M);
    let mut t = Traffic::default();
    for _ in 0..13 {
        t.send(&mut net, 1, M);
    }
    assert_eq!(net.sock(1).stats().dropped_hold, 5);
    net.run_for(100 * MS);
    net.thaw(M, &image, addr(80, 4000));
    assert!(net.settle(SETTLE));
    let (seqs, from) = received_from(&net, 1, M);
    assert_eq!(seqs, (5..13).collect::<Vec<_>>(), "the newest 8, in order");
    assert!(from.iter().all(|a| *a == addr(3, 4000)));
    let s = net.sock(1).stats();
    assert_eq!((s.dropped_hold, s.held_and_sent), (5, 8));
    // Counted once, not also as unreachable.
    assert_eq!(s.dropped_unreachable, 0);
}

#[test]
fn hold_timeout_without_a_thaw_drops_what_is_held_and_reports_unreachable() {
    let mut net = star(51, 2);
    let hold = DatagramConfig::default().hold_timeout;
    let _image = net.freeze(M);
    let frozen_at = net.now;
    let mut t = Traffic::default();
    for _ in 0..3 {
        t.send(&mut net, 1, M);
    }
    t.send(&mut net, 2, M);
    // Nothing happens before the timeout.
    net.run_until(frozen_at + hold - 10 * MS);
    for p in 1..=2 {
        assert!(net.sock(p).peers()[0].migrating);
        assert!(net.nodes[p].events.is_empty());
    }
    assert!(net.settle(SETTLE));
    let m = net.nodes[M].first_addr();
    for (p, n) in [(1, 3), (2, 1)] {
        assert_eq!(
            net.nodes[p].events,
            [DatagramEvent::PeerUnreachable { peer: m }]
        );
        let s = net.sock(p).stats();
        assert_eq!((s.dropped_unreachable, s.held_and_sent), (n, 0));
        assert!(!net.sock(p).peers()[0].migrating);
        assert_eq!(net.sock(p).poll_timeout(), None);
    }
    // Within a millisecond or so of the configured timeout (the Freezing took one latency).
    assert!(net.now - frozen_at <= hold + Duration::from_millis(10));
    // Afterwards the peer sends straight to the old address again (the frozen socket drops it).
    let data = net.captured(dkind::DATA, Some(1)).len();
    t.send(&mut net, 1, M);
    assert_eq!(net.captured(dkind::DATA, Some(1)).len(), data + 1);
    assert!(received_from(&net, 1, M).0.is_empty());
}
