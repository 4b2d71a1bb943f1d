//! The JSON the control API speaks (docs/PROTOCOL.md §11.5), shared by the daemon and the CLI.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `GET /v1/host`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    /// The daemon's address (agents' streams and other daemons reach it here).
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// roam's version.
    pub version: String,
    /// Agents running now.
    pub running: usize,
    /// The agent kinds it can run: (kind, description).
    pub kinds: Vec<(String, String)>,
}

/// `POST /v1/agents`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    /// Agent kind.
    pub kind: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// `POST /v1/agents/{id}/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Destination daemon's address.
    pub to: SocketAddr,
}

/// Where an agent is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum AgentState {
    /// Running here.
    Running,
    /// Being migrated to the given host.
    Migrating(SocketAddr),
    /// Moved to the given host (this host keeps the record for `ps`).
    Moved(SocketAddr),
    /// Its work is done.
    Finished,
    /// It failed (why).
    Failed(String),
    /// Stopped by `roam stop`.
    Stopped,
    /// Lost with the given host: it started there in a migration, and that host failed
    /// before confirming; this host's copy was older than what its peers had seen, so it
    /// was not resumed (PROTOCOL.md §11.3).
    Lost(SocketAddr),
}

impl AgentState {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            AgentState::Running => "running",
            AgentState::Migrating(_) => "migrating",
            AgentState::Moved(_) => "moved",
            AgentState::Finished => "finished",
            AgentState::Failed(_) => "failed",
            AgentState::Stopped => "stopped",
            AgentState::Lost(_) => "lost",
        }
    }
}

/// One socket of an agent, for `roam ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketInfo {
    /// The name the agent gave it.
    pub name: String,
    /// `stream` or `datagram`.
    pub kind: String,
    /// Local address (a stream's endpoint contact; a datagram socket's bound address).
    pub local: Option<SocketAddr>,
    /// Peers' addresses as last known.
    pub peers: Vec<SocketAddr>,
    /// Bytes (streams) or datagrams (datagram sockets) sent by the application.
    pub sent: u64,
    /// … received and delivered to the application.
    pub received: u64,
    /// Streams: a transport connection carries the session now.
    pub connected: bool,
    /// Streams: completed re-associations; datagram sockets: migrations of this socket.
    pub epoch: u64,
}

/// One agent, for `roam ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its id (kept across migrations).
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// The arguments it was started with.
    pub args: Vec<String>,
    /// The host reporting it.
    pub host: SocketAddr,
    /// Its state here.
    #[serde(flatten)]
    pub state: AgentState,
    /// The agent's own one-line status.
    pub status: String,
    /// Migrations completed so far.
    pub migrations: u32,
    /// Hosts it ran on, oldest first (the last is this one while it runs here).
    pub hosts: Vec<SocketAddr>,
    /// Its sockets (empty once it left or ended).
    pub sockets: Vec<SocketInfo>,
    /// The last migration out of this host, if any.
    pub last_migration: Option<MigrationReport>,
}

/// A progress line of `POST /v1/agents/{id}/migrate` (NDJSON, one per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Progress {
    /// The destination accepted the offer.
    Accepted,
    /// The agent paused and its sockets are frozen.
    Frozen {
        /// Sockets frozen.
        sockets: usize,
        /// Bytes of state and images.
        bytes: u64,
        /// Microseconds from the request to the last image.
        freeze_us: u64,
    },
    /// The destination decoded everything.
    Prepared {
        /// Microseconds to ship and validate.
        transfer_us: u64,
    },
    /// The agent runs at the destination.
    Started {
        /// The destination's thaw time.
        thaw_us: u64,
    },
    /// The migration finished.
    Done(MigrationReport),
    /// It failed; the agent runs where it was (see the message).
    Error(ApiError),
}

/// The measured phases of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The agent.
    pub agent: String,
    /// Source host.
    pub from: SocketAddr,
    /// Destination host.
    pub to: SocketAddr,
    /// Sockets moved.
    pub sockets: usize,
    /// Bytes shipped (state plus images, before encryption).
    pub bytes: u64,
    /// Request → agent paused and every socket frozen.
    pub freeze_us: u64,
    /// Shipping and validation at the destination.
    pub transfer_us: u64,
    /// Commit → the agent runs at the destination (thawed).
    pub start_us: u64,
    /// Thaw → every stream re-associated with its peer (measured at the destination).
    pub resume_us: u64,
    /// Whether every stream re-associated within the wait.
    pub all_connected: bool,
    /// Request → the agent running at the destination (the agent's downtime).
    pub total_us: u64,
}

/// A typed error of the control API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Machine-readable code: `unknown_agent`, `bad_request`, `unreachable`, `refused`,
    /// `busy`, `auth`, `internal`.
    pub code: String,
    /// What happened.
    pub message: String,
}

impl ApiError {
    /// An error with a code.
    pub fn new(code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}
