//! Peer identity and session protection settings (PROTOCOL.md §5.1, §3.1).
//!
//! By default every session is encrypted and authenticated (ChaCha20-Poly1305 on every frame
//! after the handshake) and the first association is **trust-on-first-use**: it authenticates
//! neither endpoint. An endpoint can be given a static X25519 [`Identity`] and a
//! [`PeerPolicy`] that pins the peers' public keys or mixes in a pre-shared key.

use std::fmt;

use crate::crypto::{public_of, StaticKey};

/// An endpoint's static X25519 public key: what a peer pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// An endpoint's static X25519 key pair. The secret is never printed.
#[derive(Clone)]
pub struct Identity {
    pub(crate) key: StaticKey,
}

impl Identity {
    /// The identity whose secret scalar is `secret` (32 random bytes from a CSPRNG; store them
    /// like any private key). Deterministic: the same bytes give the same identity.
    pub fn from_secret_bytes(secret: [u8; 32]) -> Identity {
        Identity {
            key: StaticKey::new(secret),
        }
    }

    /// The public half, for peers to pin.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.key.public)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public_key())
    }
}

/// A 32-byte pre-shared key. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PreSharedKey(pub [u8; 32]);

impl fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PreSharedKey(..)")
    }
}

/// Which peers an endpoint associates with (PROTOCOL.md §5.1).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum PeerPolicy {
    /// Accept any peer: the first association authenticates nobody (trust-on-first-use);
    /// every later re-association is bound to that first association's keys. The default.
    #[default]
    TrustOnFirstUse,
    /// Accept only peers that present one of these static public keys and prove they hold
    /// its secret. This endpoint needs an [`Identity`] only if its peers pin it in turn.
    Pinned(Vec<PublicKey>),
    /// Accept only peers that hold the same pre-shared key; it is mixed into the session key.
    PreShared(PreSharedKey),
}

/// The protection settings of one endpoint's sessions.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Security {
    /// This endpoint's static key pair, presented and proven in every association it makes.
    pub identity: Option<Identity>,
    /// Which peers to accept.
    pub policy: PeerPolicy,
    /// **Insecure.** Send frames in plaintext, with no encryption and no integrity: anyone on
    /// the path can read and alter the stream. For benchmarks and debugging only. Both ends
    /// must agree (a mismatch is refused). Default `false`.
    pub insecure_plaintext: bool,
}

impl Security {
    /// Secure defaults: encrypted, trust-on-first-use, no identity.
    pub fn new() -> Security {
        Security::default()
    }

    /// These settings with `identity`.
    pub fn with_identity(mut self, identity: Identity) -> Security {
        self.identity = Some(identity);
        self
    }

    /// These settings with `policy`.
    pub fn with_policy(mut self, policy: PeerPolicy) -> Security {
        self.policy = policy;
        self
    }

    /// These settings with plaintext frames (see [`Security::insecure_plaintext`]).
    pub fn with_insecure_plaintext(mut self, insecure: bool) -> Security {
        self.insecure_plaintext = insecure;
        self
    }

    pub(crate) fn psk(&self) -> Option<&[u8; 32]> {
        match &self.policy {
            PeerPolicy::PreShared(k) => Some(&k.0),
            _ => None,
        }
    }

    /// Whether a peer presenting `key` (or none) is acceptable.
    pub(crate) fn admits(&self, key: Option<&PublicKey>) -> bool {
        match &self.policy {
            PeerPolicy::Pinned(set) => key.is_some_and(|k| set.contains(k)),
            PeerPolicy::TrustOnFirstUse | PeerPolicy::PreShared(_) => true,
        }
    }
}

/// The public key for a secret (for tests and tools).
pub fn public_key_of(secret: [u8; 32]) -> PublicKey {
    PublicKey(public_of(secret))
}
