//! The host daemon: runs agents, routes streams to their services, and moves agents to other
//! daemons in a transaction (docs/PROTOCOL.md §11).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use roam::{Datagram, DatagramImage, Endpoint, Stream, StreamImage};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;

use crate::agent::{
    lock_pub, AgentError, Context, DatagramSlot, ErasedAgent, Published, PublishedRef, Registry,
    Step,
};
use crate::api::{
    AgentInfo, AgentState, ApiError, HostInfo, MigrationReport, Progress, SocketInfo,
};
use crate::wire::{self, Channel, ChannelError, Msg, SocketImage, Transfer, TxnOutcome};

/// Agents' streams not yet accepted, per service.
const SERVICE_BACKLOG: usize = 64;
/// Records of agents no longer running that `ps` keeps.
const MAX_RECORDS: usize = 1000;
/// How long `Host::stop` waits for the agent's task to end (it only drops futures).
const STOP_WAIT: Duration = Duration::from_secs(1);
/// How long a destination waits for an arriving agent's datagram peers to acknowledge the
/// re-association before it runs the agent (a peer that is down does not hold it up longer).
const DATAGRAM_REASSOC_WAIT: Duration = Duration::from_secs(1);

/// A step of the migration transaction at which a daemon can be made to crash (test hook for
/// crash-safety tests: `ROAM_CRASH_AT=<name>` in `roam host`'s environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrashPoint {
    /// Source: the destination accepted the offer; nothing is frozen yet.
    SourceAfterOffer,
    /// Source: the agent is paused and its sockets frozen; nothing sent yet.
    SourceAfterFreeze,
    /// Source: the destination prepared; the decision is not made.
    SourceAfterPrepared,
    /// Source: the decision to commit is made and `Commit` handed to the channel.
    SourceAfterCommit,
    /// Destination: the offer was accepted.
    DestAfterOffer,
    /// Destination: part of the transfer arrived.
    DestMidTransfer,
    /// Destination: prepared (everything decoded), waiting for the decision.
    DestAfterPrepared,
    /// Destination: the agent was started.
    DestAfterStart,
}

impl CrashPoint {
    /// Every crash point, in transaction order.
    pub const ALL: [CrashPoint; 8] = [
        CrashPoint::SourceAfterOffer,
        CrashPoint::SourceAfterFreeze,
        CrashPoint::SourceAfterPrepared,
        CrashPoint::SourceAfterCommit,
        CrashPoint::DestAfterOffer,
        CrashPoint::DestMidTransfer,
        CrashPoint::DestAfterPrepared,
        CrashPoint::DestAfterStart,
    ];

    /// Its name (`source-after-commit`, …).
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::SourceAfterOffer => "source-after-offer",
            CrashPoint::SourceAfterFreeze => "source-after-freeze",
            CrashPoint::SourceAfterPrepared => "source-after-prepared",
            CrashPoint::SourceAfterCommit => "source-after-commit",
            CrashPoint::DestAfterOffer => "dest-after-offer",
            CrashPoint::DestMidTransfer => "dest-mid-transfer",
            CrashPoint::DestAfterPrepared => "dest-after-prepared",
            CrashPoint::DestAfterStart => "dest-after-start",
        }
    }
}

impl FromStr for CrashPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CrashPoint::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = CrashPoint::ALL.iter().map(|c| c.name()).collect();
                format!("unknown crash point {s:?} (one of {})", names.join(", "))
            })
    }
}

/// Settings of a [`Host`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HostConfig {
    /// The daemon's address: agents' streams and other daemons reach it here.
    pub listen: SocketAddr,
    /// The deployment key: daemons migrate agents only to and from daemons with the same key.
    pub key: [u8; 32],
    /// The agent kinds this daemon runs.
    pub registry: Registry,
    /// Most agents running at once; more are refused (`roam run` and incoming migrations).
    /// Default 1000.
    pub max_agents: usize,
    /// How long an agent may take to pause after a migration is requested. Default 10 s.
    pub yield_timeout: Duration,
    /// How long each step of the transaction may take before it aborts. Default 10 s.
    pub step_timeout: Duration,
    /// Crash-safety test hook: abort the process at this step.
    pub crash_at: Option<CrashPoint>,
}

impl HostConfig {
    /// A configuration with the built-in agents and the documented defaults.
    pub fn new(listen: SocketAddr, key: [u8; 32]) -> HostConfig {
        HostConfig {
            listen,
            key,
            registry: Registry::builtin(),
            max_agents: 1000,
            yield_timeout: Duration::from_secs(10),
            step_timeout: Duration::from_secs(10),
            crash_at: None,
        }
    }
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: roam::BindError,
    },
}

enum Phase {
    Running,
    Migrating(SocketAddr),
    Done(AgentState),
}

struct Record {
    id: String,
    kind: String,
    args: Vec<String>,
    /// Where the agent is; a watch, so `stop` can wait for its end.
    phase: watch::Sender<Phase>,
    published: PublishedRef,
    signal: watch::Sender<bool>,
    /// Set by a migration before it signals: the agent task hands itself over here.
    park: Mutex<Option<oneshot::Sender<Parked>>>,
    stop: Notify,
    migrations: AtomicU32,
    hosts: Mutex<Vec<SocketAddr>>,
    started_unix_ms: u64,
    last_migration: Mutex<Option<MigrationReport>>,
}

impl Record {
    /// The agent's migration to `to` ended its life here (`Moved`, or `Lost` with `to`): count
    /// the move and let go of the published sockets.
    fn left_for(&self, to: SocketAddr, end: AgentState) {
        self.migrations.fetch_add(1, Ordering::Relaxed);
        lock(&self.hosts).push(to);
        self.phase.send_replace(Phase::Done(end));
        let mut p = lock_pub(&self.published);
        p.streams.clear();
        p.datagrams.clear();
    }
}

/// A paused agent, handed from its task to a migration; `resume` gives it back.
struct Parked {
    agent: Box<dyn ErasedAgent>,
    cx: Context,
    resume: oneshot::Sender<(Box<dyn ErasedAgent>, Context)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state every part of a host shares.
pub(crate) struct HostShared {
    pub(crate) addr: SocketAddr,
    pub(crate) endpoint: Endpoint,
    /// Where streams go whose peer end runs on `endpoint` (see `thaw_stream`).
    aux: tokio::sync::Mutex<Option<Endpoint>>,
    config: HostConfig,
    services: Mutex<HashMap<String, mpsc::Sender<Stream>>>,
    agents: Mutex<BTreeMap<String, Arc<Record>>>,
    txns: Mutex<HashMap<u64, TxnOutcome>>,
}

impl HostShared {
    pub(crate) fn register_service(
        &self,
        service: &str,
    ) -> Result<mpsc::Receiver<Stream>, AgentError> {
        let mut services = lock(&self.services);
        if services.get(service).is_some_and(|s| !s.is_closed()) {
            return Err(AgentError::InUse(format!("service {service}")));
        }
        let (tx, rx) = mpsc::channel(SERVICE_BACKLOG);
        services.insert(service.to_owned(), tx);
        Ok(rx)
    }

    fn service_free(&self, service: &str) -> bool {
        lock(&self.services)
            .get(service)
            .is_none_or(|s| s.is_closed())
    }

    /// The endpoint to open a stream to `to` from: the main one, or for a service of this very
    /// host the second one (both ends of one session cannot live on one endpoint).
    pub(crate) async fn endpoint_toward(
        &self,
        to: SocketAddr,
    ) -> Result<Endpoint, roam::BindError> {
        if to == self.addr {
            self.aux_endpoint().await
        } else {
            Ok(self.endpoint.clone())
        }
    }

    /// The second endpoint (bound on first use).
    async fn aux_endpoint(&self) -> Result<Endpoint, roam::BindError> {
        let mut aux = self.aux.lock().await;
        if let Some(e) = aux.as_ref() {
            return Ok(e.clone());
        }
        let e = Endpoint::bind_with(
            SocketAddr::new(self.addr.ip(), 0),
            endpoint_config(&self.config.key),
        )
        .await?;
        *aux = Some(e.clone());
        Ok(e)
    }

    fn crash(&self, point: CrashPoint) {
        if self.config.crash_at == Some(point) {
            eprintln!(
                "roam host {}: crash point {} reached: aborting",
                self.addr,
                point.name()
            );
            std::process::abort();
        }
    }

    fn running(&self) -> usize {
        lock(&self.agents)
            .values()
            .filter(|r| !matches!(*r.phase.borrow(), Phase::Done(_)))
            .count()
    }

    fn new_context(
        self: &Arc<Self>,
        id: &str,
        published: PublishedRef,
        signal: watch::Receiver<bool>,
    ) -> Context {
        Context {
            id: id.to_owned(),
            host: self.clone(),
            streams: BTreeMap::new(),
            datagrams: BTreeMap::new(),
            services: BTreeMap::new(),
            signal,
            published,
        }
    }
}

/// A running host daemon. Dropping it stops accepting; [`Host::shutdown`] stops its agents.
#[derive(Clone)]
pub struct Host {
    shared: Arc<HostShared>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

/// The endpoint of a daemon: agents' sessions are authenticated by a pre-shared key derived
/// from the deployment key (PROTOCOL.md §11.1), so only daemons of the deployment (and their
/// agents) can associate, and nothing is trust-on-first-use.
pub fn endpoint_config(deployment_key: &[u8; 32]) -> roam::EndpointConfig {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"roam/v1/host endpoint pre-shared key\0");
    h.update(deployment_key);
    let mut config = roam::EndpointConfig::default();
    config.peer_policy =
        roam::proto::PeerPolicy::PreShared(roam::proto::PreSharedKey(h.finalize().into()));
    config
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

fn new_agent_id() -> String {
    format!("a{:08x}", rand::random::<u32>())
}

impl Host {
    /// Bind the daemon's address and start serving.
    pub async fn start(config: HostConfig) -> Result<Host, HostError> {
        let endpoint = Endpoint::bind_with(config.listen, endpoint_config(&config.key))
            .await
            .map_err(|source| HostError::Bind {
                addr: config.listen,
                source,
            })?;
        let shared = Arc::new(HostShared {
            addr: endpoint.local_addr(),
            endpoint,
            aux: tokio::sync::Mutex::new(None),
            config,
            services: Mutex::new(HashMap::new()),
            agents: Mutex::new(BTreeMap::new()),
            txns: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(Arc::downgrade(&shared)));
        Ok(Host { shared })
    }

    /// The daemon's address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// What `GET /v1/host` returns.
    pub fn info(&self) -> HostInfo {
        HostInfo {
            addr: self.shared.addr,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            running: self.shared.running(),
            kinds: self
                .shared
                .config
                .registry
                .kinds()
                .map(|(k, a)| (k.to_owned(), a.to_owned()))
                .collect(),
        }
    }

    /// Start an agent of `kind` with `args`.
    pub fn run(&self, kind: &str, args: &[String]) -> Result<AgentInfo, ApiError> {
        let sh = &self.shared;
        if !sh.config.registry.contains(kind) {
            let kinds: Vec<_> = sh.config.registry.kinds().map(|(k, _)| k).collect();
            return Err(ApiError::new(
                "bad_request",
                format!(
                    "unknown agent kind {kind:?} (this host runs: {})",
                    kinds.join(", ")
                ),
            ));
        }
        if sh.running() >= sh.config.max_agents {
            return Err(ApiError::new(
                "busy",
                format!(
                    "host {} is at its limit of {} agents",
                    sh.addr, sh.config.max_agents
                ),
            ));
        }
        let agent = sh
            .config
            .registry
            .create(kind, args)
            .map_err(|e| ApiError::new("bad_request", format!("{kind}: {e}")))?;
        let services = agent.services();
        let taken = |s: &String| {
            ApiError::new(
                "busy",
                format!("service {s:?} is already in use on {}", sh.addr),
            )
        };
        if let Some(s) = services.iter().find(|s| !sh.service_free(s)) {
            return Err(taken(s));
        }
        let id = new_agent_id();
        let rec = self.install(
            id.clone(),
            kind,
            args.to_vec(),
            0,
            vec![sh.addr],
            unix_ms(),
            String::new(),
        );
        let mut cx = sh.new_context(&id, rec.published.clone(), rec.signal.subscribe());
        // Listening before `run` returns: a client started next finds the service.
        for s in &services {
            if cx.listen(s).is_err() {
                // Another run took it since the check above.
                rec.phase
                    .send_replace(Phase::Done(AgentState::Failed(taken(s).message)));
                return Err(taken(s));
            }
        }
        tokio::spawn(agent_task(sh.clone(), rec.clone(), agent, cx));
        Ok(info_of(sh, &rec))
    }

    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        id: String,
        kind: &str,
        args: Vec<String>,
        migrations: u32,
        hosts: Vec<SocketAddr>,
        started_unix_ms: u64,
        status: String,
    ) -> Arc<Record> {
        let published = Arc::new(Mutex::new(Published {
            status,
            ..Published::default()
        }));
        let (signal, _) = watch::channel(false);
        let rec = Arc::new(Record {
            id: id.clone(),
            kind: kind.to_owned(),
            args,
            phase: watch::channel(Phase::Running).0,
            published,
            signal,
            park: Mutex::new(None),
            stop: Notify::new(),
            migrations: AtomicU32::new(migrations),
            hosts: Mutex::new(hosts),
            started_unix_ms,
            last_migration: Mutex::new(None),
        });
        let mut agents = lock(&self.shared.agents);
        agents.insert(id, rec.clone());
        // Forget the oldest records of agents that are gone.
        let done: Vec<String> = agents
            .iter()
            .filter(|(_, r)| matches!(*r.phase.borrow(), Phase::Done(_)))
            .map(|(k, _)| k.clone())
            .collect();
        if done.len() > MAX_RECORDS {
            for k in &done[..done.len() - MAX_RECORDS] {
                agents.remove(k);
            }
        }
        rec
    }

    /// Every agent this host runs or remembers.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let recs: Vec<_> = lock(&self.shared.agents).values().cloned().collect();
        recs.iter().map(|r| info_of(&self.shared, r)).collect()
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Result<AgentInfo, ApiError> {
        let rec = self.record(id)?;
        Ok(info_of(&self.shared, &rec))
    }

    fn record(&self, id: &str) -> Result<Arc<Record>, ApiError> {
        lock(&self.shared.agents).get(id).cloned().ok_or_else(|| {
            ApiError::new(
                "unknown_agent",
                format!("no agent {id:?} on host {}", self.shared.addr),
            )
        })
    }

    /// Stop an agent: its task ends and its sockets close.
    pub async fn stop(&self, id: &str) -> Result<AgentInfo, ApiError> {
        let rec = self.record(id)?;
        {
            let phase = rec.phase.borrow();
            match &*phase {
                Phase::Running => {}
                Phase::Migrating(to) => {
                    return Err(ApiError::new(
                        "busy",
                        format!("agent {id} is migrating to {to}"),
                    ))
                }
                Phase::Done(s) => {
                    return Err(ApiError::new(
                        "bad_request",
                        format!("agent {id} is not running here ({})", s.name()),
                    ))
                }
            }
        }
        let mut phase = rec.phase.subscribe();
        rec.stop.notify_one();
        // The task marks the record when it is gone. Bounded: a task parked for a migration
        // sees the stop only once the migration gave it back.
        let _ =
            tokio::time::timeout(STOP_WAIT, phase.wait_for(|p| matches!(p, Phase::Done(_)))).await;
        Ok(info_of(&self.shared, &rec))
    }

    /// Stop every agent (clean shutdown).
    pub async fn shutdown(&self) {
        let ids: Vec<String> = lock(&self.shared.agents).keys().cloned().collect();
        for id in ids {
            let _ = self.stop(&id).await;
        }
    }

    /// Move agent `id` to the daemon at `to` (a transaction: see PROTOCOL.md §11.3). Progress
    /// goes to `progress`; the report or the error is returned (and sent as the last event).
    pub async fn migrate(
        &self,
        id: &str,
        to: SocketAddr,
        progress: mpsc::Sender<Progress>,
    ) -> Result<MigrationReport, ApiError> {
        let r = self.migrate_inner(id, to, &progress).await;
        let last = match &r {
            Ok(rep) => Progress::Done(rep.clone()),
            Err(e) => Progress::Error(e.clone()),
        };
        let _ = progress.send(last).await;
        r
    }

    async fn migrate_inner(
        &self,
        id: &str,
        to: SocketAddr,
        progress: &mpsc::Sender<Progress>,
    ) -> Result<MigrationReport, ApiError> {
        let sh = &self.shared;
        if to == sh.addr {
            return Err(ApiError::new(
                "bad_request",
                format!("agent {id} already runs on {to}"),
            ));
        }
        let rec = self.record(id)?;
        let mut refused = None;
        rec.phase.send_if_modified(|phase| {
            refused = match &*phase {
                Phase::Running => {
                    *phase = Phase::Migrating(to);
                    return true;
                }
                Phase::Migrating(t) => Some(ApiError::new(
                    "busy",
                    format!("agent {id} is already migrating to {t}"),
                )),
                Phase::Done(AgentState::Moved(t)) => Some(ApiError::new(
                    "unknown_agent",
                    format!("agent {id} moved from {} to {t}", sh.addr),
                )),
                Phase::Done(s) => Some(ApiError::new(
                    "bad_request",
                    format!("agent {id} is not running ({})", s.name()),
                )),
            };
            false
        });
        if let Some(e) = refused {
            return Err(e);
        }
        let t0 = Instant::now();
        let txn: u64 = rand::random();
        lock(&sh.txns).insert(txn, TxnOutcome::Prepared);
        let abort = |sh: &HostShared, rec: &Record| {
            lock(&sh.txns).insert(txn, TxnOutcome::Aborted);
            // The agent kept running while we waited; it may have ended meanwhile.
            rec.phase.send_if_modified(|phase| {
                let migrating = matches!(*phase, Phase::Migrating(_));
                if migrating {
                    *phase = Phase::Running;
                }
                migrating
            });
        };

        // 1. Offer, before anything is frozen: an unreachable, stranger or refusing
        //    destination costs the agent nothing.
        let mut ch = match self.offer(to, txn, &rec).await {
            Ok(ch) => ch,
            Err(e) => {
                abort(sh, &rec);
                return Err(e);
            }
        };
        let _ = progress.send(Progress::Accepted).await;
        sh.crash(CrashPoint::SourceAfterOffer);

        // 2. Pause the agent and freeze its sockets.
        let (ptx, prx) = oneshot::channel();
        {
            // Under the phase lock, as the agent's task ends under it: either the task sees
            // the request, or we see that it ended (and `prx` fails at once below).
            let phase = rec.phase.borrow();
            if !matches!(*phase, Phase::Done(_)) {
                *lock(&rec.park) = Some(ptx);
            } else {
                drop(ptx);
            }
        }
        rec.signal.send_replace(true);
        let parked = match tokio::time::timeout(sh.config.yield_timeout, prx).await {
            Ok(Ok(p)) => p,
            _ => {
                lock(&rec.park).take();
                rec.signal.send_replace(false);
                abort(sh, &rec);
                let ended = match &*rec.phase.borrow() {
                    Phase::Done(end) => Some(end.name()),
                    _ => None,
                };
                if let Some(end) = ended {
                    let _ = ch
                        .send(&Msg::Refuse {
                            reason: "the agent ended".into(),
                        })
                        .await;
                    return Err(ApiError::new(
                        "bad_request",
                        format!("agent {id} ended ({end}) before it could move"),
                    ));
                }
                let _ = ch
                    .send(&Msg::Refuse {
                        reason: "the agent did not pause".into(),
                    })
                    .await;
                return Err(ApiError::new(
                    "busy",
                    format!(
                        "agent {id} did not pause within {:?}; it keeps running here",
                        sh.config.yield_timeout
                    ),
                ));
            }
        };
        let Parked { agent, cx, resume } = parked;
        // From here until the decision the agent is paused and its sockets are images.
        let state = match agent.save() {
            Ok(s) => s,
            Err(e) => {
                rec.signal.send_replace(false);
                let _ = resume.send((agent, cx));
                abort(sh, &rec);
                return Err(ApiError::new(
                    "internal",
                    format!("agent state does not serialize: {e}"),
                ));
            }
        };
        let services: Vec<String> = cx.services.keys().cloned().collect();
        let sockets = freeze_context(sh, cx).await;
        let status = lock_pub(&rec.published).status.clone();
        let transfer = Transfer {
            agent: rec.id.clone(),
            kind: rec.kind.clone(),
            args: rec.args.clone(),
            state,
            services,
            sockets,
            status,
            migrations: rec.migrations.load(Ordering::Relaxed) + 1,
            started_unix_ms: rec.started_unix_ms,
            hosts: {
                let mut h = lock(&rec.hosts).clone();
                h.push(to);
                h
            },
        };
        let nsockets = transfer.sockets.len();
        let bytes = transfer_bytes(&transfer);
        let freeze_us = us(t0.elapsed());
        let _ = progress
            .send(Progress::Frozen {
                sockets: nsockets,
                bytes,
                freeze_us,
            })
            .await;
        sh.crash(CrashPoint::SourceAfterFreeze);

        // 3. Ship it; the destination decodes and reserves everything, runs nothing.
        let t1 = Instant::now();
        let step = sh.config.step_timeout;
        let msg = Msg::Transfer(Box::new(transfer));
        let sent = tokio::time::timeout(step, ch.send(&msg)).await;
        let Msg::Transfer(transfer) = msg else {
            unreachable!("built just above")
        };
        let prepared = match sent {
            Ok(Ok(())) => {
                let answer = recv_or_down(&mut ch, step).await;
                expect_answer(to, answer, "prepare", |m| matches!(m, Msg::Prepared)).map(drop)
            }
            Ok(Err(e)) => Err(channel_error(to, e)),
            Err(_) => Err(ApiError::new(
                "unreachable",
                format!("shipping to {to} took over {step:?}"),
            )),
        };
        if let Err(e) = prepared {
            // Abort: nothing runs at the destination; resume here.
            lock(&sh.txns).insert(txn, TxnOutcome::Aborted);
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                ch.send(&Msg::Refuse {
                    reason: format!("aborted: {}", e.message),
                }),
            )
            .await;
            return Err(self
                .resume_here(&rec, agent, resume, &transfer, e, None)
                .await);
        }
        let transfer_us = us(t1.elapsed());
        let _ = progress.send(Progress::Prepared { transfer_us }).await;
        sh.crash(CrashPoint::SourceAfterPrepared);

        // 4. Decide. From here on the agent belongs to the destination; peers that come
        //    looking for its streams here are sent there.
        lock(&sh.txns).insert(txn, TxnOutcome::Committed);
        forward_sessions(sh, &transfer, to);
        let t2 = Instant::now();
        let commit_sent = ch.send(&Msg::Commit { txn }).await;
        sh.crash(CrashPoint::SourceAfterCommit);
        let started = match commit_sent {
            Ok(()) => wait_started(&mut ch, step).await,
            Err(_) => None,
        };
        let (thaw_us, contact) = match started {
            Some(s) => s,
            None => {
                // The channel broke after the decision: ask the destination what it did
                // (while it is prepared, our Commit is still on its way, or it will ask us).
                let mut outcome = self.query(to, txn).await;
                for _ in 0..50 {
                    if outcome != Some(TxnOutcome::Prepared) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    outcome = self.query(to, txn).await;
                }
                match outcome {
                    Some(TxnOutcome::Committed | TxnOutcome::Prepared) => (0, to),
                    _ => {
                        // It is gone (or forgot). If it never started the agent, our copy is
                        // the only one and still current: resume here. If it had, its thaw
                        // re-associated the streams and ours are superseded (the peers refuse
                        // them, StaleEpoch): then the agent died with it and must not run a
                        // second time here from an older state (PROTOCOL.md §11.3 step 7).
                        lock(&sh.txns).insert(txn, TxnOutcome::Aborted);
                        let e = ApiError::new(
                            "unreachable",
                            format!(
                                "{to} failed after the commit; the agent resumes on {}",
                                sh.addr
                            ),
                        );
                        let after = AfterCommit { to, txn };
                        return Err(self
                            .resume_here(&rec, agent, resume, &transfer, e, Some(after))
                            .await);
                    }
                }
            }
        };
        let start_us = us(t2.elapsed());
        let _ = progress.send(Progress::Started { thaw_us }).await;
        // The agent's task ends: it will not be resumed here.
        drop((agent, resume));
        let _ = contact;
        rec.left_for(to, AgentState::Moved(to));
        let total_us = us(t0.elapsed());
        let (resume_us, all_connected) = match tokio::time::timeout(step, ch.recv()).await {
            Ok(Ok(Msg::Resumed {
                resume_us,
                all_connected,
            })) => (resume_us, all_connected),
            _ => (0, false),
        };
        let report = MigrationReport {
            agent: rec.id.clone(),
            from: sh.addr,
            to,
            sockets: nsockets,
            bytes,
            freeze_us,
            transfer_us,
            start_us,
            resume_us,
            all_connected,
            total_us,
        };
        *lock(&rec.last_migration) = Some(report.clone());
        Ok(report)
    }

    /// Open the daemon channel to `to` and offer it the agent.
    async fn offer(&self, to: SocketAddr, txn: u64, rec: &Record) -> Result<Channel, ApiError> {
        let sh = &self.shared;
        let mut ch = open_channel(sh, to).await?;
        let offer = Msg::Offer {
            txn,
            agent: rec.id.clone(),
            kind: rec.kind.clone(),
            from: sh.addr,
        };
        ch.send(&offer).await.map_err(|e| channel_error(to, e))?;
        let answer = recv_or_down(&mut ch, sh.config.step_timeout).await;
        expect_answer(to, answer, "answer the offer", |m| matches!(m, Msg::Ready))?;
        Ok(ch)
    }

    /// Ask the daemon at `peer` what became of `txn` (`None`: unreachable).
    async fn query(&self, peer: SocketAddr, txn: u64) -> Option<TxnOutcome> {
        query(&self.shared, peer, txn).await
    }

    /// An aborted migration: thaw the frozen sockets here and give the agent back to its task.
    ///
    /// `after_commit`: the destination failed after the decision to commit, so it may have
    /// started the agent. The thaw tells: a stream whose peer refuses our image as stale was
    /// re-associated by the destination. Then the agent ran there and this copy is older than
    /// what its peers saw: it is not resumed (never two runs of one agent, §11.3), its sockets
    /// are frozen again (the peers see a failure, not an end of stream) and dropped, and the
    /// record says the agent was lost with the destination.
    async fn resume_here(
        &self,
        rec: &Arc<Record>,
        agent: Box<dyn ErasedAgent>,
        resume: oneshot::Sender<(Box<dyn ErasedAgent>, Context)>,
        transfer: &Transfer,
        err: ApiError,
        after_commit: Option<AfterCommit>,
    ) -> ApiError {
        let sh = &self.shared;
        rec.signal.send_replace(false);
        let sockets = match decode_sockets(transfer) {
            Ok(s) => s,
            Err(reason) => {
                // Our own images: cannot happen short of memory corruption; say so loudly.
                rec.phase
                    .send_replace(Phase::Done(AgentState::Failed(format!(
                        "resume failed: {reason}"
                    ))));
                return ApiError::new(
                    "internal",
                    format!("{}; resuming failed: {reason}", err.message),
                );
            }
        };
        let (cx, superseded) = thaw_context(
            sh,
            &rec.id,
            &transfer.services,
            sockets,
            rec.published.clone(),
            rec.signal.subscribe(),
        )
        .await;
        // Streams answer at once (a peer refuses a stale image); datagram peers refuse one
        // silently, so the agent gets its datagram sockets back only once every peer has
        // taken our re-association (before that, nothing of the agent's is sent).
        let stale = match after_commit {
            Some(_) => {
                let wait = sh.config.step_timeout;
                superseded > 0 || !datagram_peers_confirm(&cx, wait).await
            }
            None => false,
        };
        if let (Some(AfterCommit { to, txn }), true) = (after_commit, stale) {
            lock(&sh.txns).insert(txn, TxnOutcome::Committed);
            let _ = freeze_context(sh, cx).await;
            drop((agent, resume));
            rec.left_for(to, AgentState::Lost(to));
            tracing::warn!(
                agent = %rec.id, %to, superseded,
                "destination failed after starting the agent: lost with it"
            );
            return ApiError::new(
                "lost",
                format!(
                    "{to} started the agent and failed before confirming: the agent died \
                     with it (its peers had re-associated with {to}: {superseded} streams \
                     refused as stale, or datagram peers silent; the copy on {} is stale \
                     and is not resumed)",
                    sh.addr
                ),
            );
        }
        rec.phase.send_replace(Phase::Running);
        if resume.send((agent, cx)).is_err() {
            rec.phase.send_replace(Phase::Done(AgentState::Failed(
                "the agent's task ended during the migration".into(),
            )));
        }
        err
    }
}

/// After a failure past the commit: whether every peer of the agent's thawed datagram
/// sockets acknowledged our re-association within `wait`. A peer that the destination
/// re-associated first drops ours silently (same epoch from another address, PROTOCOL.md
/// §10.5) and is reported unreachable; so is a peer that is down, and then the copy here is
/// not trusted either (it may be stale, and resuming a stale datagram socket would reuse the
/// destination's packet counters under the same key).
async fn datagram_peers_confirm(cx: &Context, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    for slot in cx.datagrams.values() {
        let sock = &slot.socket;
        while sock.peers().iter().any(|p| p.reassociating) {
            match tokio::time::timeout_at(deadline, sock.next_event()).await {
                Ok(Some(roam::DatagramEvent::PeerUnreachable { .. })) | Ok(None) | Err(_) => {
                    return false
                }
                Ok(Some(_)) => {}
            }
        }
    }
    true
}

/// A migration that failed after the decision to commit (see [`Host::resume_here`]).
#[derive(Debug, Clone, Copy)]
struct AfterCommit {
    to: SocketAddr,
    txn: u64,
}

/// Messages' size, for reports.
fn transfer_bytes(t: &Transfer) -> u64 {
    let images: usize = t
        .sockets
        .iter()
        .map(|s| match s {
            SocketImage::Stream { image, .. }
            | SocketImage::Datagram { image, .. }
            | SocketImage::Pending { image, .. } => image.len(),
        })
        .sum();
    (images + t.state.len()) as u64
}

fn channel_error(to: SocketAddr, e: ChannelError) -> ApiError {
    match e {
        ChannelError::Auth => ApiError::new(
            "auth",
            format!("{to} is not a daemon of this deployment (its key differs): refused"),
        ),
        other => ApiError::new("unreachable", format!("{to}: {other}")),
    }
}

async fn open_channel(sh: &HostShared, to: SocketAddr) -> Result<Channel, ApiError> {
    let step = sh.config.step_timeout;
    let fut = async {
        let mut stream = sh.endpoint.connect(to).await.map_err(|e| match &e {
            roam::ConnectError::Handshake(h)
                if matches!(
                    h.refuse_reason(),
                    roam::RefuseReason::Unauthorized | roam::RefuseReason::BadProof
                ) =>
            {
                ApiError::new(
                    "auth",
                    format!(
                        "{to} is not a daemon of this deployment (its key differs): refused ({e})"
                    ),
                )
            }
            _ => ApiError::new("unreachable", format!("cannot reach host {to}: {e}")),
        })?;
        wire::write_preamble(&mut stream, wire::HOST_SERVICE)
            .await
            .map_err(|e| ApiError::new("unreachable", format!("{to}: {e}")))?;
        Channel::initiate(stream, &sh.config.key)
            .await
            .map_err(|e| channel_error(to, e))
    };
    tokio::time::timeout(step, fut).await.map_err(|_| {
        ApiError::new(
            "unreachable",
            format!("host {to} did not answer within {step:?}"),
        )
    })?
}

async fn query(sh: &HostShared, peer: SocketAddr, txn: u64) -> Option<TxnOutcome> {
    let mut ch = open_channel(sh, peer).await.ok()?;
    ch.send(&Msg::Query { txn }).await.ok()?;
    match tokio::time::timeout(sh.config.step_timeout, ch.recv()).await {
        Ok(Ok(Msg::Outcome { outcome, .. })) => Some(outcome),
        _ => None,
    }
}

/// Wait for `Started` on the channel; `None` if the channel broke or timed out.
async fn wait_started(ch: &mut Channel, step: Duration) -> Option<(u64, SocketAddr)> {
    let mut connected = ch.stream.watch_connected();
    tokio::select! {
        r = tokio::time::timeout(step, ch.recv()) => match r {
            Ok(Ok(Msg::Started { thaw_us, contact })) => Some((thaw_us, contact)),
            _ => None,
        },
        _ = down_for(&mut connected, Duration::from_millis(500)) => None,
    }
}

/// The destination's answer to a step: the expected message, or the error to report (its
/// refusal, a broken channel, silence, or anything else).
fn expect_answer(
    to: SocketAddr,
    answer: Result<Result<Msg, ChannelError>, NoAnswer>,
    step: &str,
    expected: impl Fn(&Msg) -> bool,
) -> Result<Msg, ApiError> {
    match answer {
        Ok(Ok(m)) if expected(&m) => Ok(m),
        Ok(Ok(Msg::Refuse { reason })) => Err(ApiError::new(
            "refused",
            format!("{to} refused the agent: {reason}"),
        )),
        Ok(Ok(other)) => Err(ApiError::new(
            "internal",
            format!("unexpected answer from {to}: {other:?}"),
        )),
        Ok(Err(e)) => Err(channel_error(to, e)),
        Err(NoAnswer) => Err(ApiError::new(
            "unreachable",
            format!("{to} did not {step} in time"),
        )),
    }
}

/// No answer: the step timed out, or the channel's stream has been without a connection for
/// half a second (the other daemon is most likely gone).
#[derive(Debug)]
struct NoAnswer;

/// The next message on the channel, or [`NoAnswer`].
async fn recv_or_down(
    ch: &mut Channel,
    step: Duration,
) -> Result<Result<Msg, ChannelError>, NoAnswer> {
    let mut connected = ch.stream.watch_connected();
    tokio::select! {
        r = tokio::time::timeout(step, ch.recv()) => r.map_err(|_| NoAnswer),
        _ = down_for(&mut connected, Duration::from_millis(500)) => Err(NoAnswer),
    }
}

/// Resolves once the stream has been without a connection for `grace` in one stretch.
async fn down_for(connected: &mut watch::Receiver<bool>, grace: Duration) {
    loop {
        if connected.wait_for(|c| !*c).await.is_err() {
            return;
        }
        if tokio::time::timeout(grace, connected.wait_for(|c| *c))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Freeze every socket of a paused agent (concurrently); failed sockets are dropped with a
/// warning (their sessions had already failed).
async fn freeze_context(sh: &HostShared, mut cx: Context) -> Vec<SocketImage> {
    let mut set: JoinSet<Option<SocketImage>> = JoinSet::new();
    for (service, mut rx) in std::mem::take(&mut cx.services) {
        lock(&sh.services).remove(&service);
        rx.close();
        while let Ok(stream) = rx.try_recv() {
            let service = service.clone();
            set.spawn(async move {
                match stream.freeze().await {
                    Ok(img) => Some(SocketImage::Pending { service, image: img.to_bytes() }),
                    Err(e) => {
                        tracing::warn!(%service, error = %e, "a pending stream could not be frozen");
                        None
                    }
                }
            });
        }
    }
    for (name, stream) in std::mem::take(&mut cx.streams) {
        set.spawn(async move {
            match stream.freeze().await {
                Ok(img) => Some(SocketImage::Stream {
                    name,
                    image: img.to_bytes(),
                }),
                Err(e) => {
                    tracing::warn!(%name, error = %e, "stream could not be frozen");
                    None
                }
            }
        });
    }
    for (name, slot) in std::mem::take(&mut cx.datagrams) {
        set.spawn(async move {
            match slot.socket.freeze().await {
                Ok(img) => Some(SocketImage::Datagram {
                    name,
                    port: slot.port,
                    image: img.to_bytes(),
                }),
                Err(e) => {
                    tracing::warn!(%name, error = %e, "datagram socket could not be frozen");
                    None
                }
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(img)) = r {
            out.push(img);
        }
    }
    out
}

/// A transfer's sockets, decoded and checked: thawing them cannot fail for want of anything
/// but the network.
struct Decoded {
    streams: Vec<(String, StreamImage)>,
    datagrams: Vec<(String, Option<u16>, DatagramImage)>,
    pending: Vec<(String, StreamImage)>,
}

/// Everything the destination checks before it answers `Prepared`.
fn decode(sh: &HostShared, t: &Transfer) -> Result<(Box<dyn ErasedAgent>, Decoded), String> {
    let agent = sh.config.registry.restore(&t.kind, &t.state)?;
    for s in &t.services {
        if !sh.service_free(s) {
            return Err(format!("service {s:?} is already in use on {}", sh.addr));
        }
    }
    Ok((agent, decode_sockets(t)?))
}

fn decode_sockets(t: &Transfer) -> Result<Decoded, String> {
    let mut d = Decoded {
        streams: Vec::new(),
        datagrams: Vec::new(),
        pending: Vec::new(),
    };
    for s in &t.sockets {
        match s {
            SocketImage::Stream { name, image } => {
                let img =
                    StreamImage::from_bytes(image).map_err(|e| format!("stream {name}: {e}"))?;
                d.streams.push((name.clone(), img));
            }
            SocketImage::Pending { service, image } => {
                let img = StreamImage::from_bytes(image)
                    .map_err(|e| format!("pending stream of {service}: {e}"))?;
                d.pending.push((service.clone(), img));
            }
            SocketImage::Datagram { name, port, image } => {
                let img = DatagramImage::from_bytes(image)
                    .map_err(|e| format!("datagram socket {name}: {e}"))?;
                d.datagrams.push((name.clone(), *port, img));
            }
        }
    }
    Ok(d)
}

/// Bring a decoded agent's sockets to life on this host and return its context, and how many
/// streams their peers refused as stale: another copy of those images was thawed first (§11.3).
async fn thaw_context(
    sh: &Arc<HostShared>,
    id: &str,
    services: &[String],
    d: Decoded,
    published: PublishedRef,
    signal: watch::Receiver<bool>,
) -> (Context, usize) {
    let mut superseded = 0;
    let mut cx = sh.new_context(id, published, signal);
    for s in services {
        if let Err(e) = cx.listen(s) {
            tracing::warn!(service = %s, error = %e, "service could not be registered");
        }
    }
    // Streams re-associate concurrently (each thaw waits for its peer).
    let mut set = JoinSet::new();
    for (name, img) in d.streams {
        let sh = sh.clone();
        set.spawn(async move { (Some(name), None, thaw_stream(&sh, img).await) });
    }
    for (service, img) in d.pending {
        let sh = sh.clone();
        set.spawn(async move { (None, Some(service), thaw_stream(&sh, img).await) });
    }
    while let Some(r) = set.join_next().await {
        let Ok((name, service, stream)) = r else {
            continue;
        };
        match (name, service, stream) {
            (Some(name), _, Ok(s)) => cx.insert_stream(name, s),
            (None, Some(service), Ok(s)) => {
                if let Some(tx) = lock(&sh.services).get(&service) {
                    let _ = tx.try_send(s);
                }
            }
            (name, service, Err(e)) => {
                if matches!(e, roam::ThawError::Refused(roam::RefuseReason::StaleEpoch)) {
                    superseded += 1;
                }
                tracing::warn!(?name, ?service, error = %e, "stream could not be thawed")
            }
            _ => {}
        }
    }
    for (name, port, img) in d.datagrams {
        let ip = sh.addr.ip();
        let first = SocketAddr::new(ip, port.unwrap_or(0));
        let sock = match Datagram::thaw(img.clone(), first).await {
            Ok(s) => Ok(s),
            Err(_) if port.is_some() => Datagram::thaw(img, SocketAddr::new(ip, 0)).await,
            Err(e) => Err(e),
        };
        match sock {
            Ok(socket) => {
                cx.add_datagram(name, DatagramSlot { socket, port });
            }
            Err(e) => tracing::warn!(%name, error = %e, "datagram socket could not be thawed"),
        }
    }
    (cx, superseded)
}

/// Thaw a stream on this host. Both ends of one session cannot live on one endpoint (they
/// share the session id): a stream whose peer is an agent of this host goes to the host's
/// second endpoint, on the same address with another port.
async fn thaw_stream(sh: &Arc<HostShared>, img: StreamImage) -> Result<Stream, roam::ThawError> {
    let id = img.session_id();
    match sh.endpoint.thaw(img.clone()).await {
        Err(roam::ThawError::AlreadyRunning(_)) => {}
        other => return other,
    }
    let aux = sh.aux_endpoint().await.map_err(|e| {
        tracing::warn!(error = %e, "second endpoint could not be bound");
        roam::ThawError::AlreadyRunning(id)
    })?;
    aux.thaw(img).await
}

/// After a commit: this endpoint tells peers that re-associate here where their sessions went
/// (PROTOCOL.md §5.5), so both ends of a stream may move at once.
fn forward_sessions(sh: &HostShared, t: &Transfer, to: SocketAddr) {
    for s in &t.sockets {
        if let SocketImage::Stream { image, .. } | SocketImage::Pending { image, .. } = s {
            if let Ok(img) = StreamImage::from_bytes(image) {
                sh.endpoint.forward(img.session_id(), to);
            }
        }
    }
}

async fn agent_task(
    sh: Arc<HostShared>,
    rec: Arc<Record>,
    mut agent: Box<dyn ErasedAgent>,
    mut cx: Context,
) {
    let end = loop {
        let r = tokio::select! {
            r = agent.run(&mut cx) => Some(r),
            _ = rec.stop.notified() => None,
        };
        match r {
            None => break AgentState::Stopped,
            Some(Ok(Step::Done)) => break AgentState::Finished,
            Some(Err(e)) => break AgentState::Failed(e.to_string()),
            Some(Ok(Step::Yield)) => {
                let park = lock(&rec.park).take();
                let Some(park) = park else {
                    // Yielded without a request (or the request was withdrawn): go on.
                    tokio::task::yield_now().await;
                    continue;
                };
                let (tx, rx) = oneshot::channel();
                if let Err(p) = park.send(Parked {
                    agent,
                    cx,
                    resume: tx,
                }) {
                    agent = p.agent;
                    cx = p.cx;
                    continue;
                }
                match rx.await {
                    Ok((a, c)) => {
                        agent = a;
                        cx = c;
                        continue;
                    }
                    // Migrated away: the record was updated by the migration.
                    Err(_) => return,
                }
            }
        }
    };
    for service in cx.services.keys() {
        lock(&sh.services).remove(service);
    }
    drop(cx);
    rec.phase.send_modify(|phase| {
        *phase = Phase::Done(end);
        // A migration waiting for this agent to pause learns at once that it ended instead.
        lock(&rec.park).take();
    });
    lock_pub(&rec.published).streams.clear();
    lock_pub(&rec.published).datagrams.clear();
}

fn info_of(sh: &HostShared, rec: &Record) -> AgentInfo {
    let state = match &*rec.phase.borrow() {
        Phase::Running => AgentState::Running,
        Phase::Migrating(t) => AgentState::Migrating(*t),
        Phase::Done(s) => s.clone(),
    };
    let p = lock_pub(&rec.published);
    let mut sockets = Vec::new();
    for (name, m) in &p.streams {
        if let Some(st) = m.status() {
            sockets.push(SocketInfo {
                name: name.clone(),
                kind: "stream".into(),
                local: None,
                peers: vec![st.peer.contact],
                sent: st.stats.bytes_written,
                received: st.stats.bytes_read,
                connected: st.connected,
                epoch: st.epoch.0,
            });
        }
    }
    for (name, m) in &p.datagrams {
        if let Some((stats, peers)) = m.status() {
            sockets.push(SocketInfo {
                name: name.clone(),
                kind: "datagram".into(),
                local: Some(m.local_addr()),
                peers: peers.iter().map(|e| e.addr).collect(),
                sent: stats.sent,
                received: stats.received,
                connected: true,
                epoch: stats.migrations,
            });
        }
    }
    AgentInfo {
        id: rec.id.clone(),
        kind: rec.kind.clone(),
        args: rec.args.clone(),
        host: sh.addr,
        state,
        status: p.status.clone(),
        migrations: rec.migrations.load(Ordering::Relaxed),
        hosts: lock(&rec.hosts).clone(),
        sockets,
        last_migration: lock(&rec.last_migration).clone(),
    }
}

async fn accept_loop(weak: std::sync::Weak<HostShared>) {
    loop {
        let Some(sh) = weak.upgrade() else { return };
        let accepted = {
            let endpoint = sh.endpoint.clone();
            drop(sh);
            endpoint.accept().await
        };
        let Some(sh) = weak.upgrade() else { return };
        match accepted {
            Ok(stream) => {
                tokio::spawn(route(sh, stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                return;
            }
        }
    }
}

/// Read an incoming stream's preamble and hand it to the daemon channel or an agent.
async fn route(sh: Arc<HostShared>, mut stream: Stream) {
    let service = match tokio::time::timeout(
        Duration::from_secs(5),
        wire::read_preamble(&mut stream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        _ => return,
    };
    if service == wire::HOST_SERVICE {
        match tokio::time::timeout(
            sh.config.step_timeout,
            Channel::respond(stream, &sh.config.key),
        )
        .await
        {
            Ok(Ok(ch)) => serve_channel(sh, ch).await,
            Ok(Err(e)) => tracing::warn!(error = %e, "daemon channel refused"),
            Err(_) => tracing::warn!("daemon channel handshake timed out"),
        }
        return;
    }
    let Some(name) = service.strip_prefix(wire::AGENT_PREFIX) else {
        return;
    };
    let tx = lock(&sh.services).get(name).cloned();
    if let Some(tx) = tx {
        let mut stream = stream;
        if wire_ok(&mut stream).await.is_err() {
            return;
        }
        if tx.send(stream).await.is_ok() {
            return;
        }
        // The agent left between the lookup and the hand-over: the stream is dropped, and the
        // connecting agent sees it end.
        return;
    }
    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &[wire::SERVICE_UNKNOWN]).await;
    let _ = tokio::io::AsyncWriteExt::flush(&mut stream).await;
}

async fn wire_ok(stream: &mut Stream) -> std::io::Result<()> {
    tokio::io::AsyncWriteExt::write_all(stream, &[wire::SERVICE_OK]).await?;
    tokio::io::AsyncWriteExt::flush(stream).await
}

/// The destination's side of the daemon channel (and answers to queries).
async fn serve_channel(sh: Arc<HostShared>, mut ch: Channel) {
    let step = sh.config.step_timeout;
    let (txn, agent_id, kind, from) = match tokio::time::timeout(step, ch.recv()).await {
        Ok(Ok(Msg::Offer {
            txn,
            agent,
            kind,
            from,
        })) => (txn, agent, kind, from),
        Ok(Ok(Msg::Query { txn })) => {
            let outcome = lock(&sh.txns)
                .get(&txn)
                .copied()
                .unwrap_or(TxnOutcome::Unknown);
            let _ = ch.send(&Msg::Outcome { txn, outcome }).await;
            return;
        }
        _ => return,
    };
    let refuse = |reason: String| Msg::Refuse { reason };
    if let Some(reason) = offer_refusal(&sh, &agent_id, &kind) {
        let _ = ch.send(&refuse(reason)).await;
        return;
    }
    if ch.send(&Msg::Ready).await.is_err() {
        return;
    }
    sh.crash(CrashPoint::DestAfterOffer);
    if sh.config.crash_at == Some(CrashPoint::DestMidTransfer) {
        ch.crash_after_first_chunk = true;
    }
    let t = match tokio::time::timeout(step, ch.recv()).await {
        Ok(Ok(Msg::Transfer(t))) => t,
        _ => return,
    };
    if t.agent != agent_id || t.kind != kind {
        let _ = ch
            .send(&refuse("the transfer does not match the offer".into()))
            .await;
        return;
    }
    let (agent, decoded) =
        match decode(&sh, &t).and_then(|d| match offer_refusal(&sh, &agent_id, &kind) {
            Some(r) => Err(r),
            None => Ok(d),
        }) {
            Ok(d) => d,
            Err(reason) => {
                let _ = ch.send(&refuse(reason)).await;
                return;
            }
        };
    lock(&sh.txns).insert(txn, TxnOutcome::Prepared);
    if ch.send(&Msg::Prepared).await.is_err() {
        // Our answer may or may not have left: the decision is the source's; ask it below.
    }
    sh.crash(CrashPoint::DestAfterPrepared);

    // Wait for the decision; if the channel breaks, ask the source; if the source is gone
    // (its copy of the agent died with it), the agent runs here.
    let commit = {
        let mut connected = ch.stream.watch_connected();
        tokio::select! {
            r = tokio::time::timeout(step, ch.recv()) => match r {
                Ok(Ok(Msg::Commit { txn: t2 })) if t2 == txn => Some(true),
                Ok(Ok(Msg::Refuse { .. })) => Some(false),
                _ => None,
            },
            _ = down_for(&mut connected, Duration::from_millis(500)) => None,
        }
    };
    let commit = match commit {
        Some(c) => c,
        None => decide_by_query(&sh, from, txn).await,
    };
    if !commit {
        lock(&sh.txns).insert(txn, TxnOutcome::Aborted);
        return;
    }
    // The decision is known here from now on, whatever the thaw takes.
    lock(&sh.txns).insert(txn, TxnOutcome::Committed);
    let t0 = Instant::now();
    let host = Host { shared: sh.clone() };
    let rec = host.install(
        t.agent.clone(),
        &t.kind,
        t.args.clone(),
        t.migrations,
        t.hosts.clone(),
        t.started_unix_ms,
        t.status.clone(),
    );
    let (cx, _) = thaw_context(
        &sh,
        &t.agent,
        &t.services,
        decoded,
        rec.published.clone(),
        rec.signal.subscribe(),
    )
    .await;
    // Streams are re-associated once thawed; datagram peers are given a moment to take our
    // re-association before the agent sends anything, so a datagram of this copy never
    // precedes it: a peer that answers the source instead (after we die) has seen nothing of
    // this copy, and the source may resume its own (`Host::resume_here`).
    datagram_peers_confirm(&cx, DATAGRAM_REASSOC_WAIT).await;
    let mut watches: Vec<_> = cx.streams.values().map(|s| s.watch_connected()).collect();
    tokio::spawn(agent_task(sh.clone(), rec, agent, cx));
    let thaw_us = us(t0.elapsed());
    let _ = ch
        .send(&Msg::Started {
            thaw_us,
            contact: sh.addr,
        })
        .await;
    sh.crash(CrashPoint::DestAfterStart);
    let all = async {
        for w in &mut watches {
            if w.wait_for(|c| *c).await.is_err() {
                return;
            }
        }
    };
    let all_connected = tokio::time::timeout(step, all).await.is_ok();
    let resume_us = us(t0.elapsed());
    let _ = ch
        .send(&Msg::Resumed {
            resume_us,
            all_connected,
        })
        .await;
    // Let the source read the last message before the channel closes.
    let _ = tokio::time::timeout(step, ch.recv()).await;
}

/// The destination lost its channel before the decision: ask the source (a few times while
/// it is undecided). Unreachable or forgotten means the source is gone with its copy.
async fn decide_by_query(sh: &HostShared, from: SocketAddr, txn: u64) -> bool {
    for _ in 0..50 {
        match query(sh, from, txn).await {
            Some(TxnOutcome::Committed) | Some(TxnOutcome::Unknown) | None => return true,
            Some(TxnOutcome::Aborted) => return false,
            Some(TxnOutcome::Prepared) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    false
}

fn offer_refusal(sh: &HostShared, agent: &str, kind: &str) -> Option<String> {
    if !sh.config.registry.contains(kind) {
        return Some(format!("{} does not run agents of kind {kind:?}", sh.addr));
    }
    if let Some(r) = lock(&sh.agents).get(agent) {
        if !matches!(*r.phase.borrow(), Phase::Done(_)) {
            return Some(format!("agent {agent} already runs on {}", sh.addr));
        }
    }
    if sh.running() >= sh.config.max_agents {
        return Some(format!(
            "{} is at its limit of {} agents",
            sh.addr, sh.config.max_agents
        ));
    }
    None
}
