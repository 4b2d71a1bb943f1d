//! The roam host daemon: runs applications ("agents") whose state is serializable and whose
//! sockets are roam streams and datagram sockets, and moves them between hosts with their
//! connections (claims 1c, 12c and 21c of US 6,920,501: the application moves with its
//! sockets, to a third host).
//!
//! - [`agent`]: the agent API ([`Agent`], [`Context`], [`Step`]) and the [`Registry`] of kinds.
//! - [`agents`]: the example agents (`echo`, `chat`, `bulk-send`, `bulk-recv`, `telemetry`,
//!   `collector`).
//! - [`Host`]: the daemon: runs agents in-process as tokio tasks, routes incoming streams to
//!   their services, and migrates agents to other daemons in a transaction over an encrypted,
//!   deployment-key-authenticated channel (docs/PROTOCOL.md §11).
//! - [`control`]: the local control API (HTTP/1.1 + JSON on a Unix socket) and its client,
//!   which `roam run`, `roam ps`, `roam migrate` and `roam stop` use.
//! - [`tunnel`]: `roam tunnel`: unmodified TCP programs over roam sessions.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod agents;
pub mod api;
pub mod control;
mod host;
pub mod tunnel;
mod wire;

pub use agent::{Agent, AgentError, Context, MigrationSignal, Registry, Step};
pub use host::{endpoint_config, CrashPoint, Host, HostConfig, HostError};
pub use wire::ChannelError;
