//! Migration images: a frozen session encoded for the trip to a new host (PROTOCOL.md §7).
//!
//! Layout: `"ROAMIMG\0" | version: u16 | body length: u32 | body | SHA-256 of all before`.
//! Decoding checks the magic, the version, the exact length, the digest, every field, and the
//! consistency of the offsets, in that order; any failure is a typed [`ImageError`].
//!
//! A **sealed** image ([`StreamImage::seal_with`], PROTOCOL.md §7.1) is encrypted and
//! authenticated for one recipient's static key: `"ROAMSEAL" | version u16 | recipient [32] |
//! ephemeral [32] | ChaCha20-Poly1305(image) | tag [16]`.

use bytes::{BufMut, Bytes};

use crate::codec::{DecodeError, Reader, WriteExt};
use crate::crypto::{self, SessionKey};
use crate::secure::{Identity, PublicKey, Suite};
use crate::session::{LocalInfo, PeerInfo, Stats};
use crate::types::{EndpointId, Entropy, Epoch, Offset, SessionId};

/// First bytes of every image.
pub const IMAGE_MAGIC: [u8; 8] = *b"ROAMIMG\0";
/// The image format version this crate writes (3: the session's AEAD suite). Version 2 images
/// (no suite: ChaCha20-Poly1305) are still read.
pub const IMAGE_VERSION: u16 = 3;
/// The oldest image format version this crate reads.
pub const IMAGE_VERSION_MIN: u16 = 2;
/// First bytes of every sealed image.
pub const SEALED_MAGIC: [u8; 8] = *b"ROAMSEAL";
/// The sealed-image format version.
pub const SEALED_VERSION: u16 = 1;
/// Bytes of a sealed image before its ciphertext: magic, version, recipient, ephemeral key.
const SEALED_HEADER_LEN: usize = 8 + 2 + 32 + 32;
const DIGEST_LEN: usize = 32;
const PREFIX_LEN: usize = 8 + 2 + 4;

/// Why bytes are not a usable image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Shorter than the fixed header and digest, or shorter than the length it declares.
    #[error("image truncated")]
    Truncated,
    /// Does not start with the image magic: not a roam image.
    #[error("not a roam stream image")]
    Foreign,
    /// Written by a different format version.
    #[error("unsupported image version {0}")]
    UnsupportedVersion(u16),
    /// Longer than the length it declares.
    #[error("{0} unexpected bytes after the image")]
    Trailing(usize),
    /// The digest does not match: the image was altered or damaged.
    #[error("image integrity check failed (corrupted)")]
    Corrupt,
    /// A field could not be decoded.
    #[error("malformed image: {0}")]
    Malformed(#[from] DecodeError),
    /// The fields contradict each other.
    #[error("inconsistent image: {0}")]
    Inconsistent(&'static str),
    /// A sealed image: open it with [`StreamImage::open_sealed`] (the recipient's identity).
    #[error("sealed image: thaw it with the recipient's identity")]
    Sealed,
    /// A sealed image addressed to another identity.
    #[error("sealed image is for another recipient ({0})")]
    WrongRecipient(PublicKey),
    /// A sealed image that failed authentication: altered, or sealed under another key.
    #[error("sealed image failed authentication (tampered)")]
    Tampered,
    /// No identity to open a sealed image with.
    #[error("no identity configured to open a sealed image")]
    NoIdentity,
    /// The image names an AEAD suite this version does not know (it came from a newer one).
    #[error("image uses unknown cipher suite {0}")]
    UnknownSuite(u8),
}

/// A frozen stream's complete state: identity, keys, peer, sequence numbers, the
/// synchronization buffer (received, unread) and the retention buffer (written, unacknowledged).
///
/// It carries the session secret: treat it like a key. It can be thawed once; the peer refuses
/// a second thaw of the same image (PROTOCOL.md §5.3).
#[derive(Clone, PartialEq, Eq)]
pub struct StreamImage {
    pub(crate) session: SessionId,
    pub(crate) epoch: Epoch,
    pub(crate) key: SessionKey,
    pub(crate) secure: bool,
    pub(crate) suite: Suite,
    pub(crate) peer_identity: Option<PublicKey>,
    pub(crate) local: LocalInfo,
    pub(crate) peer: PeerInfo,
    pub(crate) tx_acked: Offset,
    pub(crate) tx_data: Bytes,
    pub(crate) fin: Option<Offset>,
    pub(crate) peer_limit: Offset,
    pub(crate) rx_recv: Offset,
    pub(crate) rx_data: Bytes,
    pub(crate) peer_fin: Option<Offset>,
    pub(crate) stats: Stats,
}

impl std::fmt::Debug for StreamImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamImage")
            .field("session", &self.session)
            .field("epoch", &self.epoch)
            .field("peer", &self.peer)
            .field("tx_acked", &self.tx_acked)
            .field("tx_data", &self.tx_data.len())
            .field("rx_recv", &self.rx_recv)
            .field("rx_data", &self.rx_data.len())
            .finish_non_exhaustive()
    }
}

impl StreamImage {
    /// The session id.
    pub fn session_id(&self) -> SessionId {
        self.session
    }

    /// The epoch the image was frozen at.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The peer the thawed stream will re-associate with.
    pub fn peer(&self) -> PeerInfo {
        self.peer
    }

    /// Where the stream lived when it was frozen.
    pub fn origin(&self) -> LocalInfo {
        self.local
    }

    /// Bytes written by the application but not yet acknowledged (sent again after thaw).
    pub fn unacked_bytes(&self) -> usize {
        self.tx_data.len()
    }

    /// Bytes received but not yet read (delivered first after thaw, claim 7).
    pub fn buffered_input_bytes(&self) -> usize {
        self.rx_data.len()
    }

    /// Counters carried with the session.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether the session's frames are sealed (false only in the insecure plaintext mode).
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// The static key the peer proved at association, if any.
    pub fn peer_identity(&self) -> Option<PublicKey> {
        self.peer_identity
    }

    /// The AEAD suite the session's frames are sealed with; the thawed session keeps it.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// This image encrypted and authenticated for the holder of `recipient`'s secret
    /// (PROTOCOL.md §7.1): X25519 between a fresh ephemeral key (`entropy.secret`) and
    /// `recipient`, HKDF-SHA256, ChaCha20-Poly1305. Intercepted, it discloses nothing but its
    /// length and recipient; only [`StreamImage::open_sealed`] with that identity opens it.
    pub fn seal_with(&self, recipient: &PublicKey, entropy: &Entropy) -> Vec<u8> {
        let eph_public = crypto::public_of(entropy.secret);
        let mut out = Vec::with_capacity(SEALED_HEADER_LEN + 512);
        out.put_slice(&SEALED_MAGIC);
        out.put_u16(SEALED_VERSION);
        out.put_slice(&recipient.0);
        out.put_slice(&eph_public);
        out.extend_from_slice(&self.to_bytes());
        let (aad, body) = out.split_at_mut(SEALED_HEADER_LEN);
        let tag = crypto::seal_for(&recipient.0, entropy.secret, aad, body);
        // A low-order recipient key gives no secret: seal to nothing anyone can open (all-zero
        // tag over a zeroed body) rather than disclose the image.
        let tag = tag.unwrap_or_else(|| {
            body.fill(0);
            [0; crypto::TAG_LEN]
        });
        out.put_slice(&tag);
        out
    }

    /// Open an image sealed for `identity` and decode it.
    pub fn open_sealed(bytes: &[u8], identity: &Identity) -> Result<StreamImage, ImageError> {
        if bytes.len() < 8 || bytes[..8] != SEALED_MAGIC {
            return Err(if SEALED_MAGIC.starts_with(bytes) {
                ImageError::Truncated
            } else {
                ImageError::Foreign
            });
        }
        if bytes.len() < SEALED_HEADER_LEN + crypto::TAG_LEN {
            return Err(ImageError::Truncated);
        }
        let version = u16::from_be_bytes([bytes[8], bytes[9]]);
        if version != SEALED_VERSION {
            return Err(ImageError::UnsupportedVersion(version));
        }
        let mut recipient = [0u8; 32];
        recipient.copy_from_slice(&bytes[10..42]);
        if recipient != identity.key.public {
            return Err(ImageError::WrongRecipient(PublicKey(recipient)));
        }
        let mut eph = [0u8; 32];
        eph.copy_from_slice(&bytes[42..74]);
        let (aad, rest) = bytes.split_at(SEALED_HEADER_LEN);
        let (ct, tag) = rest.split_at(rest.len() - crypto::TAG_LEN);
        let mut tagb = [0u8; crypto::TAG_LEN];
        tagb.copy_from_slice(tag);
        let mut body = ct.to_vec();
        crypto::open_sealed(&identity.key, &eph, aad, &mut body, &tagb)
            .map_err(|_| ImageError::Tampered)?;
        StreamImage::from_bytes(&body)
    }

    /// Encode for transport or storage.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(256 + self.tx_data.len() + self.rx_data.len());
        body.put_slice(&self.session.0);
        body.put_u64(self.epoch.0);
        body.put_slice(&self.key.0);
        body.put_u8(u8::from(self.secure));
        body.put_u8(self.suite.code());
        match &self.peer_identity {
            None => body.put_u8(0),
            Some(k) => {
                body.put_u8(1);
                body.put_slice(&k.0);
            }
        }
        body.put_slice(&self.local.endpoint.0);
        body.put_socket_addr(self.local.contact);
        body.put_slice(&self.peer.endpoint.0);
        body.put_socket_addr(self.peer.contact);
        body.put_u64(self.tx_acked.0);
        body.put_opt_u64(self.fin.map(|o| o.0));
        body.put_u64(self.peer_limit.0);
        body.put_u64(self.tx_data.len() as u64);
        body.put_slice(&self.tx_data);
        body.put_u64(self.rx_recv.0);
        body.put_opt_u64(self.peer_fin.map(|o| o.0));
        body.put_u64(self.rx_data.len() as u64);
        body.put_slice(&self.rx_data);
        let s = &self.stats;
        for v in [
            s.bytes_written,
            s.bytes_read,
            s.bytes_replayed,
            s.bytes_duplicate,
            s.reassociations,
            s.connections_lost,
            s.migrations,
            s.auth_failures,
        ] {
            body.put_u64(v);
        }
        seal_versioned(&IMAGE_MAGIC, IMAGE_VERSION, &body)
    }

    /// Decode and verify an image made by [`StreamImage::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<StreamImage, ImageError> {
        if bytes.starts_with(&SEALED_MAGIC) {
            return Err(ImageError::Sealed);
        }
        let (version, body) =
            open_versioned(&IMAGE_MAGIC, IMAGE_VERSION_MIN, IMAGE_VERSION, bytes)?;
        let mut r = Reader::new(body);
        let session = SessionId(r.array("session id")?);
        let epoch = Epoch(r.u64("epoch")?);
        let key = SessionKey(r.array("key")?);
        let secure = r.bool("secure")?;
        let suite = if version >= 3 {
            let code = r.u8("suite")?;
            Suite::from_code(code).ok_or(ImageError::UnknownSuite(code))?
        } else {
            Suite::ChaCha20Poly1305
        };
        let peer_identity = match r.u8("peer identity")? {
            0 => None,
            1 => Some(PublicKey(r.array("peer identity")?)),
            _ => return Err(DecodeError::Invalid("peer identity").into()),
        };
        let local = LocalInfo {
            endpoint: EndpointId(r.array("local endpoint")?),
            contact: r.socket_addr("local contact")?,
        };
        let peer = PeerInfo {
            endpoint: EndpointId(r.array("peer endpoint")?),
            contact: r.socket_addr("peer contact")?,
        };
        let tx_acked = Offset(r.u64("acknowledged offset")?);
        let fin = r.opt_u64("end of stream")?.map(Offset);
        let peer_limit = Offset(r.u64("peer limit")?);
        let tx_len = r.u64("send buffer length")?;
        let tx_data = Bytes::copy_from_slice(r.bytes(len_of(tx_len, &r)?, "send buffer")?);
        let rx_recv = Offset(r.u64("received offset")?);
        let peer_fin = r.opt_u64("peer end of stream")?.map(Offset);
        let rx_len = r.u64("receive buffer length")?;
        let rx_data = Bytes::copy_from_slice(r.bytes(len_of(rx_len, &r)?, "receive buffer")?);
        let mut st = [0u64; 8];
        for v in &mut st {
            *v = r.u64("stats")?;
        }
        r.finish()?;
        // No real session comes near 2^62 bytes or events. Bounding what an image claims keeps
        // every later sum in the thawed session from overflowing: a forged image (anyone can
        // recompute the digest) must not be able to make it panic.
        const LIMIT: u64 = 1 << 62;
        let tx_written = tx_acked.0.checked_add(tx_data.len() as u64);
        if tx_written.is_none_or(|w| w >= LIMIT) || rx_recv.0 >= LIMIT {
            return Err(ImageError::Inconsistent("offsets out of range"));
        }
        if st.iter().any(|&v| v >= LIMIT) {
            return Err(ImageError::Inconsistent("counters out of range"));
        }
        if fin.is_some_and(|f| Some(f.0) != tx_written) {
            return Err(ImageError::Inconsistent(
                "end of stream is not at the last byte",
            ));
        }
        if (rx_data.len() as u64) > rx_recv.0 {
            return Err(ImageError::Inconsistent(
                "more buffered input than received",
            ));
        }
        if peer_fin.is_some_and(|f| f < rx_recv) {
            return Err(ImageError::Inconsistent(
                "data received beyond end of stream",
            ));
        }
        Ok(StreamImage {
            session,
            epoch,
            key,
            secure,
            suite,
            peer_identity,
            local,
            peer,
            tx_acked,
            tx_data,
            fin,
            peer_limit,
            rx_recv,
            rx_data,
            peer_fin,
            stats: Stats {
                bytes_written: st[0],
                bytes_read: st[1],
                bytes_replayed: st[2],
                bytes_duplicate: st[3],
                reassociations: st[4],
                connections_lost: st[5],
                migrations: st[6],
                auth_failures: st[7],
            },
        })
    }
}

/// Wrap an image body: `magic | version | length | body | SHA-256 of all before`.
fn seal_versioned(magic: &[u8; 8], version: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + DIGEST_LEN);
    out.put_slice(magic);
    out.put_u16(version);
    // Image bodies are bounded by session and socket buffer capacities (far below 4 GiB).
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    let digest = crypto::sha256(&out);
    out.put_slice(&digest);
    out
}

/// Check an image's envelope (magic, version in `min..=max`, exact length, digest) and return
/// its version and body.
pub(crate) fn open_versioned<'a>(
    magic: &[u8; 8],
    min: u16,
    max: u16,
    bytes: &'a [u8],
) -> Result<(u16, &'a [u8]), ImageError> {
    if bytes.len() < 8 || bytes[..8] != *magic {
        return Err(if magic.starts_with(bytes) {
            ImageError::Truncated
        } else {
            ImageError::Foreign
        });
    }
    if bytes.len() < PREFIX_LEN + DIGEST_LEN {
        return Err(ImageError::Truncated);
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    if !(min..=max).contains(&version) {
        return Err(ImageError::UnsupportedVersion(version));
    }
    let body_len = u32::from_be_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]) as usize;
    let expected = PREFIX_LEN + body_len + DIGEST_LEN;
    if bytes.len() < expected {
        return Err(ImageError::Truncated);
    }
    if bytes.len() > expected {
        return Err(ImageError::Trailing(bytes.len() - expected));
    }
    let (signed, digest) = bytes.split_at(PREFIX_LEN + body_len);
    if crypto::sha256(signed) != digest {
        return Err(ImageError::Corrupt);
    }
    Ok((version, &signed[PREFIX_LEN..]))
}

/// Check a length read from an image against the bytes left.
pub(crate) fn len_of(n: u64, r: &Reader<'_>) -> Result<usize, DecodeError> {
    if n > r.remaining() as u64 {
        return Err(DecodeError::Truncated("buffer"));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(suite: Suite) -> StreamImage {
        let local = LocalInfo {
            endpoint: EndpointId([1; 16]),
            contact: "127.0.0.2:7000".parse().unwrap(),
        };
        let peer = PeerInfo {
            endpoint: EndpointId([2; 16]),
            contact: "127.0.0.3:7000".parse().unwrap(),
        };
        StreamImage {
            session: SessionId([3; 16]),
            epoch: Epoch(4),
            key: SessionKey([5; 32]),
            secure: true,
            suite,
            peer_identity: None,
            local,
            peer,
            tx_acked: Offset(10),
            tx_data: Bytes::from_static(b"unacked"),
            fin: None,
            peer_limit: Offset(1000),
            rx_recv: Offset(20),
            rx_data: Bytes::from_static(b"unread"),
            peer_fin: None,
            stats: Stats::default(),
        }
    }

    /// Where the suite byte sits in an encoded image: after the prefix, session id, epoch, key
    /// and the secure flag.
    const SUITE_AT: usize = PREFIX_LEN + 16 + 8 + 32 + 1;

    #[test]
    fn images_carry_the_suite_and_old_or_unknown_ones_are_handled() {
        for suite in Suite::DEFAULT_PREFERENCE {
            let i = image(suite);
            let back = StreamImage::from_bytes(&i.to_bytes()).unwrap();
            assert_eq!(back, i);
            assert_eq!(back.suite(), suite);
        }
        // A version-2 image (from before suites): no suite byte, read as ChaCha20-Poly1305.
        let v3 = image(Suite::ChaCha20Poly1305).to_bytes();
        let mut body = v3[PREFIX_LEN..SUITE_AT].to_vec();
        body.extend_from_slice(&v3[SUITE_AT + 1..v3.len() - DIGEST_LEN]);
        let v2 = seal_versioned(&IMAGE_MAGIC, 2, &body);
        let old = StreamImage::from_bytes(&v2).unwrap();
        assert_eq!(old.suite(), Suite::ChaCha20Poly1305);
        assert_eq!(old, image(Suite::ChaCha20Poly1305));
        // Version 1 is refused; so is an unknown suite code, with its own error.
        let v1 = seal_versioned(&IMAGE_MAGIC, 1, &body);
        assert_eq!(
            StreamImage::from_bytes(&v1),
            Err(ImageError::UnsupportedVersion(1))
        );
        let mut unknown = v3[..v3.len() - DIGEST_LEN].to_vec();
        unknown[SUITE_AT] = 0x7f;
        let unknown = seal_versioned(&IMAGE_MAGIC, IMAGE_VERSION, &unknown[PREFIX_LEN..]);
        assert_eq!(
            StreamImage::from_bytes(&unknown),
            Err(ImageError::UnknownSuite(0x7f))
        );
        // A sealed image keeps the suite too.
        let r = Identity::from_secret_bytes([9; 32]);
        let e = Entropy {
            secret: [8; 32],
            nonce: [7; 16],
        };
        let sealed = image(Suite::Aes256Gcm).seal_with(&r.public_key(), &e);
        let opened = StreamImage::open_sealed(&sealed, &r).unwrap();
        assert_eq!(opened.suite(), Suite::Aes256Gcm);
    }
}
