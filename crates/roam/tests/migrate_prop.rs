//! Property test of the whole stack over loopback: one stream pair `s`/`t`, where `s` migrates
//! between hosts (127.0.0.2, .4, .5) while `t` stays on 127.0.0.3 behind a fault-injecting relay
//! (127.0.0.6), both directions streaming seeded pseudo-random data. Planned migrations and
//! abrupt connection kills happen at random points of the transfer; at the end every byte must
//! have arrived exactly once, in order, in both directions (SHA-256 and byte counts).
//!
//! The property (`migrating_stream_delivers_exactly_once`) draws the seed, both sizes and the
//! number of migrations and faults; the seed drives the rest: the route of `s` (any host but the
//! current one, back to A included), the byte counts at which each step runs (signalled by the
//! writers' progress, not by sleeps), kills right after a freeze started or right after a thaw,
//! `kill_all`, `kill_after_bytes`, partitions (the relay refusing connections) overlapping later
//! steps, write and read sizes, reader pauses and, now and then, small buffers and frames.
//! Named scenarios below pin down specific cases, including regressions the property found.
//!
//! Every scenario is bounded by [`CASE_TIMEOUT`], so a hang fails with the case's parameters and
//! its event log instead of hanging CI.
//!
//! - more cases: `ROAM_PROP_CASES=200 cargo test -p roam --test migrate_prop`
//! - soak: `cargo test -p roam --test migrate_prop soak -- --ignored`
//! - replay one case with its log: `ROAM_PROP_VERBOSE=1 CASE=seed,s_total,t_total,migrations,kills
//!   cargo test -p roam --test migrate_prop replay_case -- --ignored --nocapture`

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::proto::frame::{Accept, Reassoc};
use roam::proto::{EndpointId, Epoch, Frame, Offset, SessionId};
use roam::{Endpoint, EndpointConfig, Stream, StreamImage};
use roam_testkit::Relay;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};

/// Upper bound of one whole scenario.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a scheduled `kill_all` waits for a live connection to kill.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Index of host A (where `s` starts) in [`World::hosts`].
const A: usize = 0;
/// Octets of the hosts `s` can live on: A, C, D.
const S_HOSTS: [u8; 3] = [2, 4, 5];
/// Octet of host B (where `t` lives).
const B_HOST: u8 = 3;
/// Octet of the relay in front of B.
const RELAY_HOST: u8 = 6;

fn ip(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

/// Short timers, so a lost connection is noticed and redialed quickly. The session timeout is
/// a generous upper bound the tests never rely on.
fn config(rng: &mut ChaCha8Rng) -> EndpointConfig {
    let mut cfg = EndpointConfig::default();
    cfg.handshake_timeout = Duration::from_secs(2);
    let s = &mut cfg.session;
    s.idle_timeout = Duration::from_millis(1500);
    s.keepalive_interval = Duration::from_millis(300);
    s.redial_initial = Duration::from_millis(2);
    s.redial_max = Duration::from_millis(50);
    s.session_timeout = Duration::from_secs(20);
    s.freeze_timeout = Duration::from_secs(1);
    // Small buffers now and then, so flow control and the send limit take part.
    if rng.gen_bool(0.3) {
        s.send_capacity = rng.gen_range(16 * 1024..=256 * 1024);
        s.recv_capacity = rng.gen_range(64 * 1024..=256 * 1024);
        s.max_frame_payload = rng.gen_range(512..=64 * 1024);
        // A sender whose buffer is below the receiver's acknowledgement threshold waits for the
        // delayed acknowledgement every time; keep most such cases fast.
        if rng.gen_bool(0.7) {
            s.ack_threshold = (s.send_capacity as u64 / 2).max(1);
        }
    }
    cfg
}

// ------------------------------------------------------------------------------------- log

/// A shared, timestamped event log, printed when a scenario fails.
#[derive(Clone)]
struct Log {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn new() -> Log {
        Log {
            start: Instant::now(),
            lines: Arc::default(),
        }
    }

    fn push(&self, what: impl Into<String>) {
        let t = self.start.elapsed();
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.push(format!(
            "{:>9.3} ms  {}",
            t.as_secs_f64() * 1e3,
            what.into()
        ));
    }

    fn dump(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }
}

// ------------------------------------------------------------------------------------- data

/// A random size from a mix of tiny, packet-sized, medium and large.
fn io_size(rng: &mut ChaCha8Rng, max: usize) -> usize {
    let n = match rng.gen_range(0..10) {
        0 => rng.gen_range(1..=16),
        1..=3 => rng.gen_range(17..=1500),
        4..=6 => rng.gen_range(1501..=16 * 1024),
        _ => rng.gen_range(16 * 1024..=256 * 1024),
    };
    n.min(max).max(1)
}

/// A deterministic stream of pseudo-random bytes handed out in chunks of random size; hashes
/// what was actually accepted by the writer.
struct Source {
    rng: ChaCha8Rng,
    total: u64,
    produced: u64,
    chunk: Vec<u8>,
    pos: usize,
    sent: u64,
    hash: Sha256,
    /// Largest chunk.
    max_write: usize,
}

impl Source {
    fn new(seed: u64, total: u64, max_write: usize) -> Source {
        Source {
            rng: ChaCha8Rng::seed_from_u64(seed),
            total,
            produced: 0,
            chunk: Vec::new(),
            pos: 0,
            sent: 0,
            hash: Sha256::new(),
            max_write,
        }
    }

    fn done(&self) -> bool {
        self.sent == self.total
    }

    /// The bytes to write next (non-empty unless done).
    fn chunk(&mut self) -> &[u8] {
        if self.pos == self.chunk.len() && self.produced < self.total {
            let left = (self.total - self.produced) as usize;
            let n = io_size(&mut self.rng, self.max_write).min(left);
            self.chunk.resize(n, 0);
            self.rng.fill_bytes(&mut self.chunk);
            self.produced += n as u64;
            self.pos = 0;
        }
        &self.chunk[self.pos..]
    }

    /// `n` bytes of the current chunk were accepted.
    fn consume(&mut self, n: usize) {
        self.hash.update(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        self.sent += n as u64;
    }
}

/// Hash and count of everything received.
struct Sink {
    hash: Sha256,
    count: u64,
}

impl Sink {
    fn new() -> Sink {
        Sink {
            hash: Sha256::new(),
            count: 0,
        }
    }

    fn update(&mut self, b: &[u8]) {
        self.hash.update(b);
        self.count += b.len() as u64;
    }
}

/// What one side ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tally {
    count: u64,
    digest: [u8; 32],
}

impl Tally {
    fn of_source(s: Source) -> Tally {
        Tally {
            count: s.sent,
            digest: s.hash.finalize().into(),
        }
    }

    fn of_sink(s: Sink) -> Tally {
        Tally {
            count: s.count,
            digest: s.hash.finalize().into(),
        }
    }
}

// ------------------------------------------------------------------------------------- plan

/// Which writer's progress triggers an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    S,
    T,
}

/// A connection kill attached to a planned migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillAt {
    Never,
    /// Right after the freeze started, before the peer's `FreezeAck` can come back.
    DuringFreeze,
    /// Right after `thaw` returned.
    AfterThaw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Planned migration of `s` to host index `to` (into [`World::hosts`]).
    Migrate { to: usize, kill: KillAt },
    /// `relay.kill_all()`, waiting for a live connection if there is none.
    Kill,
    /// `relay.kill_after_bytes(n)`.
    KillAfterBytes(u64),
    /// The relay refuses (resets) every connection for this many milliseconds: B looks
    /// unreachable. Later steps, migrations included, may run during the partition.
    Partition(u64),
}

#[derive(Debug, Clone, Copy)]
struct Step {
    /// Run once this side has written at least `at` bytes.
    side: Side,
    at: u64,
    action: Action,
}

#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    s_total: u64,
    t_total: u64,
    steps: Vec<Step>,
    /// Largest single write (the ping-pong-ish scenarios use small ones).
    max_write: usize,
    /// Largest single read.
    max_read: usize,
}

impl Plan {
    /// A random schedule of `migrations` planned migrations and `kills` kills.
    fn random(seed: u64, s_total: u64, t_total: u64, migrations: usize, kills: usize) -> Plan {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_f91a);
        let mut steps = Vec::new();
        let mut host = A;
        for _ in 0..migrations {
            let kill = match rng.gen_range(0..6) {
                0 => KillAt::DuringFreeze,
                1 => KillAt::AfterThaw,
                _ => KillAt::Never,
            };
            // The destination is chosen below, once the steps are in order.
            steps.push((rng.gen::<f64>(), Action::Migrate { to: A, kill }));
        }
        for _ in 0..kills {
            let action = match rng.gen_range(0..8) {
                0 | 1 => Action::KillAfterBytes(rng.gen_range(0..256 * 1024)),
                2 => Action::Partition(rng.gen_range(1..=60)),
                _ => Action::Kill,
            };
            steps.push((rng.gen::<f64>(), action));
        }
        // Random points along the transfer, in order of progress.
        steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        let steps = steps
            .into_iter()
            .map(|(frac, mut action)| {
                if let Action::Migrate { to, .. } = &mut action {
                    // Any host but the current one, including back to A.
                    *to = (host + rng.gen_range(1..S_HOSTS.len())) % S_HOSTS.len();
                    host = *to;
                }
                let side = if rng.gen_bool(0.5) { Side::S } else { Side::T };
                let total = if side == Side::S { s_total } else { t_total };
                Step {
                    side,
                    at: (total as f64 * frac) as u64,
                    action,
                }
            })
            .collect();
        Plan {
            seed,
            s_total,
            t_total,
            steps,
            max_write: 256 * 1024,
            max_read: 128 * 1024,
        }
    }

    fn migrations(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.action, Action::Migrate { .. }))
            .count()
    }
}

// ------------------------------------------------------------------------------------- world

/// Hosts A, C, D for `s`, host B for `t`, and the relay in front of B that B advertises as its
/// contact, so every (re)dial from `s` goes through the relay.
struct World {
    hosts: Vec<Endpoint>,
    b: Endpoint,
    relay: Arc<Relay>,
}

impl World {
    async fn new(cfg: &EndpointConfig) -> World {
        World::with_b_config(cfg, cfg.clone()).await
    }

    async fn with_b_config(cfg: &EndpointConfig, b_cfg: EndpointConfig) -> World {
        // The relay needs B's address and B must advertise the relay's: reserve a port on B's
        // address, start the relay towards it, then bind B there. Retry if the port was taken in
        // between.
        let mut attempt = 0;
        let (relay, b) = loop {
            attempt += 1;
            let reserve = std::net::TcpListener::bind(ip(B_HOST)).unwrap();
            let b_addr = reserve.local_addr().unwrap();
            drop(reserve);
            let relay = Relay::start(ip(RELAY_HOST), b_addr).await.unwrap();
            let mut bc = b_cfg.clone();
            bc.contact = Some(relay.local_addr());
            match Endpoint::bind_with(b_addr, bc).await {
                Ok(b) => break (relay, b),
                Err(e) if attempt < 10 => {
                    eprintln!("binding B on a reserved port failed ({e}); retrying");
                }
                Err(e) => panic!("cannot bind B: {e}"),
            }
        };
        let mut hosts = Vec::new();
        for &h in &S_HOSTS {
            hosts.push(Endpoint::bind_with(ip(h), cfg.clone()).await.unwrap());
        }
        World {
            hosts,
            b,
            relay: Arc::new(relay),
        }
    }

    /// Open the pair: `s` on A (through the relay), `t` on B.
    async fn pair(&self) -> (Stream, Stream) {
        let s = self.hosts[A]
            .connect(self.b.contact_addr())
            .await
            .expect("connect");
        let t = self.b.accept().await.expect("accept");
        assert_eq!(s.session_id(), t.session_id());
        (s, t)
    }
}

/// Kill every live relayed connection, waiting (bounded) for one to exist. Returns how many
/// were killed.
async fn kill_some(relay: &Relay, log: &Log, why: &str) -> usize {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let n = relay.kill_all();
        if n > 0 {
            log.push(format!("{why}: killed {n} connection(s)"));
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: no live relayed connection to kill for {KILL_WAIT:?}\nlog:\n{}",
            log.dump()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ------------------------------------------------------------------------------------- s side

/// A command to the task that owns `s`.
struct Migrate {
    to: usize,
    kill: KillAt,
    done: oneshot::Sender<usize>,
}

/// The migrating side: one task owns the stream and does reads and writes concurrently (one
/// `poll_fn` polling both), and migrates it on command, keeping its hashes across.
struct Mover {
    stream: Option<Stream>,
    host: usize,
    src: Source,
    sink: Sink,
    rng: ChaCha8Rng,
    rbuf: Vec<u8>,
    read_size: usize,
    max_read: usize,
    shut: bool,
    eof: bool,
    flip: bool,
    /// Reading is paused until then (so buffers fill up and images carry unread input).
    read_paused: Option<tokio::time::Instant>,
    progress: watch::Sender<u64>,
    migrations: usize,
    log: Log,
}

enum IoEv {
    Wrote,
    Read,
    Eof,
    Shut,
}

impl Mover {
    fn io_done(&self) -> bool {
        self.shut && self.eof
    }

    /// One read or one write, whichever is ready first (alternating which is tried first).
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<IoEv>> {
        let st = self.stream.as_mut().expect("stream present");
        self.flip = !self.flip;
        for i in 0..2 {
            let read_turn = (i == 0) == self.flip;
            if read_turn && !self.eof && self.read_paused.is_none() {
                let mut rb = ReadBuf::new(&mut self.rbuf[..self.read_size]);
                match Pin::new(&mut *st).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                            return Poll::Ready(Ok(IoEv::Eof));
                        }
                        self.sink.update(&self.rbuf[..n]);
                        self.read_size = io_size(&mut self.rng, self.max_read);
                        if self.rng.gen_ratio(1, 40) {
                            let ms = self.rng.gen_range(1..=20);
                            self.read_paused =
                                Some(tokio::time::Instant::now() + Duration::from_millis(ms));
                        }
                        return Poll::Ready(Ok(IoEv::Read));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            } else if !read_turn && !self.shut {
                if self.src.done() {
                    match Pin::new(&mut *st).poll_shutdown(cx) {
                        Poll::Ready(Ok(())) => {
                            self.shut = true;
                            return Poll::Ready(Ok(IoEv::Shut));
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                } else {
                    let chunk = self.src.chunk();
                    match Pin::new(&mut *st).poll_write(cx, chunk) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(n)) => {
                            self.src.consume(n);
                            self.progress.send_replace(self.src.sent);
                            return Poll::Ready(Ok(IoEv::Wrote));
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
            }
        }
        Poll::Pending
    }

    async fn migrate(
        &mut self,
        hosts: &[Endpoint],
        relay: &Relay,
        to: usize,
        kill: KillAt,
    ) -> Result<usize, String> {
        let st = self.stream.take().expect("stream present");
        let from = self.host;
        let mut killed = 0;
        self.log.push(format!(
            "migrate {from}->{to} (kill {kill:?}) at s.sent={} s.recv={} stats={:?}",
            self.src.sent,
            self.sink.count,
            st.stats()
        ));
        let image = if kill == KillAt::DuringFreeze {
            let fut = st.freeze();
            tokio::pin!(fut);
            // Poll once so the freeze has started, then cut the connection under it.
            let first = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
            match first {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    killed = relay.kill_all();
                    self.log
                        .push(format!("killed {killed} connection(s) during the freeze"));
                    fut.await
                }
            }
        } else {
            st.freeze().await
        };
        let image = image.map_err(|e| format!("freeze failed: {e}"))?;
        let bytes = image.to_bytes();
        self.log
            .push(format!("frozen: image of {} bytes", bytes.len()));
        let image = StreamImage::from_bytes(&bytes).map_err(|e| format!("image: {e}"))?;
        let st = hosts[to]
            .thaw(image)
            .await
            .map_err(|e| format!("thaw on host {to} failed: {e}"))?;
        self.log
            .push(format!("thawed on host {to}, epoch {}", st.epoch()));
        if kill == KillAt::AfterThaw {
            killed = relay.kill_all();
            self.log.push(format!(
                "killed {killed} connection(s) right after the thaw"
            ));
        }
        self.stream = Some(st);
        self.host = to;
        self.migrations += 1;
        Ok(killed)
    }

    /// Run until both directions are done and no more commands can come.
    async fn run(
        mut self,
        hosts: Vec<Endpoint>,
        relay: Arc<Relay>,
        mut cmds: mpsc::Receiver<Migrate>,
    ) -> Result<(Mover, Stream), String> {
        let mut cmds_open = true;
        loop {
            if self.io_done() && !cmds_open {
                break;
            }
            let io_done = self.io_done();
            let paused = self.read_paused;
            tokio::select! {
                () = sleep_until_opt(paused), if paused.is_some() => self.read_paused = None,
                cmd = cmds.recv(), if cmds_open => match cmd {
                    None => cmds_open = false,
                    Some(Migrate { to, kill, done }) => {
                        let killed = self.migrate(&hosts, &relay, to, kill).await?;
                        let _ = done.send(killed);
                    }
                },
                ev = poll_fn(|cx| self.poll_io(cx)), if !io_done => match ev {
                    Ok(IoEv::Wrote | IoEv::Read) => {}
                    Ok(IoEv::Eof) => self.log.push(format!("s read EOF after {} bytes", self.sink.count)),
                    Ok(IoEv::Shut) => self.log.push(format!("s shut down after {} bytes", self.src.sent)),
                    Err(e) => {
                        return Err(format!(
                            "s I/O failed after sending {} and receiving {} bytes: {e} ({:?})",
                            self.src.sent, self.sink.count, e.get_ref()
                        ))
                    }
                },
            }
        }
        let st = self.stream.take().expect("stream present");
        Ok((self, st))
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(t).await;
    }
}

// ------------------------------------------------------------------------------------- t side

async fn t_writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut src: Source,
    progress: watch::Sender<u64>,
    log: Log,
) -> Result<(W, Source), String> {
    while !src.done() {
        let chunk = src.chunk();
        let n = w.write(chunk).await.map_err(|e| {
            format!(
                "t write failed after {} bytes: {e} ({:?})",
                src.sent,
                e.get_ref()
            )
        })?;
        if n == 0 {
            return Err("t write returned 0".into());
        }
        src.consume(n);
        progress.send_replace(src.sent);
    }
    w.shutdown()
        .await
        .map_err(|e| format!("t shutdown failed: {e}"))?;
    log.push(format!("t shut down after {} bytes", src.sent));
    Ok((w, src))
}

async fn t_reader<R: AsyncRead + Unpin>(
    mut r: R,
    seed: u64,
    max_read: usize,
    log: Log,
) -> Result<(R, Sink), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sink = Sink::new();
    let mut buf = vec![0u8; max_read];
    loop {
        let want = io_size(&mut rng, max_read);
        let n = r.read(&mut buf[..want]).await.map_err(|e| {
            format!(
                "t read failed after {} bytes: {e} ({:?})",
                sink.count,
                e.get_ref()
            )
        })?;
        if n == 0 {
            log.push(format!("t read EOF after {} bytes", sink.count));
            return Ok((r, sink));
        }
        sink.update(&buf[..n]);
        if rng.gen_ratio(1, 40) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1..=20))).await;
        }
    }
}

// ------------------------------------------------------------------------------------- a case

/// What a scenario did, for assertions beyond the byte streams.
#[derive(Debug)]
struct Outcome {
    migrations: usize,
    kills: usize,
}

/// Run one scenario, bounded by [`CASE_TIMEOUT`]; panics with the plan and the event log on
/// failure.
async fn run_plan(plan: Plan) -> Outcome {
    run_plan_with(plan, |_| {}).await
}

async fn run_plan_with(plan: Plan, tweak_b: impl FnOnce(&mut EndpointConfig)) -> Outcome {
    let log = Log::new();
    let r = tokio::time::timeout(CASE_TIMEOUT, scenario(plan.clone(), log.clone(), tweak_b)).await;
    match r {
        Ok(Ok(o)) => {
            if std::env::var_os("ROAM_PROP_VERBOSE").is_some() {
                eprintln!("plan: {plan:?}\noutcome: {o:?}\nlog:\n{}\n", log.dump());
            }
            o
        }
        Ok(Err(e)) => panic!("{e}\nplan: {plan:?}\nlog:\n{}", log.dump()),
        Err(_) => panic!(
            "scenario hung for {CASE_TIMEOUT:?}\nplan: {plan:?}\nlog:\n{}",
            log.dump()
        ),
    }
}

async fn scenario(
    plan: Plan,
    log: Log,
    tweak_b: impl FnOnce(&mut EndpointConfig),
) -> Result<Outcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    let cfg = config(&mut rng);
    let mut b_cfg = cfg.clone();
    tweak_b(&mut b_cfg);
    let world = World::with_b_config(&cfg, b_cfg).await;
    let relay = world.relay.clone();
    let (s, t) = world.pair().await;
    log.push(format!("pair open, session {}", s.session_id()));

    let (s_progress, mut s_seen) = watch::channel(0u64);
    let (t_progress, mut t_seen) = watch::channel(0u64);
    let (cmd_tx, cmd_rx) = mpsc::channel(1);

    let mover = Mover {
        stream: Some(s),
        host: A,
        src: Source::new(plan.seed.wrapping_mul(2) + 1, plan.s_total, plan.max_write),
        sink: Sink::new(),
        rng: ChaCha8Rng::seed_from_u64(plan.seed.wrapping_add(7)),
        rbuf: vec![0; plan.max_read],
        read_size: plan.max_read.min(4096),
        max_read: plan.max_read,
        shut: false,
        eof: false,
        flip: false,
        read_paused: None,
        progress: s_progress,
        migrations: 0,
        log: log.clone(),
    };
    let mover = tokio::spawn(mover.run(world.hosts.clone(), relay.clone(), cmd_rx));

    let (t_rd, t_wr) = tokio::io::split(t);
    let t_src = Source::new(plan.seed.wrapping_mul(2) + 2, plan.t_total, plan.max_write);
    let t_w = tokio::spawn(t_writer(t_wr, t_src, t_progress, log.clone()));
    let t_r = tokio::spawn(t_reader(
        t_rd,
        plan.seed.wrapping_add(11),
        plan.max_read,
        log.clone(),
    ));

    // The controller: each step waits for its byte-count trigger, then acts.
    let mut kills = 0usize;
    let mut kill_all_steps = 0usize;
    let mut partitions = Vec::new();
    let mut schedule_err = None;
    for step in &plan.steps {
        let seen = match step.side {
            Side::S => &mut s_seen,
            Side::T => &mut t_seen,
        };
        let at = step.at;
        if seen.wait_for(|&n| n >= at).await.is_err() {
            // The writer failed; its own error is reported below.
            schedule_err = Some(format!("{:?} writer ended before {at} bytes", step.side));
            break;
        }
        match step.action {
            Action::Migrate { to, kill } => {
                let (done_tx, done_rx) = oneshot::channel();
                let sent = cmd_tx.send(Migrate {
                    to,
                    kill,
                    done: done_tx,
                });
                if sent.await.is_err() {
                    break; // the mover failed; its error is reported below
                }
                match done_rx.await {
                    Ok(k) => kills += k,
                    Err(_) => break,
                }
            }
            Action::Kill => {
                kills += kill_some(&relay, &log, &format!("step {step:?}")).await;
                kill_all_steps += 1;
            }
            Action::KillAfterBytes(n) => {
                log.push(format!("kill_after_bytes({n})"));
                relay.kill_after_bytes(n);
            }
            Action::Partition(ms) => {
                log.push(format!("partition for {ms} ms"));
                relay.set_refuse(true);
                let (relay, log) = (relay.clone(), log.clone());
                partitions.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    relay.set_refuse(false);
                    log.push("partition healed");
                }));
            }
        }
    }
    for p in partitions {
        p.await
            .map_err(|e| format!("partition task panicked: {e}"))?;
    }
    drop(cmd_tx);
    log.push("schedule done");

    let (mover, s) = mover.await.map_err(|e| format!("mover panicked: {e}"))??;
    let (t_wr, t_src) = t_w.await.map_err(|e| format!("t writer panicked: {e}"))??;
    let (t_rd, t_sink) = t_r.await.map_err(|e| format!("t reader panicked: {e}"))??;
    let t = t_rd.unsplit(t_wr);
    if let Some(e) = schedule_err {
        return Err(e);
    }

    let s_stats = s.stats();
    let t_stats = t.stats();
    log.push(format!("s stats {s_stats:?}"));
    log.push(format!("t stats {t_stats:?}"));
    log.push(format!("relay stats {:?}", relay.stats()));
    log.push(format!("B endpoint stats {:?}", world.b.stats()));

    let migrations = mover.migrations;
    let s_sent = Tally::of_source(mover.src);
    let s_recv = Tally::of_sink(mover.sink);
    let t_sent = Tally::of_source(t_src);
    let t_recv = Tally::of_sink(t_sink);
    if s_sent.count != plan.s_total || t_sent.count != plan.t_total {
        return Err(format!(
            "writers stopped short: s {}/{} t {}/{}",
            s_sent.count, plan.s_total, t_sent.count, plan.t_total
        ));
    }
    if s_sent != t_recv {
        return Err(format!(
            "s->t differs: sent {s_sent:?}, received {t_recv:?}"
        ));
    }
    if t_sent != s_recv {
        return Err(format!(
            "t->s differs: sent {t_sent:?}, received {s_recv:?}"
        ));
    }
    if migrations != plan.migrations() {
        return Err(format!(
            "{} migrations planned, {migrations} done",
            plan.migrations()
        ));
    }
    if s_stats.migrations != migrations as u64 {
        return Err(format!(
            "s counts {} migrations, {migrations} done",
            s_stats.migrations
        ));
    }
    if s_stats.bytes_written != plan.s_total || s_stats.bytes_read != plan.t_total {
        return Err(format!("s byte counters off: {s_stats:?}"));
    }
    if t_stats.bytes_written != plan.t_total || t_stats.bytes_read != plan.s_total {
        return Err(format!("t byte counters off: {t_stats:?}"));
    }
    if s_stats.reassociations < migrations as u64 {
        return Err(format!(
            "{migrations} migrations but only {} re-associations",
            s_stats.reassociations
        ));
    }
    let rs = relay.stats();
    if rs.killed < kills as u64 || kills < kill_all_steps {
        return Err(format!(
            "{kill_all_steps} kill steps, {kills} kills observed, relay counts {}",
            rs.killed
        ));
    }
    // Every byte went through the relay. Its counters are bumped just after each write to the
    // socket, which the reader may beat: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let rs = relay.stats();
        if rs.bytes_up >= plan.s_total && rs.bytes_down >= plan.t_total {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("data bypassed the relay: {rs:?}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Both ends settle on the same epoch (the listener may still be finishing a handshake).
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.epoch() != t.epoch() {
        if Instant::now() > deadline {
            return Err(format!("epochs disagree: s {} t {}", s.epoch(), t.epoch()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    log.push(format!("done at epoch {}", s.epoch()));
    drop((s, t, world));
    Ok(Outcome { migrations, kills })
}

/// Run `plan` on its own two-worker runtime (as each property case does).
fn run_blocking(plan: Plan) -> Outcome {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run_plan(plan))
}

// ------------------------------------------------------------------------------------- properties

/// Number of property cases: `ROAM_PROP_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("ROAM_PROP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(48),
        failure_persistence: None,
        max_shrink_iters: 8,
        ..ProptestConfig::default()
    })]

    /// Random sizes, random migration routes and random kills: everything arrives exactly once.
    #[test]
    fn migrating_stream_delivers_exactly_once(
        seed in any::<u64>(),
        s_total in 256u64 * 1024..4 * 1024 * 1024,
        t_total in 256u64 * 1024..4 * 1024 * 1024,
        migrations in 1usize..6,
        kills in 0usize..4,
    ) {
        let plan = Plan::random(seed, s_total, t_total, migrations, kills);
        let o = run_blocking(plan.clone());
        prop_assert_eq!(o.migrations, plan.migrations());
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(500),
        failure_persistence: None,
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    })]

    /// Soak: many more cases, bigger schedules. `cargo test -p roam --test migrate_prop -- --ignored`
    #[test]
    #[ignore]
    fn soak_migrating_stream_delivers_exactly_once(
        seed in any::<u64>(),
        s_total in 0u64..8 * 1024 * 1024,
        t_total in 0u64..8 * 1024 * 1024,
        migrations in 1usize..12,
        kills in 0usize..8,
    ) {
        let plan = Plan::random(seed, s_total, t_total, migrations, kills);
        let o = run_blocking(plan.clone());
        prop_assert_eq!(o.migrations, plan.migrations());
    }
}

// ------------------------------------------------------------------------------------- scenarios

fn step(side: Side, at: u64, action: Action) -> Step {
    Step { side, at, action }
}

fn migrate(to: usize, kill: KillAt) -> Action {
    Action::Migrate { to, kill }
}

const KIB: u64 = 1024;

/// A kill lands while each freeze is waiting for the peer's `FreezeAck`: the image must then
/// hold every unacknowledged byte, and the thaw must cope with a peer that received more than
/// the image knows was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_freeze() {
    let plan = Plan {
        seed: 1,
        s_total: 2048 * KIB,
        t_total: 2048 * KIB,
        steps: vec![
            step(Side::S, 300 * KIB, migrate(1, KillAt::DuringFreeze)),
            step(Side::T, 700 * KIB, migrate(2, KillAt::DuringFreeze)),
            step(Side::S, 1200 * KIB, migrate(0, KillAt::DuringFreeze)),
            step(Side::T, 1800 * KIB, migrate(1, KillAt::DuringFreeze)),
        ],
        max_write: 256 * 1024,
        max_read: 128 * 1024,
    };
    let o = run_plan(plan).await;
    assert_eq!(o.migrations, 4);
    assert!(o.kills >= 1, "no freeze was cut short: {o:?}");
}

/// Deterministic version: B acknowledges lazily, so `t` has received bytes whose
/// acknowledgement `s` never saw; the relay swallows everything while `s` freezes, and the
/// connection is then killed. The image's acknowledged offset is behind what `t` holds, and
/// the thaw must still re-associate (regression: it was refused as an acknowledgement of
/// unsent bytes, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_after_freeze_lost_the_peers_ack() {
    let log = Log::new();
    let r = tokio::time::timeout(CASE_TIMEOUT, async {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let cfg = config(&mut rng);
        let mut b_cfg = cfg.clone();
        b_cfg.session.ack_delay = Duration::from_secs(5);
        b_cfg.session.ack_threshold = 1 << 30;
        let world = World::with_b_config(&cfg, b_cfg).await;
        let (mut s, mut t) = world.pair().await;
        let data = vec![7u8; 10_000];
        s.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(s.stats().bytes_written, 10_000);
        world.relay.set_blackhole(true);
        let fut = s.freeze();
        tokio::pin!(fut);
        let first = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "freeze finished without the peer");
        assert_eq!(world.relay.kill_all(), 1);
        let image = fut.await.expect("freeze");
        world.relay.set_blackhole(false);
        log.push("frozen with the peer's acknowledgement lost");
        let mut s = world.hosts[1].thaw(image).await.expect("thaw");
        log.push("thawed");
        s.write_all(b"after").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        t.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after");
        t.write_all(b"back").await.unwrap();
        t.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
    })
    .await;
    assert!(r.is_ok(), "hung\nlog:\n{}", log.dump());
}

/// The same with the freeze timing out instead of the connection being killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_after_freeze_timed_out() {
    let r = tokio::time::timeout(CASE_TIMEOUT, async {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut cfg = config(&mut rng);
        cfg.session.freeze_timeout = Duration::from_millis(200);
        let mut b_cfg = cfg.clone();
        b_cfg.session.ack_delay = Duration::from_secs(5);
        b_cfg.session.ack_threshold = 1 << 30;
        let world = World::with_b_config(&cfg, b_cfg).await;
        let (mut s, mut t) = world.pair().await;
        s.write_all(&[1u8; 5000]).await.unwrap();
        let mut got = vec![0u8; 5000];
        t.read_exact(&mut got).await.unwrap();
        world.relay.set_blackhole(true);
        let image = s.freeze().await.expect("freeze");
        world.relay.set_blackhole(false);
        // The blackholed connection is still open at the relay; cut it so B notices.
        world.relay.kill_all();
        let mut s = world.hosts[2].thaw(image).await.expect("thaw");
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        t.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
    })
    .await;
    assert!(r.is_ok(), "hung");
}

/// `s` goes round the hosts and back to where it started, twice, with no faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_back_to_origin() {
    let plan = Plan {
        seed: 4,
        s_total: 1536 * KIB,
        t_total: 1024 * KIB,
        steps: vec![
            step(Side::S, 100 * KIB, migrate(1, KillAt::Never)),
            step(Side::S, 300 * KIB, migrate(0, KillAt::Never)),
            step(Side::T, 400 * KIB, migrate(2, KillAt::Never)),
            step(Side::S, 900 * KIB, migrate(0, KillAt::Never)),
            // After both writers finished: the FIN travels in the image too.
            step(Side::S, 1536 * KIB, migrate(1, KillAt::Never)),
            step(Side::T, 1024 * KIB, migrate(0, KillAt::Never)),
        ],
        max_write: 256 * 1024,
        max_read: 128 * 1024,
    };
    let o = run_plan(plan).await;
    assert_eq!(o.migrations, 6);
}

/// A kill right after each thaw, while the re-association may still be completing at B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_right_after_thaw() {
    let plan = Plan {
        seed: 5,
        s_total: 1024 * KIB,
        t_total: 1024 * KIB,
        steps: (0..6)
            .map(|i| {
                let side = if i % 2 == 0 { Side::S } else { Side::T };
                step(
                    side,
                    i * 150 * KIB,
                    migrate((i as usize + 1) % 3, KillAt::AfterThaw),
                )
            })
            .collect(),
        max_write: 64 * 1024,
        max_read: 64 * 1024,
    };
    let o = run_plan(plan).await;
    assert_eq!(o.migrations, 6);
    assert!(o.kills >= 1, "no thaw was followed by a kill: {o:?}");
}

/// Byte sizes of a `Reassoc` (IPv4 contact) and of an `Accept`.
fn reassoc_and_accept_len() -> (u64, u64) {
    let r = Frame::Reassoc(Reassoc {
        session: SessionId([0; 16]),
        epoch: Epoch(0),
        endpoint: EndpointId([0; 16]),
        contact: ip(2),
        eph: [0; 32],
        nonce: [0; 16],
        recv: Offset(0),
        mac: [0; 32],
    });
    let a = Frame::Accept(Accept {
        eph: [0; 32],
        nonce: [0; 16],
        recv: Offset(0),
        mac: [0; 32],
    });
    (r.to_bytes().len() as u64, a.to_bytes().len() as u64)
}

/// Deterministic: the connection of a thaw's re-association dies exactly after the `Accept`, so
/// `s` sent its `Confirm` (and moved to the next epoch and key) but B never read it. `s`
/// redials with the new epoch; B must still know the pending key (regression: B forgot it when
/// the handshake connection broke, refused with `BadProof`, and the session failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_lost_on_thaw() {
    let log = Log::new();
    let r = tokio::time::timeout(CASE_TIMEOUT, async {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let cfg = config(&mut rng);
        let world = World::new(&cfg).await;
        let (mut s, mut t) = world.pair().await;
        s.write_all(b"one").await.unwrap();
        let mut three = [0u8; 3];
        t.read_exact(&mut three).await.unwrap();
        let image = s.freeze().await.unwrap();
        // The frozen connection carries nothing after the FreezeAck, so the budget below is
        // spent on the thaw's connection: Reassoc up, Accept down, and the Confirm trips it.
        let before = world.relay.stats();
        let (r_len, a_len) = reassoc_and_accept_len();
        world.relay.kill_after_bytes(r_len + a_len);
        log.push(format!(
            "armed kill after {} bytes ({before:?})",
            r_len + a_len
        ));
        let mut s = world.hosts[1].thaw(image).await.expect("thaw");
        log.push(format!(
            "thawed at epoch {}; relay {:?}",
            s.epoch(),
            world.relay.stats()
        ));
        s.write_all(b"two").await.expect("write after thaw");
        t.read_exact(&mut three).await.expect("t read");
        assert_eq!(&three, b"two");
        t.write_all(b"ack").await.unwrap();
        s.read_exact(&mut three).await.expect("s read");
        assert_eq!(&three, b"ack");
        assert!(world.relay.stats().killed >= 1);
        assert_eq!(s.epoch(), t.epoch());
    })
    .await;
    assert!(r.is_ok(), "hung\nlog:\n{}", log.dump());
}

/// Latency-style ping-pong of small messages, migrating every few round trips (with kills in
/// between): each echo must come back intact and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_across_migrations() {
    let log = Log::new();
    let r = tokio::time::timeout(CASE_TIMEOUT, async {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = config(&mut rng);
        let world = World::new(&cfg).await;
        let (s, t) = world.pair().await;
        // t echoes everything until EOF.
        let echo = tokio::spawn(async move {
            let mut t = t;
            let mut buf = vec![0u8; 4096];
            let mut total = 0u64;
            loop {
                let n = t.read(&mut buf).await.expect("echo read");
                if n == 0 {
                    break;
                }
                t.write_all(&buf[..n]).await.expect("echo write");
                total += n as u64;
            }
            t.shutdown().await.unwrap();
            (t, total)
        });
        let mut s = Some(s);
        let mut host = A;
        let mut sent = 0u64;
        let mut migrations = 0;
        let started = Instant::now();
        for round in 0..600u32 {
            let len = rng.gen_range(1..=64usize);
            let mut msg = vec![0u8; len];
            rng.fill_bytes(&mut msg);
            let st = s.as_mut().unwrap();
            st.write_all(&msg).await.expect("ping");
            let mut back = vec![0u8; len];
            st.read_exact(&mut back).await.expect("pong");
            assert_eq!(back, msg, "round {round}");
            sent += len as u64;
            if round % 40 == 39 {
                let to = (host + 1 + rng.gen_range(0..2)) % 3;
                let image = s.take().unwrap().freeze().await.expect("freeze");
                let image = StreamImage::from_bytes(&image.to_bytes()).unwrap();
                s = Some(world.hosts[to].thaw(image).await.expect("thaw"));
                host = to;
                migrations += 1;
            } else if round % 40 == 19 {
                kill_some(&world.relay, &log, "ping-pong kill").await;
            }
        }
        let mut st = s.take().unwrap();
        st.shutdown().await.unwrap();
        let mut rest = Vec::new();
        st.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (_t, echoed) = echo.await.unwrap();
        assert_eq!(echoed, sent);
        assert_eq!(st.stats().migrations, migrations);
        log.push(format!(
            "600 round trips, {migrations} migrations in {:?}",
            started.elapsed()
        ));
    })
    .await;
    assert!(r.is_ok(), "hung\nlog:\n{}", log.dump());
}

/// The first case the property test found (before the fixes): a kill during a freeze, a kill
/// right after a thaw and plain kills, with the last migration back onto the same host. It
/// failed with the thaw refused (`BadProof`: the listener had dropped the pending key of a
/// re-association whose `Confirm` the kill had cut off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_prop_kill_after_thaw_then_migrate() {
    let plan = Plan {
        seed: 60761239556392275,
        s_total: 924808,
        t_total: 3013625,
        steps: vec![
            step(Side::S, 109409, migrate(2, KillAt::Never)),
            step(Side::T, 785625, migrate(0, KillAt::DuringFreeze)),
            step(Side::S, 387506, Action::Kill),
            step(Side::T, 1479315, migrate(1, KillAt::AfterThaw)),
            step(Side::T, 2292416, Action::Kill),
            step(Side::T, 2644820, migrate(1, KillAt::Never)),
        ],
        max_write: 256 * 1024,
        max_read: 128 * 1024,
    };
    let o = run_plan(plan).await;
    assert_eq!(o.migrations, 4);
}

/// Partitions (B unreachable: every connection reset) overlapping migrations: thaws must keep
/// redialing until the network heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_during_partition() {
    let plan = Plan {
        seed: 8,
        s_total: 1024 * KIB,
        t_total: 768 * KIB,
        steps: vec![
            step(Side::S, 100 * KIB, Action::Partition(40)),
            step(Side::S, 100 * KIB, migrate(1, KillAt::Never)),
            step(Side::T, 300 * KIB, Action::Partition(25)),
            step(Side::T, 300 * KIB, migrate(2, KillAt::DuringFreeze)),
            step(Side::S, 600 * KIB, migrate(0, KillAt::Never)),
            step(Side::S, 700 * KIB, Action::Partition(30)),
        ],
        max_write: 64 * 1024,
        max_read: 64 * 1024,
    };
    let o = run_plan(plan).await;
    assert_eq!(o.migrations, 3);
}

/// A silent network (the relay swallows everything) for longer than the idle timeout: both
/// ends notice through their keep-alives, `s` redials (its handshakes time out while the
/// network is silent) and the transfer completes once it heals, then `s` migrates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_detected_by_idle_timeout() {
    let log = Log::new();
    let r = tokio::time::timeout(CASE_TIMEOUT, async {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut cfg = config(&mut rng);
        cfg.handshake_timeout = Duration::from_millis(300);
        cfg.session.idle_timeout = Duration::from_millis(300);
        cfg.session.keepalive_interval = Duration::from_millis(75);
        let world = World::new(&cfg).await;
        let (mut s, mut t) = world.pair().await;
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        s.write_all(&data[..1000]).await.unwrap();
        let mut got = vec![0u8; 1000];
        t.read_exact(&mut got).await.unwrap();
        world.relay.set_blackhole(true);
        log.push("blackhole on");
        // Written into the void; the idle timeout (not a reset) must notice.
        s.write_all(&data[1000..]).await.unwrap();
        let lost_before = s.stats().connections_lost;
        // Wait until both ends have closed the silent connection before any byte can pass
        // again (the relay must not resume a stream it cut bytes out of).
        let (mut sw, mut tw) = (s.watch_connected(), t.watch_connected());
        sw.wait_for(|up| !*up).await.unwrap();
        tw.wait_for(|up| !*up).await.unwrap();
        world.relay.set_blackhole(false);
        log.push("blackhole off");
        assert!(
            s.stats().connections_lost > lost_before,
            "idle timeout did not fire"
        );
        let mut got = vec![0u8; data.len() - 1000];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data[1000..]);
        let image = s.freeze().await.unwrap();
        let mut s = world.hosts[2].thaw(image).await.unwrap();
        t.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");
    })
    .await;
    assert!(r.is_ok(), "hung\nlog:\n{}", log.dump());
}

/// Replay one property case by its inputs, with its event log:
/// `ROAM_PROP_VERBOSE=1 CASE=seed,s_total,t_total,migrations,kills cargo test -p roam
/// --test migrate_prop replay_case -- --ignored --nocapture`
#[test]
#[ignore]
fn replay_case() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let v: Vec<u64> = std::env::var("CASE")
        .expect("CASE=seed,s_total,t_total,migrations,kills")
        .split(',')
        .map(|x| x.trim().parse().expect("a number"))
        .collect();
    let plan = Plan::random(v[0], v[1], v[2], v[3] as usize, v[4] as usize);
    let o = run_blocking(plan.clone());
    assert_eq!(o.migrations, plan.migrations());
}
