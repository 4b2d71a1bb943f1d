//! Outside what the datagram protocol promises: both ends moving at once, and a freeze in the
//! middle of a first contact. These must degrade (events, counters), never panic or retry
//! forever.

use roam_proto::datagram::dkind;
use roam_proto::DatagramEvent;

use crate::net::{addr, received_from, Net};
use crate::{is_unreachable, star, Traffic, SETTLE};

#[test]
fn both_ends_moving_at_once_degrades_to_unreachable() {
    let mut net = star(70, 1);
    let now = net.now;
    net.sock_mut(0).freeze(now).unwrap();
    net.sock_mut(1).freeze(now).unwrap();
    let done = net.run_until_or(net.now + SETTLE, |n| {
        n.sock(0).is_frozen() && n.sock(1).is_frozen()
    });
    assert!(done);
    let i0 = net.sock(0).image().unwrap().to_bytes();
    let i1 = net.sock(1).image().unwrap().to_bytes();
    net.thaw(0, &i0, addr(90, 4000));
    net.thaw(1, &i1, addr(91, 4000));
    assert!(net.settle(SETTLE), "every timer stops");
    for i in 0..2 {
        let peer = net.nodes[1 - i].first_addr();
        assert_eq!(
            net.nodes[i]
                .events
                .iter()
                .filter(|e| is_unreachable(e))
                .collect::<Vec<_>>(),
            [&DatagramEvent::PeerUnreachable { peer }]
        );
        assert_eq!(net.sock(i).poll_timeout(), None);
        assert_eq!(net.sock(i).stats().reassoc_sent, 8);
    }
    assert_eq!(net.captured(dkind::REASSOC_ACK, None).len(), 0);
}

/// A socket that freezes while its own first `Hello` is unanswered waits for the `Welcome`
/// (the first contact completes during the freeze, and that new peer is told to hold too), so
/// the datagram is delivered and the association moves with the image (regression: the
/// responder refused the fresh `Hello` sent after the thaw and the datagram was lost).
#[test]
fn freeze_during_own_first_contact() {
    let mut net = Net::with_nodes(71, 2);
    let mut t = Traffic::default();
    t.send(&mut net, 0, 1);
    let image = net.freeze(0);
    net.run_for(crate::net::MS * 20);
    net.thaw(0, &image, addr(92, 4000));
    assert!(net.settle(SETTLE), "every timer stops");
    assert_eq!(received_from(&net, 0, 1).0, [0], "delivered once");
    assert_eq!(net.sock(0).stats().dropped_unreachable, 0);
    assert_eq!(net.sock(0).peers().len(), 1);
    assert_eq!(
        net.sock(1).peers()[0].addr,
        addr(92, 4000),
        "the peer followed the move"
    );
}
