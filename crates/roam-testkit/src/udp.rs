//! A seeded, lossy UDP relay between real sockets, with one upstream socket per client.
//!
//! This is the datagram counterpart of [`crate::Relay`], modelled on smoltcp's
//! `phy/fault_injector.rs`: every datagram crossing the relay may be dropped, corrupted,
//! duplicated, held back for reordering or delayed, with the decisions drawn from a seeded
//! ChaCha8 generator so that a run can be replayed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::debug;

/// Receive buffer size; larger than any UDP payload over IPv4 or (non-jumbo) IPv6.
const MAX_DATAGRAM: usize = 64 * 1024;
/// Most bytes a single flow may keep in its delay queue.
const DELAY_QUEUE_BYTES: usize = 1 << 20;
/// Longest delay accepted; longer bounds of [`Faults::delay`] are clamped to this.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// Pause after a failed `recv_from` so a persistent socket error cannot make a loop spin.
const RECV_BACKOFF: Duration = Duration::from_millis(5);

/// The faults a [`UdpRelay`] injects, applied independently to every datagram in both
/// directions.
///
/// Rates are probabilities in `[0, 1]` per datagram; out-of-range values are clamped into
/// that range and NaN counts as 0 (see [`Faults::clamped`]). The default injects nothing.
///
/// For every datagram the relay takes, in this order:
/// 1. **drop** with probability `drop`: the datagram is discarded;
/// 2. **corrupt** with probability `corrupt`: one uniformly chosen bit is flipped (empty
///    datagrams are never corrupted);
/// 3. **duplicate** with probability `duplicate`: the (possibly corrupted) datagram is sent
///    twice, back to back;
/// 4. **delay**: if `delay` is `Some((min, max))`, the datagram (with its duplicate) is sent
///    after a delay drawn uniformly from `[min, max)` (`min == max` gives a fixed delay);
/// 5. **reorder** with probability `reorder`: the datagram is held back and released right
///    after the next datagram of the same flow that is not dropped, at that datagram's send
///    time (its own delay draw is then unused). Only one
///    datagram per flow is held at a time (a datagram arriving while another is held is never
///    held itself), so `reorder = 1.0` swaps neighbours: `a b c d` becomes `b a d c`. If no
///    further datagram arrives within [`UdpRelay::MAX_HOLD`], the held one is sent anyway, at once.
///
/// Every datagram consumes the same number of random draws whatever the rates and outcomes,
/// so the decision for one fault depends only on the seed, its own rate and the datagram's
/// position in its flow: e.g. changing `duplicate` does not change which datagrams are dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Seed of the ChaCha8 generators. Each flow (one client, one direction) gets its own
    /// stream of this seed, so its decisions do not depend on other flows' traffic.
    pub seed: u64,
    /// Probability that a datagram is discarded.
    pub drop: f64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back and released after the next one.
    pub reorder: f64,
    /// Uniform random delay range `(min, max)` applied to every datagram, or `None` for no
    /// delay. Reversed bounds are swapped; both bounds are clamped to 60 s.
    pub delay: Option<(Duration, Duration)>,
    /// Probability that one random bit of a datagram is flipped.
    pub corrupt: f64,
}

impl Faults {
    /// This configuration with every rate clamped into `[0, 1]` (NaN becomes 0), the delay
    /// bounds put in order and limited to 60 s. This is what the relay actually applies.
    pub fn clamped(&self) -> Faults {
        fn rate(p: f64) -> f64 {
            if p.is_nan() {
                0.0
            } else {
                p.clamp(0.0, 1.0)
            }
        }
        Faults {
            seed: self.seed,
            drop: rate(self.drop),
            duplicate: rate(self.duplicate),
            reorder: rate(self.reorder),
            delay: self
                .delay
                .map(|(a, b)| (a.min(b).min(MAX_DELAY), a.max(b).min(MAX_DELAY))),
            corrupt: rate(self.corrupt),
        }
    }
}

/// Counters for one direction of a [`UdpRelay`].
///
/// `received`, `dropped`, `corrupted`, `duplicated` and `reordered` count original
/// datagrams; `delayed`, `overflowed`, `forwarded` and `send_errors` count copies (a
/// duplicated datagram is two copies). Once the relay is idle (nothing held or queued),
/// `received + duplicated == dropped + overflowed + forwarded + send_errors`.
/// Datagrams still held or queued when the relay shuts down are discarded without being
/// counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpDirectionStats {
    /// Datagrams taken in: for `up`, read from the listening socket from an admitted client
    /// (see [`UdpRelayStats::rejected`]); for `down`, read from an upstream socket and sent by
    /// the current target (see [`UdpRelayStats::foreign`]).
    pub received: u64,
    /// Copies handed to the operating system for sending (counted just before the send).
    pub forwarded: u64,
    /// Datagrams discarded by the `drop` fault.
    pub dropped: u64,
    /// Datagrams sent twice by the `duplicate` fault.
    pub duplicated: u64,
    /// Held-back datagrams released after the datagram that overtook them (not counted when
    /// a held datagram is released by the [`UdpRelay::MAX_HOLD`] timeout instead).
    pub reordered: u64,
    /// Copies that went through the delay queue.
    pub delayed: u64,
    /// Datagrams with a bit flipped by the `corrupt` fault.
    pub corrupted: u64,
    /// Copies discarded because a bounded queue was full: a client's inbound queue
    /// ([`UdpRelay::CLIENT_QUEUE_LEN`]) or a flow's delay queue
    /// ([`UdpRelay::DELAY_QUEUE_LEN`] datagrams, 1 MiB).
    pub overflowed: u64,
    /// Copies the operating system refused to send.
    pub send_errors: u64,
}

impl UdpDirectionStats {
    /// Field-wise sum of two sets of counters.
    fn add(&self, o: &UdpDirectionStats) -> UdpDirectionStats {
        UdpDirectionStats {
            received: self.received + o.received,
            forwarded: self.forwarded + o.forwarded,
            dropped: self.dropped + o.dropped,
            duplicated: self.duplicated + o.duplicated,
            reordered: self.reordered + o.reordered,
            delayed: self.delayed + o.delayed,
            corrupted: self.corrupted + o.corrupted,
            overflowed: self.overflowed + o.overflowed,
            send_errors: self.send_errors + o.send_errors,
        }
    }
}

/// Counters describing what a [`UdpRelay`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpRelayStats {
    /// Client → target direction.
    pub up: UdpDirectionStats,
    /// Target → client direction.
    pub down: UdpDirectionStats,
    /// Clients admitted so far (each got its own upstream socket).
    pub clients: u64,
    /// Datagrams from clients that could not be admitted (more than
    /// [`UdpRelay::MAX_CLIENTS`], or binding the upstream socket failed); discarded.
    pub rejected: u64,
    /// Datagrams that reached an upstream socket from an address other than the current
    /// target (e.g. the old target after [`UdpRelay::set_target`]); discarded.
    pub foreign: u64,
}

impl UdpRelayStats {
    /// Both directions added together.
    pub fn total(&self) -> UdpDirectionStats {
        self.up.add(&self.down)
    }
}

/// A seeded, lossy UDP relay between real sockets: datagrams sent to
/// [`local_addr`](UdpRelay::local_addr) reach the target, replies come back, and [`Faults`]
/// are injected on the way in both directions.
///
/// # Address mapping
///
/// The relay is symmetric, with one upstream socket per client:
///
/// * A client `P` sends to the relay's listening address `R`. The first datagram from `P`
///   admits it: the relay binds a fresh upstream socket `U_P` (on `R`'s IP, port 0; on the
///   unspecified address if `R`'s IP does not suit the target's family or scope) and
///   forwards `P`'s datagrams to the target `T` from `U_P`. So `T` sees every client as a
///   distinct source address `U_P`, and a client that changes its address looks to `T`
///   like a migrated peer.
/// * Datagrams `T` sends to `U_P` go back to `P`, from `R`. Datagrams reaching `U_P` from
///   anyone but the *current* target are discarded (counted in [`UdpRelayStats::foreign`]).
///
/// The relay thus only ever sends to the configured target and to clients that contacted
/// it. At most [`UdpRelay::MAX_CLIENTS`] clients are admitted; mappings are never expired.
/// Bind the relay to a concrete address such as `127.0.0.5:0`, not a wildcard.
///
/// # Flows and determinism
///
/// Each client has two flows, `up` (client → target) and `down` (target → client), each
/// handled by one task with its own generator: stream `2 i` (up) and `2 i + 1` (down) of
/// `ChaCha8Rng::seed_from_u64(seed)`, where `i` is the client's admission index (0 for the
/// first client). Given the same seed and the same sequence of datagrams in a flow, the
/// relay makes the same decisions for that flow, regardless of timing and other flows.
///
/// # Bounds
///
/// Every queue is bounded and counts what it discards ([`UdpDirectionStats::overflowed`]);
/// the relay's tasks end on [`UdpRelay::shutdown`] or drop (see [`UdpRelay::stopped`]) and
/// sleep while there is nothing to do.
///
/// The relay is `Send + Sync`; all controls take `&self`.
pub struct UdpRelay {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

/// State shared between the [`UdpRelay`] handle and its tasks.
struct Shared {
    /// Current (clamped) faults; flows reseed their generator whenever it changes.
    faults: watch::Sender<Faults>,
    /// Current target address.
    target: watch::Sender<SocketAddr>,
    /// Set to `true` once on shutdown.
    stop: watch::Sender<bool>,
    /// Number of live tasks.
    tasks: watch::Sender<usize>,
    /// Notified (all waiters) whenever counters may have changed.
    changed: Notify,
    up: DirCounters,
    down: DirCounters,
    clients: AtomicU64,
    rejected: AtomicU64,
    foreign: AtomicU64,
}

/// Live counters for one direction; see [`UdpDirectionStats`].
#[derive(Default)]
struct DirCounters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    delayed: AtomicU64,
    corrupted: AtomicU64,
    overflowed: AtomicU64,
    send_errors: AtomicU64,
}

impl DirCounters {
    fn snapshot(&self) -> UdpDirectionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        UdpDirectionStats {
            received: get(&self.received),
            forwarded: get(&self.forwarded),
            dropped: get(&self.dropped),
            duplicated: get(&self.duplicated),
            reordered: get(&self.reordered),
            delayed: get(&self.delayed),
            corrupted: get(&self.corrupted),
            overflowed: get(&self.overflowed),
            send_errors: get(&self.send_errors),
        }
    }
}

/// Add one to a counter.
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::AcqRel);
}

/// Which way a flow goes.
#[derive(Clone, Copy, Debug)]
enum Dir {
    /// Client → target.
    Up,
    /// Target → client.
    Down,
}

/// Keeps the task count up while a relay task runs.
struct TaskGuard(Arc<Shared>);

impl TaskGuard {
    fn new(shared: &Arc<Shared>) -> TaskGuard {
        shared.tasks.send_modify(|n| *n += 1);
        TaskGuard(Arc::clone(shared))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.tasks.send_modify(|n| *n -= 1);
    }
}

/// Spawn a relay task; it counts as live until `fut` has completed and been dropped (so its
/// sockets are closed) or the task is cancelled.
fn spawn_tracked<F>(shared: &Arc<Shared>, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let guard = TaskGuard::new(shared);
    tokio::spawn(async move {
        fut.await;
        drop(guard);
    });
}

impl UdpRelay {
    /// Most clients one relay admits; datagrams from further clients are discarded and
    /// counted in [`UdpRelayStats::rejected`].
    pub const MAX_CLIENTS: usize = 64;
    /// Capacity, in datagrams, of each client's queue between the listening socket and its
    /// upstream flow; beyond it datagrams are discarded (counted as `up.overflowed`).
    pub const CLIENT_QUEUE_LEN: usize = 64;
    /// Capacity, in copies, of each flow's delay queue (which also holds at most 1 MiB);
    /// beyond it copies are discarded (counted as `overflowed`).
    pub const DELAY_QUEUE_LEN: usize = 256;
    /// Longest time a datagram is held back for reordering: if no other datagram of its flow
    /// arrives by then, it is sent anyway.
    pub const MAX_HOLD: Duration = Duration::from_millis(100);

    /// Bind `listen` (e.g. `127.0.0.5:0`) and relay datagrams between clients and `target`,
    /// injecting `faults` (clamped, see [`Faults::clamped`]). Must be called within a Tokio
    /// runtime; the relay's tasks run on it.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        faults: Faults,
    ) -> io::Result<UdpRelay> {
        let socket = UdpSocket::bind(listen).await?;
        let local_addr = socket.local_addr()?;
        let shared = Arc::new(Shared {
            faults: watch::Sender::new(faults.clamped()),
            target: watch::Sender::new(target),
            stop: watch::Sender::new(false),
            tasks: watch::Sender::new(0),
            changed: Notify::new(),
            up: DirCounters::default(),
            down: DirCounters::default(),
            clients: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        });
        debug!(%local_addr, %target, "udp relay started");
        spawn_tracked(
            &shared,
            listen_loop(Arc::clone(&shared), Arc::new(socket), local_addr),
        );
        Ok(UdpRelay { shared, local_addr })
    }

    /// The address clients send to instead of the target.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replace the faults (clamped, see [`Faults::clamped`]) for all flows, existing and
    /// future. Each flow restarts its generator from the new seed with the next datagram it
    /// takes, even if the new faults equal the old ones. Datagrams already held or queued
    /// are released as scheduled.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.faults.send_replace(faults.clamped());
    }

    /// The faults currently applied (clamped).
    pub fn faults(&self) -> Faults {
        *self.shared.faults.borrow()
    }

    /// Send client datagrams to `target` from now on (also those already queued), and accept
    /// replies only from it: datagrams from the old target are discarded as foreign. Existing
    /// client mappings and upstream sockets are kept.
    pub fn set_target(&self, target: SocketAddr) {
        debug!(%target, "udp relay retargeted");
        self.shared.target.send_replace(target);
    }

    /// The current target address.
    pub fn target(&self) -> SocketAddr {
        *self.shared.target.borrow()
    }

    /// A snapshot of the relay's counters.
    pub fn stats(&self) -> UdpRelayStats {
        let s = &self.shared;
        UdpRelayStats {
            up: s.up.snapshot(),
            down: s.down.snapshot(),
            clients: s.clients.load(Ordering::Acquire),
            rejected: s.rejected.load(Ordering::Acquire),
            foreign: s.foreign.load(Ordering::Acquire),
        }
    }

    /// Wait until `pred` holds for the relay's counters and return them. Counters are checked
    /// now and again every time they may have changed, so this never misses an update (but
    /// waits forever if `pred` never becomes true; wrap it in a timeout).
    pub async fn wait_stats<F>(&self, mut pred: F) -> UdpRelayStats
    where
        F: FnMut(&UdpRelayStats) -> bool,
    {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stats = self.stats();
            if pred(&stats) {
                return stats;
            }
            notified.await;
        }
    }

    /// Stop relaying: every task ends soon after, discarding held and queued datagrams, and
    /// all the relay's sockets are closed. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        self.shared.stop.send_replace(true);
    }

    /// A future that completes once every task of the relay has ended and its sockets are
    /// closed. It does not keep the relay alive and does not shut it down: call
    /// [`UdpRelay::shutdown`] or drop the relay, or it never completes.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut tasks = self.shared.tasks.subscribe();
        async move {
            // The sender lives in `Shared`, which the tasks keep alive while they run, so an
            // error here also means every task is gone.
            let _ = tasks.wait_for(|n| *n == 0).await;
        }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for UdpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpRelay")
            .field("local_addr", &self.local_addr)
            .field("target", &self.target())
            .field("faults", &self.faults())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The IP to bind a client's upstream socket to: the listening IP if it can reach the
/// target, else the unspecified address of the target's family.
fn upstream_ip(listen: IpAddr, target: SocketAddr) -> IpAddr {
    let t = target.ip();
    if listen.is_ipv4() == t.is_ipv4() && listen.is_loopback() == t.is_loopback() {
        listen
    } else if t.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    }
}

/// Read datagrams on the listening socket and hand them to each client's upstream flow,
/// admitting new clients as they appear.
async fn listen_loop(shared: Arc<Shared>, listen: Arc<UdpSocket>, local_addr: SocketAddr) {
    let mut stop = shared.stop.subscribe();
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = listen.recv_from(&mut buf) => r,
        };
        let (n, client) = match received {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "udp relay: receive on listening socket failed");
                if backoff(&mut stop).await {
                    break;
                }
                continue;
            }
        };
        if !clients.contains_key(&client) {
            if clients.len() >= UdpRelay::MAX_CLIENTS {
                debug!(%client, "udp relay: too many clients, datagram discarded");
                bump(&shared.rejected);
                shared.changed.notify_waiters();
                continue;
            }
            match admit(&shared, &listen, local_addr, client, clients.len() as u64).await {
                Ok(tx) => {
                    clients.insert(client, tx);
                }
                Err(e) => {
                    debug!(%client, error = %e, "udp relay: could not bind upstream socket");
                    bump(&shared.rejected);
                    shared.changed.notify_waiters();
                    continue;
                }
            }
        }
        if let Some(tx) = clients.get(&client) {
            if tx.try_send(buf[..n].to_vec()).is_err() {
                // Full (or, only during shutdown, closed): count it as received and lost.
                bump(&shared.up.received);
                bump(&shared.up.overflowed);
                shared.changed.notify_waiters();
            }
        }
    }
    debug!(%local_addr, "udp relay stopped");
}

/// Admit `client` as client number `index`: bind its upstream socket and spawn its two flows.
async fn admit(
    shared: &Arc<Shared>,
    listen: &Arc<UdpSocket>,
    local_addr: SocketAddr,
    client: SocketAddr,
    index: u64,
) -> io::Result<mpsc::Sender<Vec<u8>>> {
    let target = *shared.target.borrow();
    let upstream =
        UdpSocket::bind(SocketAddr::new(upstream_ip(local_addr.ip(), target), 0)).await?;
    debug!(%client, upstream = ?upstream.local_addr(), "udp relay: client admitted");
    let upstream = Arc::new(upstream);
    let (tx, rx) = mpsc::channel(UdpRelay::CLIENT_QUEUE_LEN);
    let up = Flow::new(shared, Dir::Up, 2 * index);
    let down = Flow::new(shared, Dir::Down, 2 * index + 1);
    spawn_tracked(shared, up_loop(up, Arc::clone(&upstream), rx));
    spawn_tracked(
        shared,
        down_loop(down, upstream, Arc::clone(listen), client),
    );
    bump(&shared.clients);
    Ok(tx)
}

/// Client → target flow: take the client's datagrams from the listener, apply faults, and send
/// them from the upstream socket to the current target.
async fn up_loop(mut flow: Flow, upstream: Arc<UdpSocket>, mut rx: mpsc::Receiver<Vec<u8>>) {
    let shared = Arc::clone(&flow.shared);
    let mut stop = shared.stop.subscribe();
    let mut out = Vec::new();
    loop {
        let wake = flow.next_deadline();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            () = sleep_until_opt(wake) => flow.fire_due(wake, &mut out),
            r = rx.recv() => match r {
                Some(data) => flow.process(data, &mut out),
                None => break,
            },
        }
        let sent = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => false,
            () = send_all(&upstream, &mut out, || *shared.target.borrow(), &shared.up) => true,
        };
        shared.changed.notify_waiters();
        if !sent {
            break;
        }
    }
}

/// Target → client flow: read the upstream socket, keep what the current target sent, apply
/// faults, and send it to the client from the listening socket.
async fn down_loop(
    mut flow: Flow,
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
) {
    let shared = Arc::clone(&flow.shared);
    let mut stop = shared.stop.subscribe();
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let wake = flow.next_deadline();
        let received = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            () = sleep_until_opt(wake) => {
                flow.fire_due(wake, &mut out);
                None
            }
            r = upstream.recv_from(&mut buf) => Some(r),
        };
        match received {
            None => {}
            Some(Ok((n, from))) => {
                let target = *shared.target.borrow();
                if from == target {
                    flow.process(buf[..n].to_vec(), &mut out);
                } else {
                    debug!(%from, %client, "udp relay: datagram from a non-target discarded");
                    bump(&shared.foreign);
                }
            }
            Some(Err(e)) => {
                debug!(%client, error = %e, "udp relay: receive on upstream socket failed");
                if backoff(&mut stop).await {
                    break;
                }
            }
        }
        let sent = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => false,
            () = send_all(&listen, &mut out, || client, &shared.down) => true,
        };
        shared.changed.notify_waiters();
        if !sent {
            break;
        }
    }
}

/// Sleep until `at`, or forever if there is nothing scheduled.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Wait [`RECV_BACKOFF`] after a socket error; returns true if the relay stopped meanwhile.
async fn backoff(stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => true,
        () = tokio::time::sleep(RECV_BACKOFF) => false,
    }
}

/// Send every datagram in `out`, in order, to `dest()` (evaluated per datagram).
async fn send_all(
    socket: &UdpSocket,
    out: &mut Vec<Vec<u8>>,
    dest: impl Fn() -> SocketAddr,
    counters: &DirCounters,
) {
    for data in out.drain(..) {
        let to = dest();
        // Count before sending, so whoever receives the datagram already sees it counted.
        bump(&counters.forwarded);
        if let Err(e) = socket.send_to(&data, to).await {
            debug!(%to, error = %e, "udp relay: send failed");
            counters.forwarded.fetch_sub(1, Ordering::AcqRel);
            bump(&counters.send_errors);
        }
    }
}

/// A datagram copy waiting in a delay queue; ordered by send time, then by arrival.
struct Scheduled {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A datagram held back for reordering.
struct Held {
    data: Vec<u8>,
    /// 1, or 2 if it was duplicated.
    copies: u8,
    /// When it is sent even if nothing overtook it.
    expires: Instant,
}

/// The random draws taken for every datagram (always all of them, in this order).
struct Draws {
    drop: f64,
    corrupt: f64,
    bit: u64,
    duplicate: f64,
    delay: f64,
    reorder: f64,
}

impl Draws {
    fn take(rng: &mut ChaCha8Rng) -> Draws {
        // Struct fields are evaluated in the order written, which fixes the draw order.
        Draws {
            drop: rng.gen(),
            corrupt: rng.gen(),
            bit: rng.gen(),
            duplicate: rng.gen(),
            delay: rng.gen(),
            reorder: rng.gen(),
        }
    }
}

/// The fault state of one flow (one client, one direction), owned by the flow's task.
struct Flow {
    shared: Arc<Shared>,
    dir: Dir,
    faults_rx: watch::Receiver<Faults>,
    faults: Faults,
    /// ChaCha stream of this flow.
    stream: u64,
    rng: ChaCha8Rng,
    held: Option<Held>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    queued_bytes: usize,
    next_seq: u64,
}

/// The generator for `stream` of `seed`.
fn flow_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

impl Flow {
    fn new(shared: &Arc<Shared>, dir: Dir, stream: u64) -> Flow {
        let mut faults_rx = shared.faults.subscribe();
        let faults = *faults_rx.borrow_and_update();
        Flow {
            shared: Arc::clone(shared),
            dir,
            faults_rx,
            faults,
            stream,
            rng: flow_rng(faults.seed, stream),
            held: None,
            queue: BinaryHeap::new(),
            queued_bytes: 0,
            next_seq: 0,
        }
    }

    fn counters(&self) -> &DirCounters {
        match self.dir {
            Dir::Up => &self.shared.up,
            Dir::Down => &self.shared.down,
        }
    }

    /// The next time something must be sent without new input: the earliest queued copy or
    /// the expiry of the held datagram.
    fn next_deadline(&self) -> Option<Instant> {
        let queued = self.queue.peek().map(|Reverse(s)| s.at);
        let held = self.held.as_ref().map(|h| h.expires);
        match (queued, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Apply the faults to one incoming datagram; copies to send right away go to `out`.
    fn process(&mut self, mut data: Vec<u8>, out: &mut Vec<Vec<u8>>) {
        if self.faults_rx.has_changed().unwrap_or(false) {
            self.faults = *self.faults_rx.borrow_and_update();
            self.rng = flow_rng(self.faults.seed, self.stream);
        }
        let now = Instant::now();
        let f = self.faults;
        let d = Draws::take(&mut self.rng);
        bump(&self.counters().received);
        if d.drop < f.drop {
            bump(&self.counters().dropped);
            return;
        }
        if d.corrupt < f.corrupt && !data.is_empty() {
            // `bits` is at most 8 * 64 KiB, so both conversions are lossless.
            let bits = data.len() as u64 * 8;
            let bit = (d.bit % bits) as usize;
            data[bit / 8] ^= 1 << (bit % 8);
            bump(&self.counters().corrupted);
        }
        let copies = if d.duplicate < f.duplicate {
            bump(&self.counters().duplicated);
            2
        } else {
            1
        };
        let at = f
            .delay
            .map(|(lo, hi)| now + lo + (hi - lo).mul_f64(d.delay));
        if self.held.is_none() && d.reorder < f.reorder {
            self.held = Some(Held {
                data,
                copies,
                expires: now + UdpRelay::MAX_HOLD,
            });
            return;
        }
        self.emit(data, copies, at, out);
        if let Some(held) = self.held.take() {
            bump(&self.counters().reordered);
            self.emit(held.data, held.copies, at, out);
        }
    }

    /// Release everything due at `wake` (the deadline just slept until) into `out`.
    fn fire_due(&mut self, wake: Option<Instant>, out: &mut Vec<Vec<u8>>) {
        // Use at least the deadline slept until, so the entry that woke us is always due.
        let now = wake.map_or_else(Instant::now, |w| w.max(Instant::now()));
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= now) {
            if let Some(Reverse(s)) = self.queue.pop() {
                self.queued_bytes -= s.data.len();
                out.push(s.data);
            }
        }
        if self.held.as_ref().is_some_and(|h| h.expires <= now) {
            if let Some(held) = self.held.take() {
                self.emit(held.data, held.copies, None, out);
            }
        }
    }

    /// Send `copies` copies of `data` now (into `out`) or queue them for `at`.
    fn emit(&mut self, data: Vec<u8>, copies: u8, at: Option<Instant>, out: &mut Vec<Vec<u8>>) {
        if copies > 1 {
            self.emit_one(data.clone(), at, out);
        }
        self.emit_one(data, at, out);
    }

    fn emit_one(&mut self, data: Vec<u8>, at: Option<Instant>, out: &mut Vec<Vec<u8>>) {
        let Some(at) = at else {
            out.push(data);
            return;
        };
        if self.queue.len() >= UdpRelay::DELAY_QUEUE_LEN
            || self.queued_bytes + data.len() > DELAY_QUEUE_BYTES
        {
            bump(&self.counters().overflowed);
            return;
        }
        bump(&self.counters().delayed);
        self.queued_bytes += data.len();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse(Scheduled { at, seq, data }));
    }
}

/// Which way a datagram crossed a [`UdpAttacker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttackDir {
    /// Sent by the client to the attacker's front socket; forwarded to the target.
    FromClient,
    /// Sent to the attacker's back socket (by the target); forwarded to the client.
    FromTarget,
}

/// What a [`UdpAttacker`] does with one datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttackAction {
    /// Forward it unchanged.
    Forward,
    /// Drop it.
    Drop,
    /// Forward these bytes instead.
    Replace(Vec<u8>),
    /// Forward it, then the same bytes again `n` more times.
    Repeat(u32),
}

/// The attacker's policy: called for every datagram, in order, with its direction.
pub type AttackPolicy = dyn Fn(AttackDir, &[u8]) -> AttackAction + Send + Sync;

/// What a [`UdpAttacker`] saw, in order.
type Record = Arc<std::sync::Mutex<Vec<(AttackDir, Vec<u8>)>>>;

/// An in-path attacker between one client and a target, for security tests: it **observes**
/// every datagram (recorded, before the policy applies), and may **drop**, **modify**,
/// **replay** (repeat now, or [`UdpAttacker::inject`] a recorded one later) and **inject**
/// datagrams of its own in either direction.
///
/// The client sends to [`UdpAttacker::front`]; the attacker forwards to the target from
/// [`UdpAttacker::back`]; what reaches `back` goes to the last client, from `front` (as a
/// NAT would). The record is bounded ([`UdpAttacker::MAX_RECORD`] datagrams, then only
/// counted); the tasks end when the attacker is dropped.
pub struct UdpAttacker {
    front: Arc<UdpSocket>,
    back: Arc<UdpSocket>,
    client: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    target: SocketAddr,
    record: Record,
    policy: Arc<std::sync::Mutex<Arc<AttackPolicy>>>,
    seen: watch::Sender<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl UdpAttacker {
    /// Datagrams kept in the record.
    pub const MAX_RECORD: usize = 100_000;

    /// Bind two sockets at `ip` (port 0) and relay between clients and `target`, forwarding
    /// everything until [`UdpAttacker::set_policy`].
    pub async fn start(ip: IpAddr, target: SocketAddr) -> io::Result<UdpAttacker> {
        let front = Arc::new(UdpSocket::bind(SocketAddr::new(ip, 0)).await?);
        let back = Arc::new(UdpSocket::bind(SocketAddr::new(ip, 0)).await?);
        let client = Arc::new(std::sync::Mutex::new(None));
        let record: Record = Arc::new(std::sync::Mutex::new(Vec::new()));
        let forward_all: Arc<AttackPolicy> = Arc::new(|_, _| AttackAction::Forward);
        let policy = Arc::new(std::sync::Mutex::new(forward_all));
        let seen = watch::Sender::new(0u64);
        let mut tasks = Vec::new();
        for dir in [AttackDir::FromClient, AttackDir::FromTarget] {
            let (rx, tx) = match dir {
                AttackDir::FromClient => (front.clone(), back.clone()),
                AttackDir::FromTarget => (back.clone(), front.clone()),
            };
            let (client, record, policy, seen) =
                (client.clone(), record.clone(), policy.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                loop {
                    let Ok((n, from)) = rx.recv_from(&mut buf).await else {
                        tokio::time::sleep(RECV_BACKOFF).await;
                        continue;
                    };
                    let pkt = buf[..n].to_vec();
                    let to = match dir {
                        AttackDir::FromClient => {
                            *lock(&client) = Some(from);
                            Some(target)
                        }
                        AttackDir::FromTarget => *lock(&client),
                    };
                    {
                        let mut r = lock(&record);
                        if r.len() < UdpAttacker::MAX_RECORD {
                            r.push((dir, pkt.clone()));
                        }
                    }
                    let p = lock(&policy).clone();
                    let action = p(dir, &pkt);
                    if let Some(to) = to {
                        match action {
                            AttackAction::Forward => {
                                let _ = tx.send_to(&pkt, to).await;
                            }
                            AttackAction::Drop => {}
                            AttackAction::Replace(other) => {
                                let _ = tx.send_to(&other, to).await;
                            }
                            AttackAction::Repeat(k) => {
                                for _ in 0..=k {
                                    let _ = tx.send_to(&pkt, to).await;
                                }
                            }
                        }
                    }
                    seen.send_modify(|s| *s += 1);
                }
            }));
        }
        Ok(UdpAttacker {
            front,
            back,
            client,
            target,
            record,
            policy,
            seen,
            tasks,
        })
    }

    /// Where clients send (the target, as they see it).
    pub fn front(&self) -> SocketAddr {
        self.front.local_addr().expect("bound")
    }

    /// Where the target sees the client.
    pub fn back(&self) -> SocketAddr {
        self.back.local_addr().expect("bound")
    }

    /// Replace the policy.
    pub fn set_policy(&self, f: impl Fn(AttackDir, &[u8]) -> AttackAction + Send + Sync + 'static) {
        *lock(&self.policy) = Arc::new(f);
    }

    /// Every datagram seen so far, in order, as received (before the policy).
    pub fn record(&self) -> Vec<(AttackDir, Vec<u8>)> {
        lock(&self.record).clone()
    }

    /// Datagrams seen so far (both directions).
    pub fn seen(&self) -> u64 {
        *self.seen.borrow()
    }

    /// Wait until at least `n` datagrams were seen.
    pub async fn wait_seen(&self, n: u64) {
        let mut rx = self.seen.subscribe();
        let _ = rx.wait_for(|s| *s >= n).await;
    }

    /// Send `bytes` as the relay would in direction `dir`: to the target from `back`, or to
    /// the last client from `front`.
    pub async fn inject(&self, dir: AttackDir, bytes: &[u8]) -> io::Result<()> {
        match dir {
            AttackDir::FromClient => self.back.send_to(bytes, self.target).await.map(|_| ()),
            AttackDir::FromTarget => {
                let to = *lock(&self.client);
                match to {
                    Some(to) => self.front.send_to(bytes, to).await.map(|_| ()),
                    None => Ok(()),
                }
            }
        }
    }
}

impl fmt::Debug for UdpAttacker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpAttacker")
            .field("front", &self.front.local_addr().ok())
            .field("back", &self.back.local_addr().ok())
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for UdpAttacker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
