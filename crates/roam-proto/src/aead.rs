//! Authenticated encryption of datagram-socket `Data` packets (PROTOCOL.md §10.3): per-direction
//! ChaCha20-Poly1305 keys derived from the association key, nonces from a per-direction packet
//! counter carried in the packet, and the sliding window of counters received.
//!
//! The primitives are RustCrypto's (`chacha20poly1305`, `hkdf`, `sha2`); this file only names
//! the labels and the layout.

use bytes::{BufMut, Bytes, BytesMut};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::crypto::SessionKey;
use crate::types::SocketId;

/// Length of a Poly1305 tag.
pub(crate) const TAG_LEN: usize = 16;

const LABEL_DATA_KEY: &[u8] = b"roam/v1/dgram-data";

/// The key `sender` encrypts its `Data` packets with on an association keyed `key`:
/// `HKDF-SHA256(salt = "roam/v1/dgram-data", ikm = key, info = "roam/v1/dgram-data" | sender)`.
/// The two ends' socket ids differ, so the two directions have different keys.
pub(crate) fn data_cipher(key: &SessionKey, sender: SocketId) -> ChaCha20Poly1305 {
    let hk = Hkdf::<Sha256>::new(Some(LABEL_DATA_KEY), &key.0);
    let mut okm = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 255*32 limit, so expand cannot fail.
    hk.expand_multi_info(&[LABEL_DATA_KEY, &sender.0], &mut okm)
        .expect("32-byte HKDF output");
    ChaCha20Poly1305::new(Key::from_slice(&okm))
}

/// The 96-bit nonce of packet number `counter`: four zero bytes, then the counter big-endian.
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    *Nonce::from_slice(&n)
}

/// `header | ChaCha20-Poly1305(payload) | tag`, the header being the associated data.
pub(crate) fn seal(
    cipher: &ChaCha20Poly1305,
    counter: u64,
    header: &[u8],
    payload: &[u8],
) -> Bytes {
    let mut b = BytesMut::with_capacity(header.len() + payload.len() + TAG_LEN);
    b.put_slice(header);
    b.put_slice(payload);
    let (head, body) = b.split_at_mut(header.len());
    // Encryption fails only for messages above ChaCha20's 256 GiB limit; datagrams are < 64 KiB.
    let tag = cipher
        .encrypt_in_place_detached(&nonce(counter), head, body)
        .expect("a datagram is far below the ChaCha20 limit");
    b.put_slice(&tag);
    b.freeze()
}

/// The payload of `sealed` (ciphertext and tag) if it authenticates under `cipher`, `counter`
/// and `header`; `None` if anything was altered.
pub(crate) fn open(
    cipher: &ChaCha20Poly1305,
    counter: u64,
    header: &[u8],
    sealed: &[u8],
) -> Option<Bytes> {
    let split = sealed.len().checked_sub(TAG_LEN)?;
    let (ct, tag) = sealed.split_at(split);
    let mut buf = BytesMut::from(ct);
    cipher
        .decrypt_in_place_detached(&nonce(counter), header, &mut buf, Tag::from_slice(tag))
        .ok()?;
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
        let tx = data_cipher(&k, a);
        let header = [0x42, 1, 2, 3];
        let p = seal(&tx, 5, &header, b"secret payload");
        assert!(!p.windows(6).any(|w| w == b"secret"), "not in clear");
        let sealed = &p[header.len()..];
        assert_eq!(
            open(&data_cipher(&k, a), 5, &header, sealed).as_deref(),
            Some(&b"secret payload"[..])
        );
        // The other direction's key, another counter, another header, a flipped bit: refused.
        assert!(open(&data_cipher(&k, b), 5, &header, sealed).is_none());
        assert!(open(&tx, 6, &header, sealed).is_none());
        assert!(open(&tx, 5, &[0x42, 1, 2, 4], sealed).is_none());
        for i in 0..sealed.len() {
            let mut v = sealed.to_vec();
            v[i] ^= 1;
            assert!(open(&tx, 5, &header, &v).is_none());
        }
        assert!(open(&tx, 5, &header, &sealed[..TAG_LEN - 1]).is_none());
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
