//! Authenticated encryption of datagram-socket `Data` packets (PROTOCOL.md §10.3): per-direction
//! keys of the association's suite (AES-256-GCM or ChaCha20-Poly1305) derived from its key, nonces from a per-direction packet
//! counter carried in the packet, and the sliding window of counters received.
//!
//! The primitives are `ring`'s AEADs ([`AeadKey`]) and RustCrypto's `hkdf` and
//! `sha2`; this file only names the labels and the layout.

use bytes::{BufMut, Bytes, BytesMut};
use hkdf::Hkdf;
use sha2::Sha256;

pub(crate) use crate::crypto::TAG_LEN;
use crate::crypto::{AeadKey, SessionKey};
use crate::secure::Suite;
use crate::types::SocketId;

/// Packets are sealed into slices of one block of this size (a new block when the rest is too
/// small), so sending allocates once per block rather than once per packet.
const SEAL_BLOCK: usize = 64 * 1024;

const LABEL_DATA_KEY: &[u8] = b"roam/v1/dgram-data";

/// The `suite` key `sender` encrypts its `Data` packets with on an association keyed `key`:
/// `HKDF-SHA256(salt = "roam/v1/dgram-data", ikm = key, info = "roam/v1/dgram-data" | sender)`.
/// The two ends' socket ids differ, so the two directions have different keys.
pub(crate) fn data_cipher(suite: Suite, key: &SessionKey, sender: SocketId) -> AeadKey {
    let hk = Hkdf::<Sha256>::new(Some(LABEL_DATA_KEY), &key.0);
    let mut okm = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 255*32 limit, so expand cannot fail.
    hk.expand_multi_info(&[LABEL_DATA_KEY, &sender.0], &mut okm)
        .expect("32-byte HKDF output");
    AeadKey::new(suite, &okm)
}

/// `header | AEAD(payload) | tag`, the header being the associated data and the
/// nonce four zero bytes then `counter` big-endian. The packet is cut from `block`.
pub(crate) fn seal(
    cipher: &AeadKey,
    counter: u64,
    header: &[u8],
    payload: &[u8],
    block: &mut BytesMut,
) -> Bytes {
    let len = header.len() + payload.len() + TAG_LEN;
    if block.capacity() < len {
        // Reuses the block's allocation if every packet cut from it is gone.
        block.reserve(len.max(SEAL_BLOCK));
    }
    block.put_slice(header);
    block.put_slice(payload);
    let tag = cipher.seal(counter, header, &mut block[header.len()..]);
    block.put_slice(&tag);
    block.split().freeze()
}

/// The payload of `sealed` (ciphertext and tag) if it authenticates under `cipher`, `counter`
/// and `header`; `None` if anything was altered. Decrypts in place when `sealed` is the only
/// reference to its bytes (as a received packet is), else in a copy.
pub(crate) fn open(cipher: &AeadKey, counter: u64, header: &[u8], sealed: Bytes) -> Option<Bytes> {
    let split = sealed.len().checked_sub(TAG_LEN)?;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&sealed[split..]);
    let mut buf = sealed
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    buf.truncate(split);
    cipher.open(counter, header, &mut buf, &tag).ok()?;
    Some(buf.freeze())
}

/// Counters at most this far below the highest received are still accepted once.
pub const REPLAY_WINDOW: u64 = 1024;
/// Words of the window's ring: one more than the window spans, so the words covering
/// `[highest - REPLAY_WINDOW + 1, highest]` are all distinct.
pub(crate) const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize + 1;

/// The packet counters received on one association (as IPsec's and WireGuard's anti-replay
/// windows): a counter is accepted once, if it is above the highest seen or at most
/// [`REPLAY_WINDOW`] below it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ReplayWindow {
    /// The highest counter accepted plus one; 0 when none was.
    pub(crate) next: u64,
    /// Bit `c % 64` of word `(c / 64) % WINDOW_WORDS` is set when counter `c` was accepted.
    pub(crate) bits: [u64; WINDOW_WORDS],
}

impl ReplayWindow {
    /// Whether `counter` may be new: above the window's top, or inside it and not yet seen.
    /// Checked before the (costlier) decryption; [`ReplayWindow::mark`] after it succeeded.
    pub(crate) fn fresh(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > REPLAY_WINDOW {
            return false;
        }
        let (w, b) = Self::slot(counter);
        self.bits[w] & (1 << b) == 0
    }

    /// Record `counter` as received (it passed [`ReplayWindow::fresh`] and authenticated).
    pub(crate) fn mark(&mut self, counter: u64) {
        if counter >= self.next {
            // Clear the words the window slides over (all of them after a long jump).
            let to = counter / 64;
            if self.next == 0 {
                self.bits = [0; WINDOW_WORDS];
            } else {
                // Words above the one holding the highest counter so far.
                let from = (self.next - 1) / 64 + 1;
                if to >= from && to - from >= WINDOW_WORDS as u64 {
                    self.bits = [0; WINDOW_WORDS];
                } else {
                    for w in from..=to {
                        self.bits[(w % WINDOW_WORDS as u64) as usize] = 0;
                    }
                }
            }
            self.next = counter + 1;
        }
        let (w, b) = Self::slot(counter);
        self.bits[w] |= 1 << b;
    }

    fn slot(counter: u64) -> (usize, u64) {
        (
            ((counter / 64) % WINDOW_WORDS as u64) as usize,
            counter % 64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_unaltered_under_the_senders_key() {
        let k = SessionKey([7; 32]);
        let (a, b) = (SocketId([1; 16]), SocketId([2; 16]));
        let tx = data_cipher(Suite::ChaCha20Poly1305, &k, a);
        let header = [0x42, 1, 2, 3];
        let mut block = BytesMut::new();
        let p = seal(&tx, 5, &header, b"secret payload", &mut block);
        assert!(!p.windows(6).any(|w| w == b"secret"), "not in clear");
        let sealed = p.slice(header.len()..);
        assert_eq!(
            open(
                &data_cipher(Suite::ChaCha20Poly1305, &k, a),
                5,
                &header,
                sealed.clone()
            )
            .as_deref(),
            Some(&b"secret payload"[..])
        );
        // A uniquely owned packet is opened in place.
        let unique = Bytes::from(sealed.to_vec());
        assert_eq!(
            open(&tx, 5, &header, unique).as_deref(),
            Some(&b"secret payload"[..])
        );
        // The other direction's key, another counter, another header, a flipped bit: refused.
        assert!(open(
            &data_cipher(Suite::ChaCha20Poly1305, &k, b),
            5,
            &header,
            sealed.clone()
        )
        .is_none());
        // The other suite's key from the same secret: refused.
        assert!(open(
            &data_cipher(Suite::Aes256Gcm, &k, a),
            5,
            &header,
            sealed.clone()
        )
        .is_none());
        assert!(open(&tx, 6, &header, sealed.clone()).is_none());
        assert!(open(&tx, 5, &[0x42, 1, 2, 4], sealed.clone()).is_none());
        for i in 0..sealed.len() {
            let mut v = sealed.to_vec();
            v[i] ^= 1;
            assert!(open(&tx, 5, &header, v.into()).is_none());
        }
        assert!(open(&tx, 5, &header, sealed.slice(..TAG_LEN - 1)).is_none());
        // Packets cut from one block stay intact while later ones are sealed.
        let q = seal(&tx, 6, &header, b"second", &mut block);
        assert_eq!(
            open(&tx, 6, &header, q.slice(header.len()..)).as_deref(),
            Some(&b"second"[..])
        );
        assert_eq!(
            open(&tx, 5, &header, p.slice(header.len()..)).as_deref(),
            Some(&b"secret payload"[..])
        );
    }

    #[test]
    fn replay_window_accepts_each_counter_once_within_its_width() {
        let mut w = ReplayWindow::default();
        let take = |w: &mut ReplayWindow, c: u64| {
            let ok = w.fresh(c);
            if ok {
                w.mark(c);
            }
            ok
        };
        assert!(take(&mut w, 0));
        assert!(!take(&mut w, 0));
        assert!(take(&mut w, 5));
        assert!(take(&mut w, 3), "reordered, inside the window");
        assert!(!take(&mut w, 3));
        assert!(take(&mut w, 2000));
        assert!(!take(&mut w, 5), "fell out of the window");
        assert!(
            take(&mut w, 2000 - REPLAY_WINDOW + 1),
            "oldest still inside"
        );
        assert!(!take(&mut w, 2000 - REPLAY_WINDOW), "just outside");
        // Sliding by less than the ring keeps what is still inside.
        assert!(take(&mut w, 2100));
        assert!(!take(&mut w, 2000));
        assert!(take(&mut w, 1999));
        // A long jump clears everything.
        assert!(take(&mut w, 1 << 40));
        assert!(!take(&mut w, 2100));
        assert!(take(&mut w, (1 << 40) - 1));
        // Every counter of a long run, each once, in a shuffled-ish order.
        let mut w = ReplayWindow::default();
        for base in (0..50_000u64).step_by(100) {
            for i in (0..100).rev() {
                assert!(take(&mut w, base + i));
            }
            for i in 0..100 {
                assert!(!take(&mut w, base + i));
            }
        }
    }
}
