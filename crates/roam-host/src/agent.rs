//! The agent API: an application a host daemon runs and can move to another host, with its
//! serializable state and its sockets.
//!
//! An agent is a type that is `Serialize + Deserialize` and implements [`Agent`]. Its sockets
//! live in the [`Context`] under names the agent chooses, never in the agent's own state: at a
//! migration the host freezes them into images and ships them beside the serialized state. The
//! agent learns that a migration was requested from [`Context::signal`] and answers by returning
//! [`Step::Yield`] from [`Agent::run`] at a point where its state is consistent; on the new host,
//! `run` is called again on the deserialized state with the same sockets, already re-associated
//! with their peers.
//!
//! ```no_run
//! use roam_host::{Agent, AgentError, Context, Step};
//! use serde::{Deserialize, Serialize};
//! use tokio::io::AsyncWriteExt;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Counter { to: String, next: u64 }
//!
//! impl Agent for Counter {
//!     const KIND: &'static str = "counter";
//!     const ABOUT: &'static str = "writes a line per second to a service";
//!     fn from_args(args: &[String]) -> Result<Self, AgentError> {
//!         let to = args.first().ok_or_else(|| AgentError::Args("counter ADDRESS".into()))?;
//!         Ok(Counter { to: to.clone(), next: 0 })
//!     }
//!     async fn run(&mut self, cx: &mut Context) -> Result<Step, AgentError> {
//!         if !cx.has_stream("out") {
//!             cx.connect("out", &self.to).await?;
//!         }
//!         let mut signal = cx.signal();
//!         loop {
//!             tokio::select! {
//!                 _ = signal.requested() => return Ok(Step::Yield),
//!                 _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
//!             }
//!             let line = format!("{}\n", self.next);
//!             cx.stream("out")?.write_all(line.as_bytes()).await?;
//!             self.next += 1;
//!         }
//!     }
//! }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use roam::{Datagram, DatagramMonitor, Stream, StreamMonitor};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::host::HostShared;
use crate::wire::{self, ServiceAddr};

/// A boxed future, as the type-erased agent runtime stores it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What [`Agent::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The agent finished its work; the host closes its sockets and reports it finished.
    Done,
    /// The agent paused at a consistent point because a migration was requested
    /// ([`Context::signal`]); `run` is called again later, here or on the destination host.
    Yield,
}

/// Why an agent could not start or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The arguments of `roam run` were wrong.
    #[error("bad arguments: {0}")]
    Args(String),
    /// No socket of that name in the context.
    #[error("no socket named {0:?}")]
    NoSocket(String),
    /// A socket or service of that name already exists.
    #[error("{0:?} is already in use")]
    InUse(String),
    /// A peer address could not be parsed (`HOST:PORT/SERVICE`).
    #[error("bad service address {0:?} (expected HOST:PORT/SERVICE)")]
    BadAddress(String),
    /// Connecting to a service failed.
    #[error("connect to {to}: {reason}")]
    Connect {
        /// The service address.
        to: String,
        /// What went wrong.
        reason: String,
    },
    /// A stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A datagram socket failed.
    #[error("datagram socket: {0}")]
    Datagram(#[from] roam::DatagramError),
    /// The agent's own logic failed (for example a verification).
    #[error("{0}")]
    Failed(String),
    /// The host is shutting down.
    #[error("the host is shutting down")]
    HostClosed,
}

/// An application the host daemon runs and can migrate. See the [module docs](self).
pub trait Agent: Serialize + DeserializeOwned + Send + 'static {
    /// The name `roam run KIND` uses.
    const KIND: &'static str;
    /// One line for `roam run --help`-style listings.
    const ABOUT: &'static str;

    /// Build a fresh agent from the arguments after `roam run KIND`.
    fn from_args(args: &[String]) -> Result<Self, AgentError>;

    /// Do the work. Called once on the first host and once more after each migration, on the
    /// deserialized state. Return [`Step::Yield`] soon after [`Context::signal`] fires, with the
    /// state consistent: whatever is in `self` and in the sockets is what the new host gets.
    fn run(&mut self, cx: &mut Context) -> impl Future<Output = Result<Step, AgentError>> + Send;

    /// The services this agent accepts streams on from its start. The host registers them
    /// before `roam run` returns (refusing the run if one is taken), so a client started right
    /// after finds them; an agent may also [`Context::listen`] later. Default: none.
    fn services(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The object-safe form of [`Agent`] the host stores.
pub(crate) trait ErasedAgent: Send {
    fn run<'a>(&'a mut self, cx: &'a mut Context) -> BoxFuture<'a, Result<Step, AgentError>>;
    fn save(&self) -> Result<Vec<u8>, serde_json::Error>;
    fn services(&self) -> Vec<String>;
}

impl<A: Agent> ErasedAgent for A {
    fn run<'a>(&'a mut self, cx: &'a mut Context) -> BoxFuture<'a, Result<Step, AgentError>> {
        Box::pin(Agent::run(self, cx))
    }
    fn save(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
    fn services(&self) -> Vec<String> {
        Agent::services(self)
    }
}

type FromArgs = fn(&[String]) -> Result<Box<dyn ErasedAgent>, AgentError>;
type Restore = fn(&[u8]) -> Result<Box<dyn ErasedAgent>, serde_json::Error>;

#[derive(Clone, Copy)]
struct Kind {
    about: &'static str,
    from_args: FromArgs,
    restore: Restore,
}

/// The agent kinds a host can run and receive. Daemons of one deployment need the same kinds:
/// a destination refuses an agent whose kind it does not know.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Kind>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The example agents shipped with roam (see [`crate::agents`]).
    pub fn builtin() -> Registry {
        let mut r = Registry::new();
        crate::agents::register_all(&mut r);
        r
    }

    /// Add an agent kind.
    pub fn register<A: Agent>(&mut self) -> &mut Registry {
        self.kinds.insert(
            A::KIND,
            Kind {
                about: A::ABOUT,
                from_args: |args| Ok(Box::new(A::from_args(args)?)),
                restore: |bytes| Ok(Box::new(serde_json::from_slice::<A>(bytes)?)),
            },
        );
        self
    }

    /// Every kind with its one-line description.
    pub fn kinds(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.kinds.iter().map(|(k, v)| (*k, v.about))
    }

    /// Whether `kind` is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    pub(crate) fn create(
        &self,
        kind: &str,
        args: &[String],
    ) -> Result<Box<dyn ErasedAgent>, AgentError> {
        let k = self
            .kinds
            .get(kind)
            .ok_or_else(|| AgentError::Args(format!("unknown agent kind {kind:?}")))?;
        (k.from_args)(args)
    }

    pub(crate) fn restore(&self, kind: &str, state: &[u8]) -> Result<Box<dyn ErasedAgent>, String> {
        let k = self
            .kinds
            .get(kind)
            .ok_or_else(|| format!("unknown agent kind {kind:?}"))?;
        (k.restore)(state).map_err(|e| format!("state of {kind} does not deserialize: {e}"))
    }
}

/// Resolves when a migration of the agent is requested. Cancel-safe: use it in `select!`.
#[derive(Debug, Clone)]
pub struct MigrationSignal(watch::Receiver<bool>);

impl MigrationSignal {
    /// Wait until a migration is requested (at once if it already is).
    pub async fn requested(&mut self) {
        if self.0.wait_for(|v| *v).await.is_err() {
            // The host dropped the agent: nothing will ever be requested; wait forever (the
            // agent's future is being dropped anyway).
            std::future::pending::<()>().await;
        }
    }

    /// Whether a migration is requested now.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// What `roam ps` shows of an agent's sockets, shared between the agent and the host.
#[derive(Default)]
pub(crate) struct Published {
    pub(crate) status: String,
    pub(crate) streams: BTreeMap<String, StreamMonitor>,
    pub(crate) datagrams: BTreeMap<String, DatagramMonitor>,
}

pub(crate) type PublishedRef = Arc<Mutex<Published>>;

pub(crate) fn lock_pub(p: &PublishedRef) -> std::sync::MutexGuard<'_, Published> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A datagram socket of an agent, with the port it asked for (kept at the next host when free).
pub(crate) struct DatagramSlot {
    pub(crate) socket: Datagram,
    pub(crate) port: Option<u16>,
}

/// An agent's sockets and its link to the host it runs on.
pub struct Context {
    pub(crate) id: String,
    pub(crate) host: Arc<HostShared>,
    pub(crate) streams: BTreeMap<String, Stream>,
    pub(crate) datagrams: BTreeMap<String, DatagramSlot>,
    /// Services this agent accepts streams on, with their queues of streams not yet accepted.
    pub(crate) services: BTreeMap<String, mpsc::Receiver<Stream>>,
    pub(crate) signal: watch::Receiver<bool>,
    pub(crate) published: PublishedRef,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("agent", &self.id)
            .field("streams", &self.streams.keys().collect::<Vec<_>>())
            .field("datagrams", &self.datagrams.keys().collect::<Vec<_>>())
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The agent's id (the same on every host it moves to).
    pub fn agent_id(&self) -> &str {
        &self.id
    }

    /// The address of the host the agent runs on now.
    pub fn host_addr(&self) -> SocketAddr {
        self.host.addr
    }

    /// A future that resolves when a migration is requested.
    pub fn signal(&self) -> MigrationSignal {
        MigrationSignal(self.signal.clone())
    }

    /// Whether a migration is requested now.
    pub fn migration_requested(&self) -> bool {
        *self.signal.borrow()
    }

    /// Set the one-line status `roam ps` shows (progress, counts).
    pub fn set_status(&self, status: impl Into<String>) {
        lock_pub(&self.published).status = status.into();
    }

    /// Open a stream named `name` to the service at `to` (`HOST:PORT/SERVICE`, where
    /// `HOST:PORT` is a host daemon's address). The stream moves with the agent.
    pub async fn connect(&mut self, name: &str, to: &str) -> Result<&mut Stream, AgentError> {
        if self.streams.contains_key(name) {
            return Err(AgentError::InUse(name.to_owned()));
        }
        let addr: ServiceAddr = to
            .parse()
            .map_err(|_| AgentError::BadAddress(to.to_owned()))?;
        let connect_err = |reason: String| AgentError::Connect {
            to: to.to_owned(),
            reason,
        };
        let mut stream = self
            .host
            .endpoint_toward(addr.host)
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .connect(addr.host)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        wire::write_preamble(&mut stream, &wire::agent_service(&addr.service))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let mut answer = [0u8; 1];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        if answer[0] != wire::SERVICE_OK {
            return Err(connect_err(format!(
                "no agent listens on service {:?} there",
                addr.service
            )));
        }
        Ok(self.add_stream(name.to_owned(), stream))
    }

    /// Listen on the service `service` of this host (other agents connect to
    /// `HOST:PORT/SERVICE`). The listening moves with the agent; streams that arrived but were
    /// not accepted yet move too.
    pub fn listen(&mut self, service: &str) -> Result<(), AgentError> {
        if self.services.contains_key(service) {
            return Ok(());
        }
        let rx = self.host.register_service(service)?;
        self.services.insert(service.to_owned(), rx);
        Ok(())
    }

    /// Wait for the next stream to `service` (see [`Context::listen`], which this calls) and
    /// name it `name`. Cancel-safe.
    pub async fn accept(&mut self, service: &str, name: &str) -> Result<&mut Stream, AgentError> {
        if self.streams.contains_key(name) {
            return Err(AgentError::InUse(name.to_owned()));
        }
        self.listen(service)?;
        let rx = self
            .services
            .get_mut(service)
            .ok_or_else(|| AgentError::NoSocket(service.to_owned()))?;
        let stream = rx.recv().await.ok_or(AgentError::HostClosed)?;
        Ok(self.add_stream(name.to_owned(), stream))
    }

    fn add_stream(&mut self, name: String, stream: Stream) -> &mut Stream {
        lock_pub(&self.published)
            .streams
            .insert(name.clone(), stream.monitor());
        self.streams.entry(name).or_insert(stream)
    }

    pub(crate) fn insert_stream(&mut self, name: String, stream: Stream) {
        self.add_stream(name, stream);
    }

    /// Whether a stream named `name` exists.
    pub fn has_stream(&self, name: &str) -> bool {
        self.streams.contains_key(name)
    }

    /// The stream named `name`.
    pub fn stream(&mut self, name: &str) -> Result<&mut Stream, AgentError> {
        self.streams
            .get_mut(name)
            .ok_or_else(|| AgentError::NoSocket(name.to_owned()))
    }

    /// Close the stream named `name` gracefully (its write half ends; see [`Stream`]).
    pub async fn close_stream(&mut self, name: &str) -> Result<(), AgentError> {
        let mut s = self
            .streams
            .remove(name)
            .ok_or_else(|| AgentError::NoSocket(name.to_owned()))?;
        lock_pub(&self.published).streams.remove(name);
        s.shutdown().await?;
        Ok(())
    }

    /// Bind a datagram socket named `name` on this host's address (`port` 0 or `None` picks
    /// one). After a migration the socket is bound on the new host, on the same port when free;
    /// its peers keep sending to the address they first knew.
    pub async fn bind(&mut self, name: &str, port: Option<u16>) -> Result<&Datagram, AgentError> {
        if self.datagrams.contains_key(name) {
            return Err(AgentError::InUse(name.to_owned()));
        }
        let addr = SocketAddr::new(self.host.addr.ip(), port.unwrap_or(0));
        let socket = Datagram::bind(addr)
            .await
            .map_err(|e| AgentError::Failed(format!("bind {addr}: {e}")))?;
        Ok(self.add_datagram(name.to_owned(), DatagramSlot { socket, port }))
    }

    pub(crate) fn add_datagram(&mut self, name: String, slot: DatagramSlot) -> &Datagram {
        lock_pub(&self.published)
            .datagrams
            .insert(name.clone(), slot.socket.monitor());
        &self.datagrams.entry(name).or_insert(slot).socket
    }

    /// Whether a datagram socket named `name` exists.
    pub fn has_datagram(&self, name: &str) -> bool {
        self.datagrams.contains_key(name)
    }

    /// The datagram socket named `name`.
    pub fn datagram(&self, name: &str) -> Result<&Datagram, AgentError> {
        self.datagrams
            .get(name)
            .map(|s| &s.socket)
            .ok_or_else(|| AgentError::NoSocket(name.to_owned()))
    }

    /// Names of the streams.
    pub fn stream_names(&self) -> BTreeSet<String> {
        self.streams.keys().cloned().collect()
    }
}

/// Write everything, then flush: a helper agents use for whole messages.
pub async fn send_all(stream: &mut Stream, data: &[u8]) -> std::io::Result<()> {
    stream.write_all(data).await?;
    stream.flush().await
}
