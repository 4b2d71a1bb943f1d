//! A simulated UDP network that drives `DatagramSocket`s deterministically.
//!
//! One virtual clock (`Instant::now()` once, then advanced by `Duration`s; nothing sleeps),
//! sockets at distinct `127.0.0.x:port` addresses, and packets in flight keyed by arrival time.
//! The driver loop is the one the `datagram` module docs ask for: `handle` each arriving
//! datagram, `handle_timeout` when `poll_timeout` is due, then `poll_transmit` and `poll_event`
//! until empty. Applications read eagerly (`recv`) unless a node's `auto_recv` is off.
//!
//! Faults are seeded: every directed link (source address, destination address) has its own
//! ChaCha RNG, so a link's fate depends only on the sequence of packets sent on it and not on
//! the order in which a socket happens to iterate its association table (a `HashMap`). Packets
//! due at the same instant are delivered in (destination, source, per-link sequence) order. The
//! same seed therefore gives the same run.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam_proto::datagram::dkind;
use roam_proto::{DatagramConfig, DatagramEvent, DatagramImage, DatagramSocket};

pub const MS: Duration = Duration::from_millis(1);

/// `127.0.0.host:port`.
pub fn addr(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, host], port))
}

/// Probabilities of what happens to a packet (each drawn independently).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Dropped.
    pub drop: f64,
    /// Delivered twice (the copy a little later).
    pub dup: f64,
    /// Delayed by up to `reorder_by` on top of the latency, so later packets overtake it.
    pub reorder: f64,
}

impl Faults {
    pub const NONE: Faults = Faults {
        drop: 0.0,
        dup: 0.0,
        reorder: 0.0,
    };

    pub fn new(drop: f64, dup: f64, reorder: f64) -> Faults {
        Faults { drop, dup, reorder }
    }
}

/// A fault rule: packets matching every `Some` field get `faults`. The first matching rule wins;
/// packets no rule matches get [`Net::faults`]. A rule with `remaining` applies to that many
/// matching packets and then retires.
#[derive(Debug, Clone, Default)]
pub struct Rule {
    /// Sending node.
    pub from: Option<usize>,
    /// Receiving node (resolved from the destination address when the packet is sent).
    pub to: Option<usize>,
    /// Packet type (first byte, `dkind::*`).
    pub kind: Option<u8>,
    pub faults: Faults,
    pub remaining: Option<u32>,
}

impl Rule {
    /// Drop the next `n` packets of `kind` (from any node to any node).
    pub fn drop_next(kind: u8, n: u32) -> Rule {
        Rule {
            kind: Some(kind),
            faults: Faults::new(1.0, 0.0, 0.0),
            remaining: Some(n),
            ..Rule::default()
        }
    }

    /// Drop every packet of `kind` from `from` (any node if `None`) to `to`.
    pub fn drop_all(kind: Option<u8>, from: Option<usize>, to: Option<usize>) -> Rule {
        Rule {
            from,
            to,
            kind,
            faults: Faults::new(1.0, 0.0, 0.0),
            remaining: None,
        }
    }
}

/// One packet a socket (or a test) put on the network.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Bytes,
    /// The sending node, `None` for injected packets.
    pub node: Option<usize>,
}

impl Sent {
    pub fn kind(&self) -> u8 {
        self.bytes.first().copied().unwrap_or(0xff)
    }
}

/// Network counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetStats {
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub delivered: u64,
    /// Arrived at an address no socket is bound to.
    pub to_nowhere: u64,
}

/// A host's socket and what its application saw.
pub struct Node {
    pub name: String,
    pub sock: DatagramSocket,
    pub config: DatagramConfig,
    /// Every address this node's socket was bound at, first one first.
    pub addrs: Vec<SocketAddr>,
    pub events: Vec<DatagramEvent>,
    /// What the application read: (sender as reported by `recv`, payload).
    pub got: Vec<(SocketAddr, Bytes)>,
    /// Read everything after every step.
    pub auto_recv: bool,
    /// Bound on the network: receives packets and timers.
    pub up: bool,
}

impl Node {
    pub fn first_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn count_events(&self, f: impl Fn(&DatagramEvent) -> bool) -> usize {
        self.events.iter().filter(|e| f(e)).count()
    }
}

type FlightKey = (Instant, SocketAddr, SocketAddr, u64);

pub struct Net {
    pub start: Instant,
    pub now: Instant,
    pub nodes: Vec<Node>,
    /// One-way latency of every packet.
    pub latency: Duration,
    /// Largest extra delay of a reordered packet.
    pub reorder_by: Duration,
    /// Faults of packets no rule matches.
    pub faults: Faults,
    pub rules: Vec<Rule>,
    pub log: Vec<Sent>,
    pub stats: NetStats,
    seed: u64,
    links: HashMap<(SocketAddr, SocketAddr), (ChaCha8Rng, u64)>,
    flight: BTreeMap<FlightKey, (Bytes, Option<usize>)>,
}

fn link_seed(seed: u64, from: SocketAddr, to: SocketAddr) -> [u8; 32] {
    // FNV-1a over the seed and both addresses: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&seed.to_be_bytes());
    eat(from.to_string().as_bytes());
    eat(b"->");
    eat(to.to_string().as_bytes());
    let mut s = [0u8; 32];
    for (i, c) in s.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(h ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes());
    }
    s
}

impl Net {
    pub fn new(seed: u64) -> Net {
        let now = Instant::now();
        Net {
            start: now,
            now,
            nodes: Vec::new(),
            latency: 5 * MS,
            reorder_by: 30 * MS,
            faults: Faults::NONE,
            rules: Vec::new(),
            log: Vec::new(),
            stats: NetStats::default(),
            seed,
            links: HashMap::new(),
            flight: BTreeMap::new(),
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// A new socket at `at` with `config`; its CSPRNG seed derives from the net's seed and index.
    pub fn add(&mut self, name: &str, at: SocketAddr, config: DatagramConfig) -> usize {
        assert!(self.node_at(at).is_none(), "{at} is taken");
        let i = self.nodes.len();
        let sock = DatagramSocket::new(config.clone(), at, self.sock_seed(i, 0));
        self.nodes.push(Node {
            name: name.to_string(),
            sock,
            config,
            addrs: vec![at],
            events: Vec::new(),
            got: Vec::new(),
            auto_recv: true,
            up: true,
        });
        i
    }

    /// `n` sockets with the default configuration at 127.0.0.(2+i):4000.
    pub fn with_nodes(seed: u64, n: usize) -> Net {
        let mut net = Net::new(seed);
        for i in 0..n {
            net.add(
                &format!("n{i}"),
                addr(2 + i as u8, 4000),
                DatagramConfig::default(),
            );
        }
        net
    }

    fn sock_seed(&self, node: usize, generation: usize) -> [u8; 32] {
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&self.seed.to_be_bytes());
        s[8..16].copy_from_slice(&(node as u64).to_be_bytes());
        s[16..24].copy_from_slice(&(generation as u64).to_be_bytes());
        s[31] = 0x5a;
        s
    }

    /// The up node whose socket is bound at `a`.
    pub fn node_at(&self, a: SocketAddr) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.up && n.sock.local_addr() == a)
    }

    pub fn sock(&self, i: usize) -> &DatagramSocket {
        &self.nodes[i].sock
    }

    pub fn sock_mut(&mut self, i: usize) -> &mut DatagramSocket {
        &mut self.nodes[i].sock
    }

    /// The application at node `i` sends `payload` to `dest`.
    pub fn send(
        &mut self,
        i: usize,
        dest: SocketAddr,
        payload: &[u8],
    ) -> Result<(), roam_proto::DatagramError> {
        let now = self.now;
        let r = self.nodes[i].sock.send_to(now, dest, payload);
        self.flush(i);
        r
    }

    /// Put bytes on the wire as if sent from `from` (spoofed or a third party's).
    pub fn inject(&mut self, from: SocketAddr, to: SocketAddr, bytes: Bytes) {
        self.enqueue(None, from, to, bytes);
    }

    /// Hand bytes straight to node `i`'s socket, now, as if from `from`.
    pub fn deliver_now(&mut self, i: usize, from: SocketAddr, bytes: Bytes) {
        let now = self.now;
        self.nodes[i].sock.handle(now, from, bytes);
        self.flush(i);
    }

    fn rule_for(&mut self, node: Option<usize>, to: Option<usize>, kind: u8) -> Faults {
        for (k, r) in self.rules.iter_mut().enumerate() {
            let hit = r.from.is_none_or(|f| Some(f) == node)
                && r.to.is_none_or(|t| Some(t) == to)
                && r.kind.is_none_or(|t| t == kind);
            if hit {
                let f = r.faults;
                if let Some(n) = r.remaining.as_mut() {
                    *n -= 1;
                    if *n == 0 {
                        self.rules.remove(k);
                    }
                }
                return f;
            }
        }
        self.faults
    }

    fn enqueue(&mut self, node: Option<usize>, from: SocketAddr, to: SocketAddr, bytes: Bytes) {
        self.stats.sent += 1;
        self.log.push(Sent {
            at: self.now,
            from,
            to,
            bytes: bytes.clone(),
            node,
        });
        let kind = bytes.first().copied().unwrap_or(0xff);
        let dest = self.node_at(to);
        let f = self.rule_for(node, dest, kind);
        let seed = self.seed;
        let (latency, reorder_by) = (self.latency, self.reorder_by);
        let link = self
            .links
            .entry((from, to))
            .or_insert_with(|| (ChaCha8Rng::from_seed(link_seed(seed, from, to)), 0));
        // Every draw is made for every packet so one fault does not shift the others.
        let (d, u, r) = (
            link.0.gen_bool(f.drop),
            link.0.gen_bool(f.dup),
            link.0.gen_bool(f.reorder),
        );
        let extra = link.0.gen_range(1..=reorder_by.as_micros().max(1) as u64);
        let dup_extra = link.0.gen_range(1..=10_000u64);
        if d {
            self.stats.dropped += 1;
            return;
        }
        let mut at = self.now + latency;
        if r {
            self.stats.reordered += 1;
            at += Duration::from_micros(extra);
        }
        link.1 += 1;
        self.flight
            .insert((at, to, from, link.1), (bytes.clone(), node));
        if u {
            self.stats.duplicated += 1;
            link.1 += 1;
            self.flight.insert(
                (at + Duration::from_micros(dup_extra), to, from, link.1),
                (bytes, node),
            );
        }
    }

    /// Collect node `i`'s transmits, events and (if `auto_recv`) received datagrams.
    pub fn flush(&mut self, i: usize) {
        let from = self.nodes[i].sock.local_addr();
        while let Some((to, bytes)) = self.nodes[i].sock.poll_transmit() {
            assert!(
                bytes.len() <= roam_proto::datagram::MAX_UDP_PAYLOAD,
                "a datagram larger than UDP allows"
            );
            self.enqueue(Some(i), from, to, bytes);
        }
        let n = &mut self.nodes[i];
        while let Some(ev) = n.sock.poll_event() {
            n.events.push(ev);
        }
        if n.auto_recv {
            while let Some(d) = n.sock.recv() {
                n.got.push(d);
            }
        }
    }

    pub fn flush_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.flush(i);
        }
    }

    /// The next instant something happens: a packet arrives or a timer is due.
    pub fn next_time(&self) -> Option<Instant> {
        let p = self.flight.keys().next().map(|k| k.0);
        let t = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .filter_map(|n| n.sock.poll_timeout())
            .min();
        match (p, t) {
            (Some(p), Some(t)) => Some(p.min(t)),
            (p, t) => p.or(t),
        }
    }

    /// Deliver one packet due by now, if any.
    fn deliver_one(&mut self) -> bool {
        let Some((&key, _)) = self.flight.iter().next() else {
            return false;
        };
        if key.0 > self.now {
            return false;
        }
        let (bytes, _) = self.flight.remove(&key).expect("key just seen");
        let (_, to, from, _) = key;
        match self.node_at(to) {
            Some(j) => {
                self.stats.delivered += 1;
                let now = self.now;
                self.nodes[j].sock.handle(now, from, bytes);
                self.flush(j);
            }
            None => self.stats.to_nowhere += 1,
        }
        true
    }

    /// Fire the timers due by now.
    fn timers(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].up && self.nodes[i].sock.poll_timeout().is_some_and(|t| t <= now) {
                self.nodes[i].sock.handle_timeout(now);
                self.flush(i);
                if let Some(t) = self.nodes[i].sock.poll_timeout() {
                    assert!(t > now, "{}: timer still due after handle_timeout", i);
                }
            }
        }
    }

    /// Run until `deadline` (inclusive), or until `stop` holds after a step.
    pub fn run_until_or(&mut self, deadline: Instant, mut stop: impl FnMut(&Net) -> bool) -> bool {
        self.flush_all();
        let mut steps = 0u64;
        loop {
            if stop(self) {
                return true;
            }
            match self.next_time() {
                Some(t) if t <= deadline => {
                    self.now = self.now.max(t);
                    while self.deliver_one() {
                        steps += 1;
                        assert!(steps < 5_000_000, "the simulation does not quiesce");
                    }
                    self.timers();
                    steps += 1;
                    assert!(steps < 5_000_000, "the simulation does not quiesce");
                }
                _ => {
                    self.now = self.now.max(deadline);
                    return stop(self);
                }
            }
        }
    }

    pub fn run_until(&mut self, deadline: Instant) {
        self.run_until_or(deadline, |_| false);
    }

    pub fn run_for(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }

    /// Run until nothing is in flight and no timer is armed, at most `limit` of virtual time.
    /// Returns whether the network became idle.
    pub fn settle(&mut self, limit: Duration) -> bool {
        let t = self.now + limit;
        self.run_until_or(t, |n| n.idle())
    }

    /// Nothing in flight and no timer armed.
    pub fn idle(&self) -> bool {
        self.flight.is_empty()
            && self
                .nodes
                .iter()
                .all(|n| !n.up || n.sock.poll_timeout().is_none())
    }

    /// Packets in flight.
    pub fn in_flight(&self) -> usize {
        self.flight.len()
    }

    /// Freeze node `i` and run the network until its freeze completes (peers' `FreezingAck`s
    /// or the freeze timeout); returns the encoded image.
    pub fn freeze(&mut self, i: usize) -> Vec<u8> {
        let now = self.now;
        self.nodes[i].sock.freeze(now).expect("not frozen yet");
        let limit = self.now + self.nodes[i].config.freeze_timeout + 10 * MS;
        let done = self.run_until_or(limit, |n| n.nodes[i].sock.is_frozen());
        assert!(done, "{} did not finish freezing", self.nodes[i].name);
        self.flush(i);
        assert_eq!(
            self.nodes[i].events.last(),
            Some(&DatagramEvent::Frozen),
            "Frozen is the last event of a freeze"
        );
        self.nodes[i]
            .sock
            .image()
            .expect("frozen sockets have an image")
            .to_bytes()
    }

    /// Rebuild node `i` from `image` at `at` (the old address is unbound).
    pub fn thaw(&mut self, i: usize, image: &[u8], at: SocketAddr) {
        let image = DatagramImage::from_bytes(image).expect("a genuine image decodes");
        assert!(self.node_at(at).is_none_or(|j| j == i), "{at} is taken");
        let seed = self.sock_seed(i, self.nodes[i].addrs.len());
        let config = self.nodes[i].config.clone();
        let now = self.now;
        self.nodes[i].sock = DatagramSocket::from_image(image, at, config, seed, now);
        self.nodes[i].addrs.push(at);
        self.nodes[i].up = true;
        self.flush(i);
    }

    /// A planned move of node `i` to `at`: freeze, image bytes, thaw.
    pub fn migrate(&mut self, i: usize, at: SocketAddr) {
        let image = self.freeze(i);
        self.thaw(i, &image, at);
    }

    /// Captured packets of `kind`, optionally only those sent by node `from`.
    pub fn captured(&self, kind: u8, from: Option<usize>) -> Vec<Sent> {
        self.log
            .iter()
            .filter(|s| s.kind() == kind && (from.is_none() || s.node == from))
            .cloned()
            .collect()
    }

    /// The association id of the first `Data` packet sent from node `from` to node `to`'s
    /// current address.
    pub fn assoc_id(&self, from: usize, to: usize) -> u64 {
        let dest = self.nodes[to].sock.local_addr();
        let s = self
            .log
            .iter()
            .find(|s| s.kind() == dkind::DATA && s.node == Some(from) && s.to == dest)
            .expect("a data packet between them");
        u64::from_be_bytes(s.bytes[1..9].try_into().expect("8 bytes"))
    }
}

/// An application payload naming its sender, receiver and sequence number.
pub fn payload(from: usize, to: usize, seq: u32) -> Vec<u8> {
    let mut v = b"dg".to_vec();
    v.extend_from_slice(&(from as u16).to_be_bytes());
    v.extend_from_slice(&(to as u16).to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    // A varying tail so payload sizes differ.
    v.extend(std::iter::repeat_n(seq as u8, (seq % 7) as usize));
    v
}

/// Sender, receiver and sequence number of a [`payload`].
pub fn parse_payload(b: &[u8]) -> Option<(usize, usize, u32)> {
    if b.len() < 10 || &b[..2] != b"dg" {
        return None;
    }
    let from = u16::from_be_bytes([b[2], b[3]]) as usize;
    let to = u16::from_be_bytes([b[4], b[5]]) as usize;
    let seq = u32::from_be_bytes([b[6], b[7], b[8], b[9]]);
    Some((from, to, seq))
}

/// Sequence numbers node `to` read from node `from`, and the sender addresses `recv` reported.
pub fn received_from(net: &Net, from: usize, to: usize) -> (Vec<u32>, Vec<SocketAddr>) {
    let mut seqs = Vec::new();
    let mut addrs = Vec::new();
    for (a, b) in &net.nodes[to].got {
        if let Some((f, t, s)) = parse_payload(b) {
            if f == from && t == to {
                seqs.push(s);
                addrs.push(*a);
            }
        }
    }
    (seqs, addrs)
}
