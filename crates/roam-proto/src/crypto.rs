//! Key agreement and proofs of key possession (PROTOCOL.md §5).
//!
//! X25519 for key agreement, HKDF-SHA256 for key derivation, HMAC-SHA256 for proofs, the
//! negotiated [`Suite`] (AES-256-GCM or ChaCha20-Poly1305) for frames and datagrams, and
//! ChaCha20-Poly1305 (RFC 8439) for images (PROTOCOL.md §3.1, §7.1). The AEADs are `ring`'s
//! (assembly with AES-NI/VAES or SIMD); the rest is from the RustCrypto / dalek crates.
//! Nothing here is hand-rolled beyond the labels and the layout.

use std::fmt;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::frame::MAC_LEN;
use crate::secure::Suite;
use crate::types::Epoch;

/// Size of an AEAD tag (both suites).
pub(crate) const TAG_LEN: usize = 16;

/// Bytes one AES-256-GCM direction key seals on a connection before the connection is replaced
/// (fresh keys): 2^36 (64 GiB), below the 2^38.5 bytes TLS 1.3 allows an AES-GCM key (RFC 8446
/// §5.5). ChaCha20-Poly1305 has no practical limit (only the 2^64 frame counter).
pub(crate) const AES_GCM_BYTES_PER_KEY: u64 = 1 << 36;

/// An AEAD key of one [`Suite`] with explicit 96-bit nonces `0u32 || counter u64`
/// (big-endian). The caller guarantees that a counter is never used twice under one key.
pub(crate) struct AeadKey(LessSafeKey);

impl AeadKey {
    pub(crate) fn new(suite: Suite, key: &[u8; 32]) -> AeadKey {
        let alg = match suite {
            Suite::ChaCha20Poly1305 => &CHACHA20_POLY1305,
            Suite::Aes256Gcm => &AES_256_GCM,
        };
        // Both algorithms take exactly a 32-byte key, so this cannot fail.
        let k = UnboundKey::new(alg, key).expect("32-byte AEAD key");
        AeadKey(LessSafeKey::new(k))
    }

    fn nonce(counter: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Encrypt `buf` in place under nonce `counter`, authenticating `aad`; the tag.
    pub(crate) fn seal(&self, counter: u64, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        // ring refuses only plaintexts beyond the per-nonce limits (64 GiB for AES-GCM, 256 GiB
        // for ChaCha20); every caller seals less than MAX_FRAME_BODY (or an image, or a
        // datagram).
        let tag = self
            .0
            .seal_in_place_separate_tag(Self::nonce(counter), Aad::from(aad), buf)
            .expect("plaintext far below the AEAD per-message limits");
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        t
    }

    /// Decrypt `buf` in place under nonce `counter`; fails, leaving `buf` unspecified, unless
    /// `tag` authenticates `aad` and the ciphertext.
    pub(crate) fn open(
        &self,
        counter: u64,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AuthFailed> {
        self.0
            .open_in_place_separate_tag(
                Self::nonce(counter),
                Aad::from(aad),
                Tag::from(*tag),
                buf,
                0..,
            )
            .map(|_| ())
            .map_err(|_| AuthFailed)
    }
}

type HmacSha256 = Hmac<Sha256>;

/// A session's current symmetric secret (32 bytes). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub(crate) [u8; 32]);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// An X25519 key pair built from caller-supplied secret bytes: a handshake's ephemeral key or
/// an endpoint's long-term identity ([`StaticKey`]). Never printed.
#[derive(Clone)]
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

/// A long-term X25519 key pair (an endpoint's identity): the same construction as an
/// ephemeral one, kept for the endpoint's life.
pub(crate) type StaticKey = Ephemeral;

/// The public half of an X25519 secret given as bytes.
pub(crate) fn public_of(secret: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(secret)).to_bytes()
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

/// The first session key: from the association's DH outputs (ephemeral-ephemeral, then any
/// static-ephemeral terms and the pre-shared key, in the order of PROTOCOL.md §5.1) and the
/// transcript.
pub(crate) fn initial_key(ikm: &[&[u8]], hello: &[u8], welcome_signed: &[u8]) -> SessionKey {
    let th = transcript_hash(&[b"roam/v1/associate", hello, welcome_signed]);
    expand(b"roam/v1/associate", &ikm.concat(), &th)
}

/// One connection's frame protection (PROTOCOL.md §3.1): a key of the session's suite per
/// direction, derived from the epoch's session key, and a frame counter per direction as the
/// nonce.
pub(crate) struct Traffic {
    tx: AeadKey,
    rx: AeadKey,
    tx_count: u64,
    rx_count: u64,
    /// Plaintext bytes this direction key may still seal (the suite's usage limit).
    pub(crate) tx_budget: u64,
}

/// This connection's send key is used up: 2^64 frames, or the suite's byte limit
/// ([`AES_GCM_BYTES_PER_KEY`]). The session replaces the connection (fresh keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CounterExhausted;

/// A sealed frame did not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AuthFailed;

impl Traffic {
    /// The `suite` keys of the connection installed at `epoch` under `key`; `dialer` is whether
    /// this side opened that connection.
    pub(crate) fn new(key: &SessionKey, epoch: Epoch, dialer: bool, suite: Suite) -> Traffic {
        let salt = epoch.0.to_be_bytes();
        let d2l = expand(&key.0, &salt, b"roam/v1/traffic dialer to listener");
        let l2d = expand(&key.0, &salt, b"roam/v1/traffic listener to dialer");
        let (tx, rx) = if dialer { (d2l, l2d) } else { (l2d, d2l) };
        Traffic {
            tx: AeadKey::new(suite, &tx.0),
            rx: AeadKey::new(suite, &rx.0),
            tx_count: 0,
            rx_count: 0,
            tx_budget: match suite {
                Suite::Aes256Gcm => AES_GCM_BYTES_PER_KEY,
                Suite::ChaCha20Poly1305 => u64::MAX,
            },
        }
    }

    /// Encrypt `buf` in place under the next send counter, authenticating `aad`; the tag.
    pub(crate) fn seal(
        &mut self,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CounterExhausted> {
        let n = self.tx_count;
        let next = n.checked_add(1).ok_or(CounterExhausted)?;
        self.tx_budget = self
            .tx_budget
            .checked_sub(buf.len() as u64)
            .ok_or(CounterExhausted)?;
        self.tx_count = next;
        Ok(self.tx.seal(n, aad, buf))
    }

    /// Decrypt `buf` in place under the next receive counter; fails (leaving the counter
    /// unchanged) unless `tag` authenticates `aad` and the ciphertext.
    pub(crate) fn open(
        &mut self,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AuthFailed> {
        let n = self.rx_count;
        let next = n.checked_add(1).ok_or(AuthFailed)?;
        self.rx.open(n, aad, buf, tag)?;
        self.rx_count = next;
        Ok(())
    }

    /// Frames sealed and opened so far on this connection.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.tx_count, self.rx_count)
    }
}

/// The single-use key of a sealed image (PROTOCOL.md §7.1).
fn seal_key(shared: &[u8; 32], eph: &[u8; 32], recipient: &[u8; 32]) -> AeadKey {
    let th = transcript_hash(&[b"roam/v1/seal", eph, recipient]);
    let k = expand(b"roam/v1/seal", shared, &th);
    AeadKey::new(Suite::ChaCha20Poly1305, &k.0)
}

/// Encrypt `buf` in place for `recipient` with the ephemeral secret `eph` (whose public half is
/// `eph_public`); `aad` is authenticated. `None` for a low-order recipient key.
pub(crate) fn seal_for(
    recipient: &[u8; 32],
    eph: [u8; 32],
    aad: &[u8],
    buf: &mut [u8],
) -> Option<[u8; TAG_LEN]> {
    let e = Ephemeral::new(eph);
    let shared = e.agree(recipient).ok()?;
    Some(seal_key(&shared, &e.public, recipient).seal(0, aad, buf))
}

/// Decrypt a buffer sealed by [`seal_for`] with the recipient's static key.
pub(crate) fn open_sealed(
    me: &StaticKey,
    eph_public: &[u8; 32],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AuthFailed> {
    let shared = me.agree(eph_public).map_err(|_| AuthFailed)?;
    seal_key(&shared, eph_public, &me.public).open(0, aad, buf, tag)
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
    let mut m = <HmacSha256 as Mac>::new_from_slice(&key.0).expect("HMAC takes any key length");
    m.update(&transcript_hash(&[label]));
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m
}

/// Constant-time equality of two tags.
pub(crate) fn ct_eq(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        let k = initial_key(&[&sa], b"hello", b"welcome");
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
    fn traffic_keys_pair_up_by_direction_and_reject_tampering_and_replay() {
        for suite in Suite::DEFAULT_PREFERENCE {
            traffic_round_trip(suite);
        }
    }

    fn traffic_round_trip(suite: Suite) {
        let k = SessionKey([3; 32]);
        let mut d = Traffic::new(&k, Epoch(4), true, suite);
        let mut l = Traffic::new(&k, Epoch(4), false, suite);
        let mut buf = *b"secret payload";
        let tag = d.seal(b"hdr", &mut buf).unwrap();
        assert_ne!(&buf, b"secret payload");
        let wire = buf;
        l.open(b"hdr", &mut buf, &tag).unwrap();
        assert_eq!(&buf, b"secret payload");
        // The same ciphertext again (a replay) is under the next counter: refused.
        let mut again = wire;
        assert_eq!(l.open(b"hdr", &mut again, &tag), Err(AuthFailed));
        // A flipped bit, or other associated data, is refused; the counter does not move.
        let mut buf2 = *b"second";
        let tag2 = d.seal(b"hdr", &mut buf2).unwrap();
        let mut bad = buf2;
        bad[0] ^= 1;
        assert_eq!(l.open(b"hdr", &mut bad, &tag2), Err(AuthFailed));
        assert_eq!(l.open(b"hdX", &mut buf2.clone(), &tag2), Err(AuthFailed));
        l.open(b"hdr", &mut buf2, &tag2).unwrap();
        assert_eq!(&buf2, b"second");
        // Another epoch gives other keys.
        let mut other = Traffic::new(&k, Epoch(5), false, suite);
        let mut b3 = *b"x";
        let t3 = d.seal(b"", &mut b3).unwrap();
        assert_eq!(other.open(b"", &mut b3, &t3), Err(AuthFailed));
    }

    #[test]
    fn suites_do_not_open_each_others_frames() {
        let k = SessionKey([3; 32]);
        let mut aes = Traffic::new(&k, Epoch(0), true, Suite::Aes256Gcm);
        let mut chacha = Traffic::new(&k, Epoch(0), false, Suite::ChaCha20Poly1305);
        let mut buf = *b"payload";
        let tag = aes.seal(b"", &mut buf).unwrap();
        assert_eq!(chacha.open(b"", &mut buf, &tag), Err(AuthFailed));
    }

    #[test]
    fn an_aes_gcm_key_stops_sealing_at_its_byte_limit() {
        let k = SessionKey([3; 32]);
        let mut t = Traffic::new(&k, Epoch(0), true, Suite::Aes256Gcm);
        t.tx_budget = 10;
        t.seal(b"", &mut [0u8; 6]).unwrap();
        assert_eq!(t.seal(b"", &mut [0u8; 5]), Err(CounterExhausted));
        assert_eq!(t.counts().0, 1, "a refused seal uses no counter");
        t.seal(b"", &mut [0u8; 4]).unwrap();
        let c = Traffic::new(&k, Epoch(0), true, Suite::ChaCha20Poly1305);
        assert_eq!(c.tx_budget, u64::MAX);
    }

    #[test]
    fn sealed_buffers_open_only_for_the_recipient() {
        let r = StaticKey::new([9; 32]);
        let other = StaticKey::new([10; 32]);
        let eph = [11; 32];
        let eph_pub = public_of(eph);
        let mut buf = *b"image bytes";
        let tag = seal_for(&r.public, eph, b"aad", &mut buf).unwrap();
        let mut copy = buf;
        assert_eq!(
            open_sealed(&other, &eph_pub, b"aad", &mut copy, &tag),
            Err(AuthFailed)
        );
        open_sealed(&r, &eph_pub, b"aad", &mut buf, &tag).unwrap();
        assert_eq!(&buf, b"image bytes");
        assert!(seal_for(&[0; 32], eph, b"", &mut [0u8; 4]).is_none());
    }

    #[test]
    fn low_order_peer_keys_are_refused() {
        let a = Ephemeral::new([1; 32]);
        assert_eq!(a.agree(&[0; 32]), Err(NonContributory));
    }
}
