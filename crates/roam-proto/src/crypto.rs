//! Key agreement and proofs of key possession (PROTOCOL.md §5).
//!
//! X25519 for key agreement, HKDF-SHA256 for key derivation, HMAC-SHA256 for proofs. All from
//! the RustCrypto / dalek crates; nothing here is hand-rolled beyond the labels.

use std::fmt;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::frame::MAC_LEN;

type HmacSha256 = Hmac<Sha256>;

/// A session's current symmetric secret (32 bytes). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub(crate) [u8; 32]);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// An ephemeral X25519 key pair built from caller-supplied secret bytes.
pub(crate) struct Ephemeral {
    secret: StaticSecret,
    /// The public half, sent to the peer.
    pub public: [u8; 32],
}

/// The peer's public key gave an all-zero shared secret (a low-order point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NonContributory;

impl Ephemeral {
    pub(crate) fn new(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret).to_bytes();
        Ephemeral { secret, public }
    }

    pub(crate) fn agree(&self, peer: &[u8; 32]) -> Result<[u8; 32], NonContributory> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if shared.was_contributory() {
            Ok(shared.to_bytes())
        } else {
            Err(NonContributory)
        }
    }
}

fn transcript_hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

fn expand(salt: &[u8], ikm: &[u8], info: &[u8]) -> SessionKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut okm = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 255*32 limit, so expand cannot fail.
    hk.expand(info, &mut okm).expect("32-byte HKDF output");
    SessionKey(okm)
}

/// The first session key: from the association's DH output and transcript (PROTOCOL.md §5.1).
pub(crate) fn initial_key(shared: &[u8; 32], hello: &[u8], welcome_signed: &[u8]) -> SessionKey {
    let th = transcript_hash(&[b"roam/v1/associate", hello, welcome_signed]);
    expand(b"roam/v1/associate", shared, &th)
}

/// An association key for datagram sockets (PROTOCOL.md §10.2), and the 64-bit association id
/// both sides derive from it.
pub(crate) fn datagram_key(
    shared: &[u8; 32],
    hello: &[u8],
    welcome_signed: &[u8],
) -> (SessionKey, u64) {
    let th = transcript_hash(&[b"roam/v1/datagram", hello, welcome_signed]);
    let key = expand(b"roam/v1/datagram", shared, &th);
    let id = expand(&key.0, b"", b"roam/v1/association-id");
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    (key, u64::from_be_bytes(b))
}

/// The next epoch's key: the old key ratcheted with a fresh DH output (PROTOCOL.md §5.2).
///
/// A copy of an old image holds the old key but not the fresh DH secret, so it cannot follow.
pub(crate) fn ratchet(
    prev: &SessionKey,
    shared: &[u8; 32],
    reassoc_signed: &[u8],
    accept_signed: &[u8],
) -> SessionKey {
    let th = transcript_hash(&[b"roam/v1/ratchet", reassoc_signed, accept_signed]);
    expand(&prev.0, shared, &th)
}

/// HMAC-SHA256 under `key` over a label and the given parts.
pub(crate) fn mac(key: &SessionKey, label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    keyed(key, label, parts).finalize().into_bytes().into()
}

/// Constant-time check of a tag made by [`mac`].
pub(crate) fn verify(key: &SessionKey, label: &[u8], parts: &[&[u8]], tag: &[u8; MAC_LEN]) -> bool {
    keyed(key, label, parts).verify_slice(tag).is_ok()
}

fn keyed(key: &SessionKey, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut m = HmacSha256::new_from_slice(&key.0).expect("HMAC takes any key length");
    m.update(&transcript_hash(&[label]));
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m
}

/// SHA-256 of `data`; used for image integrity.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_macs_verify_only_under_the_right_key() {
        let a = Ephemeral::new([1; 32]);
        let b = Ephemeral::new([2; 32]);
        let sa = a.agree(&b.public).unwrap();
        let sb = b.agree(&a.public).unwrap();
        assert_eq!(sa, sb);
        let k = initial_key(&sa, b"hello", b"welcome");
        let k2 = ratchet(&k, &sa, b"r", b"a");
        assert_ne!(k, k2);
        let tag = mac(&k, b"label", &[b"x", b"y"]);
        assert!(verify(&k, b"label", &[b"x", b"y"], &tag));
        assert!(!verify(&k2, b"label", &[b"x", b"y"], &tag));
        assert!(!verify(&k, b"other", &[b"x", b"y"], &tag));
        // Part boundaries are bound into the MAC.
        assert!(!verify(&k, b"label", &[b"xy"], &tag));
    }

    #[test]
    fn low_order_peer_keys_are_refused() {
        let a = Ephemeral::new([1; 32]);
        assert_eq!(a.agree(&[0; 32]), Err(NonContributory));
    }
}
