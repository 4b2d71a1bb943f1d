//! Newtypes for the protocol's identifiers and counters (PROTOCOL.md §2).

use std::fmt;

macro_rules! hex_id {
    ($(#[$m:meta])* $name:ident, $len:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }
    };
}

hex_id!(
    /// A session's identifier: chosen by the listener at association, the same at both ends, and
    /// kept for the session's whole life across migrations (PROTOCOL.md §2, claims 3, 15).
    SessionId,
    16
);

hex_id!(
    /// A datagram socket's identifier: random at bind, kept across migrations
    /// (PROTOCOL.md §10.1).
    SocketId,
    16
);

hex_id!(
    /// An endpoint's identifier: random per endpoint, the "host identity" half of the patent's
    /// object reference (PROTOCOL.md §2).
    EndpointId,
    16
);

/// The number of completed re-associations of a session; strictly increasing (PROTOCOL.md §5).
///
/// Both ends agree on it; a re-association must name the current epoch, so an image frozen at an
/// older epoch cannot be thawed a second time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0.wrapping_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A byte offset in one direction of a stream: the number of bytes before it (PROTOCOL.md §4).
///
/// Offsets are 64-bit and never wrap in practice (2^64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Offset(pub u64);

impl Offset {
    /// This offset advanced by `n` bytes.
    pub fn plus(self, n: u64) -> Offset {
        Offset(self.0.saturating_add(n))
    }

    /// Bytes from `earlier` to this offset (0 if `earlier` is later).
    pub fn since(self, earlier: Offset) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A driver-assigned name for one transport connection (one TCP stream) a session uses.
///
/// The core never opens connections; it only tells them apart, so frames from a replaced
/// connection are ignored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ConnId(pub u64);

/// Random bytes the caller supplies for one handshake: an X25519 secret and a nonce.
///
/// The core draws no randomness of its own; drivers fill this from a CSPRNG, tests from a
/// seeded generator.
#[derive(Clone)]
pub struct Entropy {
    /// Secret scalar bytes for an ephemeral X25519 key.
    pub secret: [u8; 32],
    /// A fresh nonce mixed into the handshake transcript.
    pub nonce: [u8; 16],
}

impl fmt::Debug for Entropy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Entropy(..)")
    }
}
