//! Re-association: claim 28 (data from a peer before its acknowledgement resends the request),
//! resends with backoff, and giving up on a peer that never answers.

use roam_proto::datagram::dkind;
use roam_proto::DatagramEvent;

use crate::net::{addr, Net, Rule, MS};
use crate::{is_moved, is_reassociated, is_unreachable, ms, star, Traffic, SETTLE};

const M: usize = 0;

/// Send times of node `from`'s `Reassoc`s to node `to`, in ms since `since`.
fn reassoc_times(net: &Net, from: usize, to: usize, since: std::time::Instant) -> Vec<u64> {
    let dest = net.nodes[to].sock.local_addr();
    net.captured(dkind::REASSOC, Some(from))
        .iter()
        .filter(|s| s.to == dest && s.at >= since)
        .map(|s| ms(s.at - since))
        .collect()
}

#[test]
fn data_before_the_reassoc_ack_resends_the_request() {
    // Claim 28. The peer's acknowledgement is lost; the datagrams it held while we were frozen
    // arrive right after it, and the first of them makes us send the request again.
    let mut net = star(20, 1);
    let mut t = Traffic::default();
    let image = net.freeze(M);
    for _ in 0..5 {
        t.send(&mut net, 1, M);
    }
    net.rules.push(Rule::drop_next(dkind::REASSOC_ACK, 1));
    let thawed = net.now;
    net.thaw(M, &image, addr(50, 4000));
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);

    let s = net.sock(M).stats();
    assert_eq!(
        s.reassoc_resent_on_data, 1,
        "one resend for a burst of five"
    );
    assert_eq!(s.reassoc_sent, 2);
    // Sent at the thaw, again when the held data arrived (two round trips later: the peer
    // validated the new address first), well before the 50 ms retry timer.
    assert_eq!(reassoc_times(&net, M, 1, thawed), [0, 20]);
    assert_eq!(net.nodes[M].count_events(is_reassociated), 1);
    assert!(!net.sock(M).peers()[0].reassociating);
    // The peer acknowledged both, moved once.
    assert_eq!(net.captured(dkind::REASSOC_ACK, Some(1)).len(), 2);
    assert_eq!(net.nodes[1].count_events(is_moved), 1);
    assert_eq!(net.sock(1).stats().reassoc_accepted, 1);
    assert_eq!(net.sock(1).stats().held_and_sent, 5);
    assert_eq!(net.sock(1).peers()[0].addr, addr(50, 4000));
}

#[test]
fn timer_resend_then_data_resend_when_request_and_ack_are_both_lost() {
    // The first Reassoc is lost; the timer resends it at 50 ms. Its acknowledgement is lost
    // too, and the datagrams the peer held (it keeps sending every 5 ms) arrive right behind
    // it: claim 28 resends once more, without waiting for the next timer.
    let mut net = star(21, 1);
    net.rules.push(Rule::drop_next(dkind::REASSOC, 1));
    net.rules.push(Rule::drop_next(dkind::REASSOC_ACK, 1));
    let mut t = Traffic::default();
    let thawed;
    {
        let image = net.freeze(M);
        thawed = net.now;
        net.thaw(M, &image, addr(51, 4000));
    }
    // The peer keeps sending every 5 ms; they are held until the Reassoc arrives.
    for _ in 0..40 {
        t.send(&mut net, 1, M);
        net.run_for(5 * MS);
    }
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    let s = net.sock(M).stats();
    // Timer resend at 50 ms (the first was lost), the path validated, its ack lost, the held
    // data right behind it resends again.
    assert_eq!(reassoc_times(&net, M, 1, thawed), [0, 50, 70]);
    assert_eq!(s.reassoc_resent_on_data, 1);
    assert_eq!(net.nodes[M].count_events(is_reassociated), 1);
    assert_eq!(net.nodes[1].count_events(is_moved), 1);
}

#[test]
fn lost_reassoc_acks_are_resent_with_backoff() {
    let mut net = star(22, 1);
    net.rules.push(Rule::drop_next(dkind::REASSOC_ACK, 3));
    let image = net.freeze(M);
    let thawed = net.now;
    net.thaw(M, &image, addr(52, 4000));
    assert!(net.settle(SETTLE));
    assert_eq!(reassoc_times(&net, M, 1, thawed), [0, 50, 150, 350]);
    assert_eq!(net.captured(dkind::REASSOC_ACK, Some(1)).len(), 4);
    assert_eq!(net.nodes[M].count_events(is_reassociated), 1);
    // Each resend is acknowledged; the table moved once.
    assert_eq!(net.nodes[1].count_events(is_moved), 1);
    assert_eq!(net.sock(1).stats().reassoc_accepted, 1);
    let s = net.sock(M).stats();
    assert_eq!((s.reassoc_sent, s.reassoc_resent_on_data), (4, 0));
    assert_eq!(net.sock(M).poll_timeout(), None);
}

#[test]
fn a_peer_that_never_answers_is_unreachable_after_max_tries() {
    let mut net = star(23, 2);
    // Peer 2 never receives a Reassoc (it got the Freezing, so it holds for the mover).
    net.rules
        .push(Rule::drop_all(Some(dkind::REASSOC), Some(M), Some(2)));
    let image = net.freeze(M);
    let thawed = net.now;
    net.thaw(M, &image, addr(53, 4000));
    let mut t = Traffic::default();
    t.send(&mut net, 2, M);
    assert!(net.settle(SETTLE), "every timer stops");
    assert_eq!(
        reassoc_times(&net, M, 2, thawed),
        [0, 50, 150, 350, 750, 1550, 2550, 3550],
        "max_tries = 8 sends, backoff capped at 1 s"
    );
    assert_eq!(reassoc_times(&net, M, 1, thawed), [0]);
    let p2 = net.nodes[2].first_addr();
    assert_eq!(
        net.nodes[M]
            .events
            .iter()
            .filter(|e| is_unreachable(e))
            .collect::<Vec<_>>(),
        [&DatagramEvent::PeerUnreachable { peer: p2 }]
    );
    assert_eq!(net.nodes[M].count_events(is_reassociated), 1, "peer 1 only");
    assert_eq!(net.sock(M).poll_timeout(), None);
    assert!(net.sock(M).peers().iter().all(|r| !r.reassociating));
    // Not retried forever.
    let before = net.captured(dkind::REASSOC, Some(M)).len();
    net.run_for(SETTLE);
    assert_eq!(net.captured(dkind::REASSOC, Some(M)).len(), before);
    // The peer held its datagram for the frozen mover until the hold timeout, then gave up too.
    let m = net.nodes[M].first_addr();
    assert!(net.nodes[2]
        .events
        .contains(&DatagramEvent::PeerUnreachable { peer: m }));
    assert_eq!(net.sock(2).stats().dropped_unreachable, 1);
    assert_eq!(net.sock(2).poll_timeout(), None);
}
