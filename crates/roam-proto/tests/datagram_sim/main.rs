//! Deterministic tests of migrateable datagram sockets (`roam_proto::datagram`) on a simulated
//! UDP network (see `net.rs`): a virtual clock, N sockets at distinct `127.0.0.x:4000`
//! addresses, and a seeded network that drops, duplicates, reorders and delays packets per
//! direction and per packet type.
//!
//! - `association`: first contact (Hello/Welcome), lost Hellos and Welcomes, simultaneous Hellos.
//! - `migration`: planned moves of a socket with several peers: freeze, image bytes, thaw,
//!   re-association, translation tables, and no datagram lost on a loss-free network.
//! - `reassoc`: claim 28 (data before the acknowledgement resends the request), backoff,
//!   unreachable peers.
//! - `faults`: loss, duplication and reordering during migrations.
//! - `attacks`: forged and replayed `Reassoc`, forged `Freezing`.
//! - `hold`: hold-queue bound and hold timeout.
//! - `malformed`: truncated and random packets of every type.
//! - `prop`: random operation sequences (proptest).
//! - `security`: tampering, the replay window, counters across a move, path validation, the
//!   anti-amplification bound, spoofed `Reassoc`, `Hello` floods.
//!
//! # Behaviour found surprising (documented, not changed here)
//!
//! - A socket's association table is a `HashMap`, so the order in which it sends `Freezing`
//!   and `Reassoc` to its peers (and resends) differs from run to run. The simulator gives every
//!   directed link its own RNG so fault patterns stay reproducible regardless.
//! - `Data` is encrypted and authenticated (issue 5): a packet from any source address is
//!   accepted if it authenticates and its counter is new, which is what lets held datagrams
//!   reach a moved socket and triggers claim 28. A `Reassoc` moves the peer to the address it
//!   came *from*, once that address answered a path challenge (`security`).
//! - A `Hello` from a socket we already associated with *as initiator* (the losing Hello of a
//!   simultaneous open arriving late, or a network duplicate of it) is counted in
//!   `stats().refused`: benign traffic shows up as "refused". (A resent Hello at the responder
//!   is answered with the same `Welcome` and not counted.)
//! - Claim-28 resends do not count towards `max_tries` (data proves the peer is alive).
//! - After `PeerUnreachable` for a `Reassoc` the association stays in the table: the mover
//!   keeps sending to the peer, whose answers go to the mover's old address. After a hold
//!   timeout, a peer sends straight to the frozen socket's old address again (lost there).
//! - A first contact in progress completes during a freeze: the freeze waits for the Welcome
//!   (up to its timeout) and tells that new peer to hold too (`limits::freeze_during_own_first_
//!   contact`). Only if the Welcome is lost until the freeze deadline does the image re-queue the
//!   datagrams for a fresh handshake, which a responder that answered the first Hello refuses.
//!   A peer whose `Hello` is in flight to a socket that then moves reaches nobody (it knows no
//!   association to translate).
//! - A freeze waits for the peers in the table and first contacts in progress: a socket with
//!   neither is frozen at once.
//! - Both ends moving at once (out of scope): each sends its `Reassoc` to the other's old
//!   address; both give up with `PeerUnreachable` after `max_tries` (no panic, no endless retry).
//!
//! # Fixed in `src/datagram.rs` because of these tests
//!
//! - A `Reassoc` at the peer's current epoch (a claim-28 resend, a network duplicate, or a
//!   replay from anyone) arriving after that peer announced its *next* freeze ended the hold:
//!   the peer flushed what it held to the frozen address and kept sending there, losing the
//!   whole move's traffic. It is now only acknowledged again
//!   (`attacks::replayed_current_reassoc_during_the_next_freeze_does_not_end_the_hold`).
//! - `Freezing` was sent once, never resent: if it was lost the freeze waited the whole
//!   `freeze_timeout`, and that peer, not holding, sent what it had during the move to the old
//!   address, where it was lost (RELIABILITY.md finding 1). It is now resent with the backoff
//!   of `Hello` and `Reassoc` until `FreezingAck` or the deadline
//!   (`faults::a_lost_freezing_is_resent_and_the_peer_holds_its_datagrams`,
//!   `faults::a_freezing_lost_every_time_is_resent_until_the_freeze_deadline`). If every
//!   `Freezing` (or every `FreezingAck`) is lost until the deadline, that peer still does not
//!   hold.

mod net;

mod association;
mod attacks;
mod faults;
mod hold;
mod limits;
mod malformed;
mod migration;
mod prop;
mod reassoc;
mod security;

use std::collections::BTreeMap;
use std::time::Duration;

use net::{payload, received_from, Net};
use roam_proto::{DatagramError, DatagramEvent};

/// Long enough for any loss-free exchange to finish and every retry timer to stop.
const SETTLE: Duration = Duration::from_secs(60);

/// Node 0 associated with nodes 1..=peers: each peer said hello first, then node 0 answered.
fn star(seed: u64, peers: usize) -> Net {
    let mut net = Net::with_nodes(seed, peers + 1);
    let m = net.nodes[0].first_addr();
    for p in 1..=peers {
        net.send(p, m, b"hi").unwrap();
    }
    assert!(net.settle(SETTLE));
    for p in 1..=peers {
        let a = net.nodes[p].first_addr();
        net.send(0, a, b"hi").unwrap();
    }
    assert!(net.settle(SETTLE));
    for p in 0..=peers {
        net.nodes[p].got.clear();
        net.nodes[p].events.clear();
    }
    net
}

/// Numbered application datagrams between nodes, always addressed to the receiver's first
/// address, and the check that each arrived exactly once, in order, from the sender's first
/// address.
#[derive(Default)]
struct Traffic {
    next: BTreeMap<(usize, usize), u32>,
}

impl Traffic {
    /// Node `from` sends the next numbered datagram to node `to`; false if the socket is
    /// frozen (nothing was sent).
    fn send(&mut self, net: &mut Net, from: usize, to: usize) -> bool {
        let seq = self.next.entry((from, to)).or_default();
        let dest = net.nodes[to].first_addr();
        match net.send(from, dest, &payload(from, to, *seq)) {
            Ok(()) => {
                *seq += 1;
                true
            }
            Err(DatagramError::Frozen) => false,
            Err(e) => panic!("send_to: {e}"),
        }
    }

    fn sent(&self, from: usize, to: usize) -> u32 {
        self.next.get(&(from, to)).copied().unwrap_or(0)
    }

    /// Everything sent arrived once and in order, reported under the sender's first address.
    fn assert_exact(&self, net: &Net) {
        for (&(f, t), &n) in &self.next {
            let (seqs, from) = received_from(net, f, t);
            assert_eq!(
                seqs,
                (0..n).collect::<Vec<_>>(),
                "datagrams {} -> {}",
                net.nodes[f].name,
                net.nodes[t].name
            );
            let first = net.nodes[f].first_addr();
            assert!(from.iter().all(|a| *a == first), "reported as from {first}");
        }
    }
}

fn is_moved(e: &DatagramEvent) -> bool {
    matches!(e, DatagramEvent::PeerMoved { .. })
}

fn is_reassociated(e: &DatagramEvent) -> bool {
    matches!(e, DatagramEvent::Reassociated { .. })
}

fn is_unreachable(e: &DatagramEvent) -> bool {
    matches!(e, DatagramEvent::PeerUnreachable { .. })
}

fn is_associated(e: &DatagramEvent) -> bool {
    matches!(e, DatagramEvent::Associated { .. })
}

/// Whole virtual milliseconds of a duration.
fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
