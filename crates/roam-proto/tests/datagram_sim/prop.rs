//! Random operation sequences: sends between random sockets, planned moves of random sockets,
//! time passing, loss switched on and off. Never a panic, every timer eventually stops, and on
//! a loss-free run every datagram sent arrives exactly once, in order, reported under the
//! address the receiver first knew its sender by.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;

use crate::net::{addr, payload, received_from, Faults, Net, MS};

const N: usize = 4;
/// How long a move waits for its re-associations (or a first contact to finish) before the
/// sequence goes on regardless.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Op {
    Send { from: usize, to: usize, n: u8 },
    Migrate { who: usize },
    Advance { ms: u16 },
    Loss { on: bool },
}

fn op(loss: bool) -> impl Strategy<Value = Op> {
    let node = 0..N;
    prop_oneof![
        10 => (node.clone(), node.clone(), 1..6u8)
            .prop_map(|(from, to, n)| Op::Send { from, to, n }),
        3 => node.prop_map(|who| Op::Migrate { who }),
        4 => prop_oneof![0..20u16, 0..2000u16].prop_map(|ms| Op::Advance { ms }),
        (if loss { 1 } else { 0 }) => any::<bool>().prop_map(|on| Op::Loss { on }),
    ]
}

struct Run {
    net: Net,
    /// (a, b) → the address a's application uses for b (and b's `recv` reports for a is
    /// `known[(b, a)]`).
    known: BTreeMap<(usize, usize), SocketAddr>,
    next: BTreeMap<(usize, usize), u32>,
    ever_lossy: bool,
    moves: u16,
}

impl Run {
    fn new(seed: u64) -> Run {
        Run {
            net: Net::with_nodes(seed, N),
            known: BTreeMap::new(),
            next: BTreeMap::new(),
            ever_lossy: false,
            moves: 0,
        }
    }

    /// Both sockets list each other.
    fn associated(&self, a: usize, b: usize) -> bool {
        let has = |x: usize, y: usize| {
            let id = self.net.sock(y).id();
            self.net.sock(x).peers().iter().any(|r| r.socket == id)
        };
        has(a, b) && has(b, a)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Send { from, to, n } => {
                if from == to {
                    return;
                }
                if !self.known.contains_key(&(from, to)) {
                    // First contact: each side learns the other's address of the moment.
                    let (fa, ta) = (
                        self.net.sock(from).local_addr(),
                        self.net.sock(to).local_addr(),
                    );
                    self.known.insert((from, to), ta);
                    self.known.insert((to, from), fa);
                }
                let dest = self.known[&(from, to)];
                for _ in 0..n {
                    let seq = self.next.entry((from, to)).or_default();
                    match self.net.send(from, dest, &payload(from, to, *seq)) {
                        Ok(()) => *seq += 1,
                        Err(e) => panic!("send_to: {e}"),
                    }
                }
            }
            Op::Migrate { who } => {
                // A first contact is not migrateable (see main.rs): let the ones involving
                // this socket finish first.
                let pending: Vec<usize> = (0..N)
                    .filter(|&o| o != who && self.known.contains_key(&(who, o)))
                    .filter(|&o| !self.associated(who, o))
                    .collect();
                if !pending.is_empty() {
                    let t = self.net.now + WAIT;
                    self.net.run_until_or(t, |net| {
                        pending.iter().all(|&o| {
                            let id = net.sock(o).id();
                            let mine = net.sock(who).id();
                            net.sock(who).peers().iter().any(|r| r.socket == id)
                                && net.sock(o).peers().iter().any(|r| r.socket == mine)
                        })
                    });
                }
                self.moves += 1;
                let to = addr(100 + (self.moves % 100) as u8, 5000 + self.moves);
                self.net.migrate(who, to);
                // Its re-associations finish before anything else moves (both ends moving at
                // once is out of scope).
                let t = self.net.now + WAIT;
                self.net.run_until_or(t, |net| {
                    net.sock(who).peers().iter().all(|r| !r.reassociating)
                });
            }
            Op::Advance { ms } => self.net.run_for(MS * u32::from(ms)),
            Op::Loss { on } => {
                self.ever_lossy |= on;
                self.net.faults = if on {
                    Faults::new(0.2, 0.1, 0.1)
                } else {
                    Faults::NONE
                };
            }
        }
    }

    fn finish(&mut self) {
        self.net.faults = Faults::NONE;
        assert!(
            self.net.settle(Duration::from_secs(600)),
            "timers still armed after 10 minutes"
        );
        if self.ever_lossy {
            return;
        }
        for (&(f, t), &n) in &self.next {
            let (seqs, from) = received_from(&self.net, f, t);
            assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "{f} -> {t}");
            let expect = self.known[&(t, f)];
            assert!(
                from.iter().all(|a| *a == expect),
                "{f} -> {t}: reported as {from:?}, first known as {expect}"
            );
        }
        for (i, node) in self.net.nodes.iter().enumerate() {
            let s = node.sock.stats();
            assert_eq!(
                s.dropped_hold + s.dropped_recv + s.dropped_unreachable,
                0,
                "node {i}: {s:?}"
            );
            assert!(!node.events.iter().any(crate::is_unreachable), "node {i}");
        }
    }
}

fn run(seed: u64, ops: &[Op]) {
    let mut r = Run::new(seed);
    for op in ops {
        r.apply(op);
    }
    r.finish();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        rng_seed: RngSeed::Fixed(0x6467_7261_6d73),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn loss_free_random_operations_deliver_every_datagram_exactly_once(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(false), 1..40),
    ) {
        run(seed, &ops);
    }

    #[test]
    fn random_operations_with_loss_never_panic_and_stop(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(true), 1..40),
    ) {
        run(seed, &ops);
    }
}
