//! A simulated network that drives `roam_proto` sessions deterministically, after quinn-proto's
//! `tests/util.rs` `Pair`.
//!
//! The [`World`] owns a virtual clock, a set of hosts ([`Node`]s, each with its own
//! [`LocalInfo`] and at most one session) and a set of simulated transport connections. It plays
//! the driver's role described in the `session` module docs: frames travel as encoded bytes
//! through two directional pipes per connection with a latency, are delivered in randomly split
//! chunks (so `Frame::decode` sees partial frames) and are dispatched to `handle_frame`, or to the
//! handshake calls (`accept_hello`, `handle_reassoc`, `handle_confirm`, `handle_accept`,
//! `handle_moved`) while a connection is still being set up. A host whose session left answers a
//! `Reassoc` for it from its forwarding table (`Moved`), as an endpoint does. `Event::Dial` opens a connection to whichever host owns the
//! contact address; `Event::CloseConnection` closes the local end (the other end reads EOF after
//! the bytes already in flight and reports `handle_connection_lost`).
//!
//! Everything is seeded: the same seed gives the same run, byte for byte.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam_proto::frame::Moved;
use roam_proto::{
    Associating, ConnId, EndpointId, Entropy, Epoch, Event, ForwardTable, Frame, LocalInfo,
    ReadError, RefuseReason, Session, SessionConfig, SessionId, StreamImage, WriteError,
};
use sha2::{Digest, Sha256};

/// Index of a host in [`World::nodes`].
pub type NodeId = usize;

/// What the driver expects next on one end of a connection.
enum Stage {
    /// Accepted a connection: expects `Hello` (association) or `Reassoc`.
    Listen,
    /// Sent `Hello`: expects `Welcome`.
    AwaitWelcome(Box<Associating>),
    /// Sent `Reassoc`: expects `Accept` or `Refuse` (driver-side handshake timeout from `since`).
    AwaitAccept { since: Instant },
    /// Sent `Accept`: expects `Confirm`.
    AwaitConfirm,
    /// Frames go to `handle_frame`.
    Established,
    /// A connection opened by a test to inject bytes; received frames are only recorded.
    Raw,
    /// Closed or abandoned.
    Dead,
}

enum Seg {
    Data(Vec<u8>),
    Eof,
}

struct End {
    node: NodeId,
    stage: Stage,
    /// This end has not been closed (it still reads and writes).
    open: bool,
    /// Bytes received but not yet decoded into a whole frame.
    rx: BytesMut,
    /// Bytes travelling towards this end, with their arrival time.
    inbox: VecDeque<(Instant, Seg)>,
    /// Frames received on a `Raw` end.
    raw: Vec<Frame>,
}

struct Conn {
    /// `ends[0]` dialed, `ends[1]` accepted.
    ends: [End; 2],
    latency: Duration,
    blackholed: bool,
}

/// One host: an endpoint identity and contact address, and the session living there (if any).
pub struct Node {
    /// Name for messages.
    pub name: String,
    /// Identity and contact address.
    pub local: LocalInfo,
    /// The live session on this host.
    pub session: Option<Session>,
    /// Sessions that were frozen away from this host (kept for inspection).
    pub retired: Vec<Session>,
    /// Every event the session emitted, with its time.
    pub events: Vec<(Instant, Event)>,
    /// When this host's session asked to dial.
    pub dials: Vec<Instant>,
    /// How many of those dials were refused at the transport level.
    pub dials_refused: usize,
    /// Refuse (at the transport level) this many further dials *to* this host.
    pub refuse_dials: usize,
    /// When false every dial to this host is refused.
    pub reachable: bool,
    /// Why this host's session refused re-associations (`handle_reassoc` / `handle_confirm`).
    pub refusals_sent: Vec<RefuseReason>,
    /// Why `handle_accept` failed on this host.
    pub accept_errors: Vec<RefuseReason>,
    /// Protocol violations and decode errors seen on this host's connections.
    pub violations: Vec<String>,
    /// Where sessions that left this host went (answered with `Moved`).
    pub forwards: ForwardTable,
    /// `Moved` answers this host sent.
    pub moved_sent: usize,
    /// `Moved` answers this host's session received while dialing.
    pub moved_received: Vec<Moved>,
    /// One-way latency of connections this host dials (instead of [`World::latency`]).
    pub dial_latency: Option<Duration>,
}

/// The simulated network and its virtual clock.
pub struct World {
    /// The virtual clock.
    pub now: Instant,
    /// When the world was created.
    pub start: Instant,
    rng: ChaCha8Rng,
    /// The hosts.
    pub nodes: Vec<Node>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    /// One-way latency of connections opened from now on.
    pub latency: Duration,
    /// Configuration for sessions created from now on.
    pub config: SessionConfig,
    /// A dialer waiting this long for `Accept` gives up (`handle_connection_lost`).
    pub handshake_timeout: Duration,
    /// `drive` stops when nothing is in flight and no timer is due within this long of the last
    /// activity (keep-alives alone do not keep it going).
    pub horizon: Duration,
    /// Bound on steps of any single run.
    pub max_steps: usize,
    last_activity: Instant,
    /// Every `Reassoc` a session sent, encoded, with its connection (for replay tests).
    pub captured_reassoc: Vec<(ConnId, Vec<u8>)>,
    /// Frames delivered, by kind.
    pub frames_seen: BTreeMap<&'static str, usize>,
    /// Times a decode found an incomplete frame at the end of a delivered chunk.
    pub partial_reads: usize,
    /// Faults: when host `.0` is about to receive a frame of kind `.1` on a handshake, the
    /// connection is killed instead (both ends see a reset). Each entry fires once.
    pub kill_before: Vec<(NodeId, &'static str)>,
}

/// Name of a frame's kind.
pub fn kind(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Welcome(_) => "Welcome",
        Frame::Reassoc(_) => "Reassoc",
        Frame::Accept(_) => "Accept",
        Frame::Confirm(_) => "Confirm",
        Frame::Refuse(_) => "Refuse",
        Frame::Moved(_) => "Moved",
        Frame::Data { .. } => "Data",
        Frame::Ack { .. } => "Ack",
        Frame::Fin { .. } => "Fin",
        Frame::Freeze { .. } => "Freeze",
        Frame::FreezeAck { .. } => "FreezeAck",
        Frame::Ping => "Ping",
        _ => "other",
    }
}

/// Host `n`'s endpoint: id `[n; 16]`, contact 127.0.0.n:7000 (for tests that drive sessions by
/// hand, without a [`World`]).
pub fn local(n: u8) -> LocalInfo {
    LocalInfo {
        endpoint: EndpointId([n; 16]),
        contact: format!("127.0.0.{n}:7000").parse().unwrap(),
    }
}

/// Fixed entropy: every byte `n`.
pub fn ent(n: u8) -> Entropy {
    Entropy {
        secret: [n; 32],
        nonce: [n; 16],
    }
}

/// The test configuration: small buffers and frames so windows and splits matter.
pub fn test_config() -> SessionConfig {
    let mut c = SessionConfig::default();
    c.send_capacity = 256 * 1024;
    c.recv_capacity = 128 * 1024;
    c.max_frame_payload = 16 * 1024;
    c.ack_threshold = 32 * 1024;
    c
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

enum Until<'a> {
    /// Until nothing is in flight and no timer is due within the horizon.
    Quiet,
    /// Until the predicate holds; panics at `deadline`.
    Pred(Instant, &'a mut dyn FnMut(&World) -> bool),
    /// Process everything up to this instant, then stop there.
    Time(Instant),
}

impl World {
    /// An empty world with the test configuration and 2 ms latency.
    pub fn new(seed: u64) -> World {
        let now = Instant::now();
        World {
            now,
            start: now,
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            latency: Duration::from_millis(2),
            config: test_config(),
            handshake_timeout: Duration::from_secs(2),
            horizon: Duration::from_secs(1),
            max_steps: 2_000_000,
            last_activity: now,
            captured_reassoc: Vec::new(),
            frames_seen: BTreeMap::new(),
            partial_reads: 0,
            kill_before: Vec::new(),
        }
    }

    /// Add a host with a fresh endpoint id and contact address `127.0.0.(2+i):7000`.
    pub fn add_host(&mut self, name: &str) -> NodeId {
        let i = self.nodes.len();
        assert!(i < 250, "too many hosts");
        let contact: SocketAddr = format!("127.0.0.{}:7000", i + 2).parse().unwrap();
        let local = LocalInfo {
            endpoint: EndpointId(self.rng.gen()),
            contact,
        };
        self.nodes.push(Node {
            name: name.to_string(),
            local,
            session: None,
            retired: Vec::new(),
            events: Vec::new(),
            dials: Vec::new(),
            dials_refused: 0,
            refuse_dials: 0,
            reachable: true,
            refusals_sent: Vec::new(),
            accept_errors: Vec::new(),
            violations: Vec::new(),
            forwards: ForwardTable::new(ForwardTable::DEFAULT_CAPACITY, ForwardTable::DEFAULT_TTL),
            moved_sent: 0,
            moved_received: Vec::new(),
            dial_latency: None,
        });
        i
    }

    /// The live session on host `n`.
    pub fn s(&mut self, n: NodeId) -> &mut Session {
        let node = &mut self.nodes[n];
        match node.session.as_mut() {
            Some(s) => s,
            None => panic!("no session on {}", node.name),
        }
    }

    /// The live session on host `n`, shared.
    pub fn sr(&self, n: NodeId) -> &Session {
        let node = &self.nodes[n];
        node.session
            .as_ref()
            .unwrap_or_else(|| panic!("no session on {}", node.name))
    }

    /// Time since the world began.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn entropy(&mut self) -> Entropy {
        Entropy {
            secret: self.rng.gen(),
            nonce: self.rng.gen(),
        }
    }

    // ------------------------------------------------------------------ connections

    fn open_conn(&mut self, from: NodeId, to: NodeId, s0: Stage, s1: Stage) -> ConnId {
        let latency = self.nodes[from].dial_latency.unwrap_or(self.latency);
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let end = |node, stage| End {
            node,
            stage,
            open: true,
            rx: BytesMut::new(),
            inbox: VecDeque::new(),
            raw: Vec::new(),
        };
        self.conns.insert(
            id,
            Conn {
                ends: [end(from, s0), end(to, s1)],
                latency,
                blackholed: false,
            },
        );
        id
    }

    fn host_of(&self, addr: SocketAddr) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.local.contact == addr)
    }

    fn end_of(&self, c: ConnId, node: NodeId) -> Option<usize> {
        let conn = self.conns.get(&c)?;
        conn.ends.iter().position(|e| e.node == node)
    }

    /// Whether end `e` of `c` is still open.
    fn end_open(&self, c: ConnId, e: usize) -> bool {
        self.conns.get(&c).is_some_and(|k| k.ends[e].open)
    }

    /// Whether connection `c` has any end still open.
    pub fn conn_open(&self, c: ConnId) -> bool {
        self.conns
            .get(&c)
            .is_some_and(|k| k.ends.iter().any(|e| e.open))
    }

    /// Connections on which host `n` still has an open end, oldest first.
    pub fn open_conns_of(&self, n: NodeId) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, k)| k.ends.iter().any(|e| e.node == n && e.open))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Bytes (and EOFs) travelling on any connection.
    pub fn in_flight(&self) -> usize {
        self.conns
            .values()
            .flat_map(|c| c.ends.iter())
            .filter(|e| e.open)
            .map(|e| e.inbox.len())
            .sum()
    }

    /// Whether bytes written on `c` by `node` are still travelling.
    pub fn in_flight_from(&self, c: ConnId, node: NodeId) -> bool {
        let Some(e) = self.end_of(c, node) else {
            return false;
        };
        let o = &self.conns[&c].ends[1 - e];
        o.open && !o.inbox.is_empty()
    }

    fn send_end(&mut self, c: ConnId, e: usize, bytes: Vec<u8>) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        // Writing on a closed socket, into a black hole, or to a closed peer: the bytes vanish.
        if !conn.ends[e].open || conn.blackholed || !conn.ends[1 - e].open {
            return;
        }
        let latency = conn.latency;
        let inbox = &mut conn.ends[1 - e].inbox;
        let at = inbox
            .back()
            .map_or(now + latency, |(t, _)| (*t).max(now + latency));
        inbox.push_back((at, Seg::Data(bytes)));
    }

    fn send_frame(&mut self, c: ConnId, e: usize, f: &Frame) {
        self.send_end(c, e, f.to_bytes().to_vec());
    }

    /// The driver closes its end `e` of `c`; the other end reads EOF after the bytes in flight.
    fn close_end(&mut self, c: ConnId, e: usize) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if !conn.ends[e].open {
            return;
        }
        let end = &mut conn.ends[e];
        end.open = false;
        end.stage = Stage::Dead;
        end.inbox.clear();
        end.rx.clear();
        let latency = conn.latency;
        if !conn.blackholed && conn.ends[1 - e].open {
            let inbox = &mut conn.ends[1 - e].inbox;
            let at = inbox
                .back()
                .map_or(now + latency, |(t, _)| (*t).max(now + latency));
            inbox.push_back((at, Seg::Eof));
        }
    }

    /// Close end `e` and tell its session the connection is gone (what a driver does when it
    /// drops a connection on its own initiative).
    fn drop_end(&mut self, c: ConnId, e: usize) {
        let Some(node) = self.conns.get(&c).map(|k| k.ends[e].node) else {
            return;
        };
        let raw = matches!(self.conns[&c].ends[e].stage, Stage::Raw);
        self.close_end(c, e);
        let now = self.now;
        if !raw {
            if let Some(s) = self.nodes[node].session.as_mut() {
                s.handle_connection_lost(now, c);
            }
        }
    }

    /// Kill `c` abruptly (a reset seen at both ends): everything in flight is lost and both
    /// sessions get `handle_connection_lost`.
    pub fn kill(&mut self, c: ConnId) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let mut notify = Vec::new();
        for end in conn.ends.iter_mut() {
            if end.open {
                end.open = false;
                end.inbox.clear();
                end.rx.clear();
                if !matches!(end.stage, Stage::Raw) {
                    notify.push(end.node);
                }
                end.stage = Stage::Dead;
            }
        }
        for n in notify {
            if let Some(s) = self.nodes[n].session.as_mut() {
                s.handle_connection_lost(now, c);
            }
        }
    }

    /// From now on every byte on `c`, in either direction, is silently dropped (including the
    /// bytes already in flight, and the EOF of a later close).
    pub fn blackhole(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(&c) {
            conn.blackholed = true;
            for e in conn.ends.iter_mut() {
                e.inbox.clear();
            }
        }
    }

    /// A half-open connection: `node`'s end sees a reset, the other end sees nothing at all.
    pub fn reset_one_end(&mut self, c: ConnId, node: NodeId) {
        let e = self.end_of(c, node).expect("node is on conn");
        self.blackhole(c);
        self.drop_end(c, e);
    }

    /// Change the latency of an existing connection.
    pub fn set_latency(&mut self, c: ConnId, latency: Duration) {
        self.conns.get_mut(&c).expect("conn").latency = latency;
    }

    /// Open a raw connection from host `from` to `to` and write `bytes` on it (an attacker).
    pub fn inject(&mut self, from: NodeId, to: SocketAddr, bytes: &[u8]) -> ConnId {
        let target = self.host_of(to).expect("a host at that address");
        let c = self.open_conn(from, target, Stage::Raw, Stage::Listen);
        self.send_end(c, 0, bytes.to_vec());
        c
    }

    /// Write more bytes on a raw connection.
    pub fn send_raw(&mut self, c: ConnId, bytes: &[u8]) {
        self.send_end(c, 0, bytes.to_vec());
    }

    /// Write `frame` on `c` from its accepting end towards the dialer, ahead of anything the
    /// accepting host has not sent yet (an on-path attacker answering first).
    pub fn answer_first(&mut self, c: ConnId, frame: &Frame) {
        self.send_frame(c, 1, frame);
    }

    /// Host `old` remembers that `session` went to host `to` (what `Endpoint::forward` does).
    pub fn forward(&mut self, old: NodeId, session: SessionId, to: SocketAddr) {
        let now = self.now;
        self.nodes[old].forwards.insert(now, session, to);
    }

    /// Frames received on a raw connection.
    pub fn raw_frames(&self, c: ConnId) -> Vec<Frame> {
        self.conns[&c].ends[0].raw.clone()
    }

    // ------------------------------------------------------------------ association, freeze, thaw

    /// Associate: `a` dials `b` (Hello/Welcome as bytes over a new connection). Returns the
    /// connection, current at both ends.
    pub fn associate(&mut self, a: NodeId, b: NodeId) -> ConnId {
        let entropy = self.entropy();
        let (assoc, hello) = Associating::new(self.nodes[a].local, &entropy);
        let c = self.open_conn(a, b, Stage::AwaitWelcome(Box::new(assoc)), Stage::Listen);
        self.send_frame(c, 0, &hello);
        self.drive_until(|w| {
            w.nodes[a].session.is_some()
                && w.nodes[b].session.is_some()
                && w.sr(a).link() == Some(c)
                && w.sr(b).link() == Some(c)
        });
        self.drive();
        c
    }

    /// Freeze the session on `n`, drive until it is frozen, and take its image. The image is
    /// round-tripped through its encoding; the frozen session is retired from `n`.
    pub fn freeze(&mut self, n: NodeId) -> Vec<u8> {
        let now = self.now;
        self.s(n).freeze(now).expect("freeze starts");
        self.finish_freeze(n)
    }

    /// Drive until the (already freezing) session on `n` is frozen; retire it; its image bytes.
    pub fn finish_freeze(&mut self, n: NodeId) -> Vec<u8> {
        self.drive_until(|w| w.sr(n).is_frozen());
        // Let the driver act on `Frozen` and `CloseConnection`.
        self.poll_node(n);
        assert!(
            self.nodes[n]
                .events
                .iter()
                .any(|(_, e)| *e == Event::Frozen),
            "Event::Frozen emitted"
        );
        let s = self.nodes[n].session.take().expect("session");
        let image = s.image().expect("a frozen session has an image");
        assert!(s.link().is_none(), "a frozen session holds no connection");
        self.nodes[n].retired.push(s);
        let bytes = image.to_bytes();
        let back = StreamImage::from_bytes(&bytes).expect("image decodes");
        assert_eq!(back, image, "image round-trips");
        bytes
    }

    /// Thaw an image on a new host named `name`; that host's contact address now reaches it.
    pub fn thaw(&mut self, image: &[u8], name: &str) -> NodeId {
        let n = self.add_host(name);
        self.thaw_on(image, n);
        n
    }

    /// Thaw an image on an existing host without a session.
    pub fn thaw_on(&mut self, image: &[u8], n: NodeId) {
        assert!(self.nodes[n].session.is_none(), "host is free");
        let image = StreamImage::from_bytes(image).expect("image decodes");
        let s = Session::from_image(image, self.nodes[n].local, self.config.clone(), self.now);
        self.nodes[n].session = Some(s);
    }

    /// Freeze `from`, thaw onto a new host `name`, drive until quiet. Returns the new host.
    pub fn migrate(&mut self, from: NodeId, name: &str) -> NodeId {
        let image = self.freeze(from);
        let n = self.thaw(&image, name);
        self.drive();
        n
    }

    // ------------------------------------------------------------------ observations

    /// `(connection, epoch)` of every `Established` event on `n`.
    pub fn established(&self, n: NodeId) -> Vec<(ConnId, Epoch)> {
        self.nodes[n]
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Established { conn, epoch } => Some((*conn, *epoch)),
                _ => None,
            })
            .collect()
    }

    /// Whether `n` emitted an event matching `f`.
    pub fn saw(&self, n: NodeId, f: impl Fn(&Event) -> bool) -> bool {
        self.nodes[n].events.iter().any(|(_, e)| f(e))
    }

    /// Frames of this kind delivered so far.
    pub fn seen(&self, kind: &str) -> usize {
        self.frames_seen.get(kind).copied().unwrap_or(0)
    }

    // ------------------------------------------------------------------ the driver loop

    /// Run until idle: no bytes in flight, nothing to transmit, no events, and no timer due
    /// within [`World::horizon`] of the last activity.
    pub fn drive(&mut self) {
        self.run(Until::Quiet);
    }

    /// Run (through every timer, keep-alives included) until `pred` holds; panics after a
    /// minute of virtual time.
    pub fn drive_until(&mut self, mut pred: impl FnMut(&World) -> bool) {
        let deadline = self.now + Duration::from_secs(60);
        self.run(Until::Pred(deadline, &mut pred));
    }

    /// Let `d` of virtual time pass, firing every timer and delivering everything due.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.now + d;
        self.run(Until::Time(t));
    }

    fn run(&mut self, mut until: Until<'_>) {
        self.last_activity = self.now;
        let mut same_instant = 0usize;
        for _ in 0..self.max_steps {
            if let Until::Pred(_, p) = &mut until {
                if p(self) {
                    return;
                }
            }
            if self.step_now() {
                same_instant += 1;
                assert!(
                    same_instant < 100_000,
                    "busy loop: no progress of time at {:?}",
                    self.elapsed()
                );
                continue;
            }
            if let Until::Pred(_, p) = &mut until {
                if p(self) {
                    return;
                }
            }
            let (delivery, timer) = self.next_wakeup();
            let next = min_opt(delivery, timer);
            let to = match &until {
                Until::Quiet => {
                    let timer_soon = timer.is_some_and(|t| t <= self.last_activity + self.horizon);
                    if delivery.is_none() && !timer_soon {
                        return;
                    }
                    next.expect("something is due")
                }
                Until::Pred(deadline, _) => match next {
                    Some(t) if t <= *deadline => t,
                    _ => panic!(
                        "condition not reached by {:?} (idle: {})",
                        self.elapsed(),
                        next.is_none()
                    ),
                },
                Until::Time(end) => match next {
                    Some(t) if t <= *end => t,
                    _ => {
                        self.now = self.now.max(*end);
                        while self.step_now() {}
                        return;
                    }
                },
            };
            if to > self.now {
                self.now = to;
                same_instant = 0;
            }
        }
        panic!("no quiescence after {} steps", self.max_steps);
    }

    /// When the next bytes arrive, and when the next timer (session or driver) fires.
    fn next_wakeup(&self) -> (Option<Instant>, Option<Instant>) {
        let mut delivery = None;
        let mut timer = None;
        for conn in self.conns.values() {
            for end in &conn.ends {
                if !end.open {
                    continue;
                }
                if let Some((t, _)) = end.inbox.front() {
                    delivery = min_opt(delivery, Some(*t));
                }
                if let Stage::AwaitAccept { since } = end.stage {
                    timer = min_opt(timer, Some(since + self.handshake_timeout));
                }
            }
        }
        for node in &self.nodes {
            if let Some(s) = &node.session {
                timer = min_opt(timer, s.poll_timeout());
            }
        }
        (delivery, timer)
    }

    /// Do everything due at `now`; whether anything happened.
    fn step_now(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        for node in &mut self.nodes {
            if let Some(s) = node.session.as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                    progress = true;
                }
            }
        }
        let hto = self.handshake_timeout;
        let expired: Vec<(ConnId, usize)> = self
            .conns
            .iter()
            .flat_map(|(c, k)| {
                k.ends
                    .iter()
                    .enumerate()
                    .filter_map(move |(i, e)| match e.stage {
                        Stage::AwaitAccept { since } if e.open && since + hto <= now => {
                            Some((*c, i))
                        }
                        _ => None,
                    })
            })
            .collect();
        for (c, e) in expired {
            self.drop_end(c, e);
            progress = true;
        }
        for n in 0..self.nodes.len() {
            progress |= self.poll_node(n);
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in ids {
            for e in 0..2 {
                progress |= self.deliver(c, e);
            }
        }
        progress
    }

    /// `poll_transmit` until `None`, then `poll_event` until `None`, acting on each.
    fn poll_node(&mut self, n: NodeId) -> bool {
        let now = self.now;
        let mut progress = false;
        loop {
            let Some(s) = self.nodes[n].session.as_mut() else {
                return progress;
            };
            let link = s.link();
            let Some(t) = s.poll_transmit(now) else {
                break;
            };
            let link = link.expect("a transmit needs a current connection");
            let bytes = if t.payload.is_empty() {
                t.to_vec()
            } else {
                let mut v = t.header().to_vec();
                v.extend_from_slice(&t.payload);
                v
            };
            assert_eq!(bytes.len(), t.len());
            let e = self
                .end_of(link, n)
                .expect("the link is a known connection");
            self.send_end(link, e, bytes);
            progress = true;
        }
        while let Some(ev) = self.nodes[n].session.as_mut().and_then(|s| s.poll_event()) {
            progress = true;
            self.last_activity = now;
            self.nodes[n].events.push((now, ev.clone()));
            match ev {
                Event::Dial(addr) => self.dial(n, addr),
                Event::CloseConnection(c) => {
                    if let Some(e) = self.end_of(c, n) {
                        self.close_end(c, e);
                    }
                }
                _ => {}
            }
        }
        progress
    }

    fn dial(&mut self, n: NodeId, addr: SocketAddr) {
        let now = self.now;
        self.nodes[n].dials.push(now);
        let target = self.host_of(addr);
        let refused = match target {
            None => true,
            Some(t) if !self.nodes[t].reachable => true,
            Some(t) if self.nodes[t].refuse_dials > 0 => {
                self.nodes[t].refuse_dials -= 1;
                true
            }
            Some(_) => false,
        };
        if refused {
            self.nodes[n].dials_refused += 1;
            self.s(n).handle_dial_failed(now);
            return;
        }
        let t = target.expect("checked above");
        let c = self.open_conn(n, t, Stage::AwaitAccept { since: now }, Stage::Listen);
        let entropy = self.entropy();
        let f = self.s(n).start_reassoc(now, c, &entropy);
        assert!(matches!(f, Frame::Reassoc(_)));
        let bytes = f.to_bytes().to_vec();
        self.captured_reassoc.push((c, bytes.clone()));
        self.send_end(c, 0, bytes);
    }

    /// Deliver what is due at end `e` of `c`, in randomly split chunks.
    fn deliver(&mut self, c: ConnId, e: usize) -> bool {
        let now = self.now;
        let mut data = Vec::new();
        let mut eof = false;
        {
            let Some(conn) = self.conns.get_mut(&c) else {
                return false;
            };
            let end = &mut conn.ends[e];
            if !end.open {
                return false;
            }
            while end.inbox.front().is_some_and(|(t, _)| *t <= now) {
                match end.inbox.pop_front().map(|(_, s)| s) {
                    Some(Seg::Data(d)) => data.extend_from_slice(&d),
                    Some(Seg::Eof) => {
                        eof = true;
                        break;
                    }
                    None => unreachable!(),
                }
            }
        }
        if data.is_empty() && !eof {
            return false;
        }
        if !data.is_empty() {
            let cuts = self.rng.gen_range(0..=3);
            let mut points: Vec<usize> = (0..cuts)
                .map(|_| self.rng.gen_range(0..=data.len()))
                .collect();
            points.sort_unstable();
            points.push(data.len());
            let mut prev = 0;
            for p in points {
                self.feed(c, e, &data[prev..p]);
                prev = p;
            }
        }
        if eof && self.end_open(c, e) {
            self.last_activity = now;
            let node = {
                let end = &mut self.conns.get_mut(&c).expect("conn").ends[e];
                end.open = false;
                end.stage = Stage::Dead;
                end.inbox.clear();
                end.node
            };
            if let Some(s) = self.nodes[node].session.as_mut() {
                s.handle_connection_lost(now, c);
            }
        }
        true
    }

    /// Append a chunk to end `e`'s receive buffer and dispatch every whole frame in it.
    fn feed(&mut self, c: ConnId, e: usize, chunk: &[u8]) {
        let mut rx = {
            let end = &mut self.conns.get_mut(&c).expect("conn").ends[e];
            if !end.open {
                return;
            }
            end.rx.extend_from_slice(chunk);
            std::mem::take(&mut end.rx)
        };
        loop {
            match Frame::decode(&mut rx) {
                Ok(Some(f)) => {
                    // Sealed frames are counted by their inner kind once a session opened them.
                    if !matches!(f, Frame::Sealed(_)) {
                        let mut k = kind(&f);
                        if k == "Confirm"
                            && matches!(self.conns[&c].ends[e].stage, Stage::Established)
                        {
                            // The dialer's association confirmation (PROTOCOL.md §5.1).
                            k = "AssocConfirm";
                        }
                        *self.frames_seen.entry(k).or_default() += 1;
                        if !matches!(f, Frame::Ping) {
                            self.last_activity = self.now;
                        }
                    }
                    self.dispatch(c, e, f);
                    if !self.end_open(c, e) {
                        return;
                    }
                }
                Ok(None) => {
                    if !rx.is_empty() {
                        self.partial_reads += 1;
                    }
                    break;
                }
                Err(err) => {
                    let node = self.conns[&c].ends[e].node;
                    self.nodes[node]
                        .violations
                        .push(format!("decode on {c:?}: {err}"));
                    self.drop_end(c, e);
                    return;
                }
            }
        }
        self.conns.get_mut(&c).expect("conn").ends[e].rx = rx;
    }

    /// Hand one frame to the right call for the stage end `e` of `c` is in.
    fn dispatch(&mut self, c: ConnId, e: usize, frame: Frame) {
        let now = self.now;
        let node = self.conns[&c].ends[e].node;
        let handshake = !matches!(
            self.conns[&c].ends[e].stage,
            Stage::Established | Stage::Raw
        );
        if let Some(i) = self
            .kill_before
            .iter()
            .position(|(n, k)| *n == node && *k == kind(&frame))
            .filter(|_| handshake)
        {
            self.kill_before.remove(i);
            self.kill(c);
            return;
        }
        let stage = std::mem::replace(
            &mut self.conns.get_mut(&c).expect("conn").ends[e].stage,
            Stage::Dead,
        );
        let next = match stage {
            Stage::Listen => match frame {
                Frame::Hello(h) => {
                    let id = SessionId(self.rng.gen());
                    let entropy = self.entropy();
                    let local = self.nodes[node].local;
                    match Session::accept_hello(
                        now,
                        c,
                        &h,
                        id,
                        local,
                        &entropy,
                        self.config.clone(),
                    ) {
                        Ok((s, welcome)) => {
                            assert!(self.nodes[node].session.is_none(), "one session per host");
                            self.nodes[node].session = Some(s);
                            self.send_frame(c, e, &welcome);
                            Stage::Established
                        }
                        Err(err) => {
                            self.nodes[node].violations.push(format!("hello: {err}"));
                            self.close_end(c, e);
                            Stage::Dead
                        }
                    }
                }
                Frame::Reassoc(r) => {
                    let entropy = self.entropy();
                    let here = self.nodes[node]
                        .session
                        .as_ref()
                        .is_some_and(|s| s.id() == r.session);
                    let moved = match here {
                        true => None,
                        false => self.nodes[node].forwards.get(now, &r.session),
                    };
                    let res = match (moved, self.nodes[node].session.as_mut()) {
                        (Some(_), _) => Err(RefuseReason::UnknownSession),
                        (None, Some(s)) => s.handle_reassoc(now, c, &r, &entropy),
                        (None, None) => Err(RefuseReason::UnknownSession),
                    };
                    if let Some(contact) = moved {
                        self.nodes[node].moved_sent += 1;
                        let m = Frame::Moved(Moved {
                            session: r.session,
                            contact,
                        });
                        self.send_frame(c, e, &m);
                        self.close_end(c, e);
                        return;
                    }
                    match res {
                        Ok(accept) => {
                            assert!(matches!(accept, Frame::Accept(_)));
                            self.send_frame(c, e, &accept);
                            Stage::AwaitConfirm
                        }
                        Err(reason) => {
                            self.nodes[node].refusals_sent.push(reason);
                            self.send_frame(c, e, &Frame::Refuse(reason));
                            self.close_end(c, e);
                            Stage::Dead
                        }
                    }
                }
                other => {
                    self.nodes[node]
                        .violations
                        .push(format!("unexpected first frame {}", kind(&other)));
                    self.close_end(c, e);
                    Stage::Dead
                }
            },
            Stage::AwaitConfirm => {
                let res = match self.nodes[node].session.as_mut() {
                    Some(s) => s.handle_confirm(now, c, frame),
                    None => Err(RefuseReason::UnknownSession),
                };
                match res {
                    Ok(()) => Stage::Established,
                    Err(reason) => {
                        self.nodes[node].refusals_sent.push(reason);
                        self.drop_end(c, e);
                        Stage::Dead
                    }
                }
            }
            Stage::AwaitAccept { .. } if matches!(frame, Frame::Moved(_)) => {
                let Frame::Moved(m) = frame else {
                    unreachable!()
                };
                self.nodes[node].moved_received.push(m);
                if let Some(s) = self.nodes[node].session.as_mut() {
                    s.handle_moved(now, c, &m);
                }
                self.close_end(c, e);
                Stage::Dead
            }
            Stage::AwaitAccept { .. } => {
                let res = match self.nodes[node].session.as_mut() {
                    Some(s) => s.handle_accept(now, c, frame),
                    None => Err(RefuseReason::UnknownSession),
                };
                match res {
                    Ok(confirm) => {
                        assert!(matches!(confirm, Frame::Confirm(_)));
                        // Sent before anything poll_transmit yields.
                        self.send_frame(c, e, &confirm);
                        Stage::Established
                    }
                    Err(reason) => {
                        self.nodes[node].accept_errors.push(reason);
                        self.close_end(c, e);
                        Stage::Dead
                    }
                }
            }
            Stage::AwaitWelcome(assoc) => match assoc.handle(now, c, frame, self.config.clone()) {
                Ok(s) => {
                    assert!(self.nodes[node].session.is_none(), "one session per host");
                    self.nodes[node].session = Some(s);
                    Stage::Established
                }
                Err(err) => {
                    self.nodes[node].violations.push(format!("welcome: {err}"));
                    self.close_end(c, e);
                    Stage::Dead
                }
            },
            Stage::Established => {
                if let Some(s) = self.nodes[node].session.as_mut() {
                    let sealed = matches!(frame, Frame::Sealed(_));
                    let r = match s.open_frame(now, c, frame) {
                        Ok(Some(opened)) => {
                            if sealed {
                                let k = kind(opened.frame());
                                *self.frames_seen.entry(k).or_default() += 1;
                                if k != "Ping" {
                                    self.last_activity = now;
                                }
                            }
                            s.handle_opened(now, c, opened)
                        }
                        Ok(None) => Ok(()),
                        Err(v) => Err(v),
                    };
                    if let Err(v) = r {
                        self.nodes[node].violations.push(format!("{c:?}: {v}"));
                        self.close_end(c, e);
                    }
                }
                Stage::Established
            }
            Stage::Raw => {
                self.conns.get_mut(&c).expect("conn").ends[e]
                    .raw
                    .push(frame);
                Stage::Raw
            }
            Stage::Dead => Stage::Dead,
        };
        if let Some(conn) = self.conns.get_mut(&c) {
            if conn.ends[e].open {
                conn.ends[e].stage = next;
            }
        }
    }
}

// ---------------------------------------------------------------------- application streams

/// One direction of the application stream: deterministic random bytes written at one end,
/// everything read at the other, for byte-exact comparison.
pub struct Flow {
    pub name: &'static str,
    gen: ChaCha8Rng,
    pending: Vec<u8>,
    /// Bytes `write` accepted, in order.
    pub sent: Vec<u8>,
    /// Bytes `read` returned, in order.
    pub received: Vec<u8>,
}

impl Flow {
    /// A flow whose bytes come from `seed`.
    pub fn new(name: &'static str, seed: u64) -> Flow {
        Flow {
            name,
            gen: ChaCha8Rng::seed_from_u64(seed),
            pending: Vec::new(),
            sent: Vec::new(),
            received: Vec::new(),
        }
    }

    /// Offer the next `n` bytes of the stream to `s.write`; how many it took.
    pub fn write(&mut self, s: &mut Session, n: usize) -> Result<usize, WriteError> {
        while self.pending.len() < n {
            let mut chunk = [0u8; 4096];
            self.gen.fill_bytes(&mut chunk);
            self.pending.extend_from_slice(&chunk);
        }
        let k = s.write(&self.pending[..n])?;
        assert!(k <= n);
        self.sent.extend(self.pending.drain(..k));
        Ok(k)
    }

    /// Like [`Flow::write`], with `Blocked` as 0; any other error panics.
    pub fn write_some(&mut self, s: &mut Session, n: usize) -> usize {
        match self.write(s, n) {
            Ok(k) => k,
            Err(WriteError::Blocked) => 0,
            Err(e) => panic!("{}: write failed: {e}", self.name),
        }
    }

    /// One `read` of at most `max` bytes.
    pub fn read(&mut self, s: &mut Session, max: usize) -> Result<usize, ReadError> {
        let mut buf = vec![0u8; max];
        let k = s.read(&mut buf)?;
        self.received.extend_from_slice(&buf[..k]);
        Ok(k)
    }

    /// Read until `Blocked` (or end of stream); how many bytes.
    pub fn read_all(&mut self, s: &mut Session) -> usize {
        let mut total = 0;
        loop {
            match self.read(s, 48 * 1024 + 7) {
                Ok(0) => return total,
                Ok(k) => total += k,
                Err(ReadError::Blocked) => return total,
                Err(e) => panic!("{}: read failed: {e}", self.name),
            }
        }
    }

    /// Written and not yet read.
    pub fn outstanding(&self) -> usize {
        self.sent.len() - self.received.len()
    }

    /// What was read is a prefix of what was written.
    pub fn assert_prefix(&self) {
        let n = self.received.len();
        assert!(
            n <= self.sent.len(),
            "{}: read more than written",
            self.name
        );
        if self.received[..] != self.sent[..n] {
            let at = self
                .received
                .iter()
                .zip(&self.sent)
                .position(|(a, b)| a != b)
                .unwrap_or(n);
            panic!("{}: stream differs at byte {at}", self.name);
        }
    }

    /// Everything written was read exactly once and in order (compared by SHA-256).
    pub fn assert_delivered(&self) {
        self.assert_prefix();
        assert_eq!(
            self.received.len(),
            self.sent.len(),
            "{}: {} bytes written, {} read",
            self.name,
            self.sent.len(),
            self.received.len()
        );
        assert_eq!(
            Sha256::digest(&self.sent),
            Sha256::digest(&self.received),
            "{}: digest",
            self.name
        );
    }
}
