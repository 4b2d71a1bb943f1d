//! Test support for roam: fault-injecting TCP and UDP relays.
//!
//! [`Relay`] sits between a client and a target address and forwards every
//! accepted TCP connection to the target, while letting a test inject faults
//! at the connection level: abrupt resets ([`Relay::kill_all`],
//! [`Relay::kill_after_bytes`]), an unreachable target ([`Relay::set_refuse`])
//! a silent network ([`Relay::set_blackhole`]), pauses ([`Relay::stall`]) and seeded random
//! resets, stalls and bandwidth limits ([`TcpFaults`]). The idea follows smoltcp's
//! `phy/fault_injector.rs`, lifted from packets to TCP connections.
//!
//! [`UdpRelay`] is the datagram counterpart, closer still to smoltcp's fault
//! injector: it relays UDP datagrams between real sockets (one upstream socket
//! per client) and drops, corrupts, duplicates, reorders and delays them as set
//! by seeded, reproducible [`Faults`].
//!
//! [`Mitm`] is an in-path attacker for security tests: a TCP relay that records every byte and
//! frame and lets a hook drop, duplicate (replay) or replace (modify) each roam frame, and
//! injects bytes on demand.
//!
//! All background tasks are bounded: they end when the relay is shut down or
//! dropped, so a test never leaks a task that spins forever.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod mitm;
mod relay;
mod udp;

pub use mitm::{Dir, FrameEvent, Mitm, Verdict};
pub use relay::{Relay, RelayStats, TcpFaults};
pub use udp::{
    AttackAction, AttackDir, AttackPolicy, Faults, UdpAttacker, UdpDirectionStats, UdpRelay,
    UdpRelayStats,
};
