//! Peer identity and session protection settings (PROTOCOL.md §5.1, §3.1).
//!
//! By default every session is encrypted and authenticated (an AEAD [`Suite`] on every frame
//! after the handshake: AES-256-GCM when both ends offer it, else ChaCha20-Poly1305) and the
//! first association is **trust-on-first-use**: it authenticates neither endpoint. An endpoint can be given a static X25519 [`Identity`] and a
//! [`PeerPolicy`] that pins the peers' public keys or mixes in a pre-shared key.

use std::fmt;

use crate::crypto::{public_of, StaticKey};

/// An AEAD cipher suite protecting frames (PROTOCOL.md §3.1) and datagrams (§10.3). Both are
/// `ring`'s implementations; keys are 32 bytes and nonces 96 bits with a 16-byte tag in both.
///
/// The dialer (or datagram initiator) offers its preference list, the acceptor chooses the
/// first one it also supports; the offer and the choice are covered by the handshake's
/// transcript (§5.1, §10.2), and images carry the chosen suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// ChaCha20-Poly1305 (RFC 8439), code 1: fast everywhere, in software; the only suite of
    /// peers and images from before negotiation existed.
    ChaCha20Poly1305,
    /// AES-256-GCM, code 2: several times faster on CPUs with AES and carry-less multiply
    /// instructions (x86 AES-NI/VAES, ARMv8 crypto extensions), slow without them.
    Aes256Gcm,
}

impl Suite {
    /// The default preference: AES-256-GCM first (what TLS 1.3 picks on such CPUs too), then
    /// ChaCha20-Poly1305. Put ChaCha20-Poly1305 first on CPUs without AES instructions.
    pub const DEFAULT_PREFERENCE: [Suite; 2] = [Suite::Aes256Gcm, Suite::ChaCha20Poly1305];

    /// The suite's code on the wire and in images.
    pub fn code(self) -> u8 {
        match self {
            Suite::ChaCha20Poly1305 => 1,
            Suite::Aes256Gcm => 2,
        }
    }

    /// The suite with this code, if this version knows it.
    pub fn from_code(code: u8) -> Option<Suite> {
        match code {
            1 => Some(Suite::ChaCha20Poly1305),
            2 => Some(Suite::Aes256Gcm),
            _ => None,
        }
    }

    /// The suite's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Suite::ChaCha20Poly1305 => "ChaCha20-Poly1305",
            Suite::Aes256Gcm => "AES-256-GCM",
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The suite an acceptor chooses (PROTOCOL.md §5.1, §10.2): the first code `offered` (the
/// dialer's preference order; codes this version does not know are skipped) that `supported`
/// also holds. An empty offer is a peer from before negotiation: ChaCha20-Poly1305, if
/// supported. `None` when there is no suite in common.
pub(crate) fn choose_suite(offered: &[u8], supported: &[Suite]) -> Option<Suite> {
    if offered.is_empty() {
        return supported
            .contains(&Suite::ChaCha20Poly1305)
            .then_some(Suite::ChaCha20Poly1305);
    }
    offered
        .iter()
        .filter_map(|&c| Suite::from_code(c))
        .find(|s| supported.contains(s))
}

/// `suites` as offered on the wire: its codes, without repeats, or the default preference's
/// if empty.
pub(crate) fn offer_codes(suites: &[Suite]) -> Vec<u8> {
    let list: &[Suite] = if suites.is_empty() {
        &Suite::DEFAULT_PREFERENCE
    } else {
        suites
    };
    let mut codes: Vec<u8> = Vec::with_capacity(list.len());
    for s in list {
        if !codes.contains(&s.code()) {
            codes.push(s.code());
        }
    }
    codes
}

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
#[derive(Clone, Debug)]
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
    /// The AEAD suites this endpoint accepts, most preferred first (PROTOCOL.md §3.1, §5.1):
    /// offered in this order when dialing, and the first of the dialer's offer found here is
    /// chosen when accepting. Empty means [`Suite::DEFAULT_PREFERENCE`]. Default: that
    /// preference (AES-256-GCM, then ChaCha20-Poly1305). Sessions thawed from an image keep
    /// the image's suite.
    pub suites: Vec<Suite>,
}

impl Default for Security {
    fn default() -> Security {
        Security {
            identity: None,
            policy: PeerPolicy::default(),
            insecure_plaintext: false,
            suites: Suite::DEFAULT_PREFERENCE.to_vec(),
        }
    }
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

    /// These settings with `suites` as the accepted AEAD suites, most preferred first (see
    /// [`Security::suites`]).
    pub fn with_suites(mut self, suites: impl Into<Vec<Suite>>) -> Security {
        self.suites = suites.into();
        self
    }

    /// The suites accepted, most preferred first (the default preference if none is set).
    pub(crate) fn suite_list(&self) -> &[Suite] {
        if self.suites.is_empty() {
            &Suite::DEFAULT_PREFERENCE
        } else {
            &self.suites
        }
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
