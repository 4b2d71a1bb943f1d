//! Test support for roam: a fault-injecting TCP relay.
//!
//! [`Relay`] sits between a client and a target address and forwards every
//! accepted TCP connection to the target, while letting a test inject faults
//! at the connection level: abrupt resets ([`Relay::kill_all`],
//! [`Relay::kill_after_bytes`]), an unreachable target ([`Relay::set_refuse`])
//! and a silent network ([`Relay::set_blackhole`]). The idea follows smoltcp's
//! `phy/fault_injector.rs`, lifted from packets to TCP connections.
//!
//! All background tasks are bounded: they end when the relay is shut down or
//! dropped, so a test never leaks a task that spins forever.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod relay;

pub use relay::{Relay, RelayStats};
