//! First contact: `Hello` / `Welcome` (claims 9, 23), with losses and simultaneous opens.

use roam_proto::datagram::dkind;
use roam_proto::DatagramEvent;

use crate::net::{addr, Net, Rule};
use crate::{is_associated, is_unreachable, ms, Traffic, SETTLE};

/// Send times of `Hello`s from node `from`, in milliseconds since the start.
fn hello_times(net: &Net, from: usize) -> Vec<u64> {
    net.captured(dkind::HELLO, Some(from))
        .iter()
        .map(|s| ms(s.at - net.start))
        .collect()
}

#[test]
fn first_contact_associates_both_sides_and_delivers_both_ways() {
    let mut net = Net::with_nodes(1, 2);
    let mut t = Traffic::default();
    for _ in 0..3 {
        t.send(&mut net, 0, 1);
    }
    assert!(net.settle(SETTLE));
    // The responder learned the initiator's address from the Hello and can answer at once.
    for _ in 0..2 {
        t.send(&mut net, 1, 0);
    }
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);

    let (a, b) = (net.nodes[0].first_addr(), net.nodes[1].first_addr());
    assert_eq!(net.nodes[0].events, [DatagramEvent::Associated { peer: b }]);
    assert_eq!(net.nodes[1].events, [DatagramEvent::Associated { peer: a }]);
    let pa = net.sock(0).peers();
    let pb = net.sock(1).peers();
    assert_eq!(pa.len(), 1);
    assert_eq!(pb.len(), 1);
    assert_eq!((pa[0].known_addr, pa[0].addr), (b, b));
    assert_eq!((pb[0].known_addr, pb[0].addr), (a, a));
    assert_eq!(pa[0].socket, net.sock(1).id());
    assert_eq!(pb[0].socket, net.sock(0).id());
    assert_eq!(net.captured(dkind::HELLO, None).len(), 1);
    assert_eq!(net.captured(dkind::WELCOME, None).len(), 1);
    for i in 0..2 {
        let s = net.sock(i).stats();
        assert_eq!(s.refused, 0);
        assert_eq!(s.dropped_hold + s.dropped_recv + s.dropped_unreachable, 0);
    }
    assert_eq!(net.sock(0).stats().sent, 3);
    assert_eq!(net.sock(1).stats().received, 3);
}

#[test]
fn lost_hellos_are_resent_with_backoff() {
    let mut net = Net::with_nodes(2, 2);
    net.rules.push(Rule::drop_next(dkind::HELLO, 3));
    let mut t = Traffic::default();
    t.send(&mut net, 0, 1);
    // Datagrams sent while the handshake is pending wait for it, in order.
    net.run_for(crate::net::MS * 70);
    t.send(&mut net, 0, 1);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    // 50 ms, then doubling: 0, 50, 150, 350.
    assert_eq!(hello_times(&net, 0), [0, 50, 150, 350]);
    let hellos = net.captured(dkind::HELLO, Some(0));
    assert!(
        hellos.iter().all(|h| h.bytes == hellos[0].bytes),
        "the same Hello"
    );
    assert_eq!(net.nodes[1].count_events(is_associated), 1);
    assert_eq!(net.sock(1).peers().len(), 1);
}

#[test]
fn lost_welcome_is_answered_with_the_same_welcome_and_one_association() {
    let mut net = Net::with_nodes(3, 2);
    net.rules.push(Rule::drop_next(dkind::WELCOME, 2));
    let mut t = Traffic::default();
    t.send(&mut net, 0, 1);
    t.send(&mut net, 0, 1);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    // The responder associated on the first Hello and answered each resend alike.
    let welcomes = net.captured(dkind::WELCOME, Some(1));
    assert_eq!(welcomes.len(), 3);
    assert!(welcomes.iter().all(|w| w.bytes == welcomes[0].bytes));
    assert_eq!(hello_times(&net, 0), [0, 50, 150]);
    assert_eq!(net.nodes[1].count_events(is_associated), 1);
    assert_eq!(net.nodes[0].count_events(is_associated), 1);
    assert_eq!(net.sock(1).peers().len(), 1);
    assert_eq!(net.sock(0).peers().len(), 1);
    assert_eq!(net.sock(1).stats().refused, 0);
}

/// Both sides send their first datagrams to each other at the same instant. The Hello of the
/// lower socket id wins; `drop_winner` loses its first copy (the loser's Hello keeps being
/// ignored until the winner's resend arrives).
fn simultaneous(seed: u64, drop_winner: bool) {
    let mut net = Net::with_nodes(seed, 2);
    let low = if net.sock(0).id() < net.sock(1).id() {
        0
    } else {
        1
    };
    if drop_winner {
        net.rules.push(Rule {
            remaining: Some(1),
            ..Rule::drop_all(Some(dkind::HELLO), Some(low), None)
        });
    }
    let mut t = Traffic::default();
    for _ in 0..3 {
        t.send(&mut net, 0, 1);
        t.send(&mut net, 1, 0);
    }
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    for i in 0..2 {
        assert_eq!(net.nodes[i].count_events(is_associated), 1, "node {i}");
        let p = net.sock(i).peers();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].socket, net.sock(1 - i).id());
        assert_eq!(p[0].known_addr, net.nodes[1 - i].first_addr());
    }
    // Exactly one Welcome (from the higher id) made the association.
    let w = net.captured(dkind::WELCOME, None);
    assert!(w.iter().all(|w| w.node == Some(1 - low)));
    assert!(w.iter().all(|x| x.bytes == w[0].bytes));
    // Both directions use the same association id.
    assert_eq!(net.assoc_id(0, 1), net.assoc_id(1, 0));
}

#[test]
fn simultaneous_hellos_make_one_association() {
    for seed in 0..8 {
        simultaneous(seed, false);
    }
}

#[test]
fn simultaneous_hellos_with_the_winning_hello_lost() {
    for seed in 0..8 {
        simultaneous(seed, true);
    }
}

#[test]
fn unanswered_hello_gives_up_after_max_tries() {
    let mut net = Net::with_nodes(4, 1);
    let nobody = addr(99, 4000);
    for i in 0..3u8 {
        net.send(0, nobody, &[i]).unwrap();
    }
    assert!(net.settle(SETTLE), "retries stop");
    assert_eq!(
        hello_times(&net, 0),
        [0, 50, 150, 350, 750, 1550, 2550, 3550]
    );
    assert_eq!(
        net.nodes[0].events,
        [DatagramEvent::PeerUnreachable { peer: nobody }]
    );
    assert_eq!(net.sock(0).stats().dropped_unreachable, 3);
    assert_eq!(net.sock(0).poll_timeout(), None);
    assert!(net.sock(0).peers().is_empty());
    // A later datagram starts a fresh handshake.
    net.send(0, nobody, b"again").unwrap();
    assert_eq!(net.captured(dkind::HELLO, Some(0)).len(), 9);
    assert!(net.sock(0).poll_timeout().is_some());
    assert_eq!(net.nodes[0].count_events(is_unreachable), 1);
}
