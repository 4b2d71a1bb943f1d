//! Migrateable datagram sockets: association tables, re-association and address translation
//! (PROTOCOL.md §10; claims 8-11, 21-28, 38-43).
//!
//! This object performs no I/O whatsoever. A driver passes in datagrams received
//! ([`DatagramSocket::handle`]) and timer expiries ([`DatagramSocket::handle_timeout`]), and
//! polls out datagrams to send ([`DatagramSocket::poll_transmit`]), events
//! ([`DatagramSocket::poll_event`]) and the next timer ([`DatagramSocket::poll_timeout`]), in
//! that order. The application's commands are [`DatagramSocket::send_to`],
//! [`DatagramSocket::recv`], [`DatagramSocket::freeze`]. Randomness comes from a seed the
//! driver supplies (as quinn-proto's endpoint takes an RNG seed).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::aead::{self, ReplayWindow, TAG_LEN, WINDOW_WORDS};
use crate::codec::{DecodeError, Reader, WriteExt};
use crate::crypto::AeadKey;
use crate::crypto::{self, Ephemeral, SessionKey};
use crate::frame::{FrameError, MAC_LEN, MAGIC, MAX_OFFERED_SUITES, VERSION};
use crate::secure::{choose_suite, offer_codes, Suite};
use crate::types::SocketId;

pub use crate::aead::REPLAY_WINDOW;

/// Packet type codes of datagram sockets (PROTOCOL.md §10.1, table 2).
#[allow(missing_docs)]
pub mod dkind {
    pub const HELLO: u8 = 0x40;
    pub const WELCOME: u8 = 0x41;
    pub const DATA: u8 = 0x42;
    pub const REASSOC: u8 = 0x43;
    pub const REASSOC_ACK: u8 = 0x44;
    pub const FREEZING: u8 = 0x45;
    pub const FREEZING_ACK: u8 = 0x46;
    pub const PATH_CHALLENGE: u8 = 0x47;
    pub const PATH_RESPONSE: u8 = 0x48;
    pub const PLAIN_DATA: u8 = 0x49;
}

/// The clear header of a `Data` packet: type, association id, packet counter. It is the AEAD's
/// associated data.
pub const DATA_HEADER: usize = 17;
/// Bytes a `Data` packet adds to the application's payload (header and Poly1305 tag).
pub const DATA_OVERHEAD: usize = DATA_HEADER + TAG_LEN;
/// Length of a path challenge's random data.
pub const CHALLENGE_LEN: usize = 16;
/// At most this many bytes are sent to an address not yet validated for every byte received
/// from it (RFC 9000 §8's anti-amplification limit).
pub const AMPLIFICATION_FACTOR: u64 = 3;
/// Addresses being validated at once for one association; a new one replaces the oldest.
pub const MAX_PATH_PROBES: usize = 4;
/// The largest UDP payload IPv4 allows.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

const LABEL_WELCOME: &[u8] = b"roam/v1/dgram-welcome";
const LABEL_REASSOC: &[u8] = b"roam/v1/dgram-reassoc";
const LABEL_ACK: &[u8] = b"roam/v1/dgram-ack";
const LABEL_FREEZING: &[u8] = b"roam/v1/dgram-freezing";
const LABEL_FREEZING_ACK: &[u8] = b"roam/v1/dgram-freezing-ack";
const LABEL_PATH_CHALLENGE: &[u8] = b"roam/v1/dgram-path-challenge";
const LABEL_PATH_RESPONSE: &[u8] = b"roam/v1/dgram-path-response";

/// The MAC of the short control packets (`ReassocAck`, `Freezing`, `FreezingAck`): over the
/// association id and epoch, under the association key, with the packet's own label.
fn control_mac(key: &SessionKey, label: &[u8], assoc: u64, epoch: u64) -> [u8; MAC_LEN] {
    crypto::mac(key, label, &[&control_body(assoc, epoch)])
}

/// Constant-time check of a [`control_mac`].
fn control_mac_ok(
    key: &SessionKey,
    label: &[u8],
    assoc: u64,
    epoch: u64,
    mac: &[u8; MAC_LEN],
) -> bool {
    crypto::verify(key, label, &[&control_body(assoc, epoch)], mac)
}

/// The MAC of a `PathChallenge` or `PathResponse`: over the association id and the challenge.
fn path_mac(
    key: &SessionKey,
    label: &[u8],
    assoc: u64,
    data: &[u8; CHALLENGE_LEN],
) -> [u8; MAC_LEN] {
    crypto::mac(key, label, &[&assoc.to_be_bytes(), data])
}

/// Constant-time check of a [`path_mac`].
fn path_mac_ok(
    key: &SessionKey,
    label: &[u8],
    assoc: u64,
    data: &[u8; CHALLENGE_LEN],
    mac: &[u8; MAC_LEN],
) -> bool {
    crypto::verify(key, label, &[&assoc.to_be_bytes(), data], mac)
}

/// The clear header of a `Data` (or `PlainData`) packet.
fn data_header(ty: u8, assoc: u64, counter: u64) -> [u8; DATA_HEADER] {
    let mut h = [0u8; DATA_HEADER];
    h[0] = ty;
    h[1..9].copy_from_slice(&assoc.to_be_bytes());
    h[9..].copy_from_slice(&counter.to_be_bytes());
    h
}

fn control_body(assoc: u64, epoch: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&assoc.to_be_bytes());
    b[8..].copy_from_slice(&epoch.to_be_bytes());
    b
}

/// One datagram-socket packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Packet {
    /// First contact: the initiator's socket id and ephemeral key.
    Hello {
        /// The initiator's socket id.
        socket: SocketId,
        /// Its ephemeral X25519 public key.
        eph: [u8; 32],
        /// Its nonce.
        nonce: [u8; 16],
        /// The AEAD suite codes it offers, most preferred first (`count u8 | codes` after the
        /// nonce: 1 to 16 codes, unknown ones allowed; PROTOCOL.md §10.2).
        suites: Vec<u8>,
    },
    /// The responder's answer, with key confirmation.
    Welcome {
        /// The responder's socket id.
        socket: SocketId,
        /// The initiator's socket id (echoed).
        to: SocketId,
        /// The responder's ephemeral X25519 public key.
        eph: [u8; 32],
        /// Its nonce.
        nonce: [u8; 16],
        /// The suite chosen from the `Hello`'s offer (one byte before the MAC).
        suite: Suite,
        /// HMAC under the new association key.
        mac: [u8; MAC_LEN],
    },
    /// An application datagram on an association, encrypted and authenticated
    /// (the association's suite under the sender's direction key, nonce from `counter`, the clear
    /// header as associated data; PROTOCOL.md §10.3).
    Data {
        /// The association id both sides derived from the key.
        assoc: u64,
        /// The sender's packet counter on this association (the AEAD nonce).
        counter: u64,
        /// The encrypted payload followed by the 16-byte tag.
        sealed: Bytes,
    },
    /// An application datagram in clear, only between sockets both configured
    /// [`DatagramConfig::insecure_plaintext`] (benchmarks and debugging).
    PlainData {
        /// The association id.
        assoc: u64,
        /// The sender's packet counter (replay window only; nothing is authenticated).
        counter: u64,
        /// The application's bytes.
        payload: Bytes,
    },
    /// A moved socket announces itself from its new address (claims 11, 21d, 25); the peer
    /// uses the packet's observed source address once it answered a path challenge.
    Reassoc {
        /// The association.
        assoc: u64,
        /// The sender's migration epoch; strictly increasing.
        epoch: u64,
        /// A nonce.
        nonce: [u8; 16],
        /// HMAC under the association key.
        mac: [u8; MAC_LEN],
    },
    /// Can the sender of a `Reassoc` be reached at the address it came from? (RFC 9000 §8.2.)
    PathChallenge {
        /// The association.
        assoc: u64,
        /// Random bytes to echo.
        data: [u8; CHALLENGE_LEN],
        /// HMAC under the association key.
        mac: [u8; MAC_LEN],
    },
    /// The answer to a `PathChallenge`, sent back to where the challenge came from.
    PathResponse {
        /// The association.
        assoc: u64,
        /// The challenge's bytes, echoed.
        data: [u8; CHALLENGE_LEN],
        /// HMAC under the association key.
        mac: [u8; MAC_LEN],
    },
    /// The peer updated its tables (claim 26).
    ReassocAck {
        /// The association.
        assoc: u64,
        /// The epoch acknowledged.
        epoch: u64,
        /// HMAC under the association key.
        mac: [u8; MAC_LEN],
    },
    /// The sender is freezing: hold datagrams for it until it re-associates (claim 16's
    /// close message, for datagrams).
    Freezing {
        /// The association.
        assoc: u64,
        /// The sender's current epoch.
        epoch: u64,
        /// HMAC under the association key.
        mac: [u8; MAC_LEN],
    },
    /// Answer to `Freezing`: every datagram the peer sent before this one is ahead of it, and
    /// it holds everything after.
    FreezingAck {
        /// The association.
        assoc: u64,
        /// The freezing side's epoch, echoed.
        epoch: u64,
        /// HMAC under the association key.
        mac: [u8; MAC_LEN],
    },
}

impl Packet {
    /// Encode as one UDP payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(96);
        match self {
            Packet::Hello {
                socket,
                eph,
                nonce,
                suites,
            } => {
                b.put_u8(dkind::HELLO);
                b.put_slice(&MAGIC);
                b.put_u16(VERSION);
                b.put_slice(&socket.0);
                b.put_slice(eph);
                b.put_slice(nonce);
                // An empty offer encodes as a malformed packet (count 0).
                let n = suites.len().min(MAX_OFFERED_SUITES);
                b.put_u8(n as u8);
                b.put_slice(&suites[..n]);
            }
            Packet::Welcome { mac, .. } => {
                b.put_u8(dkind::WELCOME);
                b.put_slice(&self.signed());
                b.put_slice(mac);
            }
            Packet::Data {
                assoc,
                counter,
                sealed,
            } => {
                b.reserve(DATA_HEADER + sealed.len());
                b.put_slice(&data_header(dkind::DATA, *assoc, *counter));
                b.put_slice(sealed);
            }
            Packet::PlainData {
                assoc,
                counter,
                payload,
            } => {
                b.reserve(DATA_HEADER + payload.len());
                b.put_slice(&data_header(dkind::PLAIN_DATA, *assoc, *counter));
                b.put_slice(payload);
            }
            Packet::PathChallenge { assoc, data, mac } => {
                b.put_u8(dkind::PATH_CHALLENGE);
                b.put_u64(*assoc);
                b.put_slice(data);
                b.put_slice(mac);
            }
            Packet::PathResponse { assoc, data, mac } => {
                b.put_u8(dkind::PATH_RESPONSE);
                b.put_u64(*assoc);
                b.put_slice(data);
                b.put_slice(mac);
            }
            Packet::Reassoc { mac, .. } => {
                b.put_u8(dkind::REASSOC);
                b.put_slice(&self.signed());
                b.put_slice(mac);
            }
            Packet::ReassocAck { assoc, epoch, mac } => {
                put_control(&mut b, dkind::REASSOC_ACK, *assoc, *epoch, mac)
            }
            Packet::Freezing { assoc, epoch, mac } => {
                put_control(&mut b, dkind::FREEZING, *assoc, *epoch, mac)
            }
            Packet::FreezingAck { assoc, epoch, mac } => {
                put_control(&mut b, dkind::FREEZING_ACK, *assoc, *epoch, mac)
            }
        }
        b.freeze()
    }

    /// What the MAC of a `Welcome` or `Reassoc` covers: every field but the MAC.
    fn signed(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(96);
        match self {
            Packet::Welcome {
                socket,
                to,
                eph,
                nonce,
                suite,
                ..
            } => {
                v.put_slice(&socket.0);
                v.put_slice(&to.0);
                v.put_slice(eph);
                v.put_slice(nonce);
                v.put_u8(suite.code());
            }
            Packet::Reassoc {
                assoc,
                epoch,
                nonce,
                ..
            } => {
                v.put_u64(*assoc);
                v.put_u64(*epoch);
                v.put_slice(nonce);
            }
            Packet::Hello { .. } => {
                v = self.encode().to_vec();
            }
            _ => {}
        }
        v
    }

    /// Decode one UDP payload. `Data` payloads are sliced without copying.
    pub fn decode(bytes: Bytes) -> Result<Packet, FrameError> {
        let Some(&ty) = bytes.first() else {
            return Err(DecodeError::Truncated("packet type").into());
        };
        if ty == dkind::DATA || ty == dkind::PLAIN_DATA {
            let min = if ty == dkind::DATA {
                DATA_OVERHEAD
            } else {
                DATA_HEADER
            };
            if bytes.len() < min {
                return Err(DecodeError::Truncated("data header and tag").into());
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&bytes[1..9]);
            let mut ctr = [0u8; 8];
            ctr.copy_from_slice(&bytes[9..DATA_HEADER]);
            let (assoc, counter) = (u64::from_be_bytes(id), u64::from_be_bytes(ctr));
            let rest = bytes.slice(DATA_HEADER..);
            return Ok(if ty == dkind::DATA {
                Packet::Data {
                    assoc,
                    counter,
                    sealed: rest,
                }
            } else {
                Packet::PlainData {
                    assoc,
                    counter,
                    payload: rest,
                }
            });
        }
        let mut r = Reader::new(&bytes[1..]);
        let p = match ty {
            dkind::HELLO => {
                let magic: [u8; 4] = r.array("magic").map_err(|_| FrameError::BadMagic)?;
                if magic != MAGIC {
                    return Err(FrameError::BadMagic);
                }
                let v = r.u16("version")?;
                if v != VERSION {
                    return Err(FrameError::UnsupportedVersion(v));
                }
                let socket = SocketId(r.array("socket id")?);
                let eph = r.array("ephemeral key")?;
                let nonce = r.array("nonce")?;
                let n = usize::from(r.u8("suite count")?);
                if n == 0 || n > MAX_OFFERED_SUITES {
                    return Err(DecodeError::Invalid("suite count").into());
                }
                let suites = r.bytes(n, "suites")?.to_vec();
                Packet::Hello {
                    socket,
                    eph,
                    nonce,
                    suites,
                }
            }
            dkind::WELCOME => {
                let socket = SocketId(r.array("socket id")?);
                let to = SocketId(r.array("socket id")?);
                let eph = r.array("ephemeral key")?;
                let nonce = r.array("nonce")?;
                let code = r.u8("suite")?;
                let suite = Suite::from_code(code).ok_or(DecodeError::Invalid("suite"))?;
                Packet::Welcome {
                    socket,
                    to,
                    eph,
                    nonce,
                    suite,
                    mac: r.array("mac")?,
                }
            }
            dkind::REASSOC => Packet::Reassoc {
                assoc: r.u64("association id")?,
                epoch: r.u64("epoch")?,
                nonce: r.array("nonce")?,
                mac: r.array("mac")?,
            },
            dkind::PATH_CHALLENGE | dkind::PATH_RESPONSE => {
                let (assoc, data, mac) = (
                    r.u64("association id")?,
                    r.array("challenge")?,
                    r.array("mac")?,
                );
                if ty == dkind::PATH_CHALLENGE {
                    Packet::PathChallenge { assoc, data, mac }
                } else {
                    Packet::PathResponse { assoc, data, mac }
                }
            }
            dkind::REASSOC_ACK | dkind::FREEZING | dkind::FREEZING_ACK => {
                let (assoc, epoch) = (r.u64("association id")?, r.u64("epoch")?);
                let mac = r.array("mac")?;
                match ty {
                    dkind::REASSOC_ACK => Packet::ReassocAck { assoc, epoch, mac },
                    dkind::FREEZING => Packet::Freezing { assoc, epoch, mac },
                    _ => Packet::FreezingAck { assoc, epoch, mac },
                }
            }
            other => return Err(FrameError::UnknownType(other)),
        };
        r.finish()?;
        Ok(p)
    }
}

fn put_control(b: &mut BytesMut, ty: u8, assoc: u64, epoch: u64, mac: &[u8; MAC_LEN]) {
    b.put_u8(ty);
    b.put_u64(assoc);
    b.put_u64(epoch);
    b.put_slice(mac);
}

/// Limits and timers of a datagram socket. [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatagramConfig {
    /// Largest application payload accepted by `send_to`; larger is an error, never a silent
    /// truncation. Default 65,474 (the IPv4 UDP maximum less roam's 33 bytes: header and tag).
    pub max_payload: usize,
    /// Datagrams held per peer while it is migrating (or being associated with); beyond it
    /// the oldest is dropped and counted. Default 256.
    pub hold_capacity: usize,
    /// Received datagrams waiting for `recv`; beyond it new ones are dropped and counted.
    /// Default 1024.
    pub recv_capacity: usize,
    /// Associations a socket keeps; first contacts beyond it are ignored. Default 4096.
    pub max_associations: usize,
    /// Half-open associations kept: answered first contacts (`Hello`) whose initiator has not
    /// yet sent an authenticated packet. Beyond it the oldest half-open one is forgotten
    /// (counted in [`DatagramStats::half_open_evicted`]); established associations are never.
    /// At most about 600 bytes each. Default 256.
    pub max_half_open: usize,
    /// First contacts (`Hello`) answered per second, with bursts of a tenth of it: each costs
    /// an X25519 agreement, so a flood beyond it is dropped before any work (counted in
    /// [`DatagramStats::hello_limited`]) and established associations keep the CPU. Default
    /// 1000.
    pub hello_rate: u32,
    /// Send `Data` in clear (`PlainData` packets: no encryption, no authentication) and accept
    /// it. **For benchmarks and debugging only**: anyone on the path reads, alters and injects
    /// datagrams. Both ends must set it. Default false.
    pub insecure_plaintext: bool,
    /// First resend delay of a `Hello`, `Reassoc` or `Freezing` without answer; doubles each
    /// time. Default 50 ms.
    pub retry_initial: Duration,
    /// Longest resend delay. Default 1 s.
    pub retry_max: Duration,
    /// Sends of a `Hello` or `Reassoc` before the peer is reported unreachable, and most sends
    /// of a `Freezing` (which stops at `freeze_timeout` anyway). Default 8.
    pub max_tries: u32,
    /// Longest a peer that announced a freeze is waited for before held datagrams are dropped.
    /// Default 30 s.
    pub hold_timeout: Duration,
    /// Longest a freeze waits for every peer's `FreezingAck` (draining what is in flight into
    /// the image) before it completes anyway. Default 250 ms.
    pub freeze_timeout: Duration,
    /// The AEAD suites for `Data`, most preferred first (PROTOCOL.md §10.2, §10.3): offered in
    /// this order in `Hello`, and the first of a peer's offer found here is chosen when
    /// answering one. Empty means [`Suite::DEFAULT_PREFERENCE`], which is the default
    /// (AES-256-GCM, then ChaCha20-Poly1305). Thawed associations keep their image's suite.
    pub suites: Vec<Suite>,
}

impl Default for DatagramConfig {
    fn default() -> Self {
        DatagramConfig {
            max_payload: MAX_UDP_PAYLOAD - DATA_OVERHEAD,
            hold_capacity: 256,
            recv_capacity: 1024,
            max_associations: 4096,
            max_half_open: 256,
            hello_rate: 1000,
            insecure_plaintext: false,
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(1),
            max_tries: 8,
            hold_timeout: Duration::from_secs(30),
            freeze_timeout: Duration::from_millis(250),
            suites: Suite::DEFAULT_PREFERENCE.to_vec(),
        }
    }
}

impl DatagramConfig {
    /// The suites accepted, most preferred first (the default preference if none is set).
    fn suite_list(&self) -> &[Suite] {
        if self.suites.is_empty() {
            &Suite::DEFAULT_PREFERENCE
        } else {
            &self.suites
        }
    }
}

/// Why a datagram operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// The payload exceeds what one datagram can carry.
    #[error("datagram of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// The largest payload allowed.
        max: usize,
    },
    /// The receive buffer is smaller than the next datagram (which stays queued).
    #[error("buffer of {len} bytes is too small for a {needed}-byte datagram")]
    BufferTooSmall {
        /// The buffer's length.
        len: usize,
        /// The datagram's length.
        needed: usize,
    },
    /// The socket is frozen.
    #[error("socket frozen")]
    Frozen,
}

/// Something the driver or application may want to know, from
/// [`DatagramSocket::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatagramEvent {
    /// An association with the peer the application knows as `peer` is complete.
    Associated {
        /// The address the application knows the peer by.
        peer: SocketAddr,
    },
    /// A peer re-associated from a new address (our tables were updated).
    PeerMoved {
        /// The address the application knows the peer by.
        peer: SocketAddr,
        /// Where it is now.
        now_at: SocketAddr,
    },
    /// A peer acknowledged our re-association.
    Reassociated {
        /// The address the application knows the peer by.
        peer: SocketAddr,
    },
    /// A peer never answered `Hello` or `Reassoc` after `max_tries` sends.
    PeerUnreachable {
        /// The address the application knows the peer by.
        peer: SocketAddr,
    },
    /// The freeze completed: [`DatagramSocket::image`] is ready.
    Frozen,
}

/// Counters of a datagram socket (they migrate with it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatagramStats {
    /// Application datagrams sent (handed to the network).
    pub sent: u64,
    /// Application datagrams received and queued for the application.
    pub received: u64,
    /// Datagrams dropped because a hold queue (peer migrating or associating) was full.
    pub dropped_hold: u64,
    /// Datagrams dropped because the receive queue was full.
    pub dropped_recv: u64,
    /// Datagrams dropped because their peer never came back (hold timeout, unreachable).
    pub dropped_unreachable: u64,
    /// Datagrams held while a peer migrated and sent after it re-associated.
    pub held_and_sent: u64,
    /// `Reassoc` packets sent, first sends and resends.
    pub reassoc_sent: u64,
    /// `Reassoc` resends triggered by data arriving before the acknowledgement (claim 28).
    pub reassoc_resent_on_data: u64,
    /// Peers' re-associations accepted.
    pub reassoc_accepted: u64,
    /// Packets refused: bad MACs and tags, stale epochs, unknown associations, malformed.
    pub refused: u64,
    /// Planned migrations of this socket.
    pub migrations: u64,
    /// `Data` packets whose tag did not verify (altered or forged); also in `refused`.
    pub auth_failed: u64,
    /// `Data` packets dropped as replays: a counter already received, or below the window.
    pub replayed: u64,
    /// Path challenges sent to addresses peers re-associated from.
    pub path_challenges_sent: u64,
    /// Path challenges not sent because of the anti-amplification limit.
    pub amplification_limited: u64,
    /// Half-open associations forgotten to make room for new first contacts.
    pub half_open_evicted: u64,
    /// `Hello`s dropped unanswered beyond [`DatagramConfig::hello_rate`].
    pub hello_limited: u64,
}

/// One row of the association table, as the application may inspect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    /// The address the application knows the peer by (its first address).
    pub known_addr: SocketAddr,
    /// Where the peer is now (the translation of `known_addr`).
    pub addr: SocketAddr,
    /// The peer's socket id.
    pub socket: SocketId,
    /// The peer's migration epoch last accepted.
    pub peer_epoch: u64,
    /// True while the peer announced a freeze and has not re-associated.
    pub migrating: bool,
    /// True while our re-association to it is unacknowledged.
    pub reassociating: bool,
    /// The AEAD suite of `Data` on this association (chosen at first contact).
    pub suite: Suite,
}

struct Retry {
    tries: u32,
    next_at: Instant,
    delay: Duration,
    last_sent: Instant,
}

impl Retry {
    fn new(now: Instant, first: Duration) -> Retry {
        Retry {
            tries: 1,
            next_at: now + first,
            delay: first,
            last_sent: now,
        }
    }

    fn bump(&mut self, now: Instant, max: Duration) {
        self.tries += 1;
        self.delay = (self.delay * 2).min(max);
        self.next_at = now + self.delay;
    }
}

/// A freeze in progress (PROTOCOL.md §10.4): the associations whose `FreezingAck` is awaited,
/// when the freeze completes anyway, and the resend timer of their `Freezing`.
struct Freeze {
    waiting: Vec<u64>,
    deadline: Instant,
    /// `Freezing` is resent to every association still in `waiting` with the backoff of
    /// `Hello` and `Reassoc`, up to `max_tries` sends, until the deadline.
    resend: Retry,
}

/// An address a peer re-associated from, being validated (RFC 9000 §8.2).
struct Probe {
    addr: SocketAddr,
    /// The epoch of the `Reassoc` it came with.
    epoch: u64,
    challenge: [u8; CHALLENGE_LEN],
    /// Bytes of authenticated packets received from it.
    received: u64,
    /// Bytes sent to it.
    sent: u64,
    /// When to send the challenge again (while the amplification budget allows).
    resend_at: Option<Instant>,
}

/// A row of the association table (claims 9, 21b, 23).
struct Assoc {
    id: u64,
    peer: SocketId,
    key: SessionKey,
    /// The AEAD suite of `Data` on this association, chosen at first contact.
    suite: Suite,
    /// Our direction's cipher and next packet counter.
    tx: AeadKey,
    tx_counter: u64,
    /// The peer's direction's cipher and the counters received from it.
    rx: AeadKey,
    window: ReplayWindow,
    /// False for an association we answered until the peer sent an authenticated packet
    /// (half-open).
    confirmed: bool,
    /// Addresses the peer re-associated from that have not answered a challenge yet.
    probes: Vec<Probe>,
    known_addr: SocketAddr,
    addr: SocketAddr,
    peer_epoch: u64,
    /// Our unacknowledged re-association.
    reassoc: Option<Retry>,
    /// The peer announced a freeze at this instant; hold datagrams for it.
    migrating_since: Option<Instant>,
    held: VecDeque<Bytes>,
    /// For a responder: the Hello it answered and the Welcome, to answer a resent Hello alike.
    answered: Option<([u8; 32], Bytes)>,
}

impl Assoc {
    /// A new row: `suite` keys for both directions, counters at zero, peer at `addr`.
    fn new(
        id: u64,
        me: SocketId,
        peer: SocketId,
        (key, suite): (SessionKey, Suite),
        addr: SocketAddr,
        confirmed: bool,
    ) -> Assoc {
        Assoc {
            id,
            peer,
            suite,
            tx: aead::data_cipher(suite, &key, me),
            tx_counter: 0,
            rx: aead::data_cipher(suite, &key, peer),
            window: ReplayWindow::default(),
            confirmed,
            probes: Vec::new(),
            key,
            known_addr: addr,
            addr,
            peer_epoch: 0,
            reassoc: None,
            migrating_since: None,
            held: VecDeque::new(),
            answered: None,
        }
    }

    /// The next `Data` packet carrying `payload` (`PlainData` if `plaintext`), numbered with
    /// the next counter of our direction, cut from `block`.
    fn data_packet(&mut self, payload: &[u8], plaintext: bool, block: &mut BytesMut) -> Bytes {
        let counter = self.tx_counter;
        self.tx_counter += 1;
        if plaintext {
            let mut b = BytesMut::with_capacity(DATA_HEADER + payload.len());
            b.put_slice(&data_header(dkind::PLAIN_DATA, self.id, counter));
            b.put_slice(payload);
            b.freeze()
        } else {
            let header = data_header(dkind::DATA, self.id, counter);
            aead::seal(&self.tx, counter, &header, payload, block)
        }
    }
}

/// An association being set up by this side (the initiator).
struct Handshake {
    eph: Ephemeral,
    hello: Bytes,
    /// The suite codes the `Hello` offered.
    offered: Vec<u8>,
    retry: Retry,
    queued: VecDeque<Bytes>,
}

/// What a frozen datagram socket carries to its new host (PROTOCOL.md §10.4).
#[derive(Clone, PartialEq, Eq)]
pub struct DatagramImage {
    pub(crate) id: SocketId,
    pub(crate) epoch: u64,
    pub(crate) origin: SocketAddr,
    pub(crate) assocs: Vec<AssocImage>,
    pub(crate) pending: Vec<(SocketAddr, Vec<Bytes>)>,
    pub(crate) inbox: Vec<(SocketAddr, Bytes)>,
    pub(crate) stats: DatagramStats,
}

#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AssocImage {
    pub(crate) id: u64,
    pub(crate) peer: SocketId,
    pub(crate) key: SessionKey,
    pub(crate) suite: Suite,
    pub(crate) known_addr: SocketAddr,
    pub(crate) addr: SocketAddr,
    pub(crate) peer_epoch: u64,
    pub(crate) tx_counter: u64,
    pub(crate) window: ReplayWindow,
    pub(crate) confirmed: bool,
    pub(crate) held: Vec<Bytes>,
}

impl std::fmt::Debug for DatagramImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramImage")
            .field("id", &self.id)
            .field("epoch", &self.epoch)
            .field("origin", &self.origin)
            .field("peers", &self.assocs.len())
            .field("inbox", &self.inbox.len())
            .finish_non_exhaustive()
    }
}

impl DatagramImage {
    /// The socket's id.
    pub fn socket_id(&self) -> SocketId {
        self.id
    }

    /// The migration epoch the image was frozen at.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Peers in the association table.
    pub fn peer_count(&self) -> usize {
        self.assocs.len()
    }

    /// Received datagrams not yet read (delivered first after thaw).
    pub fn buffered_datagrams(&self) -> usize {
        self.inbox.len()
    }

    /// Counters carried with the socket.
    pub fn stats(&self) -> DatagramStats {
        self.stats
    }
}

/// A migrateable datagram socket's state (the roam socket module for UDP).
pub struct DatagramSocket {
    config: DatagramConfig,
    id: SocketId,
    local: SocketAddr,
    epoch: u64,
    rng: ChaCha20Rng,
    assocs: HashMap<u64, Assoc>,
    /// Application-known and current addresses → association (the address translation
    /// table, claims 27, 42, 43).
    by_addr: HashMap<SocketAddr, u64>,
    handshakes: HashMap<SocketAddr, Handshake>,
    /// Half-open associations (answered, not yet confirmed), oldest first.
    half_open: VecDeque<u64>,
    /// The `Hello` token bucket: tokens (in thousandths) and when it was last filled.
    hello_tokens: (u64, Option<Instant>),
    inbox: VecDeque<(SocketAddr, Bytes)>,
    transmits: VecDeque<(SocketAddr, Bytes)>,
    /// Where `Data` packets are sealed (PROTOCOL.md §10.3).
    seal_block: BytesMut,
    events: VecDeque<DatagramEvent>,
    /// A freeze in progress.
    freezing: Option<Freeze>,
    frozen: bool,
    wake_recv: bool,
    stats: DatagramStats,
}

impl std::fmt::Debug for DatagramSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramSocket")
            .field("id", &self.id)
            .field("local", &self.local)
            .field("epoch", &self.epoch)
            .field("peers", &self.assocs.len())
            .finish_non_exhaustive()
    }
}

impl DatagramSocket {
    /// A new socket bound (by the driver) at `local`; `seed` feeds its CSPRNG.
    pub fn new(config: DatagramConfig, local: SocketAddr, seed: [u8; 32]) -> DatagramSocket {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        DatagramSocket {
            config,
            id: SocketId(id),
            local,
            epoch: 0,
            rng,
            assocs: HashMap::new(),
            by_addr: HashMap::new(),
            handshakes: HashMap::new(),
            half_open: VecDeque::new(),
            hello_tokens: (0, None),
            inbox: VecDeque::new(),
            transmits: VecDeque::new(),
            seal_block: BytesMut::new(),
            events: VecDeque::new(),
            freezing: None,
            frozen: false,
            wake_recv: false,
            stats: DatagramStats::default(),
        }
    }

    /// Rebuild a frozen socket at its new address and re-associate with every peer in its
    /// table (claims 10, 11, 21d, 24, 25): one `Reassoc` each, at a new epoch.
    pub fn from_image(
        image: DatagramImage,
        local: SocketAddr,
        config: DatagramConfig,
        seed: [u8; 32],
        now: Instant,
    ) -> DatagramSocket {
        let mut s = DatagramSocket::new(config, local, seed);
        s.id = image.id;
        s.epoch = image.epoch + 1;
        s.stats = image.stats;
        s.stats.migrations += 1;
        for a in image.assocs {
            s.by_addr.insert(a.known_addr, a.id);
            s.by_addr.insert(a.addr, a.id);
            let mut row = Assoc::new(
                a.id,
                s.id,
                a.peer,
                (a.key, a.suite),
                a.known_addr,
                a.confirmed,
            );
            row.addr = a.addr;
            row.peer_epoch = a.peer_epoch;
            row.tx_counter = a.tx_counter;
            row.window = a.window;
            row.held = a.held.into();
            if !row.confirmed {
                s.half_open.push_back(a.id);
            }
            s.assocs.insert(a.id, row);
        }
        let ids: Vec<u64> = s.assocs.keys().copied().collect();
        for id in ids {
            s.send_reassoc(now, id, false);
        }
        for (dest, queued) in image.pending {
            for d in queued {
                // Re-queued for a fresh handshake; errors cannot occur for sizes that fit.
                let _ = s.send_to(now, dest, &d);
            }
        }
        s.inbox = image.inbox.into();
        s.wake_recv = !s.inbox.is_empty();
        s
    }

    // ------------------------------------------------------------------ getters

    /// The socket's id.
    pub fn id(&self) -> SocketId {
        self.id
    }

    /// The address the driver bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The migration epoch (planned moves so far).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counters.
    pub fn stats(&self) -> DatagramStats {
        self.stats
    }

    /// The association table.
    pub fn peers(&self) -> Vec<PeerEntry> {
        let mut v: Vec<PeerEntry> = self
            .assocs
            .values()
            .map(|a| PeerEntry {
                known_addr: a.known_addr,
                addr: a.addr,
                socket: a.peer,
                peer_epoch: a.peer_epoch,
                migrating: a.migrating_since.is_some(),
                reassociating: a.reassoc.is_some(),
                suite: a.suite,
            })
            .collect();
        v.sort_by_key(|p| p.known_addr);
        v
    }

    /// True once frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Whether the application's receiver should be woken (clears the flag).
    pub fn take_wake_recv(&mut self) -> bool {
        std::mem::take(&mut self.wake_recv)
    }

    // ----------------------------------------------------------------- commands

    /// Send `payload` to the peer the application knows as `dest`. Associates on first
    /// contact (the datagram waits, bounded, until then); while the peer is migrating the
    /// datagram is held and sent after it re-associates.
    pub fn send_to(
        &mut self,
        now: Instant,
        dest: SocketAddr,
        payload: &[u8],
    ) -> Result<(), DatagramError> {
        if self.frozen || self.freezing.is_some() {
            return Err(DatagramError::Frozen);
        }
        let max = self.config.max_payload.min(MAX_UDP_PAYLOAD - DATA_OVERHEAD);
        if payload.len() > max {
            return Err(DatagramError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        if let Some(id) = self.by_addr.get(&dest).copied() {
            let cap = self.config.hold_capacity;
            let a = self
                .assocs
                .get_mut(&id)
                .expect("by_addr points at live rows");
            if a.migrating_since.is_some() {
                if a.held.len() >= cap {
                    a.held.pop_front();
                    self.stats.dropped_hold += 1;
                }
                a.held.push_back(Bytes::copy_from_slice(payload));
            } else {
                let to = a.addr;
                let p = a.data_packet(
                    payload,
                    self.config.insecure_plaintext,
                    &mut self.seal_block,
                );
                self.transmits.push_back((to, p));
                self.stats.sent += 1;
            }
            return Ok(());
        }
        let payload = Bytes::copy_from_slice(payload);
        let cap = self.config.hold_capacity;
        if let Some(h) = self.handshakes.get_mut(&dest) {
            if h.queued.len() >= cap {
                h.queued.pop_front();
                self.stats.dropped_hold += 1;
            }
            h.queued.push_back(payload);
            return Ok(());
        }
        let mut secret = [0u8; 32];
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut secret);
        self.rng.fill_bytes(&mut nonce);
        let eph = Ephemeral::new(secret);
        let offered = offer_codes(self.config.suite_list());
        let hello = Packet::Hello {
            socket: self.id,
            eph: eph.public,
            nonce,
            suites: offered.clone(),
        }
        .encode();
        self.transmits.push_back((dest, hello.clone()));
        self.handshakes.insert(
            dest,
            Handshake {
                eph,
                hello,
                offered,
                retry: Retry::new(now, self.config.retry_initial),
                queued: VecDeque::from([payload]),
            },
        );
        Ok(())
    }

    /// The next received datagram and the address the application knows its sender by.
    pub fn recv(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.inbox.pop_front()
    }

    /// Length and sender of the next received datagram, without taking it.
    pub fn peek(&self) -> Option<(SocketAddr, usize)> {
        self.inbox.front().map(|(a, b)| (*a, b.len()))
    }

    /// Planned migration (PROTOCOL.md §10.4): tell every peer to hold its datagrams for us
    /// (`Freezing`, queued for the driver), keep receiving until each answered `FreezingAck`
    /// (what they sent before is then in our receive queue, the synchronization buffer) or
    /// `freeze_timeout` passed, then stop: [`DatagramEvent::Frozen`] and
    /// [`DatagramSocket::image`] follow.
    pub fn freeze(&mut self, now: Instant) -> Result<(), DatagramError> {
        if self.frozen || self.freezing.is_some() {
            return Err(DatagramError::Frozen);
        }
        let ids: Vec<u64> = self.assocs.keys().copied().collect();
        self.freezing = Some(Freeze {
            waiting: Vec::new(),
            deadline: now + self.config.freeze_timeout,
            resend: Retry::new(now, self.config.retry_initial),
        });
        for id in ids {
            self.announce_freezing(id);
        }
        self.check_frozen();
        Ok(())
    }

    /// Send `Freezing` on association `id` and wait for its answer (resent by the freeze's
    /// timer until then).
    fn announce_freezing(&mut self, id: u64) {
        if !self.send_freezing(id) {
            return;
        }
        if let Some(f) = self.freezing.as_mut() {
            f.waiting.push(id);
        }
    }

    /// Queue a `Freezing` for association `id`, to where the peer is now; false if there is
    /// no such association.
    fn send_freezing(&mut self, id: u64) -> bool {
        let Some(a) = self.assocs.get(&id) else {
            return false;
        };
        let mac = control_mac(&a.key, LABEL_FREEZING, a.id, self.epoch);
        let p = Packet::Freezing {
            assoc: a.id,
            epoch: self.epoch,
            mac,
        };
        self.transmits.push_back((a.addr, p.encode()));
        true
    }

    /// Frozen once every peer answered and every first contact in progress completed (its
    /// peer then got `Freezing` too), or at the deadline.
    fn check_frozen(&mut self) {
        if self.freezing.as_ref().is_some_and(|f| f.waiting.is_empty())
            && self.handshakes.is_empty()
        {
            self.finish_freeze();
        }
    }

    /// The freeze's timers: at the deadline it completes; before, `Freezing` is resent to
    /// every peer that has not answered, with backoff (PROTOCOL.md §10.4).
    fn on_freeze_timer(&mut self, now: Instant) {
        let (max_tries, max_delay) = (self.config.max_tries, self.config.retry_max);
        let Some(f) = self.freezing.as_mut() else {
            return;
        };
        if f.deadline <= now {
            self.finish_freeze();
            return;
        }
        if f.waiting.is_empty() || f.resend.tries >= max_tries || f.resend.next_at > now {
            return;
        }
        f.resend.bump(now, max_delay);
        let waiting = f.waiting.clone();
        for id in waiting {
            self.send_freezing(id);
        }
    }

    /// When the freeze's next timer (resend or deadline) is due.
    fn freeze_timer(&self, f: &Freeze) -> Instant {
        let resend = (!f.waiting.is_empty() && f.resend.tries < self.config.max_tries)
            .then_some(f.resend.next_at);
        resend.map_or(f.deadline, |r| r.min(f.deadline))
    }

    fn finish_freeze(&mut self) {
        self.freezing = None;
        self.frozen = true;
        self.events.push_back(DatagramEvent::Frozen);
    }

    /// The image of a frozen socket: association table, keys, epochs, datagrams waiting.
    pub fn image(&self) -> Option<DatagramImage> {
        if !self.frozen {
            return None;
        }
        let mut assocs: Vec<AssocImage> = self
            .assocs
            .values()
            .map(|a| AssocImage {
                id: a.id,
                peer: a.peer,
                key: a.key.clone(),
                suite: a.suite,
                known_addr: a.known_addr,
                addr: a.addr,
                peer_epoch: a.peer_epoch,
                tx_counter: a.tx_counter,
                window: a.window.clone(),
                confirmed: a.confirmed,
                held: a.held.iter().cloned().collect(),
            })
            .collect();
        assocs.sort_by_key(|a| a.id);
        let mut pending: Vec<(SocketAddr, Vec<Bytes>)> = self
            .handshakes
            .iter()
            .map(|(d, h)| (*d, h.queued.iter().cloned().collect()))
            .collect();
        pending.sort_by_key(|p| p.0);
        Some(DatagramImage {
            id: self.id,
            epoch: self.epoch,
            origin: self.local,
            assocs,
            pending,
            inbox: self.inbox.iter().cloned().collect(),
            stats: self.stats,
        })
    }

    // ------------------------------------------------------------------ handle_*

    /// Handle one datagram received from `from`. Malformed, forged, altered, replayed and stale
    /// packets are counted and dropped; nothing a peer or an attacker sends can make this fail.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: Bytes) {
        if self.frozen {
            return;
        }
        let len = bytes.len() as u64;
        let Ok(p) = Packet::decode(bytes) else {
            self.stats.refused += 1;
            return;
        };
        match p {
            Packet::Hello {
                socket,
                eph,
                nonce,
                suites,
            } => {
                if self.hello_allowed(now) {
                    self.on_hello(from, socket, eph, nonce, suites)
                } else {
                    self.stats.hello_limited += 1;
                }
            }
            p @ Packet::Welcome { .. } => self.on_welcome(from, p),
            Packet::Data {
                assoc,
                counter,
                sealed,
            } => self.on_data(now, from, len, assoc, counter, sealed, false),
            Packet::PlainData {
                assoc,
                counter,
                payload,
            } => self.on_data(now, from, len, assoc, counter, payload, true),
            p @ Packet::Reassoc { .. } => self.on_reassoc(now, from, len, p),
            Packet::ReassocAck { assoc, epoch, mac } => self.on_reassoc_ack(assoc, epoch, mac),
            Packet::Freezing { assoc, epoch, mac } => self.on_freezing(now, assoc, epoch, mac),
            Packet::FreezingAck { assoc, epoch, mac } => self.on_freezing_ack(assoc, epoch, mac),
            Packet::PathChallenge { assoc, data, mac } => {
                self.on_path_challenge(from, assoc, data, mac)
            }
            Packet::PathResponse { assoc, data, mac } => {
                self.on_path_response(now, from, assoc, data, mac)
            }
        }
    }

    /// Take a token from the `Hello` bucket (`hello_rate` per second, bursts of a tenth).
    fn hello_allowed(&mut self, now: Instant) -> bool {
        let rate = u64::from(self.config.hello_rate);
        let cap = (rate * 1000 / 10).max(1000);
        let (tokens, last) = self.hello_tokens;
        let refill = match last {
            None => cap,
            Some(t) => {
                let us = now
                    .saturating_duration_since(t)
                    .as_micros()
                    .min(u128::from(u32::MAX));
                // Thousandths of a token: rate per second is rate per million microseconds.
                (us as u64).saturating_mul(rate) / 1000
            }
        };
        let tokens = tokens.saturating_add(refill).min(cap);
        if tokens < 1000 {
            self.hello_tokens = (tokens, Some(now));
            return false;
        }
        self.hello_tokens = (tokens - 1000, Some(now));
        true
    }

    fn on_hello(
        &mut self,
        from: SocketAddr,
        socket: SocketId,
        eph: [u8; 32],
        nonce: [u8; 16],
        suites: Vec<u8>,
    ) {
        if self.freezing.is_some() {
            // Not while moving: the peer resends its Hello and reaches us after the thaw.
            return;
        }
        if socket == self.id {
            self.stats.refused += 1;
            return;
        }
        // A resent Hello we already answered: answer alike.
        if let Some(a) = self.assocs.values().find(|a| a.peer == socket) {
            match &a.answered {
                Some((e, welcome)) if *e == eph => {
                    self.transmits.push_back((from, welcome.clone()));
                }
                _ => self.stats.refused += 1,
            }
            return;
        }
        // Both sides said Hello at once: the lower socket id's Hello wins.
        if self.handshakes.contains_key(&from) && self.id < socket {
            return;
        }
        // Unauthenticated first contacts are bounded (PROTOCOL.md §10.6): the oldest half-open
        // association gives way; established ones never do.
        if self.config.max_half_open == 0 {
            self.stats.refused += 1;
            return;
        }
        while self.half_open.len() >= self.config.max_half_open {
            let Some(old) = self.half_open.pop_front() else {
                break;
            };
            self.evict(old);
            self.stats.half_open_evicted += 1;
        }
        if self.assocs.len() >= self.config.max_associations {
            self.stats.refused += 1;
            return;
        }
        // The first suite of the initiator's offer we support; none in common: no answer.
        // (A Hello's offer is never empty: the decoder refuses that.)
        let Some(suite) = choose_suite(&suites, self.config.suite_list()) else {
            self.stats.refused += 1;
            return;
        };
        let mut secret = [0u8; 32];
        let mut my_nonce = [0u8; 16];
        self.rng.fill_bytes(&mut secret);
        self.rng.fill_bytes(&mut my_nonce);
        let mine = Ephemeral::new(secret);
        let Ok(shared) = mine.agree(&eph) else {
            self.stats.refused += 1;
            return;
        };
        let hello = Packet::Hello {
            socket,
            eph,
            nonce,
            suites,
        }
        .encode();
        let mut w = Packet::Welcome {
            socket: self.id,
            to: socket,
            eph: mine.public,
            nonce: my_nonce,
            suite,
            mac: [0; 32],
        };
        let signed = w.signed();
        let (key, id) = crypto::datagram_key(&shared, &hello, &signed);
        if self.assocs.contains_key(&id) {
            self.stats.refused += 1;
            return;
        }
        if let Packet::Welcome { mac, .. } = &mut w {
            *mac = crypto::mac(&key, LABEL_WELCOME, &[&signed]);
        }
        let welcome = w.encode();
        self.transmits.push_back((from, welcome.clone()));
        self.install(from, id, socket, (key, suite), Some((eph, welcome)));
    }

    /// Forget a half-open association (its first contact never proved it can be reached).
    fn evict(&mut self, id: u64) {
        let Some(a) = self.assocs.remove(&id) else {
            return;
        };
        for addr in [a.known_addr, a.addr] {
            if self.by_addr.get(&addr) == Some(&id) {
                self.by_addr.remove(&addr);
            }
        }
        if let Some(f) = self.freezing.as_mut() {
            f.waiting.retain(|w| *w != id);
        }
    }

    /// A completed association becomes a row of the table (claims 9, 21b, 23): the datagrams
    /// queued for this first contact (ours, if our own Hello lost a tie or was answered) go out
    /// on it, and if we are freezing, the new peer is told to hold for us too. An association
    /// we answered (`answered`) is half-open until the peer sends an authenticated packet; it
    /// only takes over an address an established association has once confirmed.
    fn install(
        &mut self,
        from: SocketAddr,
        id: u64,
        peer: SocketId,
        key: (SessionKey, Suite),
        answered: Option<([u8; 32], Bytes)>,
    ) {
        let confirmed = answered.is_none();
        let mut row = Assoc::new(id, self.id, peer, key, from, confirmed);
        row.answered = answered;
        if let Some(h) = self.handshakes.remove(&from) {
            for payload in h.queued {
                let p = row.data_packet(
                    &payload,
                    self.config.insecure_plaintext,
                    &mut self.seal_block,
                );
                self.transmits.push_back((from, p));
                self.stats.sent += 1;
            }
        }
        let taken = self
            .by_addr
            .get(&from)
            .and_then(|o| self.assocs.get(o))
            .is_some_and(|o| o.confirmed);
        if confirmed || !taken {
            self.by_addr.insert(from, id);
        }
        if !confirmed {
            self.half_open.push_back(id);
        }
        self.assocs.insert(id, row);
        self.events
            .push_back(DatagramEvent::Associated { peer: from });
        if self.freezing.is_some() {
            self.announce_freezing(id);
            self.check_frozen();
        }
    }

    /// The peer of association `id` sent an authenticated packet: a half-open association is
    /// established (and takes over its address in the translation table).
    fn confirm(&mut self, id: u64) {
        let Some(a) = self.assocs.get_mut(&id) else {
            return;
        };
        if a.confirmed {
            return;
        }
        a.confirmed = true;
        self.by_addr.insert(a.known_addr, id);
        self.half_open.retain(|h| *h != id);
    }

    fn on_welcome(&mut self, from: SocketAddr, w: Packet) {
        let Packet::Welcome {
            socket,
            to,
            eph,
            suite,
            mac,
            ..
        } = &w
        else {
            return;
        };
        if *to != self.id {
            self.stats.refused += 1;
            return;
        }
        let Some(h) = self.handshakes.get(&from) else {
            // A duplicate Welcome after completion, or unsolicited.
            return;
        };
        let Ok(shared) = h.eph.agree(eph) else {
            self.stats.refused += 1;
            return;
        };
        let signed = w.signed();
        let (key, id) = crypto::datagram_key(&shared, &h.hello, &signed);
        if !crypto::verify(&key, LABEL_WELCOME, &[&signed], mac) || self.assocs.contains_key(&id) {
            self.stats.refused += 1;
            return;
        }
        // The choice must be one we offered; offer and choice are both in the transcript the
        // MAC covers, so a downgrade on the path fails it (PROTOCOL.md §10.2).
        let suite = *suite;
        if !h.offered.contains(&suite.code()) {
            self.stats.refused += 1;
            return;
        }
        self.install(from, id, *socket, (key, suite), None);
    }

    /// `Data` (PROTOCOL.md §10.3): refused unless its counter is new to the replay window and
    /// it authenticates; then queued for the application under the peer's known address.
    #[allow(clippy::too_many_arguments)]
    fn on_data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        len: u64,
        assoc: u64,
        counter: u64,
        body: Bytes,
        plaintext: bool,
    ) {
        let Some(a) = self.assocs.get_mut(&assoc) else {
            self.stats.refused += 1;
            return;
        };
        if plaintext != self.config.insecure_plaintext {
            // Clear data to a socket that encrypts, or the reverse: both ends must agree.
            self.stats.refused += 1;
            return;
        }
        if !a.window.fresh(counter) {
            self.stats.replayed += 1;
            return;
        }
        let payload = if plaintext {
            body
        } else {
            let header = data_header(dkind::DATA, assoc, counter);
            match aead::open(&a.rx, counter, &header, body) {
                Some(p) => p,
                None => {
                    self.stats.refused += 1;
                    self.stats.auth_failed += 1;
                    return;
                }
            }
        };
        a.window.mark(counter);
        if let Some(p) = a.probes.iter_mut().find(|p| p.addr == from) {
            p.received += len;
        }
        let known = a.known_addr;
        // Claim 28: data from a peer whose acknowledgement of our re-association has not
        // arrived yet: send the request again (at most once per fifth of the first retry
        // delay, so a burst of data does not become a burst of requests).
        let gap = self.config.retry_initial / 5;
        let resend = a.reassoc.as_ref().is_some_and(|r| now >= r.last_sent + gap);
        self.confirm(assoc);
        if resend {
            self.stats.reassoc_resent_on_data += 1;
            self.send_reassoc(now, assoc, true);
        }
        if self.inbox.len() >= self.config.recv_capacity {
            self.stats.dropped_recv += 1;
            return;
        }
        self.inbox.push_back((known, payload));
        self.stats.received += 1;
        self.wake_recv = true;
    }

    /// `Reassoc` (PROTOCOL.md §10.5): authenticated, at a newer epoch, from the address it
    /// came from. From the address we already send to it completes at once; from another one
    /// that address must first answer a path challenge, and datagrams for the peer are held
    /// meanwhile.
    fn on_reassoc(&mut self, now: Instant, from: SocketAddr, len: u64, p: Packet) {
        let Packet::Reassoc {
            assoc, epoch, mac, ..
        } = &p
        else {
            return;
        };
        let (assoc, epoch) = (*assoc, *epoch);
        let Some(a) = self.assocs.get(&assoc) else {
            self.stats.refused += 1;
            return;
        };
        if !crypto::verify(&a.key, LABEL_REASSOC, &[&p.signed()], mac) {
            self.stats.refused += 1;
            return;
        }
        // Strictly increasing epochs: a replay of an older request is refused; the current one
        // again (a resend) from the current address is only acknowledged again, from anywhere
        // else refused (a replay cannot move the peer back, nor anywhere).
        let (peer_epoch, current) = (a.peer_epoch, a.addr);
        let fresh_probe = !a.probes.iter().any(|p| p.addr == from);
        self.confirm(assoc);
        if epoch < peer_epoch || (epoch == peer_epoch && from != current) {
            self.stats.refused += 1;
            return;
        }
        if epoch == peer_epoch {
            // A hold stays: a `Freezing` at this epoch can only have come after it.
            self.send_reassoc_ack(assoc, epoch, from);
            return;
        }
        if from == current {
            // Thawed where it was: that address is the validated one.
            self.complete_move(assoc, from, epoch);
            return;
        }
        let mut challenge = [0u8; CHALLENGE_LEN];
        if fresh_probe {
            self.rng.fill_bytes(&mut challenge);
        }
        let a = self.assocs.get_mut(&assoc).expect("looked up above");
        // Hold what the application sends the peer until the new address answers.
        a.migrating_since.get_or_insert(now);
        if fresh_probe {
            if a.probes.len() >= MAX_PATH_PROBES {
                a.probes.remove(0);
            }
            a.probes.push(Probe {
                addr: from,
                epoch,
                challenge,
                received: 0,
                sent: 0,
                resend_at: None,
            });
        }
        let probe = a
            .probes
            .iter_mut()
            .find(|p| p.addr == from)
            .expect("found or pushed above");
        probe.epoch = probe.epoch.max(epoch);
        probe.received += len;
        self.challenge(now, assoc, from);
    }

    /// Send the path challenge of association `assoc`'s probe of `addr`, within the
    /// anti-amplification limit (RFC 9000 §8: at most 3x the bytes received from that
    /// address), and schedule a resend if the limit allows one more.
    fn challenge(&mut self, now: Instant, assoc: u64, addr: SocketAddr) {
        let retry = self.config.retry_initial;
        let Some(a) = self.assocs.get_mut(&assoc) else {
            return;
        };
        let Some(probe) = a.probes.iter_mut().find(|p| p.addr == addr) else {
            return;
        };
        let data = probe.challenge;
        let packet = Packet::PathChallenge {
            assoc,
            data,
            mac: path_mac(&a.key, LABEL_PATH_CHALLENGE, assoc, &data),
        }
        .encode();
        let size = packet.len() as u64;
        let budget = AMPLIFICATION_FACTOR * probe.received;
        if probe.sent + size > budget {
            probe.resend_at = None;
            self.stats.amplification_limited += 1;
            return;
        }
        probe.sent += size;
        probe.resend_at = (probe.sent + size <= budget).then_some(now + retry);
        self.transmits.push_back((addr, packet));
        self.stats.path_challenges_sent += 1;
    }

    fn send_reassoc_ack(&mut self, assoc: u64, epoch: u64, to: SocketAddr) {
        let Some(a) = self.assocs.get(&assoc) else {
            return;
        };
        let ack = Packet::ReassocAck {
            assoc,
            epoch,
            mac: control_mac(&a.key, LABEL_ACK, assoc, epoch),
        }
        .encode();
        self.transmits.push_back((to, ack));
    }

    /// A `PathChallenge` is answered only to the address we send the peer's traffic to, so
    /// nobody can use us to vouch for another address.
    fn on_path_challenge(
        &mut self,
        from: SocketAddr,
        assoc: u64,
        data: [u8; CHALLENGE_LEN],
        mac: [u8; MAC_LEN],
    ) {
        let Some(a) = self.assocs.get(&assoc) else {
            self.stats.refused += 1;
            return;
        };
        if !path_mac_ok(&a.key, LABEL_PATH_CHALLENGE, assoc, &data, &mac) || from != a.addr {
            self.stats.refused += 1;
            return;
        }
        let response = Packet::PathResponse {
            assoc,
            data,
            mac: path_mac(&a.key, LABEL_PATH_RESPONSE, assoc, &data),
        }
        .encode();
        self.transmits.push_back((from, response));
        self.confirm(assoc);
    }

    /// A `PathResponse` from an address being validated, echoing its challenge: the peer is
    /// there; the re-association completes.
    fn on_path_response(
        &mut self,
        _now: Instant,
        from: SocketAddr,
        assoc: u64,
        data: [u8; CHALLENGE_LEN],
        mac: [u8; MAC_LEN],
    ) {
        let Some(a) = self.assocs.get(&assoc) else {
            self.stats.refused += 1;
            return;
        };
        if !path_mac_ok(&a.key, LABEL_PATH_RESPONSE, assoc, &data, &mac) {
            self.stats.refused += 1;
            return;
        }
        // A late duplicate (the path is validated already) or a response to a challenge we
        // replaced is ignored quietly: it proves nothing about an address now.
        let Some(epoch) = a
            .probes
            .iter()
            .find(|p| p.addr == from && p.challenge == data)
            .map(|p| p.epoch)
        else {
            return;
        };
        if epoch <= a.peer_epoch {
            return;
        }
        self.confirm(assoc);
        self.complete_move(assoc, from, epoch);
    }

    /// The peer is at `addr` from `epoch` on: tables updated (claims 26, 27, 42, 43),
    /// `ReassocAck` sent there, then everything held for it, in order, before anything new.
    fn complete_move(&mut self, id: u64, addr: SocketAddr, epoch: u64) {
        let plaintext = self.config.insecure_plaintext;
        let Some(a) = self.assocs.get_mut(&id) else {
            return;
        };
        let old = a.addr;
        let known = a.known_addr;
        a.peer_epoch = epoch;
        a.addr = addr;
        a.probes.clear();
        a.migrating_since = None;
        let held: Vec<Bytes> = a.held.drain(..).collect();
        let block = &mut self.seal_block;
        let packets: Vec<Bytes> = held
            .iter()
            .map(|d| a.data_packet(d, plaintext, block))
            .collect();
        self.send_reassoc_ack(id, epoch, addr);
        for p in packets {
            self.transmits.push_back((addr, p));
            self.stats.sent += 1;
            self.stats.held_and_sent += 1;
        }
        // The translation table: the application's address for the peer, and the one it
        // used last, both lead to the new address (claims 27, 42, 43).
        if old != known && self.by_addr.get(&old) == Some(&id) {
            self.by_addr.remove(&old);
        }
        self.by_addr.insert(addr, id);
        self.stats.reassoc_accepted += 1;
        self.events.push_back(DatagramEvent::PeerMoved {
            peer: known,
            now_at: addr,
        });
    }

    fn on_reassoc_ack(&mut self, assoc: u64, epoch: u64, mac: [u8; MAC_LEN]) {
        let Some(a) = self.assocs.get_mut(&assoc) else {
            self.stats.refused += 1;
            return;
        };
        if epoch != self.epoch || !control_mac_ok(&a.key, LABEL_ACK, assoc, epoch, &mac) {
            self.stats.refused += 1;
            return;
        }
        if a.reassoc.take().is_some() {
            let peer = a.known_addr;
            self.events.push_back(DatagramEvent::Reassociated { peer });
        }
        self.confirm(assoc);
    }

    fn on_freezing(&mut self, now: Instant, assoc: u64, epoch: u64, mac: [u8; MAC_LEN]) {
        let Some(a) = self.assocs.get_mut(&assoc) else {
            self.stats.refused += 1;
            return;
        };
        if epoch != a.peer_epoch || !control_mac_ok(&a.key, LABEL_FREEZING, assoc, epoch, &mac) {
            self.stats.refused += 1;
            return;
        }
        a.migrating_since.get_or_insert(now);
        // Everything we sent it before this answer is ahead of it on the path.
        let ack = Packet::FreezingAck {
            assoc,
            epoch,
            mac: control_mac(&a.key, LABEL_FREEZING_ACK, assoc, epoch),
        }
        .encode();
        self.transmits.push_back((a.addr, ack));
        self.confirm(assoc);
    }

    fn on_freezing_ack(&mut self, assoc: u64, epoch: u64, mac: [u8; MAC_LEN]) {
        let Some(a) = self.assocs.get(&assoc) else {
            self.stats.refused += 1;
            return;
        };
        if epoch != self.epoch || !control_mac_ok(&a.key, LABEL_FREEZING_ACK, assoc, epoch, &mac) {
            self.stats.refused += 1;
            return;
        }
        if let Some(f) = self.freezing.as_mut() {
            f.waiting.retain(|id| *id != assoc);
        }
        self.confirm(assoc);
        self.check_frozen();
    }

    fn send_reassoc(&mut self, now: Instant, id: u64, resend: bool) {
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let Some(a) = self.assocs.get_mut(&id) else {
            return;
        };
        let mut p = Packet::Reassoc {
            assoc: id,
            epoch: self.epoch,
            nonce,
            mac: [0; 32],
        };
        let signed = p.signed();
        if let Packet::Reassoc { mac, .. } = &mut p {
            *mac = crypto::mac(&a.key, LABEL_REASSOC, &[&signed]);
        }
        // Sent to where the peer is now; it may itself be elsewhere than the application knows.
        self.transmits.push_back((a.addr, p.encode()));
        self.stats.reassoc_sent += 1;
        match &mut a.reassoc {
            // The backoff schedule is the timer's alone (`Retry::bump`): a resend triggered by
            // data must not postpone it, or data arriving without end would keep an
            // unacknowledged re-association alive, resent forever and never given up on.
            Some(r) if resend => r.last_sent = now,
            Some(_) => {}
            None => a.reassoc = Some(Retry::new(now, self.config.retry_initial)),
        }
    }

    /// Timers: resends of `Hello`, `Reassoc` and (while freezing) `Freezing` with backoff,
    /// giving up after `max_tries`; the freeze deadline; hold timeouts of peers that never came
    /// back.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.frozen {
            return;
        }
        if self.freezing.is_some() {
            self.on_freeze_timer(now);
            // Nothing else runs while moving; retries resume after the thaw.
            return;
        }
        let (max_tries, max_delay) = (self.config.max_tries, self.config.retry_max);
        let mut dead = Vec::new();
        for (dest, h) in self.handshakes.iter_mut() {
            if h.retry.next_at <= now {
                if h.retry.tries >= max_tries {
                    dead.push(*dest);
                } else {
                    h.retry.bump(now, max_delay);
                    self.transmits.push_back((*dest, h.hello.clone()));
                }
            }
        }
        for dest in dead {
            if let Some(h) = self.handshakes.remove(&dest) {
                self.stats.dropped_unreachable += h.queued.len() as u64;
            }
            self.events
                .push_back(DatagramEvent::PeerUnreachable { peer: dest });
        }
        let ids: Vec<u64> = self
            .assocs
            .values()
            .filter(|a| a.reassoc.as_ref().is_some_and(|r| r.next_at <= now))
            .map(|a| a.id)
            .collect();
        for id in ids {
            let a = self.assocs.get_mut(&id).expect("id from the table");
            let r = a.reassoc.as_mut().expect("filtered on Some");
            if r.tries >= max_tries {
                a.reassoc = None;
                let peer = a.known_addr;
                self.events
                    .push_back(DatagramEvent::PeerUnreachable { peer });
            } else {
                r.bump(now, max_delay);
                self.send_reassoc(now, id, true);
            }
        }
        let due: Vec<(u64, SocketAddr)> = self
            .assocs
            .values()
            .flat_map(|a| {
                a.probes
                    .iter()
                    .filter(|p| p.resend_at.is_some_and(|t| t <= now))
                    .map(|p| (a.id, p.addr))
            })
            .collect();
        for (id, addr) in due {
            self.challenge(now, id, addr);
        }
        let hold = self.config.hold_timeout;
        for a in self.assocs.values_mut() {
            if a.migrating_since
                .is_some_and(|t| now.saturating_duration_since(t) >= hold)
            {
                a.migrating_since = None;
                a.probes.clear();
                self.stats.dropped_unreachable += a.held.len() as u64;
                a.held.clear();
                self.events
                    .push_back(DatagramEvent::PeerUnreachable { peer: a.known_addr });
            }
        }
    }

    // ------------------------------------------------------------------- poll_*

    /// The next datagram to send: destination and UDP payload.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DatagramEvent> {
        self.events.pop_front()
    }

    /// When [`DatagramSocket::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.frozen {
            return None;
        }
        if let Some(f) = &self.freezing {
            return Some(self.freeze_timer(f));
        }
        let hs = self.handshakes.values().map(|h| h.retry.next_at);
        let ra = self
            .assocs
            .values()
            .filter_map(|a| a.reassoc.as_ref().map(|r| r.next_at));
        let hold = self
            .assocs
            .values()
            .filter_map(|a| a.migrating_since.map(|t| t + self.config.hold_timeout));
        let probes = self
            .assocs
            .values()
            .flat_map(|a| a.probes.iter().filter_map(|p| p.resend_at));
        hs.chain(ra).chain(hold).chain(probes).min()
    }
}

/// First bytes of every datagram-socket image.
pub const DATAGRAM_IMAGE_MAGIC: [u8; 8] = *b"ROAMDGI\0";
/// The datagram image format version this crate writes. Version 2 added the packet counters and
/// replay windows of encrypted `Data`; version 3 each association's AEAD suite. Version 2
/// images are still read (their associations use ChaCha20-Poly1305); version 1 images are
/// refused ([`crate::ImageError::UnsupportedVersion`]).
pub const DATAGRAM_IMAGE_VERSION: u16 = 3;
/// The oldest datagram image format version this crate reads.
pub const DATAGRAM_IMAGE_VERSION_MIN: u16 = 2;
/// Counters in a datagram image's statistics.
const STATS_FIELDS: usize = 17;

/// `magic | version u16 | body length u32 | body | SHA-256 of all before` (PROTOCOL.md §7's
/// envelope, with the datagram image's own version).
fn seal_image(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + body.len() + 32);
    out.put_slice(&DATAGRAM_IMAGE_MAGIC);
    out.put_u16(DATAGRAM_IMAGE_VERSION);
    // Image bodies are bounded by the socket's queue capacities (far below 4 GiB).
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    let digest = crypto::sha256(&out);
    out.put_slice(&digest);
    out
}

impl DatagramImage {
    /// Encode for transport or storage (same envelope as stream images, PROTOCOL.md §7).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + 128 * self.assocs.len());
        b.put_slice(&self.id.0);
        b.put_u64(self.epoch);
        b.put_socket_addr(self.origin);
        b.put_u32(self.assocs.len() as u32);
        for a in &self.assocs {
            b.put_u64(a.id);
            b.put_slice(&a.peer.0);
            b.put_slice(&a.key.0);
            b.put_u8(a.suite.code());
            b.put_socket_addr(a.known_addr);
            b.put_socket_addr(a.addr);
            b.put_u64(a.peer_epoch);
            b.put_u64(a.tx_counter);
            b.put_u64(a.window.next);
            for w in a.window.bits {
                b.put_u64(w);
            }
            b.put_u8(u8::from(a.confirmed));
            put_datagrams(&mut b, &a.held);
        }
        b.put_u32(self.pending.len() as u32);
        for (dest, q) in &self.pending {
            b.put_socket_addr(*dest);
            put_datagrams(&mut b, q);
        }
        b.put_u32(self.inbox.len() as u32);
        for (from, d) in &self.inbox {
            b.put_socket_addr(*from);
            b.put_var_bytes(d);
        }
        for v in stats_fields(&self.stats) {
            b.put_u64(v);
        }
        seal_image(&b)
    }

    /// Decode and verify an image made by [`DatagramImage::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<DatagramImage, crate::ImageError> {
        use crate::ImageError;
        let (version, body) = crate::image::open_versioned(
            &DATAGRAM_IMAGE_MAGIC,
            DATAGRAM_IMAGE_VERSION_MIN,
            DATAGRAM_IMAGE_VERSION,
            bytes,
        )?;
        let mut r = Reader::new(body);
        let id = SocketId(r.array("socket id")?);
        let epoch = r.u64("epoch")?;
        let origin = r.socket_addr("origin")?;
        let n = r.u32("peer count")?;
        let mut assocs = Vec::new();
        for _ in 0..n {
            assocs.push(AssocImage {
                id: r.u64("association id")?,
                peer: SocketId(r.array("peer socket id")?),
                key: SessionKey(r.array("key")?),
                suite: if version >= 3 {
                    let code = r.u8("suite")?;
                    Suite::from_code(code).ok_or(ImageError::UnknownSuite(code))?
                } else {
                    Suite::ChaCha20Poly1305
                },
                known_addr: r.socket_addr("known address")?,
                addr: r.socket_addr("address")?,
                peer_epoch: r.u64("peer epoch")?,
                tx_counter: r.u64("packet counter")?,
                window: {
                    let next = r.u64("replay window")?;
                    let mut bits = [0u64; WINDOW_WORDS];
                    for w in &mut bits {
                        *w = r.u64("replay window")?;
                    }
                    ReplayWindow { next, bits }
                },
                confirmed: r.bool("confirmed")?,
                held: get_datagrams(&mut r)?,
            });
        }
        let n = r.u32("pending count")?;
        let mut pending = Vec::new();
        for _ in 0..n {
            pending.push((r.socket_addr("destination")?, get_datagrams(&mut r)?));
        }
        let n = r.u32("inbox count")?;
        let mut inbox = Vec::new();
        for _ in 0..n {
            let from = r.socket_addr("sender")?;
            inbox.push((from, Bytes::copy_from_slice(r.var_bytes("datagram")?)));
        }
        let mut st = [0u64; STATS_FIELDS];
        for v in &mut st {
            *v = r.u64("stats")?;
        }
        r.finish()?;
        const LIMIT: u64 = 1 << 62;
        if epoch >= LIMIT
            || st.iter().any(|&v| v >= LIMIT)
            || assocs
                .iter()
                .any(|a| a.peer_epoch >= LIMIT || a.tx_counter >= LIMIT || a.window.next >= LIMIT)
        {
            return Err(ImageError::Inconsistent("counters out of range"));
        }
        let too_big = |d: &Bytes| d.len() > MAX_UDP_PAYLOAD - DATA_OVERHEAD;
        if assocs.iter().any(|a| a.held.iter().any(too_big))
            || pending.iter().any(|(_, q)| q.iter().any(too_big))
            || inbox.iter().any(|(_, d)| too_big(d))
        {
            return Err(ImageError::Inconsistent("datagram larger than UDP allows"));
        }
        let mut ids: Vec<u64> = assocs.iter().map(|a| a.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != assocs.len() {
            return Err(ImageError::Inconsistent("duplicate association"));
        }
        Ok(DatagramImage {
            id,
            epoch,
            origin,
            assocs,
            pending,
            inbox,
            stats: DatagramStats {
                sent: st[0],
                received: st[1],
                dropped_hold: st[2],
                dropped_recv: st[3],
                dropped_unreachable: st[4],
                held_and_sent: st[5],
                reassoc_sent: st[6],
                reassoc_resent_on_data: st[7],
                reassoc_accepted: st[8],
                refused: st[9],
                migrations: st[10],
                auth_failed: st[11],
                replayed: st[12],
                path_challenges_sent: st[13],
                amplification_limited: st[14],
                half_open_evicted: st[15],
                hello_limited: st[16],
            },
        })
    }
}

fn stats_fields(s: &DatagramStats) -> [u64; STATS_FIELDS] {
    [
        s.sent,
        s.received,
        s.dropped_hold,
        s.dropped_recv,
        s.dropped_unreachable,
        s.held_and_sent,
        s.reassoc_sent,
        s.reassoc_resent_on_data,
        s.reassoc_accepted,
        s.refused,
        s.migrations,
        s.auth_failed,
        s.replayed,
        s.path_challenges_sent,
        s.amplification_limited,
        s.half_open_evicted,
        s.hello_limited,
    ]
}

fn put_datagrams(b: &mut Vec<u8>, ds: &[Bytes]) {
    b.put_u32(ds.len() as u32);
    for d in ds {
        b.put_var_bytes(d);
    }
}

fn get_datagrams(r: &mut Reader<'_>) -> Result<Vec<Bytes>, DecodeError> {
    let n = r.u32("datagram count")?;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Bytes::copy_from_slice(r.var_bytes("datagram")?));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(h: u8, p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, h], p))
    }

    /// Deliver everything each socket wants to send to whichever socket is at the address.
    fn pump(now: Instant, socks: &mut [&mut DatagramSocket]) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..socks.len() {
                while let Some((to, bytes)) = socks[i].poll_transmit() {
                    moved = true;
                    let from = socks[i].local_addr();
                    if let Some(j) = socks.iter().position(|s| s.local_addr() == to) {
                        socks[j].handle(now, from, bytes);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("no quiescence");
    }

    #[test]
    fn associate_send_migrate_and_translate() {
        let now = Instant::now();
        let cfg = DatagramConfig::default();
        let mut a = DatagramSocket::new(cfg.clone(), addr(2, 1000), [1; 32]);
        let mut b = DatagramSocket::new(cfg.clone(), addr(3, 1000), [2; 32]);
        a.send_to(now, b.local_addr(), b"hello").unwrap();
        pump(now, &mut [&mut a, &mut b]);
        assert_eq!(
            b.recv(),
            Some((addr(2, 1000), Bytes::from_static(b"hello")))
        );
        assert_eq!(a.peers().len(), 1);
        assert_eq!(b.peers().len(), 1);

        b.send_to(now, addr(2, 1000), b"unread").unwrap();
        pump(now, &mut [&mut a, &mut b]);
        a.freeze(now).unwrap();
        assert!(!a.is_frozen(), "waits for the peer's FreezingAck");
        pump(now, &mut [&mut a, &mut b]);
        assert!(a.is_frozen());
        assert_eq!(
            a.poll_event(),
            Some(DatagramEvent::Associated {
                peer: addr(3, 1000)
            })
        );
        assert_eq!(a.poll_event(), Some(DatagramEvent::Frozen));
        assert!(b.peers()[0].migrating);
        // Held for the migrating peer, not sent into the void.
        b.send_to(now, addr(2, 1000), b"held").unwrap();
        assert_eq!(b.poll_transmit(), None);

        let image = DatagramImage::from_bytes(&a.image().unwrap().to_bytes()).unwrap();
        assert_eq!(image.buffered_datagrams(), 1);
        let mut a2 = DatagramSocket::from_image(image, addr(4, 2000), cfg, [3; 32], now);
        pump(now, &mut [&mut a2, &mut b]);
        // Buffered input first, then what was held.
        assert_eq!(a2.recv().unwrap().1, Bytes::from_static(b"unread"));
        assert_eq!(a2.recv().unwrap().1, Bytes::from_static(b"held"));
        let p = &b.peers()[0];
        assert_eq!(
            (p.known_addr, p.addr, p.peer_epoch),
            (addr(2, 1000), addr(4, 2000), 1)
        );
        assert!(!a2.peers()[0].reassociating);
        // The application keeps using the old address; the sender keeps its old name.
        b.send_to(now, addr(2, 1000), b"translated").unwrap();
        a2.send_to(now, addr(3, 1000), b"reply").unwrap();
        pump(now, &mut [&mut a2, &mut b]);
        assert_eq!(a2.recv().unwrap().1, Bytes::from_static(b"translated"));
        assert_eq!(
            b.recv(),
            Some((addr(2, 1000), Bytes::from_static(b"reply")))
        );
    }

    #[test]
    fn oversized_datagrams_are_an_error() {
        let now = Instant::now();
        let cfg = DatagramConfig {
            max_payload: 1200,
            ..DatagramConfig::default()
        };
        let mut a = DatagramSocket::new(cfg, addr(2, 1), [1; 32]);
        assert_eq!(
            a.send_to(now, addr(3, 1), &[0; 1201]),
            Err(DatagramError::TooLarge {
                len: 1201,
                max: 1200
            })
        );
        assert!(a.send_to(now, addr(3, 1), &[0; 1200]).is_ok());
    }

    #[test]
    fn associations_negotiate_a_suite_and_images_keep_it() {
        let now = Instant::now();
        let with = |suites: Vec<Suite>| DatagramConfig {
            suites,
            ..DatagramConfig::default()
        };
        let chacha_first = with(vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm]);
        let aes_only = with(vec![Suite::Aes256Gcm]);
        let chacha_only = with(vec![Suite::ChaCha20Poly1305]);
        let d = DatagramConfig::default();
        for (mine, theirs, want) in [
            (&d, &d, Some(Suite::Aes256Gcm)),
            (&chacha_first, &d, Some(Suite::ChaCha20Poly1305)),
            (&d, &chacha_only, Some(Suite::ChaCha20Poly1305)),
            (&aes_only, &chacha_first, Some(Suite::Aes256Gcm)),
            (&aes_only, &chacha_only, None),
        ] {
            let mut a = DatagramSocket::new(mine.clone(), addr(2, 1000), [1; 32]);
            let mut b = DatagramSocket::new(theirs.clone(), addr(3, 1000), [2; 32]);
            a.send_to(now, b.local_addr(), b"hello").unwrap();
            pump(now, &mut [&mut a, &mut b]);
            let Some(want) = want else {
                assert!(a.peers().is_empty() && b.peers().is_empty());
                assert_eq!(b.stats().refused, 1);
                continue;
            };
            assert_eq!(b.recv().map(|r| r.1), Some(Bytes::from_static(b"hello")));
            assert_eq!((a.peers()[0].suite, b.peers()[0].suite), (want, want));
            a.freeze(now).unwrap();
            pump(now, &mut [&mut a, &mut b]);
            let bytes = a.image().unwrap().to_bytes();
            let image = DatagramImage::from_bytes(&bytes).unwrap();
            assert_eq!(image.assocs[0].suite, want);
            // Thawed under a configuration preferring the other suite: it keeps its own.
            let mut a2 = DatagramSocket::from_image(
                image,
                addr(4, 1000),
                chacha_first.clone(),
                [3; 32],
                now,
            );
            pump(now, &mut [&mut a2, &mut b]);
            assert_eq!(a2.peers()[0].suite, want);
            a2.send_to(now, addr(3, 1000), b"moved").unwrap();
            pump(now, &mut [&mut a2, &mut b]);
            assert_eq!(b.recv().map(|r| r.1), Some(Bytes::from_static(b"moved")));
            assert_eq!(b.stats().auth_failed, 0);
            // The same image as version 2 (no suite byte): read as ChaCha20-Poly1305. The byte
            // follows the socket id, epoch, origin (v4), peer count, association id, peer
            // socket id and key.
            let at = 14 + 16 + 8 + 7 + 4 + 8 + 16 + 32;
            assert_eq!(bytes[at], want.code());
            let mut body = bytes[14..at].to_vec();
            body.extend_from_slice(&bytes[at + 1..bytes.len() - 32]);
            let mut v2 = Vec::new();
            v2.put_slice(&DATAGRAM_IMAGE_MAGIC);
            v2.put_u16(2);
            v2.put_u32(body.len() as u32);
            v2.put_slice(&body);
            let digest = crypto::sha256(&v2);
            v2.put_slice(&digest);
            let old = DatagramImage::from_bytes(&v2).unwrap();
            assert_eq!(old.assocs[0].suite, Suite::ChaCha20Poly1305);
            // An unknown suite code is a typed error.
            let mut unknown = bytes[..bytes.len() - 32].to_vec();
            unknown[at] = 0x7f;
            let digest = crypto::sha256(&unknown);
            unknown.put_slice(&digest);
            assert_eq!(
                DatagramImage::from_bytes(&unknown),
                Err(crate::ImageError::UnknownSuite(0x7f))
            );
        }
    }

    #[test]
    fn packets_round_trip_and_garbage_is_an_error() {
        let ps = [
            Packet::Hello {
                socket: SocketId([1; 16]),
                eph: [2; 32],
                nonce: [3; 16],
                suites: vec![2, 1, 99],
            },
            Packet::Welcome {
                socket: SocketId([1; 16]),
                to: SocketId([4; 16]),
                eph: [2; 32],
                nonce: [3; 16],
                suite: Suite::Aes256Gcm,
                mac: [5; 32],
            },
            Packet::Data {
                assoc: 7,
                counter: 3,
                sealed: Bytes::from_static(b"x and a 16-byte tag"),
            },
            Packet::PlainData {
                assoc: 7,
                counter: 3,
                payload: Bytes::from_static(b"x"),
            },
            Packet::Reassoc {
                assoc: 7,
                epoch: 2,
                nonce: [1; 16],
                mac: [2; 32],
            },
            Packet::PathChallenge {
                assoc: 7,
                data: [5; 16],
                mac: [6; 32],
            },
            Packet::PathResponse {
                assoc: 7,
                data: [5; 16],
                mac: [6; 32],
            },
            Packet::ReassocAck {
                assoc: 7,
                epoch: 2,
                mac: [3; 32],
            },
            Packet::Freezing {
                assoc: 7,
                epoch: 2,
                mac: [3; 32],
            },
            Packet::FreezingAck {
                assoc: 7,
                epoch: 2,
                mac: [4; 32],
            },
        ];
        for p in ps {
            let b = p.encode();
            assert_eq!(Packet::decode(b.clone()).unwrap(), p);
            for n in 0..b.len() {
                let min = match p {
                    Packet::Data { .. } => DATA_OVERHEAD,
                    Packet::PlainData { .. } => DATA_HEADER,
                    _ => b.len(),
                };
                if n < min {
                    assert!(Packet::decode(b.slice(..n)).is_err());
                }
            }
        }
        assert!(Packet::decode(Bytes::from_static(b"GET / HTTP/1.1")).is_err());
        // An empty offer, a Hello of version 1 (before suites), or an unknown chosen suite, is
        // malformed.
        let hello = Packet::Hello {
            socket: SocketId([1; 16]),
            eph: [2; 32],
            nonce: [3; 16],
            suites: Vec::new(),
        }
        .encode();
        assert_eq!(
            Packet::decode(hello.clone()),
            Err(DecodeError::Invalid("suite count").into())
        );
        let mut v1 = hello[..hello.len() - 1].to_vec();
        v1[6] = 1;
        assert_eq!(
            Packet::decode(v1.into()),
            Err(FrameError::UnsupportedVersion(1))
        );
        let mut welcome = Packet::Welcome {
            socket: SocketId([1; 16]),
            to: SocketId([4; 16]),
            eph: [2; 32],
            nonce: [3; 16],
            suite: Suite::ChaCha20Poly1305,
            mac: [5; 32],
        }
        .encode()
        .to_vec();
        let at = welcome.len() - MAC_LEN - 1;
        welcome[at] = 0;
        assert_eq!(
            Packet::decode(welcome.into()),
            Err(DecodeError::Invalid("suite").into())
        );
    }
}
