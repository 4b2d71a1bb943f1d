//! The endpoint: one listening TCP socket per host or process that accepts new associations and
//! re-associations for every session it serves (PROTOCOL.md §5), and dials on their behalf.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use roam_proto::frame::Moved;
use roam_proto::{
    Associating, ConnId, EndpointId, Entropy, ForwardTable, Frame, FrameError, HandshakeError,
    Identity, ImageError, LocalInfo, PeerPolicy, PublicKey, RefuseReason, Security, Session,
    SessionConfig, SessionError, SessionId, StreamImage, Suite,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::driver::{lock, Driver, Handover, Shared, SharedRef, Status};
use crate::error::{AcceptError, BindError, ConnectError, ThawError};
use crate::stream::Stream;

/// Connections the kernel queues for the endpoint's accept loop (capped by `somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Settings of an [`Endpoint`] and of every session it runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// Limits and timers of each session (see [`SessionConfig`] for the defaults).
    pub session: SessionConfig,
    /// The address peers should dial to reach this endpoint, if not the bound address (for
    /// example a relay or a NAT's public side).
    pub contact: Option<SocketAddr>,
    /// Longest a handshake (association or re-association) may take. Default 5 s.
    pub handshake_timeout: Duration,
    /// Unauthenticated handshakes processed at once; more wait in the kernel's backlog.
    /// Default 256.
    pub max_handshakes: usize,
    /// Associated streams waiting for [`Endpoint::accept`]; beyond it new associations are
    /// refused with `Busy`. Default 128.
    pub accept_backlog: usize,
    /// Forwarding pointers ([`Endpoint::forward`]) kept at most; the oldest is dropped first.
    /// Default 65,536.
    pub forward_capacity: usize,
    /// How long a forwarding pointer is kept after it was recorded. Default 5 minutes.
    pub forward_ttl: Duration,
    /// This endpoint's static X25519 key pair: presented and proven at every association
    /// (PROTOCOL.md §5.1), and the key sealed images are opened with
    /// ([`Endpoint::thaw_sealed`]). Default none.
    pub identity: Option<Identity>,
    /// Which peers to associate with. Default [`PeerPolicy::TrustOnFirstUse`]: **the first
    /// association authenticates nobody** (an active attacker on the path at that moment can
    /// sit in the middle); later re-associations are bound to its keys. Pin peer keys
    /// ([`PeerPolicy::Pinned`]) or share a key ([`PeerPolicy::PreShared`]) to authenticate
    /// peers. The endpoint logs a warning once when it runs trust-on-first-use.
    pub peer_policy: PeerPolicy,
    /// **INSECURE — for benchmarks and debugging only.** Send every frame in plaintext, with
    /// no encryption and no integrity protection: anyone on the path can read and alter the
    /// stream bytes (re-associations stay authenticated). Both ends must set it; an
    /// association between a plaintext and an encrypted endpoint is refused
    /// (`RefuseReason::SecurityMismatch`), and so is thawing an image of the other mode.
    /// Default `false`.
    pub insecure_plaintext: bool,
    /// The AEAD suites for sealed frames, most preferred first (PROTOCOL.md §3.1, §5.1):
    /// offered in this order when dialing; when accepting, the first of the dialer's offer
    /// found here is chosen. Default [`Suite::DEFAULT_PREFERENCE`] (AES-256-GCM, then
    /// ChaCha20-Poly1305); put ChaCha20-Poly1305 first on CPUs without AES instructions.
    /// Thawed streams keep their image's suite.
    pub suites: Vec<Suite>,
}

impl EndpointConfig {
    /// The protection settings this configuration gives the sessions.
    pub fn security(&self) -> Security {
        let mut s = Security::new()
            .with_policy(self.peer_policy.clone())
            .with_insecure_plaintext(self.insecure_plaintext)
            .with_suites(self.suites.clone());
        if let Some(i) = &self.identity {
            s = s.with_identity(i.clone());
        }
        s
    }
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            session: SessionConfig::default(),
            contact: None,
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 256,
            accept_backlog: 128,
            forward_capacity: ForwardTable::DEFAULT_CAPACITY,
            forward_ttl: ForwardTable::DEFAULT_TTL,
            identity: None,
            peer_policy: PeerPolicy::TrustOnFirstUse,
            insecure_plaintext: false,
            suites: Suite::DEFAULT_PREFERENCE.to_vec(),
        }
    }
}

/// Counters of an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// Sessions associated (both accepted and connected).
    pub associations: u64,
    /// Re-associations this endpoint accepted as listener.
    pub reassociations_accepted: u64,
    /// Incoming handshakes refused or dropped (bad frames, bad proofs, stale epochs, …).
    pub handshakes_rejected: u64,
    /// Re-associations answered with `Moved` from a forwarding pointer.
    pub forwarded: u64,
}

#[derive(Default)]
struct Counters {
    associations: AtomicU64,
    reassociations_accepted: AtomicU64,
    handshakes_rejected: AtomicU64,
    forwarded: AtomicU64,
}

pub(crate) struct EndpointInner {
    /// Where the endpoint listens and who it is; changed only by [`Endpoint::rebind`].
    addrs: Mutex<(SocketAddr, LocalInfo)>,
    pub(crate) config: EndpointConfig,
    security: Security,
    sessions: Mutex<HashMap<SessionId, SharedRef>>,
    forwards: Mutex<ForwardTable>,
    accept_tx: mpsc::Sender<Stream>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<Stream>>,
    next_conn: AtomicU64,
    counters: Counters,
    listener_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for EndpointInner {
    fn drop(&mut self) {
        if let Some(t) = self.listener_task.get_mut().ok().and_then(|t| t.take()) {
            t.abort();
        }
    }
}

impl EndpointInner {
    /// The bound address now.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Identity and contact address now.
    pub(crate) fn local(&self) -> LocalInfo {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    pub(crate) fn conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    fn register(&self, id: SessionId, s: &SharedRef) -> bool {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&id) {
            return false;
        }
        m.insert(id, s.clone());
        true
    }

    /// Remove `id` if it still maps to `s` (a later thaw of the same session may own it).
    pub(crate) fn unregister(&self, id: SessionId, s: &SharedRef) {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&id).is_some_and(|x| Arc::ptr_eq(x, s)) {
            m.remove(&id);
        }
    }

    fn lookup(&self, id: &SessionId) -> Option<SharedRef> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).cloned()
    }

    fn rejected(&self) {
        self.counters
            .handshakes_rejected
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// A roam endpoint: listens for associations and re-associations, and hosts sessions.
///
/// One per host or process. Cheap to clone; it keeps listening while any clone or any of its
/// streams is alive.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EndpointInner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.inner.local_addr())
            .field("contact", &self.inner.local().contact)
            .finish_non_exhaustive()
    }
}

pub(crate) fn entropy() -> Entropy {
    Entropy {
        secret: rand::random(),
        nonce: rand::random(),
    }
}

impl Endpoint {
    /// Listen on `addr` with the default configuration.
    pub async fn bind(addr: SocketAddr) -> Result<Endpoint, BindError> {
        Endpoint::bind_with(addr, EndpointConfig::default()).await
    }

    /// Listen on `addr` with `config`.
    pub async fn bind_with(
        addr: SocketAddr,
        config: EndpointConfig,
    ) -> Result<Endpoint, BindError> {
        let (listener, local_addr) = bind_listener(addr)?;
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_backlog.max(1));
        if config.insecure_plaintext {
            tracing::warn!(
                addr = %local_addr,
                "roam endpoint runs INSECURE PLAINTEXT: stream bytes are neither encrypted nor \
                 integrity-protected (benchmarks and debugging only)"
            );
        } else if matches!(config.peer_policy, PeerPolicy::TrustOnFirstUse) {
            tracing::warn!(
                addr = %local_addr,
                "roam endpoint trusts peers on first use: the first association with a peer \
                 authenticates nobody; pin peer keys (EndpointConfig::peer_policy) to \
                 authenticate them"
            );
        }
        let inner = Arc::new(EndpointInner {
            addrs: Mutex::new((
                local_addr,
                LocalInfo {
                    endpoint: EndpointId(rand::random()),
                    contact: config.contact.unwrap_or(local_addr),
                },
            )),
            sessions: Mutex::new(HashMap::new()),
            forwards: Mutex::new(ForwardTable::new(
                config.forward_capacity,
                config.forward_ttl,
            )),
            security: config.security(),
            config,
            accept_tx,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            next_conn: AtomicU64::new(1),
            counters: Counters::default(),
            listener_task: Mutex::new(None),
        });
        let task = tokio::spawn(listen(listener, Arc::downgrade(&inner)));
        *inner
            .listener_task
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(Endpoint { inner })
    }

    /// Move the endpoint, and every session on it, to the local address `addr` (port 0 picks
    /// one), like quinn's `Endpoint::rebind`: for a host whose address changed (a laptop that
    /// moved to another network). The endpoint listens at the new address, every session
    /// closes its current connection and re-associates from there at once — announcing the new
    /// contact address — and replays whatever was unacknowledged; the application's streams
    /// notice nothing (PROTOCOL.md §8.1). Returns the new bound address. On error nothing
    /// changed. A configured [`EndpointConfig::contact`] is kept.
    ///
    /// A peer that is frozen for a migration meanwhile dials the old address when it thaws and
    /// does not find this endpoint; rebind while no peer migrates.
    pub async fn rebind(&self, addr: SocketAddr) -> Result<SocketAddr, BindError> {
        let (listener, local_addr) = bind_listener(addr)?;
        let contact = self.inner.config.contact.unwrap_or(local_addr);
        {
            let mut a = self.inner.addrs.lock().unwrap_or_else(|p| p.into_inner());
            a.0 = local_addr;
            a.1.contact = contact;
        }
        let task = tokio::spawn(listen(listener, Arc::downgrade(&self.inner)));
        let old = self
            .inner
            .listener_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task);
        if let Some(old) = old {
            old.abort();
        }
        let sessions: Vec<SharedRef> = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let now = Instant::now();
        for s in sessions {
            let mut g = lock(&s);
            g.core.rebind(now, contact);
            g.wake_driver();
        }
        Ok(local_addr)
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    /// The address peers dial to reach this endpoint (the bound address unless configured).
    pub fn contact_addr(&self) -> SocketAddr {
        self.inner.local().contact
    }

    /// This endpoint's identity.
    pub fn id(&self) -> EndpointId {
        self.inner.local().endpoint
    }

    /// The public key of this endpoint's static identity, if configured: what peers pin and
    /// what images are sealed to ([`crate::SealImage::seal`]).
    pub fn public_key(&self) -> Option<PublicKey> {
        self.inner.config.identity.as_ref().map(|i| i.public_key())
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        let c = &self.inner.counters;
        EndpointStats {
            associations: c.associations.load(Ordering::Relaxed),
            reassociations_accepted: c.reassociations_accepted.load(Ordering::Relaxed),
            handshakes_rejected: c.handshakes_rejected.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
        }
    }

    /// Remember that `session` now lives at the endpoint whose contact address is `to`
    /// (PROTOCOL.md §5.4): from now on a peer re-associating with it here is answered `Moved`,
    /// and dials `to` instead of retrying here until its session times out.
    ///
    /// Call it on the old endpoint once a stream frozen here was thawed elsewhere (a host
    /// daemon does this when a migration commits); with both ends of a stream moving at once,
    /// each old endpoint forwards to its new one and the two moved ends find each other.
    /// `to` should be the new endpoint's [`Endpoint::contact_addr`].
    ///
    /// Pointers are kept for [`EndpointConfig::forward_ttl`] (default 5 minutes) and at most
    /// [`EndpointConfig::forward_capacity`] of them (default 65,536; the oldest goes first); a
    /// later call for the same session replaces the pointer. A session still live on this
    /// endpoint is not affected: it keeps answering its own re-associations, and the pointer
    /// is only used once no session with that id is hosted here (so it may be recorded before
    /// the freeze completes). Thawing the session here again removes the pointer.
    pub fn forward(&self, session: SessionId, to: SocketAddr) {
        let mut f = self
            .inner
            .forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f.insert(Instant::now(), session, to);
    }

    /// Sessions currently hosted here.
    pub fn session_count(&self) -> usize {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Associate with the endpoint at `addr` and open a stream to it (PROTOCOL.md §5.1).
    pub async fn connect(&self, addr: SocketAddr) -> Result<Stream, ConnectError> {
        let timeout = self.inner.config.handshake_timeout;
        tokio::time::timeout(timeout, self.connect_inner(addr))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))?
    }

    async fn connect_inner(&self, addr: SocketAddr) -> Result<Stream, ConnectError> {
        let mut tcp = dial(self.inner.local_addr(), addr).await?;
        tcp.set_nodelay(true)?;
        let (assoc, hello) =
            Associating::with_security(self.inner.local(), &entropy(), &self.inner.security);
        tcp.write_all(&hello.to_bytes()).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let reply = read_frame(&mut tcp, &mut buf).await?;
        let conn = self.inner.conn_id();
        let core = assoc.handle(
            Instant::now(),
            conn,
            reply,
            self.inner.config.session.clone(),
        )?;
        let stream = start_session(
            &self.inner,
            core,
            Some(Handover {
                id: conn,
                stream: tcp,
                leftover: buf,
            }),
            Status::Connecting,
        )
        .ok_or(ConnectError::Collision)?;
        // PROTOCOL.md §5.1 step 5: the stream is the application's only once the listener has
        // shown it verified our Confirm (its first frame, or an Accept if the connection was
        // lost and the session re-associated). A listener that never got the Confirm refuses
        // the re-association `unknown session`, and the association fails here.
        wait_established(&self.inner, &stream)
            .await
            .map_err(|e| match e {
                SessionError::Refused(r) => ConnectError::Handshake(HandshakeError::Refused(r)),
                other => ConnectError::Failed(other),
            })?;
        self.inner
            .counters
            .associations
            .fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// Wait for the next stream a peer opened to this endpoint.
    pub async fn accept(&self) -> Result<Stream, AcceptError> {
        let mut rx = self.inner.accept_rx.lock().await;
        rx.recv().await.ok_or(AcceptError::Closed)
    }

    /// Bring a frozen stream to life here: re-associate with its peer, which then continues
    /// the same byte streams (PROTOCOL.md §6.3). Returns once the peer accepted.
    pub async fn thaw(&self, image: StreamImage) -> Result<Stream, ThawError> {
        let id = image.session_id();
        if image.is_secure() == self.inner.config.insecure_plaintext {
            return Err(ThawError::SecurityMismatch);
        }
        self.inner
            .forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let core = Session::from_image(
            image,
            self.inner.local(),
            self.inner.config.session.clone(),
            Instant::now(),
        );
        let stream = start_session(&self.inner, core, None, Status::Connecting)
            .ok_or(ThawError::AlreadyRunning(id))?;
        wait_established(&self.inner, &stream).await?;
        Ok(stream)
    }
}

/// Wait until `stream`'s session is established (or already closed). On failure its id is
/// freed at once, not when the driver task next runs, so the caller can retry at once (a
/// thaw would otherwise see `AlreadyRunning`).
async fn wait_established(inner: &EndpointInner, stream: &Stream) -> Result<(), SessionError> {
    let mut status = stream.status();
    loop {
        let st = status.borrow_and_update().clone();
        match st {
            Status::Established | Status::Closed => return Ok(()),
            Status::Failed(e) => {
                let id = lock(&stream.shared).core.id();
                inner.unregister(id, &stream.shared);
                return Err(e);
            }
            Status::Connecting | Status::Frozen => {}
        }
        if status.changed().await.is_err() {
            return Err(SessionError::TimedOut(Duration::ZERO));
        }
    }
}

impl Endpoint {
    /// Open an image sealed for this endpoint's identity ([`crate::SealImage::seal`],
    /// PROTOCOL.md §7.1) and thaw it. Fails with [`ThawError::Image`] if this endpoint has no
    /// identity, the image is for another recipient, or it was altered.
    pub async fn thaw_sealed(&self, bytes: &[u8]) -> Result<Stream, ThawError> {
        let identity = self
            .inner
            .config
            .identity
            .as_ref()
            .ok_or(ThawError::Image(ImageError::NoIdentity))?;
        let image = StreamImage::open_sealed(bytes, identity).map_err(ThawError::Image)?;
        self.thaw(image).await
    }
}

/// Sealing images for a destination (PROTOCOL.md §7.1).
pub trait SealImage {
    /// Encrypt and authenticate this image for the endpoint whose identity's public key is
    /// `recipient` (its [`Endpoint::public_key`]); only [`Endpoint::thaw_sealed`] there opens
    /// it. Intercepted or left on disk, the result discloses nothing of the session.
    fn seal(&self, recipient: &PublicKey) -> Vec<u8>;
}

impl SealImage for StreamImage {
    fn seal(&self, recipient: &PublicKey) -> Vec<u8> {
        self.seal_with(recipient, &entropy())
    }
}

fn start_session(
    inner: &Arc<EndpointInner>,
    core: Session,
    first: Option<Handover>,
    initial: Status,
) -> Option<Stream> {
    let id = core.id();
    let connected = watch::Sender::new(core.link().is_some());
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        connected,
        core,
        handover: None,
        read_waker: None,
        write_waker: None,
        driver_waker: None,
    }));
    if !inner.register(id, &shared) {
        return None;
    }
    let (status_tx, status_rx) = watch::channel(initial);
    Driver::spawn(shared.clone(), inner.clone(), status_tx, first);
    Some(Stream::new(shared, inner.clone(), status_rx))
}

/// Open a TCP connection to `to` from the endpoint's own IP address (so a peer sees the
/// connection come from this host, not from whatever source the kernel would pick).
/// A listening socket at `addr` with a deep accept queue: a batch of sessions thawing at once
/// all dial here together, and a dropped SYN costs a client a one-second retransmission.
fn bind_listener(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let io = |source| BindError::Io { addr, source };
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(io)?;
    sock.set_reuseaddr(true).map_err(io)?;
    sock.bind(addr).map_err(io)?;
    let listener: TcpListener = sock.listen(LISTEN_BACKLOG).map_err(io)?;
    let local_addr = listener.local_addr().map_err(io)?;
    Ok((listener, local_addr))
}

async fn dial(local: SocketAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if local.is_ipv4() == to.is_ipv4() && !local.ip().is_unspecified() {
        sock.bind(SocketAddr::new(local.ip(), 0))?;
    }
    sock.connect(to).await
}

/// Read one whole frame, keeping any bytes after it in `buf`. Handshake frames are small, so
/// more than 4 KiB without a frame is refused.
async fn read_frame(tcp: &mut TcpStream, buf: &mut BytesMut) -> Result<Frame, ConnectError> {
    loop {
        if let Some(f) = Frame::decode(buf)? {
            return Ok(f);
        }
        if buf.len() > 4096 {
            return Err(FrameError::TooLong(buf.len() as u32).into());
        }
        buf.reserve(1024);
        if tcp.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}

async fn listen(listener: TcpListener, endpoint: Weak<EndpointInner>) {
    let permits = match endpoint.upgrade() {
        Some(e) => Arc::new(Semaphore::new(e.config.max_handshakes.max(1))),
        None => return,
    };
    loop {
        // Holding a permit before accepting bounds unauthenticated work; excess connections
        // wait in the kernel's backlog.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                // Typically EMFILE; back off briefly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(ep) = endpoint.upgrade() else { return };
        tokio::spawn(async move {
            let timeout = ep.config.handshake_timeout;
            match tokio::time::timeout(timeout, handshake(&ep, tcp)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    ep.rejected();
                    tracing::debug!(%from, error = %e, "incoming handshake rejected");
                }
                Err(_) => {
                    ep.rejected();
                    tracing::debug!(%from, "incoming handshake timed out");
                }
            }
            drop(permit);
        });
    }
}

/// Why an incoming handshake did not complete (logged and counted, never surfaced to a stream).
#[derive(Debug, thiserror::Error)]
enum IncomingError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("refused: {0}")]
    Refused(RefuseReason),
    #[error("unexpected first frame")]
    Unexpected,
    #[error("association not confirmed")]
    Unconfirmed,
}

async fn refuse(tcp: &mut TcpStream, r: RefuseReason) -> IncomingError {
    // The refusal is a handshake frame, in the clear (PROTOCOL.md §3.1).
    let _ = tcp.write_all(&Frame::Refuse(r).to_bytes()).await;
    IncomingError::Refused(r)
}

async fn handshake(ep: &Arc<EndpointInner>, mut tcp: TcpStream) -> Result<(), IncomingError> {
    tcp.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(1024);
    let first = read_frame(&mut tcp, &mut buf).await?;
    // A connection its peer has already reset (a middlebox cut it while it waited in the
    // listen queue, a dialer gave up) gets no key agreement: nobody would read the answer.
    // Under a storm of resets this was about one re-association request in ten
    // (RELIABILITY.md, finding 9).
    if let Some(e) = tcp.take_error()? {
        return Err(e.into());
    }
    let conn = ep.conn_id();
    match first {
        Frame::Hello(hello) => {
            // Reserve a backlog slot first, so a full backlog refuses instead of queueing.
            let Ok(slot) = ep.accept_tx.clone().try_reserve_owned() else {
                return Err(refuse(&mut tcp, RefuseReason::Busy).await);
            };
            let mut id = SessionId(rand::random());
            while ep.lookup(&id).is_some() {
                id = SessionId(rand::random());
            }
            let accepted = Session::accept_hello_with(
                Instant::now(),
                conn,
                &hello,
                id,
                ep.local(),
                &entropy(),
                ep.config.session.clone(),
                &ep.security,
            );
            let (mut core, welcome) = match accepted {
                Ok(x) => x,
                Err(e) => return Err(refuse(&mut tcp, e.refuse_reason()).await),
            };
            tcp.write_all(&welcome.to_bytes()).await?;
            // PROTOCOL.md §5.1: the dialer's key confirmation (it proves the dialer's static
            // key and pre-shared key, if any) before the stream is handed to the application.
            let confirm = read_frame(&mut tcp, &mut buf).await?;
            if core.handle_frame(Instant::now(), conn, confirm).is_err() || !core.is_confirmed() {
                return Err(IncomingError::Unconfirmed);
            }
            let stream = start_session(
                ep,
                core,
                Some(Handover {
                    id: conn,
                    stream: tcp,
                    leftover: buf,
                }),
                Status::Established,
            )
            .ok_or(IncomingError::Connect(ConnectError::Collision))?;
            ep.counters.associations.fetch_add(1, Ordering::Relaxed);
            slot.send(stream);
            Ok(())
        }
        Frame::Reassoc(req) => {
            let Some(shared) = ep.lookup(&req.session) else {
                let to = ep
                    .forwards
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(Instant::now(), &req.session);
                if let Some(contact) = to {
                    // PROTOCOL.md §5.4: the session moved on from here.
                    let moved = Frame::Moved(Moved {
                        session: req.session,
                        contact,
                    });
                    tcp.write_all(&moved.to_bytes()).await?;
                    ep.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                return Err(refuse(&mut tcp, RefuseReason::UnknownSession).await);
            };
            let accept = {
                let mut s = lock(&shared);
                let a = s
                    .core
                    .handle_reassoc(Instant::now(), conn, &req, &entropy());
                // Abandoning our own dial (§5.5) emits events for the driver.
                s.wake_driver();
                a
            };
            let accept = match accept {
                Ok(a) => a,
                Err(r) => return Err(refuse(&mut tcp, r).await),
            };
            // Until the Confirm makes it current, the core must hear of this connection's end
            // however it ends (error, refusal, or the handshake timeout dropping this future).
            let mut guard = PendingGuard {
                shared: &shared,
                conn,
                armed: true,
            };
            tcp.write_all(&accept.to_bytes()).await?;
            let confirm = read_frame(&mut tcp, &mut buf).await;
            let outcome = {
                let confirm = match confirm {
                    Ok(f) => f,
                    Err(e) => return Err(e.into()),
                };
                let mut s = lock(&shared);
                guard.armed = false;
                let r = s.core.handle_confirm(Instant::now(), conn, confirm);
                s.wake_driver();
                match r {
                    Ok(()) => {
                        s.handover = Some(Handover {
                            id: conn,
                            stream: tcp,
                            leftover: buf,
                        });
                        s.wake_driver();
                        None
                    }
                    Err(r) => Some((r, tcp)),
                }
            };
            match outcome {
                None => {
                    ep.counters
                        .reassociations_accepted
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Some((r, mut tcp)) => Err(refuse(&mut tcp, r).await),
            }
        }
        _ => Err(IncomingError::Unexpected),
    }
}

/// Tells the core that a connection on which it accepted a re-association ended before the
/// `Confirm` (PROTOCOL.md §5.5), unless disarmed.
struct PendingGuard<'a> {
    shared: &'a SharedRef,
    conn: ConnId,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut s = lock(self.shared);
            s.core.handle_connection_lost(Instant::now(), self.conn);
            s.wake_driver();
        }
    }
}

/// Dialing side of re-association, run as its own task for [`roam_proto::Event::Dial`].
pub(crate) async fn dial_reassoc(shared: SharedRef, ep: Arc<EndpointInner>, addr: SocketAddr) {
    let conn = ep.conn_id();
    let timeout = ep.config.handshake_timeout;
    let mut started = false;
    let r = tokio::time::timeout(timeout, dial_inner(&ep, &shared, conn, addr, &mut started)).await;
    let err = match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("timed out after {timeout:?}")),
    };
    let mut s = lock(&shared);
    if let Some(e) = err {
        tracing::debug!(%addr, error = %e, "re-association attempt failed");
        if started {
            s.core.handle_connection_lost(Instant::now(), conn);
        } else {
            s.core.handle_dial_failed(Instant::now());
        }
    }
    s.wake_driver();
}

async fn dial_inner(
    ep: &EndpointInner,
    shared: &SharedRef,
    conn: ConnId,
    addr: SocketAddr,
    started: &mut bool,
) -> Result<(), ConnectError> {
    let mut tcp = dial(ep.local_addr(), addr).await?;
    tcp.set_nodelay(true)?;
    let req = {
        let mut s = lock(shared);
        if s.core.is_finished() || !s.core.is_dialing() {
            // Abandoned meanwhile: the peer's own re-association went first (§5.5).
            return Ok(());
        }
        *started = true;
        s.core.start_reassoc(Instant::now(), conn, &entropy())
    };
    tcp.write_all(&req.to_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let reply = read_frame(&mut tcp, &mut buf).await?;
    let confirm = {
        let mut s = lock(shared);
        if let Frame::Moved(m) = &reply {
            // §5.4: dial where the session went.
            s.core.handle_moved(Instant::now(), conn, m);
            return Ok(());
        }
        match s.core.handle_accept(Instant::now(), conn, reply) {
            Ok(c) => c,
            // The core has scheduled a retry or failed the session.
            Err(_) => return Ok(()),
        }
    };
    tcp.write_all(&confirm.to_bytes()).await?;
    let mut s = lock(shared);
    s.handover = Some(Handover {
        id: conn,
        stream: tcp,
        leftover: buf,
    });
    Ok(())
}
