//! `roam tunnel`: unmodified TCP programs keep their connections across network breaks and
//! address changes (docs/PROTOCOL.md §12).
//!
//! ```text
//! program ──TCP──▶ tunnel client ══ roam session per connection ══▶ tunnel server ──TCP──▶ server
//!                  (`roam tunnel listen`)                          (`roam tunnel serve`)
//! ```
//!
//! The program's TCP connection and the server's stay up while the roam session between the
//! two tunnel ends is cut, stalled, or while the client's address changes
//! ([`TunnelClient::rebind`] → `Endpoint::rebind`), within the session timeout.
//!
//! Each roam stream starts with one byte: `T` (carry a connection) or `P` (a probe that only
//! checks the server behind the tunnel answers). The server answers one byte: `0` (connected to
//! the real server; bytes follow) or `1` (the real server refused; the stream ends).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use roam::{Endpoint, EndpointConfig, Stream, StreamMonitor};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::watch;

use crate::api::ApiError;

const KIND_TUNNEL: u8 = b'T';
const KIND_PROBE: u8 = b'P';
const OK: u8 = 0;
const REFUSED: u8 = 1;
/// How long the first bytes of a tunnel stream may take.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to open a session before a local connection is given up (within `HEADER_TIMEOUT`).
const CONNECT_ATTEMPTS: u32 = 8;

/// Why a tunnel end could not start or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// An address could not be bound (for example a port already in use).
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The server the tunnel forwards to refuses connections.
    #[error("the server at {addr} refuses connections: {reason}")]
    ServerRefused {
        /// The server's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer tunnel end cannot be reached.
    #[error("the peer tunnel at {addr} is down or unreachable: {reason}")]
    PeerDown {
        /// The peer's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer tunnel end answered, but the server behind it refused.
    #[error("the peer tunnel at {addr} answers, but the server behind it refuses connections")]
    PeerServerRefused {
        /// The peer's address.
        addr: SocketAddr,
    },
}

/// One carried connection, for `roam ps` and the control API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelSession {
    /// The local program's address (client end), or where the server end reaches the tunnel
    /// client now (server end: the peer's contact address, which follows its rebinds).
    pub from: SocketAddr,
    /// The roam session's id (hex).
    pub session: String,
    /// Bytes carried toward the server.
    pub up: u64,
    /// Bytes carried back.
    pub down: u64,
    /// A transport connection carries the session now.
    pub connected: bool,
    /// Re-associations (reconnections, address changes) so far.
    pub reassociations: u64,
    /// Transport connections lost so far.
    pub connections_lost: u64,
}

/// A tunnel end's status (`GET /v1/tunnel`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// `client` or `server`.
    pub role: String,
    /// Where local programs connect (client) or where the roam endpoint listens (server).
    pub listen: SocketAddr,
    /// The roam endpoint's address now.
    pub endpoint: SocketAddr,
    /// The peer tunnel (client) or the real server (server).
    pub to: SocketAddr,
    /// Connections carried so far.
    pub carried: u64,
    /// Connections refused (the real server refused or the peer was unreachable).
    pub refused: u64,
    /// The sessions open now.
    pub sessions: Vec<TunnelSession>,
}

/// `POST /v1/tunnel/rebind`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebindRequest {
    /// The new local address (port 0: any).
    pub to: SocketAddr,
}

/// Answer of `POST /v1/tunnel/rebind`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebindAnswer {
    /// The endpoint's new address.
    pub endpoint: SocketAddr,
    /// Sessions moved.
    pub sessions: usize,
}

struct Live {
    from: SocketAddr,
    monitor: StreamMonitor,
    /// true at the client end: the stream's written bytes go up.
    client: bool,
}

#[derive(Default)]
struct Shared {
    live: Mutex<Vec<(u64, Live)>>,
    next: AtomicU64,
    carried: AtomicU64,
    refused: AtomicU64,
    /// Connections carried now; a watch so shutdown can wait for it to reach zero.
    open: watch::Sender<usize>,
}

impl Shared {
    fn add(&self, live: Live) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).push((id, live));
        self.open.send_modify(|n| *n += 1);
        id
    }

    fn remove(&self, id: u64) {
        lock(&self.live).retain(|(i, _)| *i != id);
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }

    async fn drained(&self) {
        let mut open = self.open.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = open.wait_for(|n| *n == 0).await;
    }

    fn sessions(&self) -> Vec<TunnelSession> {
        lock(&self.live)
            .iter()
            .filter_map(|(_, l)| {
                let st = l.monitor.status()?;
                let (up, down) = if l.client {
                    (st.stats.bytes_written, st.stats.bytes_read)
                } else {
                    (st.stats.bytes_read, st.stats.bytes_written)
                };
                Some(TunnelSession {
                    from: if l.client { l.from } else { st.peer.contact },
                    session: l.monitor.session_id().to_string(),
                    up,
                    down,
                    connected: st.connected,
                    reassociations: st.stats.reassociations,
                    connections_lost: st.stats.connections_lost,
                })
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn endpoint_config(psk: Option<[u8; 32]>) -> EndpointConfig {
    let mut config = EndpointConfig::default();
    if let Some(k) = psk {
        config.peer_policy = roam::PeerPolicy::PreShared(roam::PreSharedKey(k));
    }
    config
}

/// Copy both ways between a local TCP connection and a roam stream until both directions
/// ended; each end-of-stream is passed on as a half-close.
async fn splice(tcp: TcpStream, stream: &mut Stream) -> std::io::Result<(u64, u64)> {
    let mut tcp = tcp;
    tokio::io::copy_bidirectional(&mut tcp, stream).await
}

/// The client end: accepts local TCP connections and carries each over its own roam session.
pub struct TunnelClient {
    listen: SocketAddr,
    to: SocketAddr,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    listener: Mutex<Option<TcpListener>>,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient")
            .field("listen", &self.listen)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl TunnelClient {
    /// Bind `local` for programs, bind a roam endpoint at `bind` (port 0: any), and check that
    /// the peer tunnel at `to` answers and its server accepts connections.
    /// With `psk`, only a server end holding the same key is accepted (and it accepts only
    /// us); without, the first association is trust-on-first-use (PROTOCOL.md §5.1).
    pub async fn start(
        local: SocketAddr,
        to: SocketAddr,
        bind: SocketAddr,
        psk: Option<[u8; 32]>,
    ) -> Result<Arc<TunnelClient>, TunnelError> {
        let listener = TcpListener::bind(local)
            .await
            .map_err(|e| TunnelError::Bind {
                addr: local,
                reason: e.to_string(),
            })?;
        let listen = listener.local_addr().unwrap_or(local);
        let endpoint = Endpoint::bind_with(bind, endpoint_config(psk))
            .await
            .map_err(|e| TunnelError::Bind {
                addr: bind,
                reason: e.to_string(),
            })?;
        let down = |reason: String| TunnelError::PeerDown { addr: to, reason };
        let mut probe = tokio::time::timeout(HEADER_TIMEOUT, endpoint.connect(to))
            .await
            .map_err(|_| down("no answer".into()))?
            .map_err(|e| down(e.to_string()))?;
        probe
            .write_all(&[KIND_PROBE])
            .await
            .map_err(|e| down(e.to_string()))?;
        probe.flush().await.map_err(|e| down(e.to_string()))?;
        let mut answer = [0u8; 1];
        tokio::time::timeout(HEADER_TIMEOUT, probe.read_exact(&mut answer))
            .await
            .map_err(|_| down("no answer to the probe".into()))?
            .map_err(|e| down(e.to_string()))?;
        if answer[0] != OK {
            return Err(TunnelError::PeerServerRefused { addr: to });
        }
        drop(probe);
        Ok(Arc::new(TunnelClient {
            listen,
            to,
            endpoint,
            shared: Arc::new(Shared::default()),
            listener: Mutex::new(Some(listener)),
        }))
    }

    /// Where local programs connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Accept and carry connections until the returned future is dropped.
    pub async fn run(self: &Arc<Self>) {
        let Some(listener) = lock(&self.listener).take() else {
            return;
        };
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move { me.carry(tcp, from).await });
        }
    }

    /// A new session to the peer tunnel. A transport failure before the association exists
    /// (the first connection reset or refused mid-handshake) is retried with backoff: nothing
    /// of the local program's has been read yet, so a fresh attempt is safe. The caller bounds
    /// the whole by `HEADER_TIMEOUT`; other failures (the peer's identity, a non-roam peer)
    /// are final.
    async fn connect(&self) -> Result<Stream, String> {
        let mut backoff = Duration::from_millis(10);
        for _ in 0..CONNECT_ATTEMPTS - 1 {
            match self.endpoint.connect(self.to).await {
                Ok(s) => return Ok(s),
                Err(roam::ConnectError::Io(e)) => {
                    tracing::debug!(error = %e, ?backoff, "connection to the peer tunnel failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        self.endpoint
            .connect(self.to)
            .await
            .map_err(|e| e.to_string())
    }

    async fn carry(&self, tcp: TcpStream, from: SocketAddr) {
        let opened = async {
            let mut s = self.connect().await?;
            s.write_all(&[KIND_TUNNEL])
                .await
                .map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
            if answer[0] != OK {
                return Err("the server behind the peer tunnel refused".to_owned());
            }
            Ok::<_, String>(s)
        };
        let mut stream = match tokio::time::timeout(HEADER_TIMEOUT, opened).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%from, error = %e, "connection not carried");
                return;
            }
            Err(_) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%from, "connection not carried: the peer tunnel did not answer");
                return;
            }
        };
        self.shared.carried.fetch_add(1, Ordering::Relaxed);
        let id = self.shared.add(Live {
            from,
            monitor: stream.monitor(),
            client: true,
        });
        tracing::info!(%from, session = %stream.session_id(), "carrying");
        match splice(tcp, &mut stream).await {
            Ok((up, down)) => tracing::info!(%from, up, down, "connection ended"),
            Err(e) => tracing::warn!(%from, error = %e, "connection ended with an error"),
        }
        self.shared.remove(id);
    }

    /// Move the roam endpoint, and every carried session, to the local address `to`.
    pub async fn rebind(&self, to: SocketAddr) -> Result<RebindAnswer, ApiError> {
        let endpoint = self
            .endpoint
            .rebind(to)
            .await
            .map_err(|e| ApiError::new("bad_request", format!("cannot rebind to {to}: {e}")))?;
        Ok(RebindAnswer {
            endpoint,
            sessions: *self.shared.open.borrow(),
        })
    }

    /// Status.
    pub fn info(&self) -> TunnelInfo {
        info(
            "client",
            self.listen,
            self.endpoint.local_addr(),
            self.to,
            &self.shared,
        )
    }

    /// Connections carried now.
    pub fn open(&self) -> usize {
        *self.shared.open.borrow()
    }

    /// Resolves once no connection is carried (at once if none is).
    pub async fn drained(&self) {
        self.shared.drained().await
    }
}

fn info(
    role: &str,
    listen: SocketAddr,
    endpoint: SocketAddr,
    to: SocketAddr,
    sh: &Shared,
) -> TunnelInfo {
    TunnelInfo {
        role: role.into(),
        listen,
        endpoint,
        to,
        carried: sh.carried.load(Ordering::Relaxed),
        refused: sh.refused.load(Ordering::Relaxed),
        sessions: sh.sessions(),
    }
}

/// The server end: a roam endpoint whose sessions each become a TCP connection to the server.
pub struct TunnelServer {
    forward: SocketAddr,
    endpoint: Endpoint,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TunnelServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelServer")
            .field("forward", &self.forward)
            .finish_non_exhaustive()
    }
}

impl TunnelServer {
    /// Check the server at `forward` accepts a connection, then listen at `listen`.
    /// `advertise`: the address clients should redial (a relay in front of this end).
    /// `psk`: as for [`TunnelClient::start`].
    pub async fn start(
        listen: SocketAddr,
        forward: SocketAddr,
        advertise: Option<SocketAddr>,
        psk: Option<[u8; 32]>,
    ) -> Result<Arc<TunnelServer>, TunnelError> {
        match tokio::time::timeout(HEADER_TIMEOUT, TcpStream::connect(forward)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(TunnelError::ServerRefused {
                    addr: forward,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(TunnelError::ServerRefused {
                    addr: forward,
                    reason: "no answer".into(),
                })
            }
        }
        let mut config = endpoint_config(psk);
        config.contact = advertise;
        let endpoint =
            Endpoint::bind_with(listen, config)
                .await
                .map_err(|e| TunnelError::Bind {
                    addr: listen,
                    reason: e.to_string(),
                })?;
        Ok(Arc::new(TunnelServer {
            forward,
            endpoint,
            shared: Arc::new(Shared::default()),
        }))
    }

    /// The roam endpoint's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Serve until the returned future is dropped.
    pub async fn run(self: &Arc<Self>) {
        loop {
            let stream = match self.endpoint.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            let me = self.clone();
            tokio::spawn(async move { me.carry(stream).await });
        }
    }

    async fn carry(&self, mut stream: Stream) {
        let from = stream.peer().contact;
        let mut kind = [0u8; 1];
        match tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut kind)).await {
            Ok(Ok(_)) if kind[0] == KIND_TUNNEL || kind[0] == KIND_PROBE => {}
            _ => return,
        }
        let tcp = match TcpStream::connect(self.forward).await {
            Ok(t) => t,
            Err(e) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(forward = %self.forward, error = %e, "the server refused");
                let _ = stream.write_all(&[REFUSED]).await;
                let _ = stream.shutdown().await;
                return;
            }
        };
        if stream.write_all(&[OK]).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        if kind[0] == KIND_PROBE {
            let _ = stream.shutdown().await;
            return;
        }
        let _ = tcp.set_nodelay(true);
        self.shared.carried.fetch_add(1, Ordering::Relaxed);
        let id = self.shared.add(Live {
            from,
            monitor: stream.monitor(),
            client: false,
        });
        match splice(tcp, &mut stream).await {
            Ok((down, up)) => tracing::info!(%from, up, down, "connection ended"),
            Err(e) => tracing::warn!(%from, error = %e, "connection ended with an error"),
        }
        self.shared.remove(id);
    }

    /// Status.
    pub fn info(&self) -> TunnelInfo {
        let l = self.endpoint.local_addr();
        info("server", l, l, self.forward, &self.shared)
    }

    /// Connections carried now.
    pub fn open(&self) -> usize {
        *self.shared.open.borrow()
    }

    /// Resolves once no connection is carried (at once if none is).
    pub async fn drained(&self) {
        self.shared.drained().await
    }
}

/// The control socket of the tunnel end listening at `listen` under the state directory.
pub fn control_path(state: &Path, listen: SocketAddr) -> PathBuf {
    state
        .join("tunnels")
        .join(format!("{}_{}", listen.ip(), listen.port()))
        .join("control.sock")
}

/// Every tunnel end with a control socket under `state`.
pub fn known_tunnels(state: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(state.join("tunnels")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("control.sock"))
        .filter(|p| p.exists())
        .collect();
    out.sort();
    out
}

/// Either end, for the control API.
#[derive(Clone)]
pub enum TunnelEnd {
    /// `roam tunnel listen`.
    Client(Arc<TunnelClient>),
    /// `roam tunnel serve`.
    Server(Arc<TunnelServer>),
}

impl TunnelEnd {
    fn info(&self) -> TunnelInfo {
        match self {
            TunnelEnd::Client(c) => c.info(),
            TunnelEnd::Server(s) => s.info(),
        }
    }
}

/// Serve a tunnel end's control API on a Unix socket bound with [`crate::control::bind`]:
/// `GET /v1/tunnel` ([`TunnelInfo`]) and, at the client end, `POST /v1/tunnel/rebind`
/// ([`RebindRequest`] → [`RebindAnswer`]).
pub async fn serve_control(end: TunnelEnd, listener: UnixListener) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/v1/tunnel",
            get(|State(e): State<TunnelEnd>| async move { Json(e.info()) }),
        )
        .route("/v1/tunnel/rebind", post(rebind))
        .with_state(end);
    axum::serve(listener, app).await
}

async fn rebind(
    State(end): State<TunnelEnd>,
    Json(req): Json<RebindRequest>,
) -> Result<Json<RebindAnswer>, crate::control::ApiResponse> {
    match end {
        TunnelEnd::Client(c) => c
            .rebind(req.to)
            .await
            .map(Json)
            .map_err(crate::control::ApiResponse),
        TunnelEnd::Server(_) => Err(crate::control::ApiResponse(ApiError::new(
            "bad_request",
            "only the client end (`roam tunnel listen`) rebinds",
        ))),
    }
}
