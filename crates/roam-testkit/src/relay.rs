//! The fault-injecting TCP relay and its statistics.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::debug;

/// Size of each direction's copy buffer.
const BUF_SIZE: usize = 64 * 1024;
/// Byte-budget value meaning "no kill armed".
const UNARMED: u64 = u64::MAX;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// Longest stall accepted; longer [`TcpFaults::stall_for`] values are clamped to this.
const MAX_STALL: Duration = Duration::from_secs(60);
/// With a bandwidth limit, each read takes at most this fraction of a second's worth of bytes,
/// so the pacing is smooth (a 20th of a second).
const PACE_SLICES: u64 = 20;

/// Seeded random faults a [`Relay`] injects into every connection, in both directions.
///
/// Each direction of each connection (a *flow*) draws from its own ChaCha8 generator: stream
/// `2 i` (client → target) or `2 i + 1` (target → client) of `ChaCha8Rng::seed_from_u64(seed)`,
/// where `i` is the connection's acceptance index (0 for the first). Every chunk the relay reads
/// (up to 64 KiB, or less under a bandwidth limit) takes exactly two draws, whatever the rates:
/// 1. **reset** with probability `reset`: the chunk is discarded and the connection reset in
///    both directions (counted in [`RelayStats::killed`] and [`RelayStats::fault_resets`]);
/// 2. **stall** with probability `stall`: the flow pauses for `stall_for` before forwarding the
///    chunk (and reads nothing meanwhile, so the sender's TCP window fills up), counted in
///    [`RelayStats::stalls`].
///
/// `rate` limits each flow to that many bytes per second (paced per chunk). Rates are clamped
/// into `[0, 1]` (NaN counts as 0). The default injects nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TcpFaults {
    /// Seed of the per-flow generators.
    pub seed: u64,
    /// Probability, per chunk read, that the connection is reset.
    pub reset: f64,
    /// Probability, per chunk read, that its flow stalls for `stall_for`.
    pub stall: f64,
    /// How long a stall lasts (clamped to 60 s).
    pub stall_for: Duration,
    /// Bandwidth limit of each flow in bytes per second (`None` or `Some(0)`: unlimited).
    pub rate: Option<u64>,
}

impl TcpFaults {
    /// This configuration with the rates clamped into `[0, 1]` (NaN becomes 0) and the stall
    /// duration limited to 60 s: what the relay applies.
    pub fn clamped(&self) -> TcpFaults {
        fn rate(p: f64) -> f64 {
            if p.is_nan() {
                0.0
            } else {
                p.clamp(0.0, 1.0)
            }
        }
        TcpFaults {
            seed: self.seed,
            reset: rate(self.reset),
            stall: rate(self.stall),
            stall_for: self.stall_for.min(MAX_STALL),
            rate: self.rate.filter(|r| *r > 0),
        }
    }

    /// The generator of flow `stream` (see the type's documentation).
    fn rng(&self, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(stream);
        rng
    }
}

/// Counters describing what a [`Relay`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Connections accepted by the listener, including ones reset at once because refuse mode
    /// was on.
    pub accepted: u64,
    /// Connections the relay deliberately reset: by [`Relay::kill_all`], [`Relay::set_refuse`]
    /// (existing and newly refused ones), [`Relay::kill_after_bytes`] or [`Relay::shutdown`].
    /// Connections that end on their own (EOF or an I/O error) are not counted.
    pub killed: u64,
    /// Bytes forwarded from clients to the target.
    pub bytes_up: u64,
    /// Bytes forwarded from the target back to clients.
    pub bytes_down: u64,
    /// Pauses of a flow: random ones ([`TcpFaults::stall`]) and those a [`Relay::stall`] caused.
    pub stalls: u64,
    /// Connections reset by the random [`TcpFaults::reset`] fault (also counted in `killed`).
    pub fault_resets: u64,
}

/// A fault-injecting TCP relay: forwards every accepted connection to one target address and
/// lets tests reset, refuse or blackhole those connections on demand.
///
/// Each connection is copied in both directions with 64 KiB buffers. When one side ends its
/// stream, the relay shuts down the write half towards the other side and keeps the other
/// direction running; an I/O error on either side resets both.
///
/// The relay is owned; all controls take `&self`, and it is `Send + Sync`, so it can be shared
/// (e.g. in an `Arc`) between tasks. Dropping it is the same as calling [`Relay::shutdown`].
pub struct Relay {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

/// State shared between the [`Relay`] handle, its accept loop and its connection tasks.
struct Shared {
    state: Mutex<State>,
    /// Current blackhole setting; connection pumps subscribe to it.
    blackhole: watch::Sender<bool>,
    /// Set to `true` once on shutdown; the accept loop waits for it.
    stop: watch::Sender<bool>,
    /// Current (clamped) random faults; flows reseed when it changes.
    faults: watch::Sender<TcpFaults>,
    /// Every flow holds its data until this instant ([`Relay::stall`]).
    stall_until: watch::Sender<Option<Instant>>,
    accepted: AtomicU64,
    killed: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    stalls: AtomicU64,
    fault_resets: AtomicU64,
}

/// Mutable relay state, always accessed under [`Shared::state`].
struct State {
    conns: HashMap<u64, Arc<Conn>>,
    next_id: u64,
    /// Budget given to newly accepted connections while `kill_after_bytes` is armed.
    armed: Option<u64>,
    refuse: bool,
    shut_down: bool,
}

/// Per-connection control block.
struct Conn {
    /// Signalled (with a stored permit) when the connection must be reset.
    kill: Notify,
    /// Whether the connection has been marked killed; only changed under the state lock.
    killed: AtomicBool,
    /// Bytes the connection may still forward before being killed, or [`UNARMED`].
    budget: AtomicU64,
    /// Acceptance index (selects the flows' random streams).
    index: u64,
}

/// Why forwarding on a connection stopped early.
enum End {
    /// An I/O error on either socket (or connecting to the target).
    Io(io::Error),
    /// The connection exhausted its `kill_after_bytes` budget.
    Tripped,
    /// The random reset fault hit.
    Faulted,
    /// The connection was killed from outside.
    Killed,
}

impl Relay {
    /// Listen on `listen` (e.g. "127.0.0.5:0") and forward every accepted connection to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<Relay> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                conns: HashMap::new(),
                next_id: 0,
                armed: None,
                refuse: false,
                shut_down: false,
            }),
            blackhole: watch::Sender::new(false),
            stop: watch::Sender::new(false),
            faults: watch::Sender::new(TcpFaults::default()),
            stall_until: watch::Sender::new(None),
            accepted: AtomicU64::new(0),
            killed: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            fault_resets: AtomicU64::new(0),
        });
        debug!(%local_addr, %target, "relay started");
        tokio::spawn(accept_loop(listener, target, Arc::clone(&shared)));
        Ok(Relay { shared, local_addr })
    }

    /// The address the relay listens on (connect here instead of to the target).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Abruptly kill every live relayed connection; both the client and the target side get a
    /// TCP reset. Returns how many connections were killed by this call.
    pub fn kill_all(&self) -> usize {
        let st = self.shared.lock();
        self.shared.kill_all_locked(&st)
    }

    /// Turn refuse mode on or off. While on, new connections are accepted and immediately reset
    /// (the target looks unreachable); turning it on also kills every existing connection.
    pub fn set_refuse(&self, on: bool) {
        let mut st = self.shared.lock();
        st.refuse = on;
        if on {
            self.shared.kill_all_locked(&st);
        }
    }

    /// Turn blackhole mode on or off. While on, bytes are swallowed in both directions:
    /// connections stay open but nothing passes (an end-of-stream is held back until the
    /// blackhole is lifted). Applies to existing and new connections.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// Kill each connection after it has forwarded `n` more bytes in total (both directions
    /// together), then disarm.
    ///
    /// The budget is given to every live connection and to connections accepted later, until
    /// the first connection exhausts its budget and is reset; from then on new connections get
    /// no budget (so a reconnect survives). A connection forwards at most `n` bytes before being
    /// reset; `n == 0` kills on the next byte that arrives. Calling it again re-arms and
    /// replaces the remaining budgets.
    pub fn kill_after_bytes(&self, n: u64) {
        let mut st = self.shared.lock();
        st.armed = Some(n);
        for conn in st.conns.values() {
            conn.budget.store(n, Ordering::Release);
        }
    }

    /// Replace the random faults (clamped, see [`TcpFaults::clamped`]) of every connection,
    /// live and future. Each flow restarts its generator from the new seed with its next chunk.
    pub fn set_faults(&self, faults: TcpFaults) {
        self.shared.faults.send_replace(faults.clamped());
    }

    /// The random faults currently applied (clamped).
    pub fn faults(&self) -> TcpFaults {
        *self.shared.faults.borrow()
    }

    /// Stall every connection for `d` from now: bytes read are held (not lost) and forwarded
    /// when the stall ends; meanwhile nothing more is read, so senders' TCP windows fill up.
    /// A later call replaces the end of the stall (`Duration::ZERO` lifts it).
    pub fn stall(&self, d: Duration) {
        self.shared
            .stall_until
            .send_replace(Some(Instant::now() + d.min(MAX_STALL)));
    }

    /// A snapshot of the relay's counters.
    pub fn stats(&self) -> RelayStats {
        let s = &self.shared;
        RelayStats {
            accepted: s.accepted.load(Ordering::Acquire),
            killed: s.killed.load(Ordering::Acquire),
            bytes_up: s.bytes_up.load(Ordering::Acquire),
            bytes_down: s.bytes_down.load(Ordering::Acquire),
            stalls: s.stalls.load(Ordering::Acquire),
            fault_resets: s.fault_resets.load(Ordering::Acquire),
        }
    }

    /// Stop accepting and kill every live connection. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        {
            let mut st = self.shared.lock();
            if !st.shut_down {
                st.shut_down = true;
                self.shared.kill_all_locked(&st);
            }
        }
        self.shared.stop.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("local_addr", &self.local_addr)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Lock the state, tolerating poisoning (the state stays consistent at every await point).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark `conn` killed and signal its task; returns false if it was already killed.
    /// Must be called with the state lock held (the guard proves it).
    fn kill_locked(&self, _st: &State, conn: &Conn) -> bool {
        if conn.killed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.killed.fetch_add(1, Ordering::AcqRel);
        conn.kill.notify_one();
        true
    }

    /// Kill every registered connection; returns how many were newly killed.
    fn kill_all_locked(&self, st: &State) -> usize {
        st.conns
            .values()
            .filter(|conn| self.kill_locked(st, conn))
            .count()
    }

    /// Register a freshly accepted connection and spawn its task, or reset it at once if the
    /// relay refuses connections or is shutting down.
    fn admit(self: &Arc<Self>, client: TcpStream, peer: SocketAddr, target: SocketAddr) {
        self.accepted.fetch_add(1, Ordering::AcqRel);
        let registered = {
            let mut st = self.lock();
            if st.refuse || st.shut_down {
                None
            } else {
                let id = st.next_id;
                st.next_id += 1;
                let conn = Arc::new(Conn {
                    kill: Notify::new(),
                    killed: AtomicBool::new(false),
                    budget: AtomicU64::new(st.armed.unwrap_or(UNARMED)),
                    index: id,
                });
                st.conns.insert(id, Arc::clone(&conn));
                Some((id, conn))
            }
        };
        match registered {
            Some((id, conn)) => {
                tokio::spawn(run_conn(Arc::clone(self), id, conn, client, peer, target));
            }
            None => {
                debug!(%peer, "relay refusing connection");
                self.killed.fetch_add(1, Ordering::AcqRel);
                reset(client);
            }
        }
    }
}

impl Conn {
    /// Take up to `n` bytes from the kill budget. Returns how many bytes may be forwarded and
    /// whether the budget is now exhausted (the connection must then be killed).
    fn take_budget(&self, n: u64) -> (u64, bool) {
        let update = |left: u64| (left != UNARMED).then(|| left - left.min(n));
        match self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, update)
        {
            Err(_) => (n, false),
            Ok(left) => (left.min(n), left <= n),
        }
    }
}

/// Accept connections until the relay is shut down.
async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => shared.admit(client, peer, target),
            Err(e) => {
                debug!(error = %e, "relay accept failed");
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    debug!("relay accept loop stopped");
}

/// Connect to the target and forward one connection until it ends or is killed.
async fn run_conn(
    shared: Arc<Shared>,
    id: u64,
    conn: Arc<Conn>,
    mut client: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
) {
    let connected = tokio::select! {
        biased;
        () = conn.kill.notified() => Err(End::Killed),
        r = TcpStream::connect(target) => r.map_err(End::Io),
    };
    let (server, end) = match connected {
        Ok(mut server) => {
            if let Err(e) = client
                .set_nodelay(true)
                .and_then(|()| server.set_nodelay(true))
            {
                debug!(%peer, error = %e, "relay could not set TCP_NODELAY");
            }
            let end = tokio::select! {
                biased;
                () = conn.kill.notified() => Err(End::Killed),
                r = forward(&mut client, &mut server, &shared, &conn) => r,
            };
            (Some(server), end)
        }
        Err(end) => (None, Err(end)),
    };

    let killed = {
        let mut st = shared.lock();
        st.conns.remove(&id);
        if matches!(end, Err(End::Tripped)) {
            st.armed = None;
            shared.kill_locked(&st, &conn);
        }
        if matches!(end, Err(End::Faulted)) && shared.kill_locked(&st, &conn) {
            shared.fault_resets.fetch_add(1, Ordering::AcqRel);
        }
        conn.killed.load(Ordering::Acquire)
    };
    match &end {
        Ok(()) => debug!(%peer, "relayed connection closed"),
        Err(End::Io(e)) => debug!(%peer, error = %e, "relayed connection failed"),
        Err(End::Tripped) => debug!(%peer, "relayed connection hit its byte budget"),
        Err(End::Faulted) => debug!(%peer, "relayed connection reset by the random fault"),
        Err(End::Killed) => debug!(%peer, "relayed connection killed"),
    }
    // Anything but a clean close in both directions is propagated as a reset to both sides.
    if killed || end.is_err() {
        reset(client);
        if let Some(server) = server {
            reset(server);
        }
    }
}

/// Run both copy directions of one connection; ends when both are done or either fails.
async fn forward(
    client: &mut TcpStream,
    server: &mut TcpStream,
    shared: &Shared,
    conn: &Conn,
) -> Result<(), End> {
    let (mut client_rd, mut client_wr) = client.split();
    let (mut server_rd, mut server_wr) = server.split();
    let up = pump(
        &mut client_rd,
        &mut server_wr,
        &shared.bytes_up,
        shared,
        conn,
        2 * conn.index,
    );
    let down = pump(
        &mut server_rd,
        &mut client_wr,
        &shared.bytes_down,
        shared,
        conn,
        2 * conn.index + 1,
    );
    tokio::try_join!(up, down).map(|_| ())
}

/// Copy one direction until EOF (then shut down the write side), an error, or the byte budget
/// runs out. `stream` selects the flow's random stream (see [`TcpFaults`]).
async fn pump<R, W>(
    rd: &mut R,
    wr: &mut W,
    counter: &AtomicU64,
    shared: &Shared,
    conn: &Conn,
    stream: u64,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut blackhole = shared.blackhole.subscribe();
    let mut faults = shared.faults.subscribe();
    let mut stall_until = shared.stall_until.subscribe();
    let mut rng = faults.borrow_and_update().rng(stream);
    // Pacing under a bandwidth limit: when the next chunk may be forwarded.
    let mut next_send = Instant::now();
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let limit = match faults.borrow().rate {
            // `rate / PACE_SLICES` is at least 1 and at most BUF_SIZE here, so lossless.
            Some(rate) => (rate / PACE_SLICES).clamp(1, BUF_SIZE as u64) as usize,
            None => BUF_SIZE,
        };
        let n = rd.read(&mut buf[..limit]).await.map_err(End::Io)?;
        if n == 0 {
            // Hold the end-of-stream back while blackholed; the sender lives in `shared`, so
            // this only returns once the blackhole is lifted.
            let _ = blackhole.wait_for(|on| !*on).await;
            wr.shutdown().await.map_err(End::Io)?;
            return Ok(());
        }
        if *blackhole.borrow_and_update() {
            continue;
        }
        if faults.has_changed().unwrap_or(false) {
            rng = faults.borrow_and_update().rng(stream);
        }
        let f = *faults.borrow();
        // Always two draws per chunk, so one fault's decisions do not depend on another's rate.
        let (d_reset, d_stall): (f64, f64) = (rng.gen(), rng.gen());
        if d_reset < f.reset {
            return Err(End::Faulted);
        }
        if d_stall < f.stall {
            shared.stalls.fetch_add(1, Ordering::AcqRel);
            tokio::time::sleep(f.stall_for).await;
        }
        let until = *stall_until.borrow_and_update();
        if let Some(until) = until.filter(|u| *u > Instant::now()) {
            shared.stalls.fetch_add(1, Ordering::AcqRel);
            // A later `stall` call may move the end (earlier or later): follow it.
            let mut until = until;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    r = stall_until.changed() => {
                        if r.is_err() {
                            break;
                        }
                        match *stall_until.borrow_and_update() {
                            Some(u) if u > Instant::now() => until = u,
                            _ => break,
                        }
                    }
                }
            }
        }
        let (allowed, tripped) = conn.take_budget(n as u64);
        // `allowed <= n <= BUF_SIZE`, so this conversion is lossless.
        let allowed = allowed as usize;
        let mut off = 0;
        while off < allowed {
            let k = wr.write(&buf[off..allowed]).await.map_err(End::Io)?;
            if k == 0 {
                return Err(End::Io(io::ErrorKind::WriteZero.into()));
            }
            off += k;
            counter.fetch_add(k as u64, Ordering::AcqRel);
        }
        if tripped {
            return Err(End::Tripped);
        }
        if let Some(rate) = f.rate {
            let now = Instant::now();
            next_send = next_send.max(now) + Duration::from_secs_f64(allowed as f64 / rate as f64);
            tokio::time::sleep_until(next_send).await;
        }
    }
}

/// Abortively close `stream`: with a zero linger time, dropping it sends a TCP reset.
fn reset(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        debug!(error = %e, "relay could not set SO_LINGER");
    }
    drop(stream);
}
