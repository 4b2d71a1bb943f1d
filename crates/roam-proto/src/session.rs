//! The roam socket module: one session's state machine (PROTOCOL.md §4–§7).
//!
//! This object performs no I/O whatsoever. A driver feeds it what happened and polls out what to
//! do. Its methods fall into four groups, called in this order by a driver:
//!
//! - **getters**: [`Session::id`], [`Session::link`], [`Session::stats`], …
//! - **`handle_*`**: [`Session::handle_frame`] for frames read from the current connection,
//!   [`Session::handle_timeout`] when [`Session::poll_timeout`] expires,
//!   [`Session::handle_connection_lost`], and the re-association steps
//!   ([`Session::start_reassoc`] / [`Session::handle_accept`] / [`Session::handle_moved`] on the
//!   dialing side, [`Session::handle_reassoc`] / [`Session::handle_confirm`] on the listening
//!   side);
//! - **commands** from the application: [`Session::write`], [`Session::read`],
//!   [`Session::shutdown_write`], [`Session::detach`], [`Session::freeze`];
//! - **`poll_*`**: [`Session::poll_transmit`] until it returns `None`, then
//!   [`Session::poll_event`] until `None`, then [`Session::poll_timeout`] to arm the timer.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::crypto::{self, Ephemeral, SessionKey, Traffic};
use crate::frame::{
    data_header, kind, Accept, Confirm, Frame, Hello, Moved, Reassoc, RefuseReason, Welcome,
    DATA_HEADER_LEN, HEADER_LEN, MAX_FRAME_BODY, TAG_LEN,
};
use crate::image::StreamImage;
use crate::secure::{choose_suite, offer_codes, PublicKey, Security, Suite};
use crate::types::{ConnId, EndpointId, Entropy, Epoch, Offset, SessionId};

/// Every receiver accepts at least this many bytes beyond its read offset before it has
/// advertised a window (PROTOCOL.md §4.2).
pub const MIN_WINDOW: u64 = 64 * 1024;

/// Consecutive `Moved` answers a dialer follows at once; beyond this it waits its redial backoff
/// before each further redirected dial, so a forwarding loop cannot spin (PROTOCOL.md §5.4).
pub const MAX_REDIRECTS: u32 = 4;

const LABEL_WELCOME: &[u8] = b"roam/v1/welcome";
const LABEL_REASSOC: &[u8] = b"roam/v1/reassoc";
const LABEL_ACCEPT: &[u8] = b"roam/v1/accept";
const LABEL_CONFIRM: &[u8] = b"roam/v1/confirm";
const LABEL_ASSOC_CONFIRM: &[u8] = b"roam/v1/assoc-confirm";
/// Sealed frames are encrypted into blocks split off one per frame (a block is reused once every
/// frame in it was written). A block is sized to the frame and the data waiting behind it, at
/// most this much, and a session quiet for a keepalive interval lets go of its block: a session
/// that sends little, or has gone idle, holds no large buffer.
const SEAL_BLOCK: usize = 256 * 1024;

/// Tunable limits and timers of a session. [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Bytes the application may have written but the peer not yet acknowledged; writes wait
    /// beyond it. Default 1 MiB.
    pub send_capacity: usize,
    /// Bytes received but not yet read that the session will hold; advertised to the peer as
    /// its window. At least [`MIN_WINDOW`]. Default 1 MiB.
    pub recv_capacity: usize,
    /// Largest payload in one `Data` frame. Default 64 KiB.
    pub max_frame_payload: usize,
    /// Send an acknowledgement at once when this many bytes are unacknowledged. Default 64 KiB.
    pub ack_threshold: u64,
    /// Otherwise acknowledge at most this long after receiving. Default 5 ms.
    pub ack_delay: Duration,
    /// Send a keep-alive after this long without sending. Default 2 s.
    pub keepalive_interval: Duration,
    /// Declare the connection dead after this long without receiving. Default 6 s.
    pub idle_timeout: Duration,
    /// Fail the session after this long without a working connection. Default 30 s.
    pub session_timeout: Duration,
    /// Give up waiting for the peer's `FreezeAck` after this long; the image then keeps every
    /// unacknowledged byte. Default 2 s.
    pub freeze_timeout: Duration,
    /// First delay before redialing a lost connection; doubles up to `redial_max`. Default 10 ms.
    /// Each wait is jittered: between half the backoff and the whole of it (PROTOCOL.md §8).
    pub redial_initial: Duration,
    /// Longest delay between redials (before jitter). Default 1 s.
    pub redial_max: Duration,
    /// Re-associations accepted but not yet confirmed that a session remembers. Default 4.
    pub max_pending_reassoc: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            send_capacity: 1 << 20,
            recv_capacity: 1 << 20,
            max_frame_payload: 64 * 1024,
            ack_threshold: 64 * 1024,
            ack_delay: Duration::from_millis(5),
            keepalive_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(6),
            session_timeout: Duration::from_secs(30),
            freeze_timeout: Duration::from_secs(2),
            redial_initial: Duration::from_millis(10),
            redial_max: Duration::from_secs(1),
            max_pending_reassoc: 4,
        }
    }
}

impl SessionConfig {
    /// Clamp every field into its valid range (e.g. `recv_capacity ≥ MIN_WINDOW`).
    pub fn normalized(mut self) -> Self {
        self.recv_capacity = self.recv_capacity.max(MIN_WINDOW as usize);
        self.send_capacity = self.send_capacity.max(1);
        self.max_frame_payload = self.max_frame_payload.clamp(1, MAX_FRAME_BODY - 64);
        self.ack_threshold = self.ack_threshold.max(1);
        self.max_pending_reassoc = self.max_pending_reassoc.max(1);
        self
    }
}

/// This side's identity and where it can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalInfo {
    /// The endpoint's identity.
    pub endpoint: EndpointId,
    /// The address peers dial to re-associate (the endpoint's listening or advertised address).
    pub contact: SocketAddr,
}

/// What a session knows of its peer: learned at association, updated at re-association.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer endpoint's identity.
    pub endpoint: EndpointId,
    /// Where the peer can be reached.
    pub contact: SocketAddr,
}

/// Why a session ended with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No working connection to the peer for the whole session timeout.
    #[error("peer unreachable for {0:?} (session timeout)")]
    TimedOut(Duration),
    /// The peer refused to re-associate.
    #[error("peer refused re-association: {0}")]
    Refused(RefuseReason),
}

/// Why the application cannot write now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The send buffer is full; wait for acknowledgements.
    #[error("send buffer full")]
    Blocked,
    /// The write half was shut down.
    #[error("write half closed")]
    Finished,
    /// The session is frozen or freezing.
    #[error("session frozen")]
    Frozen,
    /// The session failed.
    #[error(transparent)]
    Failed(SessionError),
}

/// Why the application cannot read now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// Nothing buffered yet; wait.
    #[error("no data available")]
    Blocked,
    /// The session is frozen or freezing.
    #[error("session frozen")]
    Frozen,
    /// The session failed.
    #[error(transparent)]
    Failed(SessionError),
}

/// Why [`Session::freeze`] could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FreezeError {
    /// A freeze already started.
    #[error("already frozen or freezing")]
    AlreadyFrozen,
    /// The session failed before it could be frozen.
    #[error(transparent)]
    Failed(SessionError),
    /// The session has closed; there is nothing to migrate.
    #[error("session closed")]
    Closed,
}

/// A frame on the current connection broke the protocol; the driver drops that connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol violation: {0}")]
pub struct ProtocolViolation(pub &'static str);

/// Why an association handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer's key confirmation did not verify.
    #[error("key confirmation failed")]
    BadProof,
    /// The peer's key is a low-order point.
    #[error("peer sent a weak key")]
    WeakKey,
    /// The peer refused.
    #[error("refused: {0}")]
    Refused(RefuseReason),
    /// The peer sent a frame that does not belong in the handshake.
    #[error("unexpected frame in handshake")]
    Unexpected,
    /// The peer's identity is not acceptable under this side's policy: its static key is
    /// missing or not pinned, or the pre-shared key settings differ.
    #[error("peer identity not accepted (not pinned, or pre-shared key mismatch)")]
    Unauthorized,
    /// One end runs the insecure plaintext mode and the other does not.
    #[error("security mode mismatch: one end runs insecure plaintext")]
    SecurityMismatch,
    /// The two ends accept no AEAD suite in common, or the listener chose one the dialer did
    /// not offer (PROTOCOL.md §5.1).
    #[error("no cipher suite in common")]
    NoCommonSuite,
}

impl HandshakeError {
    /// The `Refuse` a listener sends for this error.
    pub fn refuse_reason(&self) -> RefuseReason {
        match self {
            HandshakeError::Refused(r) => *r,
            HandshakeError::Unauthorized => RefuseReason::Unauthorized,
            HandshakeError::SecurityMismatch | HandshakeError::NoCommonSuite => {
                RefuseReason::SecurityMismatch
            }
            HandshakeError::BadProof | HandshakeError::WeakKey => RefuseReason::BadProof,
            HandshakeError::Unexpected => RefuseReason::Protocol,
        }
    }
}

/// Something the driver must act on, from [`Session::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Open a transport connection to this address, then call [`Session::start_reassoc`] on it,
    /// or [`Session::handle_dial_failed`] if it cannot be opened.
    Dial(SocketAddr),
    /// Close this connection; the session no longer uses it.
    CloseConnection(ConnId),
    /// A connection became current (after association or re-association).
    Established {
        /// The connection.
        conn: ConnId,
        /// The epoch now in force.
        epoch: Epoch,
    },
    /// The freeze finished; [`Session::image`] is ready.
    Frozen,
    /// Both directions finished and the application let go: the session is over.
    Closed,
    /// The session failed for good.
    Failed(SessionError),
}

/// Counters describing a session's life (they migrate with it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes the application wrote.
    pub bytes_written: u64,
    /// Bytes the application read.
    pub bytes_read: u64,
    /// Bytes sent again after a re-association because they were not known to be delivered
    /// (after a thaw this includes unacknowledged bytes of the image that were never sent).
    pub bytes_replayed: u64,
    /// Received bytes dropped because they had already arrived.
    pub bytes_duplicate: u64,
    /// Re-associations completed (migrations and reconnections).
    pub reassociations: u64,
    /// Transport connections lost without a planned freeze.
    pub connections_lost: u64,
    /// Planned migrations (freezes) this session went through, on either side.
    pub migrations: u64,
    /// Sealed frames that failed authentication (altered, replayed, injected or reordered); each
    /// dropped its connection, and the session re-associated (PROTOCOL.md §3.1).
    pub auth_failures: u64,
}

/// One frame ready for the current connection: a small header and an optional payload that is
/// sent by reference (a vectored write avoids copying it).
#[derive(Debug, Clone)]
pub struct Transmit {
    header: [u8; 32],
    header_len: u8,
    /// Payload bytes following the header (empty for control frames).
    pub payload: Bytes,
}

impl Transmit {
    fn control(frame: &Frame) -> Transmit {
        let enc = frame.to_bytes();
        let mut header = [0u8; 32];
        // Control frames polled from a session are at most 21 bytes.
        header[..enc.len()].copy_from_slice(&enc);
        Transmit {
            header,
            header_len: enc.len() as u8,
            payload: Bytes::new(),
        }
    }

    /// A frame that is all payload (no separate header).
    fn whole(frame: &Frame) -> Transmit {
        Transmit {
            header: [0; 32],
            header_len: 0,
            payload: frame.to_bytes().freeze(),
        }
    }

    /// `t` sealed under `traffic` (PROTOCOL.md §3.1): the header of a `Sealed` frame, and its
    /// body (inner frame encrypted in place in `block`, then the tag) as the payload. A new
    /// block, if one is needed, has room for `more` bytes after this frame (at most
    /// [`SEAL_BLOCK`] in all).
    fn sealed(
        t: &Transmit,
        traffic: &mut Traffic,
        block: &mut BytesMut,
        more: usize,
    ) -> Option<Transmit> {
        let body_len = t.len() + TAG_LEN;
        let mut header = [0u8; 32];
        header[0] = kind::SEALED;
        // Inner frames are bounded by MAX_FRAME_BODY, so the length fits in a u32.
        header[1..HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
        if block.capacity() < body_len {
            block.reserve(body_len.max(body_len.saturating_add(more).min(SEAL_BLOCK)));
        }
        block.extend_from_slice(t.header());
        block.extend_from_slice(&t.payload);
        let Ok(tag) = traffic.seal(&header[..HEADER_LEN], &mut block[..]) else {
            // The key is used up: this frame goes nowhere, and must not be sealed along with
            // the next one (the block holds nothing else: every frame is split off).
            block.clear();
            return None;
        };
        block.extend_from_slice(&tag);
        Some(Transmit {
            header,
            header_len: HEADER_LEN as u8,
            payload: block.split().freeze(),
        })
    }

    fn data(h: [u8; DATA_HEADER_LEN], payload: Bytes) -> Transmit {
        let mut header = [0u8; 32];
        header[..DATA_HEADER_LEN].copy_from_slice(&h);
        Transmit {
            header,
            header_len: DATA_HEADER_LEN as u8,
            payload,
        }
    }

    /// The frame header (for control frames, the whole frame).
    pub fn header(&self) -> &[u8] {
        &self.header[..self.header_len as usize]
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.header_len as usize + self.payload.len()
    }

    /// Never true: every frame has a header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Header and payload as one buffer (copies; for tests and simple drivers).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = self.header().to_vec();
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Where sessions that left an endpoint went: the endpoint's forwarding pointers
/// (PROTOCOL.md §5.4). A `Reassoc` for a session the endpoint no longer hosts is answered with
/// `Moved` to the recorded address instead of `Refuse(unknown session)`.
///
/// Bounded ([`ForwardTable::new`]'s capacity; the oldest entry is evicted first) and expiring
/// (each entry lives `ttl` after it was recorded). Like the rest of this crate it reads no
/// clock: the driver passes `now`.
#[derive(Debug, Clone)]
pub struct ForwardTable {
    capacity: usize,
    ttl: Duration,
    /// Session → (where it went, when the entry expires, insertion number).
    entries: HashMap<SessionId, (SocketAddr, Instant, u64)>,
    /// Insertion order, oldest first; entries whose number no longer matches are stale.
    order: VecDeque<(SessionId, u64)>,
    next: u64,
}

impl ForwardTable {
    /// Default number of entries an endpoint keeps: 65,536.
    pub const DEFAULT_CAPACITY: usize = 65_536;
    /// Default lifetime of an entry: 5 minutes.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

    /// An empty table holding at most `capacity` (at least 1) entries for `ttl` each.
    pub fn new(capacity: usize, ttl: Duration) -> ForwardTable {
        ForwardTable {
            capacity: capacity.max(1),
            ttl,
            entries: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
        }
    }

    /// Record at `now` that `session` went to the endpoint at `to` (replacing an older entry
    /// for it), evicting the oldest entry if the table is full.
    pub fn insert(&mut self, now: Instant, session: SessionId, to: SocketAddr) {
        self.expire(now);
        self.next += 1;
        self.entries
            .insert(session, (to, now + self.ttl, self.next));
        self.order.push_back((session, self.next));
        while self.entries.len() > self.capacity {
            self.pop_oldest();
        }
        if self.order.len() > 2 * self.capacity {
            let entries = &self.entries;
            self.order
                .retain(|(id, n)| entries.get(id).is_some_and(|e| e.2 == *n));
        }
    }

    /// Where `session` went, if recorded and not expired at `now`.
    pub fn get(&mut self, now: Instant, session: &SessionId) -> Option<SocketAddr> {
        self.expire(now);
        self.entries.get(session).map(|e| e.0)
    }

    /// Forget `session` (it lives here again).
    pub fn remove(&mut self, session: &SessionId) {
        self.entries.remove(session);
    }

    /// Entries held (some may have expired since the last call that took a `now`).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drop the oldest entries while they have expired. All entries live equally long, so
    /// insertion order is expiry order.
    fn expire(&mut self, now: Instant) {
        while let Some(&(id, n)) = self.order.front() {
            match self.entries.get(&id) {
                Some(e) if e.2 == n && e.1 > now => return,
                Some(e) if e.2 == n => {
                    self.entries.remove(&id);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }

    fn pop_oldest(&mut self) {
        while let Some((id, n)) = self.order.pop_front() {
            if self.entries.get(&id).is_some_and(|e| e.2 == n) {
                self.entries.remove(&id);
                return;
            }
        }
    }
}

/// A frame that [`Session::open_frame`] authenticated and decrypted on the session's current
/// connection; only it can make one, and [`Session::handle_opened`] takes only this.
#[derive(Debug)]
pub struct Opened(Frame);

impl Opened {
    /// The inner frame.
    pub fn frame(&self) -> &Frame {
        &self.0
    }
}

/// Proof that the peer demonstrated possession of the session key on a connection. Only the
/// verification paths in this module can make one, and a connection becomes current only with
/// one (PROTOCOL.md §5.2).
struct ProofOfKey(());

/// The current transport connection and its per-connection flags.
#[derive(Debug, Clone, Copy)]
struct Link {
    conn: ConnId,
    last_rx: Instant,
    last_tx: Instant,
    fin_sent: bool,
    freeze_sent: bool,
    freeze_ack_due: bool,
    /// Nothing more may be sent on this connection (after `FreezeAck`).
    closing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Freezing { deadline: Instant },
    Frozen,
    Closed,
    Failed,
}

/// A listener-side re-association accepted but not yet confirmed.
struct Pending {
    conn: ConnId,
    epoch: Epoch,
    key: SessionKey,
    reassoc_signed: Vec<u8>,
    accept_signed: Vec<u8>,
    peer: PeerInfo,
    peer_recv: Offset,
}

/// A dialer-side re-association in flight.
struct Dialing {
    /// Where this dial goes: the peer's contact address, or a `Moved` redirect.
    addr: SocketAddr,
    conn: Option<ConnId>,
    /// Set once our `Reassoc` is on the wire ([`Session::start_reassoc`]).
    eph: Option<Ephemeral>,
    reassoc_signed: Vec<u8>,
}

/// The dialing half of an association handshake (PROTOCOL.md §5.1).
pub struct Associating {
    local: LocalInfo,
    eph: Ephemeral,
    hello: Hello,
    security: Security,
    /// Seed of the session's redial jitter, from the entropy passed in.
    jitter: u64,
}

/// The input keying material of `k_0` (PROTOCOL.md §5.1): `DH(e_d, e_l)`, then
/// `DH(e_d, S_l)` if the listener presents a static key, `DH(s_d, e_l)` if the dialer does,
/// then the pre-shared key if both use one.
fn association_ikm(
    ee: [u8; 32],
    listener_static: Option<[u8; 32]>,
    dialer_static: Option<[u8; 32]>,
    psk: Option<&[u8; 32]>,
) -> Vec<[u8; 32]> {
    let mut ikm = vec![ee];
    ikm.extend(listener_static);
    ikm.extend(dialer_static);
    ikm.extend(psk.copied());
    ikm
}

/// A seed for the redial jitter from the entropy passed in. Its nonce goes out in the clear
/// in the handshake frame anyway; the jitter needs no secrecy, only that sessions differ.
fn jitter_seed(entropy: &Entropy) -> u64 {
    u64::from_le_bytes(entropy.nonce[..8].try_into().unwrap_or_default())
        ^ u64::from_le_bytes(entropy.nonce[8..].try_into().unwrap_or_default())
}

/// SplitMix64: one step of the jitter generator (not for anything secret).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A dialer's redirect (see `Session::redirect`).
#[derive(Debug, Clone, Copy)]
struct Redirect {
    addr: SocketAddr,
    /// The endpoint there, when the peer proved it is there with a verified `Reassoc` of its
    /// own (§5.5); adopted with the address once a dial there succeeds (an `Accept` does not
    /// name the endpoint). `None` for an (unauthenticated) `Moved`.
    endpoint: Option<EndpointId>,
}

impl Associating {
    /// Begin associating with the default (secure, trust-on-first-use) settings: returns the
    /// state to keep and the `Hello` to send.
    pub fn new(local: LocalInfo, entropy: &Entropy) -> (Associating, Frame) {
        Associating::with_security(local, entropy, &Security::default())
    }

    /// Begin associating under `security`: returns the state to keep and the `Hello` to send.
    pub fn with_security(
        local: LocalInfo,
        entropy: &Entropy,
        security: &Security,
    ) -> (Associating, Frame) {
        let eph = Ephemeral::new(entropy.secret);
        let hello = Hello {
            endpoint: local.endpoint,
            contact: local.contact,
            eph: eph.public,
            nonce: entropy.nonce,
            insecure: security.insecure_plaintext,
            psk: security.psk().is_some(),
            identity: security.identity.as_ref().map(|i| i.public_key()),
            suites: offer_codes(security.suite_list()),
        };
        let frame = Frame::Hello(hello.clone());
        let security = security.clone();
        (
            Associating {
                local,
                eph,
                hello,
                security,
                jitter: jitter_seed(entropy),
            },
            frame,
        )
    }

    /// Handle the listener's answer; on success the session runs on `conn`, its first frame
    /// the `Confirm`. It is established ([`Event::Established`]) once the listener answers
    /// that `Confirm` (PROTOCOL.md §5.1 step 5); if the connection is lost before, the session
    /// re-associates at epoch 0, and a `Refuse(unknown session)` (the `Confirm` never arrived)
    /// fails it with [`SessionError::Refused`].
    pub fn handle(
        self,
        now: Instant,
        conn: ConnId,
        frame: Frame,
        config: SessionConfig,
    ) -> Result<Session, HandshakeError> {
        let w = match frame {
            Frame::Welcome(w) => w,
            Frame::Refuse(r) => return Err(HandshakeError::Refused(r)),
            _ => return Err(HandshakeError::Unexpected),
        };
        if w.insecure != self.security.insecure_plaintext {
            return Err(HandshakeError::SecurityMismatch);
        }
        if w.psk != self.security.psk().is_some() || !self.security.admits(w.identity.as_ref()) {
            return Err(HandshakeError::Unauthorized);
        }
        // The choice must be one we offered (a Welcome without one means ChaCha20-Poly1305).
        // Both our offer and the choice are in the transcript the Welcome's MAC covers, so a
        // downgrade on the path fails that MAC (PROTOCOL.md §5.1).
        let suite = w.suite.unwrap_or(Suite::ChaCha20Poly1305);
        if !self.hello.suites.contains(&suite.code()) {
            return Err(HandshakeError::NoCommonSuite);
        }
        let ee = self
            .eph
            .agree(&w.eph)
            .map_err(|_| HandshakeError::WeakKey)?;
        let es = match &w.identity {
            Some(k) => Some(self.eph.agree(&k.0).map_err(|_| HandshakeError::WeakKey)?),
            None => None,
        };
        let se = match &self.security.identity {
            Some(i) => Some(i.key.agree(&w.eph).map_err(|_| HandshakeError::WeakKey)?),
            None => None,
        };
        let ikm = association_ikm(ee, es, se, self.security.psk());
        let ikm: Vec<&[u8]> = ikm.iter().map(|k| &k[..]).collect();
        let signed = w.signed();
        let hello = self.hello.transcript();
        let key = crypto::initial_key(&ikm, &hello, &signed);
        if !crypto::verify(&key, LABEL_WELCOME, &[&signed], &w.mac) {
            return Err(HandshakeError::BadProof);
        }
        let confirm = Frame::Confirm(Confirm {
            mac: crypto::mac(&key, LABEL_ASSOC_CONFIRM, &[&hello, &signed]),
        });
        let peer = PeerInfo {
            endpoint: w.endpoint,
            contact: w.contact,
        };
        let mut s = Session::new(config, w.session, self.local, peer, key, now, self.jitter);
        s.secure = !self.security.insecure_plaintext;
        s.suite = suite;
        s.peer_identity = w.identity;
        // Key confirmation for the listener, before any other frame (PROTOCOL.md §5.1 step 4).
        s.first_tx = Some(confirm);
        // Established once the listener shows it registered the session (§5.1 step 5).
        s.awaiting_listener = true;
        s.install_link(ProofOfKey(()), now, conn, true);
        Ok(s)
    }
}

/// One roam session: the state of a migrateable stream's roam socket module.
pub struct Session {
    config: SessionConfig,
    id: SessionId,
    local: LocalInfo,
    peer: PeerInfo,
    epoch: Epoch,
    key: SessionKey,
    /// Frames after the handshake are sealed (false only in the insecure plaintext mode).
    secure: bool,
    /// The AEAD suite frames are sealed with, chosen at association (PROTOCOL.md §5.1).
    suite: Suite,
    /// The peer's static key, if it presented one at association.
    peer_identity: Option<PublicKey>,
    /// The current connection's frame keys and counters (secure sessions with a link).
    traffic: Option<Traffic>,
    /// Where sealed frames are encrypted (PROTOCOL.md §3.1).
    seal_block: BytesMut,
    /// Listening side of an association: the dialer's key confirmation, expected as the first
    /// frame on the connection (PROTOCOL.md §5.1).
    awaiting_confirm: Option<[u8; 32]>,
    /// Dialing side of an association: the key confirmation to send before anything else.
    first_tx: Option<Frame>,
    /// Dialing side of an association: the listener has not yet shown that it verified our
    /// `Confirm` and holds the session (PROTOCOL.md §5.1 step 5). Cleared by the first frame
    /// it sends on the association's connection, or by a completed re-association (its
    /// `Accept`). Until then [`Event::Established`] is held back, and `Refuse(unknown
    /// session)` fails the session: the listener never registered it.
    awaiting_listener: bool,
    pending: VecDeque<Pending>,
    /// Dialing side: the epoch and key before our last `Accept`, kept until the listener shows
    /// it installed the new connection (any frame on it). If the listener froze before our
    /// `Confirm` reached it, its image still holds this epoch.
    unconfirmed: Option<(Epoch, SessionKey)>,
    dialing: Option<Dialing>,
    /// Where the next dial goes instead of `peer.contact`: learned from an (unauthenticated)
    /// `Moved`, dropped when a dial there fails, adopted as the contact once it succeeds.
    redirect: Option<Redirect>,
    /// `Moved` answers followed since the last successful re-association (PROTOCOL.md §5.4).
    redirects: u32,
    link: Option<Link>,
    /// This side opened the current (or last) connection, so it redials after a loss.
    dialer: bool,
    /// The peer announced a freeze: wait for its re-association instead of dialing.
    peer_migrating: bool,
    phase: Phase,
    down_since: Option<Instant>,
    next_dial: Option<Instant>,
    backoff: Duration,
    /// State of the generator of the redial jitter (PROTOCOL.md §8), seeded and refreshed from
    /// the entropy passed in: the core draws no randomness of its own.
    jitter: u64,
    failure: Option<SessionError>,

    // Send direction (PROTOCOL.md §4.1).
    tx_acked: Offset,
    retained: VecDeque<Bytes>,
    retained_len: u64,
    unsent: BytesMut,
    tx_next: Offset,
    /// Where sending resumes inside `retained` when `tx_next` is below the sent end: the index
    /// of the chunk holding `tx_next` and that chunk's first offset.
    replay_at: (usize, Offset),
    fin: Option<Offset>,
    fin_acked: bool,
    peer_limit: Offset,

    // Receive direction; `rx_queue` is the synchronization buffer (claims 6, 7).
    rx_recv: Offset,
    rx_queue: VecDeque<Bytes>,
    rx_queued: u64,
    peer_fin: Option<Offset>,
    acked_sent: Offset,
    limit_sent: Offset,
    ack_now: bool,
    ack_due: Option<Instant>,

    app_detached: bool,
    /// The application is blocked on a full send buffer: ask the peer to acknowledge now.
    elicit_ack: bool,
    events: VecDeque<Event>,
    wake_read: bool,
    wake_write: bool,
    stats: Stats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("epoch", &self.epoch)
            .field("phase", &self.phase)
            .field("link", &self.link.map(|l| l.conn))
            .field("dialer", &self.dialer)
            .field("tx_acked", &self.tx_acked)
            .field("tx_next", &self.tx_next)
            .field("tx_written", &self.tx_written())
            .field("rx_recv", &self.rx_recv)
            .field("rx_queued", &self.rx_queued)
            .finish_non_exhaustive()
    }
}

impl Session {
    fn new(
        config: SessionConfig,
        id: SessionId,
        local: LocalInfo,
        peer: PeerInfo,
        key: SessionKey,
        now: Instant,
        jitter: u64,
    ) -> Session {
        let config = config.normalized();
        Session {
            backoff: config.redial_initial,
            jitter,
            config,
            id,
            local,
            peer,
            epoch: Epoch(0),
            key,
            secure: true,
            suite: Suite::ChaCha20Poly1305,
            peer_identity: None,
            traffic: None,
            seal_block: BytesMut::new(),
            awaiting_confirm: None,
            first_tx: None,
            awaiting_listener: false,
            pending: VecDeque::new(),
            unconfirmed: None,
            dialing: None,
            redirect: None,
            redirects: 0,
            link: None,
            dialer: false,
            peer_migrating: false,
            phase: Phase::Open,
            down_since: Some(now),
            next_dial: None,
            failure: None,
            tx_acked: Offset(0),
            retained: VecDeque::new(),
            retained_len: 0,
            unsent: BytesMut::new(),
            tx_next: Offset(0),
            replay_at: (0, Offset(0)),
            fin: None,
            fin_acked: false,
            peer_limit: Offset(MIN_WINDOW),
            rx_recv: Offset(0),
            rx_queue: VecDeque::new(),
            rx_queued: 0,
            peer_fin: None,
            acked_sent: Offset(0),
            limit_sent: Offset(0),
            ack_now: false,
            ack_due: None,
            app_detached: false,
            elicit_ack: false,
            events: VecDeque::new(),
            wake_read: false,
            wake_write: false,
            stats: Stats::default(),
        }
    }

    /// Listening half of association: answer a `Hello` on `conn` (PROTOCOL.md §5.1).
    ///
    /// `id` must be unused at this endpoint. Returns the established session and the
    /// `Welcome` to send.
    pub fn accept_hello(
        now: Instant,
        conn: ConnId,
        hello: &Hello,
        id: SessionId,
        local: LocalInfo,
        entropy: &Entropy,
        config: SessionConfig,
    ) -> Result<(Session, Frame), HandshakeError> {
        let security = Security::default();
        Session::accept_hello_with(now, conn, hello, id, local, entropy, config, &security)
    }

    /// [`Session::accept_hello`] under `security`: a `Hello` whose mode, pre-shared key use or
    /// static key this side does not accept is refused (send the error's
    /// [`HandshakeError::refuse_reason`]).
    ///
    /// The session's first frame on `conn` must be the dialer's key confirmation: until
    /// [`Session::handle_frame`] has accepted it, [`Session::is_confirmed`] is false and the
    /// session sends nothing; any other first frame drops the connection and fails the
    /// session. A driver hands the stream to the application only once it is confirmed.
    #[allow(clippy::too_many_arguments)]
    pub fn accept_hello_with(
        now: Instant,
        conn: ConnId,
        hello: &Hello,
        id: SessionId,
        local: LocalInfo,
        entropy: &Entropy,
        config: SessionConfig,
        security: &Security,
    ) -> Result<(Session, Frame), HandshakeError> {
        if hello.insecure != security.insecure_plaintext {
            return Err(HandshakeError::SecurityMismatch);
        }
        if hello.psk != security.psk().is_some() || !security.admits(hello.identity.as_ref()) {
            return Err(HandshakeError::Unauthorized);
        }
        let suite = choose_suite(&hello.suites, security.suite_list())
            .ok_or(HandshakeError::NoCommonSuite)?;
        let eph = Ephemeral::new(entropy.secret);
        let ee = eph.agree(&hello.eph).map_err(|_| HandshakeError::WeakKey)?;
        let es = match &security.identity {
            Some(i) => Some(
                i.key
                    .agree(&hello.eph)
                    .map_err(|_| HandshakeError::WeakKey)?,
            ),
            None => None,
        };
        let se = match &hello.identity {
            Some(k) => Some(eph.agree(&k.0).map_err(|_| HandshakeError::WeakKey)?),
            None => None,
        };
        let mut w = Welcome {
            session: id,
            endpoint: local.endpoint,
            contact: local.contact,
            eph: eph.public,
            nonce: entropy.nonce,
            insecure: security.insecure_plaintext,
            psk: security.psk().is_some(),
            identity: security.identity.as_ref().map(|i| i.public_key()),
            // A dialer from before negotiation gets the Welcome it knows (ChaCha20-Poly1305).
            suite: (!hello.suites.is_empty()).then_some(suite),
            mac: [0; 32],
        };
        let signed = w.signed();
        let ikm = association_ikm(ee, es, se, security.psk());
        let ikm: Vec<&[u8]> = ikm.iter().map(|k| &k[..]).collect();
        let transcript = hello.transcript();
        let key = crypto::initial_key(&ikm, &transcript, &signed);
        w.mac = crypto::mac(&key, LABEL_WELCOME, &[&signed]);
        let confirm = crypto::mac(&key, LABEL_ASSOC_CONFIRM, &[&transcript, &signed]);
        let peer = PeerInfo {
            endpoint: hello.endpoint,
            contact: hello.contact,
        };
        let mut s = Session::new(config, id, local, peer, key, now, jitter_seed(entropy));
        s.secure = !security.insecure_plaintext;
        s.suite = suite;
        s.peer_identity = hello.identity;
        s.awaiting_confirm = Some(confirm);
        s.install_link(ProofOfKey(()), now, conn, false);
        Ok((s, Frame::Welcome(w)))
    }

    /// Rebuild a session from an image on a new host (PROTOCOL.md §6.3). It starts
    /// disconnected and asks at once to dial the peer.
    pub fn from_image(
        image: StreamImage,
        local: LocalInfo,
        config: SessionConfig,
        now: Instant,
    ) -> Session {
        // No entropy is passed to a thaw: the jitter starts from the (random) session id and
        // this host's endpoint id, and every dial mixes in the entropy it is given.
        let seed = u64::from_le_bytes(image.session.0[..8].try_into().unwrap_or_default())
            ^ u64::from_le_bytes(local.endpoint.0[..8].try_into().unwrap_or_default());
        let mut s = Session::new(
            config,
            image.session,
            local,
            image.peer,
            image.key.clone(),
            now,
            seed,
        );
        s.epoch = image.epoch;
        s.secure = image.secure;
        s.suite = image.suite;
        s.peer_identity = image.peer_identity;
        s.dialer = true;
        s.next_dial = Some(now);
        s.tx_acked = image.tx_acked;
        s.tx_next = image.tx_acked;
        s.replay_at = (0, image.tx_acked);
        // The peer may already hold some of these bytes (they were sent before the freeze but
        // not acknowledged), so they are retained as sent: its Accept may acknowledge them.
        s.retained_len = image.tx_data.len() as u64;
        if !image.tx_data.is_empty() {
            s.retained.push_back(image.tx_data.clone());
        }
        s.fin = image.fin;
        s.peer_limit = image.peer_limit;
        s.rx_recv = image.rx_recv;
        s.rx_queued = image.rx_data.len() as u64;
        if !image.rx_data.is_empty() {
            s.rx_queue.push_back(image.rx_data.clone());
        }
        s.peer_fin = image.peer_fin;
        s.acked_sent = image.rx_recv;
        s.stats = image.stats;
        s
    }

    // ---------------------------------------------------------------- getters

    /// The session id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// What this side knows of the peer.
    pub fn peer(&self) -> PeerInfo {
        self.peer
    }

    /// This side's identity and contact address.
    pub fn local(&self) -> LocalInfo {
        self.local
    }

    /// The configuration in force.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// A fingerprint of the current session key (an HMAC under it, which reveals nothing of
    /// the key): equal at both ends exactly when they hold the same key.
    pub fn key_fingerprint(&self) -> [u8; 16] {
        let m = crypto::mac(&self.key, b"roam/v1/fingerprint", &[]);
        let mut f = [0u8; 16];
        f.copy_from_slice(&m[..16]);
        f
    }

    /// Whether frames are sealed (false only in the insecure plaintext mode).
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// The AEAD suite this session's frames are sealed with (chosen at association, kept
    /// across migrations; unused in the insecure plaintext mode).
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// The static public key the peer presented and proved at association, if any.
    pub fn peer_identity(&self) -> Option<PublicKey> {
        self.peer_identity
    }

    /// Whether the association is confirmed (PROTOCOL.md §5.1): false on the listening side
    /// until the dialer's key confirmation arrived, and on the dialing side until the listener
    /// answered it (step 5) or a re-association completed; true otherwise.
    pub fn is_confirmed(&self) -> bool {
        self.awaiting_confirm.is_none() && !self.awaiting_listener
    }

    /// Frames sealed and opened on the current connection (its nonce counters), if it is
    /// sealed. Both restart at 0 on every connection, under that connection's fresh keys.
    pub fn frame_counters(&self) -> Option<(u64, u64)> {
        self.traffic.as_ref().map(|t| t.counts())
    }

    /// The connection currently carrying the session, if any.
    pub fn link(&self) -> Option<ConnId> {
        self.link.map(|l| l.conn)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// True once [`Event::Frozen`] was emitted.
    pub fn is_frozen(&self) -> bool {
        self.phase == Phase::Frozen
    }

    /// True while a freeze is in progress.
    pub fn is_freezing(&self) -> bool {
        matches!(self.phase, Phase::Freezing { .. })
    }

    /// True once the session is over (closed, failed or frozen): the driver may stop.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Frozen | Phase::Closed | Phase::Failed)
    }

    /// The terminal error, if the session failed.
    pub fn failure(&self) -> Option<&SessionError> {
        self.failure.as_ref()
    }

    /// Bytes written by the application and not yet acknowledged by the peer.
    pub fn unacked(&self) -> u64 {
        self.tx_written().since(self.tx_acked)
    }

    /// Bytes received and not yet read by the application.
    pub fn readable_bytes(&self) -> u64 {
        self.rx_queued
    }

    /// True when the peer ended its write half and every byte before it was read.
    pub fn at_eof(&self) -> bool {
        self.rx_queued == 0 && self.peer_fin.is_some_and(|f| f == self.rx_recv)
    }

    /// Whether the application's reader should be woken (clears the flag).
    pub fn take_wake_read(&mut self) -> bool {
        std::mem::take(&mut self.wake_read)
    }

    /// Whether the application's writer should be woken (clears the flag).
    pub fn take_wake_write(&mut self) -> bool {
        std::mem::take(&mut self.wake_write)
    }

    fn tx_sent_end(&self) -> Offset {
        self.tx_acked.plus(self.retained_len)
    }

    fn tx_written(&self) -> Offset {
        self.tx_sent_end().plus(self.unsent.len() as u64)
    }

    fn rx_read(&self) -> Offset {
        Offset(self.rx_recv.0 - self.rx_queued)
    }

    fn local_limit(&self) -> Offset {
        self.rx_read().plus(self.config.recv_capacity as u64)
    }

    /// The acknowledgement value: bytes received, plus one once the peer's end of stream is in.
    fn ack_value(&self) -> Offset {
        match self.peer_fin {
            Some(f) if f == self.rx_recv => f.plus(1),
            _ => self.rx_recv,
        }
    }

    // ---------------------------------------------------------------- commands

    /// Copy application bytes into the send buffer (the only copy on the send path).
    pub fn write(&mut self, data: &[u8]) -> Result<usize, WriteError> {
        match self.phase {
            Phase::Open => {}
            Phase::Freezing { .. } | Phase::Frozen => return Err(WriteError::Frozen),
            Phase::Failed => return Err(WriteError::Failed(self.failure_or_timeout())),
            Phase::Closed => return Err(WriteError::Finished),
        }
        if self.fin.is_some() {
            return Err(WriteError::Finished);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let room = (self.config.send_capacity as u64).saturating_sub(self.unacked());
        if room == 0 {
            // Elicit the acknowledgement that will unblock us (PROTOCOL.md §4.2).
            self.elicit_ack = true;
            return Err(WriteError::Blocked);
        }
        let n = (room as usize).min(data.len());
        self.unsent.extend_from_slice(&data[..n]);
        self.stats.bytes_written += n as u64;
        Ok(n)
    }

    /// Copy buffered input to the application: synchronization-buffer bytes first (claim 7).
    /// `Ok(0)` means end of stream.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        if buf.is_empty() {
            return Ok(0);
        }
        if matches!(self.phase, Phase::Freezing { .. } | Phase::Frozen) {
            // The buffered input belongs to the image now.
            return Err(ReadError::Frozen);
        }
        if self.rx_queued > 0 {
            let mut n = 0;
            while n < buf.len() {
                let Some(front) = self.rx_queue.front_mut() else {
                    break;
                };
                let k = front.len().min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&front[..k]);
                front.advance(k);
                if front.is_empty() {
                    self.rx_queue.pop_front();
                }
                n += k;
            }
            self.rx_queued -= n as u64;
            self.stats.bytes_read += n as u64;
            self.maybe_window_update();
            return Ok(n);
        }
        if self.at_eof() {
            return Ok(0);
        }
        match self.phase {
            Phase::Failed => Err(ReadError::Failed(self.failure_or_timeout())),
            Phase::Freezing { .. } | Phase::Frozen => Err(ReadError::Frozen),
            Phase::Open | Phase::Closed => Err(ReadError::Blocked),
        }
    }

    /// End the write half: the peer reads end-of-stream after the last byte written.
    pub fn shutdown_write(&mut self) {
        if self.fin.is_none() && self.phase == Phase::Open {
            self.fin = Some(self.tx_written());
        }
    }

    /// The application let go of the stream: end the write half and discard further input.
    pub fn detach(&mut self, now: Instant) {
        self.shutdown_write();
        self.app_detached = true;
        self.rx_queue.clear();
        self.rx_queued = 0;
        self.maybe_window_update();
        self.check_closed(now);
    }

    /// The endpoint moved to `contact` (a new local address, like quinn's
    /// `Endpoint::rebind`; PROTOCOL.md §8.1): the current connection is closed and this side
    /// dials the peer from the new address at once, whichever side opened the last connection,
    /// so the re-association announces where it is now. Nothing is lost: everything
    /// unacknowledged is replayed on the new connection.
    pub fn rebind(&mut self, now: Instant, contact: SocketAddr) {
        self.local.contact = contact;
        if let Some(d) = self.dialing.take() {
            if let Some(c) = d.conn {
                self.events.push_back(Event::CloseConnection(c));
            }
        }
        if self.phase != Phase::Open {
            return;
        }
        self.dialer = true;
        if self.link.is_some() {
            self.lose_link(now, true);
        }
        if self.phase == Phase::Open && self.link.is_none() && !self.peer_migrating {
            self.backoff = self.config.redial_initial;
            self.next_dial = Some(now);
        }
    }

    /// Whether a window update is worth sending now (the application read a lot).
    pub fn wants_transmit(&self) -> bool {
        self.ack_now || !self.unsent.is_empty()
    }

    /// Start a planned migration (PROTOCOL.md §6.1, claims 12a, 16): stop application I/O,
    /// send the close message, and drain. [`Event::Frozen`] follows.
    pub fn freeze(&mut self, now: Instant) -> Result<(), FreezeError> {
        match self.phase {
            Phase::Open => {}
            Phase::Freezing { .. } | Phase::Frozen => return Err(FreezeError::AlreadyFrozen),
            Phase::Failed => return Err(FreezeError::Failed(self.failure_or_timeout())),
            Phase::Closed => return Err(FreezeError::Closed),
        }
        self.stats.migrations += 1;
        self.dialing = None;
        self.pending.clear();
        self.next_dial = None;
        match self.link {
            Some(l) if !l.closing => {
                self.phase = Phase::Freezing {
                    deadline: now + self.config.freeze_timeout,
                };
            }
            _ => self.finish_freeze(),
        }
        Ok(())
    }

    /// The migration image of a frozen session (PROTOCOL.md §7, claim 19).
    pub fn image(&self) -> Option<StreamImage> {
        if self.phase != Phase::Frozen {
            return None;
        }
        let mut tx = BytesMut::with_capacity(self.unacked() as usize);
        for c in &self.retained {
            tx.extend_from_slice(c);
        }
        tx.extend_from_slice(&self.unsent);
        let rx = match self.rx_queue.len() {
            0 => Bytes::new(),
            1 => self.rx_queue[0].clone(),
            _ => {
                let mut b = BytesMut::with_capacity(self.rx_queued as usize);
                for c in &self.rx_queue {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        Some(StreamImage {
            session: self.id,
            epoch: self.epoch,
            key: self.key.clone(),
            secure: self.secure,
            suite: self.suite,
            peer_identity: self.peer_identity,
            local: self.local,
            peer: self.peer,
            tx_acked: self.tx_acked,
            tx_data: tx.freeze(),
            fin: self.fin,
            peer_limit: self.peer_limit,
            rx_recv: self.rx_recv,
            rx_data: rx,
            peer_fin: self.peer_fin,
            stats: self.stats,
        })
    }

    // ---------------------------------------------------------------- handle_*

    /// Handle one frame read from connection `conn`. Frames from any connection other than the
    /// current one are ignored. On `Err` the driver must close `conn`; the session then behaves
    /// as after [`Session::handle_connection_lost`].
    pub fn handle_frame(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Frame,
    ) -> Result<(), ProtocolViolation> {
        match self.open_frame(now, conn, frame)? {
            Some(opened) => self.handle_opened(now, conn, opened),
            None => Ok(()),
        }
    }

    /// The first half of [`Session::handle_frame`]: authenticate and decrypt a frame read from
    /// `conn` (PROTOCOL.md §3.1). `Ok(None)` when there is nothing more to do (another
    /// connection's frame, or the association's key confirmation). On `Err` the connection is
    /// dropped as in `handle_frame`. Pass the result to [`Session::handle_opened`].
    pub fn open_frame(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Frame,
    ) -> Result<Option<Opened>, ProtocolViolation> {
        let Some(link) = self.link.as_mut() else {
            return Ok(None);
        };
        if link.conn != conn {
            return Ok(None);
        }
        link.last_rx = now;
        let r = self.open_inner(frame);
        if r.is_err() {
            self.lose_link(now, true);
            if self.awaiting_confirm.is_some() {
                // Never confirmed: nobody proved the key, there is nothing to continue.
                self.fail(SessionError::Refused(RefuseReason::BadProof));
            }
        }
        r
    }

    /// The second half of [`Session::handle_frame`]: act on a frame [`Session::open_frame`]
    /// authenticated on `conn`.
    pub fn handle_opened(
        &mut self,
        now: Instant,
        conn: ConnId,
        opened: Opened,
    ) -> Result<(), ProtocolViolation> {
        if self.link.is_none_or(|l| l.conn != conn) {
            return Ok(());
        }
        // The peer installed the connection (§5.2), or registered the association (§5.1).
        self.unconfirmed = None;
        if std::mem::take(&mut self.awaiting_listener) {
            self.events.push_back(Event::Established {
                conn,
                epoch: self.epoch,
            });
        }
        let r = self.on_link_frame(now, opened.0);
        if r.is_err() {
            self.lose_link(now, true);
        }
        r
    }

    fn open_inner(&mut self, frame: Frame) -> Result<Option<Opened>, ProtocolViolation> {
        if let Some(expected) = self.awaiting_confirm {
            // PROTOCOL.md §5.1: the dialer's key confirmation comes first, in the clear.
            let Frame::Confirm(c) = frame else {
                return Err(ProtocolViolation("association not confirmed"));
            };
            if !crypto::ct_eq(&c.mac, &expected) {
                return Err(ProtocolViolation("bad association confirmation"));
            }
            self.awaiting_confirm = None;
            // §5.1 step 5: answer at once; the dialer's connect waits for it.
            self.ack_now = true;
            return Ok(None);
        }
        if matches!(frame, Frame::Refuse(_)) {
            // A refusal of our Confirm: the peer did not install the connection (§5.2).
            return Err(ProtocolViolation("refused"));
        }
        let frame = match (self.secure, frame) {
            (true, Frame::Sealed(body)) => self.open_sealed(body)?,
            (true, _) => return Err(ProtocolViolation("plaintext frame on a sealed session")),
            (false, Frame::Sealed(_)) => {
                return Err(ProtocolViolation("sealed frame on a plaintext session"))
            }
            (false, f) => f,
        };
        Ok(Some(Opened(frame)))
    }

    /// Authenticate and decrypt a `Sealed` body in place; the inner frame (PROTOCOL.md §3.1).
    fn open_sealed(&mut self, mut body: BytesMut) -> Result<Frame, ProtocolViolation> {
        let Some(traffic) = self.traffic.as_mut() else {
            return Err(ProtocolViolation("sealed frame without keys"));
        };
        // Frame::decode checked body.len() >= MIN_SEALED_BODY and <= MAX_FRAME_BODY.
        let n = body.len();
        if n < TAG_LEN + HEADER_LEN {
            return Err(ProtocolViolation("sealed frame too short"));
        }
        let mut aad = [0u8; HEADER_LEN];
        aad[0] = kind::SEALED;
        aad[1..].copy_from_slice(&(n as u32).to_be_bytes());
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&body[n - TAG_LEN..]);
        if traffic.open(&aad, &mut body[..n - TAG_LEN], &tag).is_err() {
            self.stats.auth_failures += 1;
            return Err(ProtocolViolation("sealed frame failed authentication"));
        }
        body.truncate(n - TAG_LEN);
        match Frame::decode(&mut body) {
            Ok(Some(Frame::Sealed(_))) => Err(ProtocolViolation("nested sealed frame")),
            Ok(Some(f)) if body.is_empty() => Ok(f),
            _ => Err(ProtocolViolation("malformed sealed frame")),
        }
    }

    fn on_link_frame(&mut self, now: Instant, frame: Frame) -> Result<(), ProtocolViolation> {
        match frame {
            Frame::Data {
                offset,
                ack,
                limit,
                payload,
            } => {
                self.on_ack(ack)?;
                self.on_limit(limit);
                self.on_data(now, offset, payload)?;
            }
            Frame::Ack { ack, limit } => {
                self.on_ack(ack)?;
                self.on_limit(limit);
            }
            Frame::Fin { offset } => {
                if offset < self.rx_recv || self.peer_fin.is_some_and(|f| f != offset) {
                    return Err(ProtocolViolation("end of stream moved"));
                }
                if self.peer_fin.is_none() {
                    self.peer_fin = Some(offset);
                    if offset == self.rx_recv {
                        self.ack_now = true;
                        self.wake_read = true;
                    }
                }
            }
            Frame::Freeze { ack } => {
                // Claim 17: the peer is migrating; answer so it can drain, then wait for it.
                self.on_ack(ack)?;
                self.peer_migrating = true;
                self.stats.migrations += 1;
                if let Some(l) = self.link.as_mut() {
                    l.freeze_ack_due = true;
                }
            }
            Frame::FreezeAck { ack } => {
                self.on_ack(ack)?;
                if matches!(self.phase, Phase::Freezing { .. }) {
                    self.finish_freeze();
                } else {
                    return Err(ProtocolViolation("FreezeAck without Freeze"));
                }
            }
            Frame::Ping => {
                // A blocked sender asks for its acknowledgement now rather than after the delay.
                if self.rx_recv > self.acked_sent || self.local_limit() > self.limit_sent {
                    self.ack_now = true;
                }
            }
            _ => {
                return Err(ProtocolViolation(
                    "handshake frame on an established connection",
                ))
            }
        }
        self.check_closed(now);
        Ok(())
    }

    fn on_ack(&mut self, ack: Offset) -> Result<(), ProtocolViolation> {
        let sent_end = self.tx_sent_end();
        let fin_bonus = u64::from(self.fin == Some(sent_end));
        if ack.0 > sent_end.0 + fin_bonus {
            return Err(ProtocolViolation("acknowledgement of unsent bytes"));
        }
        if self.fin.is_some_and(|f| ack == f.plus(1)) {
            self.fin_acked = true;
        }
        let data_ack = ack.min(sent_end);
        if data_ack <= self.tx_acked {
            return Ok(());
        }
        let mut n = data_ack.since(self.tx_acked);
        self.retained_len -= n;
        let mut popped = 0;
        while n > 0 {
            // retained covers [tx_acked, sent_end) and n ≤ that length, so front exists.
            let front = self
                .retained
                .front_mut()
                .expect("retained covers acked range");
            if (front.len() as u64) <= n {
                n -= front.len() as u64;
                self.retained.pop_front();
                popped += 1;
            } else {
                front.advance(n as usize);
                n = 0;
            }
        }
        self.tx_acked = data_ack;
        if self.tx_next <= self.tx_acked {
            self.tx_next = self.tx_acked;
            self.replay_at = (0, self.tx_acked);
        } else {
            // tx_next's chunk survived the trim (it holds an unacknowledged byte).
            self.replay_at.0 -= popped;
            if self.replay_at.0 == 0 {
                self.replay_at.1 = self.tx_acked;
            }
        }
        self.wake_write = true;
        Ok(())
    }

    fn on_limit(&mut self, limit: Offset) {
        self.peer_limit = self.peer_limit.max(limit);
    }

    fn on_data(
        &mut self,
        now: Instant,
        offset: Offset,
        mut payload: Bytes,
    ) -> Result<(), ProtocolViolation> {
        let end = offset.plus(payload.len() as u64);
        if offset > self.rx_recv {
            return Err(ProtocolViolation("gap in stream data"));
        }
        if self.peer_fin.is_some_and(|f| end > f) {
            return Err(ProtocolViolation("data beyond end of stream"));
        }
        if end > self.local_limit() {
            return Err(ProtocolViolation("data beyond flow-control limit"));
        }
        let dup = self.rx_recv.since(offset).min(payload.len() as u64);
        self.stats.bytes_duplicate += dup;
        payload.advance(dup as usize);
        if payload.is_empty() {
            return Ok(());
        }
        let n = payload.len() as u64;
        self.rx_recv = self.rx_recv.plus(n);
        if !self.app_detached {
            self.rx_queue.push_back(payload);
            self.rx_queued += n;
            self.wake_read = true;
        }
        if self.peer_fin == Some(self.rx_recv) {
            self.ack_now = true;
        }
        if self.rx_recv.since(self.acked_sent) >= self.config.ack_threshold {
            self.ack_now = true;
        } else if self.ack_due.is_none() {
            self.ack_due = Some(now + self.config.ack_delay);
        }
        Ok(())
    }

    fn maybe_window_update(&mut self) {
        if self.local_limit().since(self.limit_sent) >= (self.config.recv_capacity as u64) / 2 {
            self.ack_now = true;
        }
    }

    /// The connection `conn` closed, reset or failed.
    pub fn handle_connection_lost(&mut self, now: Instant, conn: ConnId) {
        if self.dialing.as_ref().is_some_and(|d| d.conn == Some(conn)) {
            self.handle_dial_failed(now);
            return;
        }
        // Pending re-associations outlive their connection: if it died after our Accept, the
        // dialer has already ratcheted and comes back at the next epoch under that key.
        if self.link.is_some_and(|l| l.conn == conn) {
            self.lose_link(now, false);
        } else if self.pending.iter().any(|p| p.conn == conn) {
            self.pending_conn_gone(now);
        }
    }

    /// A connection on which we answered a `Reassoc` ended before its `Confirm` made it
    /// current. If we had put our own redial off for it (PROTOCOL.md §5.5), redial after the
    /// usual backoff: the peer redials too if it is still there, and the tie-break settles it.
    fn pending_conn_gone(&mut self, now: Instant) {
        if self.waiting_to_redial() {
            let t = now + self.jittered_backoff();
            self.next_dial = Some(self.next_dial.map_or(t, |d| d.min(t)));
        }
    }

    /// The wait before the next redial: the current backoff with "equal jitter", half of it
    /// plus a uniform random part of up to the other half (PROTOCOL.md §8). Sessions that lost
    /// their connections together (a restarted relay or peer, a network cut) would otherwise
    /// redial in lockstep, 10, 20, 40 ms … after the loss, and keep colliding.
    fn jittered_backoff(&mut self) -> Duration {
        let half = self.backoff / 2;
        let span = u64::try_from((self.backoff - half).as_nanos()).unwrap_or(u64::MAX);
        let r = splitmix64(&mut self.jitter);
        half + Duration::from_nanos(r % span.saturating_add(1))
    }

    /// Schedule the next dial after the (jittered) backoff, and double the backoff.
    fn redial_after_backoff(&mut self, now: Instant) {
        self.next_dial = Some(now + self.jittered_backoff());
        self.backoff = (self.backoff * 2).min(self.config.redial_max);
    }

    /// This side redials (it dialed last) and has neither a connection nor a dial in flight.
    fn waiting_to_redial(&self) -> bool {
        self.dialer
            && self.phase == Phase::Open
            && self.link.is_none()
            && self.dialing.is_none()
            && !self.peer_migrating
            && self.down_since.is_some()
    }

    fn lose_link(&mut self, now: Instant, close: bool) {
        let Some(l) = self.link.take() else { return };
        if close {
            self.events.push_back(Event::CloseConnection(l.conn));
        }
        if matches!(self.phase, Phase::Freezing { .. }) {
            self.finish_freeze();
            return;
        }
        if !l.closing && !self.peer_migrating {
            self.stats.connections_lost += 1;
        }
        self.down_since = Some(now);
        if self.app_detached && self.both_finished() {
            // Nothing is left to deliver either way and nobody holds the stream.
            self.close(now);
            return;
        }
        if self.dialer && !self.peer_migrating && self.phase == Phase::Open {
            self.next_dial = Some(now);
            self.backoff = self.config.redial_initial;
        }
    }

    /// Our end of stream was acknowledged and the peer's has arrived.
    fn both_finished(&self) -> bool {
        self.fin_acked && self.peer_fin_in()
    }

    fn peer_fin_in(&self) -> bool {
        self.peer_fin.is_some_and(|f| f == self.rx_recv)
    }

    /// A dial or a re-association attempt failed (connection refused, handshake timeout,
    /// `Refuse(Busy)`); try again after a backoff. Does nothing if no dial is in flight (it was
    /// abandoned meanwhile: PROTOCOL.md §5.5). A redirect this dial tried (§5.4) is dropped:
    /// the next dial goes to the peer's last authenticated contact address.
    pub fn handle_dial_failed(&mut self, now: Instant) {
        let Some(d) = self.dialing.take() else {
            return;
        };
        if let Some(c) = d.conn {
            self.events.push_back(Event::CloseConnection(c));
        }
        // A redirect learned while this dial was under way (from the peer's own request,
        // §5.5) is tried at once; one that this dial already tried is dropped.
        let fresh = self.redirect.is_some_and(|r| r.addr != d.addr);
        if !fresh {
            self.redirect = None;
        }
        if self.phase == Phase::Open && self.link.is_none() && !self.peer_migrating {
            if fresh {
                self.next_dial = Some(now);
            } else {
                self.redial_after_backoff(now);
            }
        }
    }

    /// The peer refused our re-association on `conn`.
    pub fn handle_refused(&mut self, now: Instant, conn: ConnId, reason: RefuseReason) {
        if self.dialing.as_ref().is_none_or(|d| d.conn != Some(conn)) {
            return;
        }
        match reason {
            // The peer finished and forgot the session; so did we, but for the application.
            RefuseReason::UnknownSession | RefuseReason::Closed if self.both_finished() => {
                self.dialing = None;
                self.events.push_back(Event::CloseConnection(conn));
                self.down_since = None;
                self.check_closed(now);
            }
            // Our association's Confirm never reached the listener, so it never registered the
            // session (PROTOCOL.md §5.1 step 5): nothing to continue.
            RefuseReason::UnknownSession if self.awaiting_listener => {
                self.dialing = None;
                self.events.push_back(Event::CloseConnection(conn));
                self.fail(SessionError::Refused(reason));
            }
            // Transient: the peer may be mid-migration itself or at a limit.
            RefuseReason::Busy | RefuseReason::UnknownSession | RefuseReason::Closed => {
                self.handle_dial_failed(now)
            }
            // We dialed under the key of our last re-association, and the peer knows neither it
            // nor its pending form: it froze before our Confirm reached it (§5.2), and its image
            // holds the previous epoch. Step back to it, once, and dial again at once.
            RefuseReason::BadProof if self.unconfirmed.is_some() => {
                if let Some((epoch, key)) = self.unconfirmed.take() {
                    self.epoch = epoch;
                    self.key = key;
                    self.pending.clear();
                }
                self.redirect = None;
                self.handle_dial_failed(now);
                if self.next_dial.is_some() {
                    self.next_dial = Some(now);
                }
            }
            _ => {
                self.dialing = None;
                self.events.push_back(Event::CloseConnection(conn));
                self.fail(SessionError::Refused(reason));
            }
        }
    }

    /// Timers: call when [`Session::poll_timeout`]'s instant has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ack_due.is_some_and(|t| t <= now) {
            self.ack_due = None;
            self.ack_now = true;
        }
        if let Phase::Freezing { deadline } = self.phase {
            if deadline <= now {
                if let Some(l) = self.link.take() {
                    self.events.push_back(Event::CloseConnection(l.conn));
                }
                self.finish_freeze();
                return;
            }
        }
        if let Some(l) = self.link {
            if now.saturating_duration_since(l.last_rx) >= self.config.idle_timeout {
                self.lose_link(now, true);
            }
        }
        if self.link.is_none() && self.phase == Phase::Open {
            if let Some(since) = self.down_since {
                if now.saturating_duration_since(since) >= self.config.session_timeout {
                    self.fail(SessionError::TimedOut(self.config.session_timeout));
                    return;
                }
            }
            if self.next_dial.is_some_and(|t| t <= now) && self.dialing.is_none() {
                self.next_dial = None;
                let addr = self.redirect.map_or(self.peer.contact, |r| r.addr);
                self.dialing = Some(Dialing {
                    addr,
                    conn: None,
                    eph: None,
                    reassoc_signed: Vec::new(),
                });
                self.events.push_back(Event::Dial(addr));
            }
        }
    }

    // ------------------------------------------------------ re-association (§5.2)

    /// Whether a dial asked for by [`Event::Dial`] is still wanted and has not started. A
    /// driver checks it (under the same lock) before [`Session::start_reassoc`]: the session
    /// abandons a dial when it answers the peer's own re-association first (PROTOCOL.md §5.5).
    pub fn is_dialing(&self) -> bool {
        self.dialing.as_ref().is_some_and(|d| d.eph.is_none())
    }

    /// Dialing side: a connection asked for by [`Event::Dial`] is open as `conn`; returns the
    /// `Reassoc` to send on it.
    pub fn start_reassoc(&mut self, now: Instant, conn: ConnId, entropy: &Entropy) -> Frame {
        let _ = now;
        self.jitter ^= jitter_seed(entropy);
        let addr = self.dialing.as_ref().map_or(self.peer.contact, |d| d.addr);
        let eph = Ephemeral::new(entropy.secret);
        let mut r = Reassoc {
            session: self.id,
            epoch: self.epoch,
            endpoint: self.local.endpoint,
            contact: self.local.contact,
            eph: eph.public,
            nonce: entropy.nonce,
            recv: self.ack_value(),
            mac: [0; 32],
        };
        let signed = r.signed();
        r.mac = crypto::mac(&self.key, LABEL_REASSOC, &[&signed]);
        self.dialing = Some(Dialing {
            addr,
            conn: Some(conn),
            eph: Some(eph),
            reassoc_signed: signed,
        });
        Frame::Reassoc(r)
    }

    /// Dialing side: the endpoint we dialed answered our `Reassoc` on `conn` with `Moved`: the
    /// session went to `moved.contact` (PROTOCOL.md §5.4). Close `conn`; the session dials the
    /// new address at once, or after its redial backoff once it has followed
    /// [`MAX_REDIRECTS`] redirects in a row without re-associating. `Moved` is not
    /// authenticated: it only changes where the next dial goes, and a redirect that fails is
    /// dropped for the last authenticated contact address.
    pub fn handle_moved(&mut self, now: Instant, conn: ConnId, moved: &Moved) {
        if self.dialing.as_ref().is_none_or(|d| d.conn != Some(conn)) {
            return;
        }
        if moved.session != self.id || moved.contact == self.local.contact {
            // Not an answer about this session, or pointing back at ourselves.
            self.handle_dial_failed(now);
            return;
        }
        self.dialing = None;
        self.events.push_back(Event::CloseConnection(conn));
        if self.phase != Phase::Open || self.link.is_some() || self.peer_migrating {
            return;
        }
        self.redirect = Some(Redirect {
            addr: moved.contact,
            endpoint: None,
        });
        self.redirects = self.redirects.saturating_add(1);
        if self.redirects <= MAX_REDIRECTS {
            self.next_dial = Some(now);
        } else {
            self.redial_after_backoff(now);
        }
    }

    /// Dialing side: the listener answered on `conn`. On success `conn` becomes current and
    /// the returned `Confirm` must be sent on it before anything [`Session::poll_transmit`]
    /// yields. On error the connection must be closed (the session retries or has failed).
    pub fn handle_accept(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Frame,
    ) -> Result<Frame, RefuseReason> {
        let accept = match frame {
            Frame::Accept(a) => a,
            Frame::Refuse(r) => {
                self.handle_refused(now, conn, r);
                return Err(r);
            }
            _ => {
                if self.dialing.as_ref().is_some_and(|d| d.conn == Some(conn)) {
                    self.handle_dial_failed(now);
                }
                return Err(RefuseReason::Protocol);
            }
        };
        let Some(d) = self.dialing.take_if(|d| d.conn == Some(conn)) else {
            return Err(RefuseReason::Protocol);
        };
        let (Some(eph), signed) = (d.eph, d.reassoc_signed) else {
            return Err(RefuseReason::Protocol);
        };
        let addr = d.addr;
        let fail = |s: &mut Session, r| {
            s.dialing = Some(Dialing {
                addr,
                conn: Some(conn),
                eph: None,
                reassoc_signed: Vec::new(),
            });
            s.handle_dial_failed(now);
            Err(r)
        };
        let Ok(shared) = eph.agree(&accept.eph) else {
            return fail(self, RefuseReason::BadProof);
        };
        let accept_signed = accept.signed();
        let next = crypto::ratchet(&self.key, &shared, &signed, &accept_signed);
        if !crypto::verify(&next, LABEL_ACCEPT, &[&signed, &accept_signed], &accept.mac) {
            return fail(self, RefuseReason::BadProof);
        }
        if !self.ack_in_range(accept.recv) {
            return fail(self, RefuseReason::Protocol);
        }
        let confirm = Confirm {
            mac: crypto::mac(&next, LABEL_CONFIRM, &[&signed, &accept_signed]),
        };
        let prev = (self.epoch, std::mem::replace(&mut self.key, next));
        self.epoch = self.epoch.next();
        // Keys we accepted from the peer were derived from the key we just replaced: no
        // request can complete them any more (PROTOCOL.md §5.5).
        self.pending.clear();
        // The Accept proves the key holder answered at the address we dialed (§5.4). If the
        // peer itself told us it moved there (its verified request, §5.5), it is that endpoint.
        self.peer.contact = addr;
        if let Some(Redirect {
            addr: at,
            endpoint: Some(e),
        }) = self.redirect
        {
            if at == addr {
                self.peer.endpoint = e;
            }
        }
        // ack_in_range checked above, so this cannot fail.
        let _ = self.on_ack(accept.recv);
        self.stats.reassociations += 1;
        // The Accept shows the listener holds the session (PROTOCOL.md §5.1 step 5).
        self.awaiting_listener = false;
        self.install_link(ProofOfKey(()), now, conn, true);
        self.unconfirmed = Some(prev);
        Ok(Frame::Confirm(confirm))
    }

    /// Whether a re-associating peer's received offset is possible: not beyond what was sent,
    /// and not below what it already acknowledged (received bytes are never forgotten; replay
    /// could not fill such a gap, so accepting it would loop on reconnections forever).
    fn ack_in_range(&self, ack: Offset) -> bool {
        let sent_end = self.tx_sent_end();
        ack >= self.tx_acked && ack.0 <= sent_end.0 + u64::from(self.fin == Some(sent_end))
    }

    /// Listening side: a `Reassoc` for this session arrived on a new connection `conn`.
    /// Returns the `Accept` to send, or why it is refused (send `Refuse` and close).
    ///
    /// Nothing changes for the current connection until [`Session::handle_confirm`]. If this
    /// side has its own re-association in flight, the endpoint ids decide which one goes on
    /// (PROTOCOL.md §5.5): ours (the request is refused `Busy`, nothing changes) or the peer's
    /// (our dial is abandoned: its connection is closed and a late `Accept` on it is ignored).
    /// The driver must report the end of `conn` before its `Confirm` (including a handshake
    /// timeout) with [`Session::handle_connection_lost`].
    pub fn handle_reassoc(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: &Reassoc,
        entropy: &Entropy,
    ) -> Result<Frame, RefuseReason> {
        if self.phase != Phase::Open {
            return Err(RefuseReason::Closed);
        }
        if req.session != self.id {
            return Err(RefuseReason::UnknownSession);
        }
        // §5.5: both ends re-associating at once. Our request is on the wire and our endpoint
        // id is the greater one: ours goes on, and the peer answers it. Decided before anything
        // changes here, so the peer's request cannot move our key or epoch meanwhile.
        let signed = req.signed();
        if self.dialing.as_ref().is_some_and(|d| d.eph.is_some())
            && self.local.endpoint >= req.endpoint
        {
            if req.endpoint != self.local.endpoint && self.request_verifies(req, &signed) {
                // The peer proved it is at `req.contact`. If our dial went elsewhere (its old
                // address) and fails, the next one goes there at once.
                self.redirect = Some(Redirect {
                    addr: req.contact,
                    endpoint: Some(req.endpoint),
                });
            }
            return Err(RefuseReason::Busy);
        }
        if req.epoch < self.epoch {
            // The peer accepted our last re-association but froze before our Confirm arrived:
            // its image is one epoch behind. Step back, once (not for our own reflected request).
            let step_back = self.unconfirmed.as_ref().is_some_and(|(epoch, key)| {
                *epoch == req.epoch
                    && req.endpoint != self.local.endpoint
                    && crypto::verify(key, LABEL_REASSOC, &[&signed], &req.mac)
            });
            if step_back && self.link.is_some() {
                // The connection our Confirm went out on is still up: the peer may yet install
                // it (this request may be one it sent before answering ours and then
                // abandoned, §5.5). Not now; a frozen peer's connection ends soon.
                return Err(RefuseReason::Busy);
            }
            // Checked just above.
            let Some((epoch, key)) = self.unconfirmed.take().filter(|_| step_back) else {
                return Err(RefuseReason::StaleEpoch);
            };
            self.key = key;
            self.epoch = epoch;
            self.pending.clear();
        }
        if req.epoch == self.epoch.next() {
            // The dialer got our Accept but its Confirm never arrived: it holds a pending key.
            let Some(i) = self.pending.iter().position(|p| {
                p.epoch == req.epoch && crypto::verify(&p.key, LABEL_REASSOC, &[&signed], &req.mac)
            }) else {
                return Err(RefuseReason::BadProof);
            };
            // Verified just now, under that pending key.
            let p = self.pending.remove(i).expect("index from position");
            self.promote(p);
        } else if req.epoch != self.epoch
            || !crypto::verify(&self.key, LABEL_REASSOC, &[&signed], &req.mac)
        {
            return Err(RefuseReason::BadProof);
        }
        if !self.ack_in_range(req.recv) {
            return Err(RefuseReason::Protocol);
        }
        if self.pending.iter().any(|p| p.reassoc_signed == signed) {
            // A dialer never repeats a request (fresh key and nonce): this is a replay, and
            // answering it again would only push a genuine pending key out.
            return Err(RefuseReason::Busy);
        }
        let eph = Ephemeral::new(entropy.secret);
        let shared = eph.agree(&req.eph).map_err(|_| RefuseReason::BadProof)?;
        let mut accept = Accept {
            eph: eph.public,
            nonce: entropy.nonce,
            recv: self.ack_value(),
            mac: [0; 32],
        };
        let accept_signed = accept.signed();
        let next = crypto::ratchet(&self.key, &shared, &signed, &accept_signed);
        accept.mac = crypto::mac(&next, LABEL_ACCEPT, &[&signed, &accept_signed]);
        self.pending.retain(|p| p.conn != conn);
        if self.pending.len() >= self.config.max_pending_reassoc {
            self.pending.pop_front();
        }
        // §5.5: the peer's request goes on. Abandon our own dial, and put off our redial while
        // this one completes (it comes back sooner if the connection dies before the Confirm).
        if let Some(d) = self.dialing.take() {
            if let Some(c) = d.conn {
                self.events.push_back(Event::CloseConnection(c));
            }
        }
        if self.waiting_to_redial() {
            self.next_dial = Some(now + self.config.idle_timeout);
        }
        self.pending.push_back(Pending {
            conn,
            epoch: self.epoch.next(),
            key: next,
            reassoc_signed: signed,
            accept_signed,
            peer: PeerInfo {
                endpoint: req.endpoint,
                contact: req.contact,
            },
            peer_recv: req.recv,
        });
        Ok(Frame::Accept(accept))
    }

    /// Whether `req` carries a valid proof under any key this side could continue with.
    fn request_verifies(&self, req: &Reassoc, signed: &[u8]) -> bool {
        let ok = |key: &SessionKey| crypto::verify(key, LABEL_REASSOC, &[signed], &req.mac);
        (req.epoch == self.epoch && ok(&self.key))
            || self
                .unconfirmed
                .as_ref()
                .is_some_and(|(e, k)| *e == req.epoch && ok(k))
            || self
                .pending
                .iter()
                .any(|p| p.epoch == req.epoch && ok(&p.key))
    }

    fn promote(&mut self, p: Pending) {
        self.stats.reassociations += 1;
        self.key = p.key;
        self.epoch = p.epoch;
        self.peer = p.peer;
        self.pending.clear();
    }

    /// Listening side: the dialer's `Confirm` arrived on `conn`; on success `conn` becomes the
    /// current connection and the old one is closed.
    pub fn handle_confirm(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Frame,
    ) -> Result<(), RefuseReason> {
        let Frame::Confirm(c) = frame else {
            if self.pending.iter().any(|p| p.conn == conn) {
                self.pending.retain(|p| p.conn != conn);
                self.pending_conn_gone(now);
            }
            return Err(RefuseReason::Protocol);
        };
        if self.phase != Phase::Open {
            return Err(RefuseReason::Closed);
        }
        let Some(i) = self.pending.iter().position(|p| p.conn == conn) else {
            return Err(RefuseReason::StaleEpoch);
        };
        // Index from position.
        let p = self.pending.remove(i).expect("index from position");
        if p.epoch != self.epoch.next() {
            self.pending_conn_gone(now);
            return Err(RefuseReason::StaleEpoch);
        }
        if !crypto::verify(
            &p.key,
            LABEL_CONFIRM,
            &[&p.reassoc_signed, &p.accept_signed],
            &c.mac,
        ) {
            self.pending_conn_gone(now);
            return Err(RefuseReason::BadProof);
        }
        let peer_recv = p.peer_recv;
        self.promote(p);
        // Range checked in handle_reassoc; acks only grow since.
        let _ = self.on_ack(peer_recv);
        // A re-association the peer started (after a rebind, §8.1) shows it holds the session
        // as well as its answer to our association's Confirm would (§5.1 step 5).
        self.awaiting_listener = false;
        self.install_link(ProofOfKey(()), now, conn, false);
        Ok(())
    }

    fn install_link(&mut self, _proof: ProofOfKey, now: Instant, conn: ConnId, dialer: bool) {
        self.unconfirmed = None;
        self.redirect = None;
        self.redirects = 0;
        // Fresh keys for every connection: each is installed under a key no earlier connection
        // used (a new association, or a ratchet with a fresh DH secret), so frame counters
        // start at 0 without ever repeating a nonce under a key (PROTOCOL.md §3.1).
        self.traffic = self
            .secure
            .then(|| Traffic::new(&self.key, self.epoch, dialer, self.suite));
        if let Some(old) = self.link.take() {
            self.events.push_back(Event::CloseConnection(old.conn));
        }
        self.link = Some(Link {
            conn,
            last_rx: now,
            last_tx: now,
            fin_sent: false,
            freeze_sent: false,
            freeze_ack_due: false,
            closing: false,
        });
        // Everything retained and unacknowledged is sent again on this connection.
        self.stats.bytes_replayed += self.retained_len;
        self.dialer = dialer;
        self.peer_migrating = false;
        self.down_since = None;
        self.next_dial = None;
        if let Some(c) = self.dialing.take().and_then(|d| d.conn) {
            // A dial of ours lost the race to this connection (PROTOCOL.md §5.5).
            if c != conn {
                self.events.push_back(Event::CloseConnection(c));
            }
        }
        self.backoff = self.config.redial_initial;
        // Replay everything the peer has not acknowledged (PROTOCOL.md §6.4).
        self.tx_next = self.tx_acked;
        self.replay_at = (0, self.tx_acked);
        self.ack_now = true;
        self.wake_write = true;
        self.wake_read = true;
        if !self.awaiting_listener {
            self.events.push_back(Event::Established {
                conn,
                epoch: self.epoch,
            });
        }
    }

    fn finish_freeze(&mut self) {
        if let Some(l) = self.link.take() {
            self.events.push_back(Event::CloseConnection(l.conn));
        }
        self.dialing = None;
        self.pending.clear();
        self.phase = Phase::Frozen;
        self.events.push_back(Event::Frozen);
        self.wake_read = true;
        self.wake_write = true;
    }

    fn fail(&mut self, e: SessionError) {
        if matches!(self.phase, Phase::Failed | Phase::Closed | Phase::Frozen) {
            return;
        }
        if let Some(l) = self.link.take() {
            self.events.push_back(Event::CloseConnection(l.conn));
        }
        self.phase = Phase::Failed;
        self.failure = Some(e.clone());
        self.events.push_back(Event::Failed(e));
        self.wake_read = true;
        self.wake_write = true;
    }

    fn failure_or_timeout(&self) -> SessionError {
        self.failure
            .clone()
            .unwrap_or(SessionError::TimedOut(self.config.session_timeout))
    }

    fn check_closed(&mut self, now: Instant) {
        let quiet = match self.link {
            // Our acknowledgement of the peer's end of stream goes out first.
            Some(l) => !l.freeze_ack_due && !self.ack_now,
            None => true,
        };
        if self.phase == Phase::Open && self.app_detached && self.both_finished() && quiet {
            self.close(now);
        }
    }

    fn close(&mut self, _now: Instant) {
        if let Some(l) = self.link.take() {
            self.events.push_back(Event::CloseConnection(l.conn));
        }
        self.phase = Phase::Closed;
        self.events.push_back(Event::Closed);
    }

    // ---------------------------------------------------------------- poll_*

    /// The next frame to write on the current connection, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.link?;
        if let Some(f) = self.first_tx.take() {
            return Some(Transmit::whole(&f));
        }
        if self.awaiting_confirm.is_some() {
            return None;
        }
        let t = self.next_transmit(now)?;
        if let Some(l) = self.link.as_mut() {
            if now.saturating_duration_since(l.last_tx) >= self.config.keepalive_interval {
                // Quiet for a keepalive interval (this is a keepalive, or the first frame after
                // one): let go of the block, which may be a bulk transfer's 256 KiB (the frames
                // cut from it keep it alive until written). A new one fits this frame.
                self.seal_block = BytesMut::new();
            }
            l.last_tx = now;
        }
        // Data still to send after this frame (frames and tags add a little more).
        let more = usize::try_from(self.tx_written().since(self.tx_next)).unwrap_or(usize::MAX);
        match self.traffic.as_mut() {
            None => Some(t),
            Some(traffic) => match Transmit::sealed(&t, traffic, &mut self.seal_block, more) {
                Some(t) => Some(t),
                None => {
                    // The send key is used up (2^64 frames, or AES-GCM's byte limit): start a
                    // fresh connection (fresh keys, PROTOCOL.md §3.1).
                    self.lose_link(now, true);
                    None
                }
            },
        }
    }

    fn next_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let link = self.link?;
        if link.closing {
            return None;
        }
        let freezing = matches!(self.phase, Phase::Freezing { .. });
        if freezing && !link.freeze_sent {
            self.link_mut().freeze_sent = true;
            return Some(Transmit::control(&Frame::Freeze {
                ack: self.ack_value(),
            }));
        }
        if link.freeze_ack_due {
            let l = self.link_mut();
            l.freeze_ack_due = false;
            l.closing = true;
            let t = Transmit::control(&Frame::FreezeAck {
                ack: self.ack_value(),
            });
            self.check_closed(now);
            return Some(t);
        }
        if freezing || self.phase != Phase::Open {
            return None;
        }
        if let Some(t) = self.next_data() {
            return Some(t);
        }
        if let Some(f) = self.fin {
            if self.tx_next == f && !link.fin_sent {
                self.link_mut().fin_sent = true;
                return Some(Transmit::control(&Frame::Fin { offset: f }));
            }
        }
        if self.elicit_ack && (self.tx_next >= self.tx_written() || self.tx_next >= self.peer_limit)
        {
            self.elicit_ack = false;
            return Some(Transmit::control(&Frame::Ping));
        }
        if self.ack_now || self.ack_due.is_some_and(|t| t <= now) {
            let t = Transmit::control(&Frame::Ack {
                ack: self.ack_value(),
                limit: self.local_limit(),
            });
            self.note_acked();
            self.check_closed(now);
            return Some(t);
        }
        if now.saturating_duration_since(link.last_tx) >= self.config.keepalive_interval {
            return Some(Transmit::control(&Frame::Ping));
        }
        None
    }

    fn link_mut(&mut self) -> &mut Link {
        // Only called after next_transmit checked that a link exists.
        self.link.as_mut().expect("link checked by caller")
    }

    fn note_acked(&mut self) {
        self.acked_sent = self.rx_recv;
        self.limit_sent = self.local_limit();
        self.ack_now = false;
        self.ack_due = None;
    }

    fn next_data(&mut self) -> Option<Transmit> {
        let written = self.tx_written();
        if self.tx_next >= written || self.tx_next >= self.peer_limit {
            return None;
        }
        let max = (self.config.max_frame_payload as u64).min(self.peer_limit.since(self.tx_next));
        let sent_end = self.tx_sent_end();
        let payload = if self.tx_next < sent_end {
            // Replay from the retention buffer, at the chunk holding tx_next.
            let (i, start) = self.replay_at;
            let chunk = &self.retained[i];
            let from = self.tx_next.since(start) as usize;
            let n = ((chunk.len() - from) as u64).min(max) as usize;
            if from + n == chunk.len() {
                self.replay_at = (i + 1, start.plus(chunk.len() as u64));
            }
            chunk.slice(from..from + n)
        } else {
            let n = (self.unsent.len() as u64).min(max) as usize;
            let chunk = self.unsent.split_to(n).freeze();
            if self.unsent.is_empty() {
                // Let go of the shared allocation so an idle session holds no buffer.
                self.unsent = BytesMut::new();
            }
            self.retained.push_back(chunk.clone());
            self.retained_len += n as u64;
            self.replay_at = (self.retained.len(), self.tx_sent_end());
            chunk
        };
        let offset = self.tx_next;
        self.tx_next = self.tx_next.plus(payload.len() as u64);
        let h = data_header(offset, self.ack_value(), self.local_limit(), payload.len());
        self.note_acked();
        Some(Transmit::data(h, payload))
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        match self.phase {
            Phase::Frozen | Phase::Closed | Phase::Failed => return None,
            Phase::Freezing { deadline } => consider(Some(deadline)),
            Phase::Open => {}
        }
        if let Some(l) = self.link {
            consider(self.ack_due);
            consider(Some(l.last_rx + self.config.idle_timeout));
            // Keep-alives are only sent while open (not while freezing): only then arm them.
            if !l.closing && self.phase == Phase::Open {
                consider(Some(l.last_tx + self.config.keepalive_interval));
            }
        } else if self.phase == Phase::Open {
            consider(self.down_since.map(|s| s + self.config.session_timeout));
            if self.dialing.is_none() {
                consider(self.next_dial);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(n: u8) -> LocalInfo {
        LocalInfo {
            endpoint: EndpointId([n; 16]),
            contact: std::net::SocketAddr::from(([127, 0, 0, n], 7000)),
        }
    }

    fn ent(n: u8) -> Entropy {
        Entropy {
            secret: [n; 32],
            nonce: [n; 16],
        }
    }

    /// An AES-256-GCM key that reaches its byte limit drops the connection (the session then
    /// re-associates under fresh keys, as after any loss) and seals nothing more under it; the
    /// frames sealed before the limit open, and no refused frame leaks into a later one.
    #[test]
    fn a_used_up_aes_gcm_key_drops_the_connection() {
        let now = Instant::now();
        let (assoc, hello) = Associating::new(local(2), &ent(3));
        let Frame::Hello(h) = hello else {
            unreachable!()
        };
        let (mut l, welcome) = Session::accept_hello(
            now,
            ConnId(1),
            &h,
            SessionId([9; 16]),
            local(4),
            &ent(5),
            SessionConfig::default(),
        )
        .unwrap();
        let mut d = assoc
            .handle(now, ConnId(1), welcome, SessionConfig::default())
            .unwrap();
        assert_eq!((d.suite(), l.suite()), (Suite::Aes256Gcm, Suite::Aes256Gcm));
        let confirm = d.poll_transmit(now).unwrap();
        l.handle_frame(
            now,
            ConnId(1),
            Frame::decode_exact(&confirm.to_vec()).unwrap(),
        )
        .unwrap();
        // Room for one 1,000-byte Data frame (its inner header is 29 bytes), not two.
        d.traffic.as_mut().unwrap().tx_budget = 1100;
        let mut delivered = 0;
        for round in 0..2 {
            d.write(&[round as u8; 1000]).unwrap();
            while let Some(t) = d.poll_transmit(now) {
                let f = Frame::decode_exact(&t.to_vec()).unwrap();
                l.handle_frame(now, ConnId(1), f).unwrap();
                delivered += 1;
                assert!(delivered < 10, "kept sealing past the limit");
            }
        }
        assert_eq!(delivered, 1);
        assert!(
            d.seal_block.is_empty(),
            "the refused frame was left in the block"
        );
        let mut lost = false;
        while let Some(e) = d.poll_event() {
            lost |= e == Event::CloseConnection(ConnId(1));
        }
        assert!(lost, "the connection was not dropped");
        assert!(d.poll_transmit(now).is_none());
        let mut buf = vec![0u8; 4096];
        assert_eq!(l.read(&mut buf), Ok(1000));
        assert!(buf[..1000].iter().all(|&b| b == 0));
    }
}
