//! Migration images: a frozen session encoded for the trip to a new host (PROTOCOL.md §7).
//!
//! Layout: `"ROAMIMG\0" | version: u16 | body length: u32 | body | SHA-256 of all before`.
//! Decoding checks the magic, the version, the exact length, the digest, every field, and the
//! consistency of the offsets, in that order; any failure is a typed [`ImageError`].

use bytes::{BufMut, Bytes};

use crate::codec::{DecodeError, Reader, WriteExt};
use crate::crypto::{self, SessionKey};
use crate::session::{LocalInfo, PeerInfo, Stats};
use crate::types::{EndpointId, Epoch, Offset, SessionId};

/// First bytes of every image.
pub const IMAGE_MAGIC: [u8; 8] = *b"ROAMIMG\0";
/// The image format version this crate writes and reads.
pub const IMAGE_VERSION: u16 = 1;
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

    /// Encode for transport or storage.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(256 + self.tx_data.len() + self.rx_data.len());
        body.put_slice(&self.session.0);
        body.put_u64(self.epoch.0);
        body.put_slice(&self.key.0);
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
        ] {
            body.put_u64(v);
        }
        seal(&IMAGE_MAGIC, &body)
    }

    /// Decode and verify an image made by [`StreamImage::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<StreamImage, ImageError> {
        let mut r = Reader::new(open(&IMAGE_MAGIC, bytes)?);
        let session = SessionId(r.array("session id")?);
        let epoch = Epoch(r.u64("epoch")?);
        let key = SessionKey(r.array("key")?);
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
        let mut st = [0u64; 7];
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
            },
        })
    }
}

/// Wrap an image body: `magic | version | length | body | SHA-256 of all before`.
pub(crate) fn seal(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + DIGEST_LEN);
    out.put_slice(magic);
    out.put_u16(IMAGE_VERSION);
    // Image bodies are bounded by session and socket buffer capacities (far below 4 GiB).
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    let digest = crypto::sha256(&out);
    out.put_slice(&digest);
    out
}

/// Check an image's envelope (magic, version, exact length, digest) and return its body.
pub(crate) fn open<'a>(magic: &[u8; 8], bytes: &'a [u8]) -> Result<&'a [u8], ImageError> {
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
    if version != IMAGE_VERSION {
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
    Ok(&signed[PREFIX_LEN..])
}

/// Check a length read from an image against the bytes left.
pub(crate) fn len_of(n: u64, r: &Reader<'_>) -> Result<usize, DecodeError> {
    if n > r.remaining() as u64 {
        return Err(DecodeError::Truncated("buffer"));
    }
    Ok(n as usize)
}
