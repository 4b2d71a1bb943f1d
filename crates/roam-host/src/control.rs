//! The local control API of a host daemon: HTTP/1.1 with JSON bodies on a Unix socket
//! (docs/PROTOCOL.md §11.5). A Unix socket, not a TCP port: only local users with access to
//! the state directory can drive the daemon, and nothing of it is reachable from the network.
//!
//! | method and path                  | body          | answer                                  |
//! |----------------------------------|---------------|-----------------------------------------|
//! | `GET /v1/host`                   |               | [`HostInfo`]                            |
//! | `GET /v1/agents`                 |               | `[`[`AgentInfo`]`]`                     |
//! | `POST /v1/agents`                | [`RunRequest`]| [`AgentInfo`]                           |
//! | `GET /v1/agents/{id}`            |               | [`AgentInfo`]                           |
//! | `POST /v1/agents/{id}/migrate`   | [`MigrateRequest`] | NDJSON, one [`Progress`] per line, the last `done` or `error` |
//! | `POST /v1/agents/{id}/stop`      |               | [`AgentInfo`]                           |
//!
//! Errors are `{"code": …, "message": …}` ([`ApiError`]) with a 4xx/5xx status.
//!
//! Where the sockets are: `STATE_DIR/hosts/IP_PORT/control.sock`, where `STATE_DIR` is
//! `$ROAM_STATE_DIR`, else `$XDG_RUNTIME_DIR/roam`, else `/tmp/roam-$USER`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::api::{AgentInfo, ApiError, HostInfo, MigrateRequest, Progress, RunRequest};
use crate::host::Host;

/// The state directory (see the module docs).
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ROAM_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("roam");
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    std::env::temp_dir().join(format!("roam-{user}"))
}

/// The directory of the daemon at `addr` under `state`.
pub fn host_dir(state: &Path, addr: SocketAddr) -> PathBuf {
    state
        .join("hosts")
        .join(format!("{}_{}", addr.ip(), addr.port()))
}

/// The control socket of the daemon at `addr` under `state`.
pub fn socket_path(state: &Path, addr: SocketAddr) -> PathBuf {
    host_dir(state, addr).join("control.sock")
}

/// Every daemon address with a control socket under `state` (live or stale).
pub fn known_hosts(state: &Path) -> Vec<SocketAddr> {
    let Ok(rd) = std::fs::read_dir(state.join("hosts")) else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (ip, port) = name.rsplit_once('_')?;
            Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
        })
        .filter(|a| socket_path(state, *a).exists())
        .collect();
    out.sort();
    out
}

pub(crate) struct ApiResponse(pub(crate) ApiError);

impl IntoResponse for ApiResponse {
    fn into_response(self) -> Response {
        let status = match self.0.code.as_str() {
            "unknown_agent" => StatusCode::NOT_FOUND,
            "bad_request" => StatusCode::BAD_REQUEST,
            "busy" => StatusCode::CONFLICT,
            "unreachable" | "refused" | "auth" | "lost" => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(self.0)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiResponse>;

/// Bind a control socket at `path`: its directory is created and a stale socket (nobody
/// answers there) replaced; a live one is an error (`AddrInUse`). Once this returns, clients
/// can connect (the kernel queues them until the socket is served).
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another process serves {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// Serve the control API of `host` on `listener` ([`bind`]) until the task is dropped.
pub async fn serve(host: Host, listener: UnixListener) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/host", get(host_info))
        .route("/v1/agents", get(list).post(run))
        .route("/v1/agents/{id}", get(one))
        .route("/v1/agents/{id}/migrate", post(migrate))
        .route("/v1/agents/{id}/stop", post(stop))
        .with_state(host);
    axum::serve(listener, app).await
}

async fn host_info(State(h): State<Host>) -> Json<HostInfo> {
    Json(h.info())
}

async fn list(State(h): State<Host>) -> Json<Vec<AgentInfo>> {
    Json(h.agents())
}

async fn one(State(h): State<Host>, UrlPath(id): UrlPath<String>) -> ApiResult<AgentInfo> {
    h.agent(&id).map(Json).map_err(ApiResponse)
}

async fn run(State(h): State<Host>, Json(req): Json<RunRequest>) -> ApiResult<AgentInfo> {
    h.run(&req.kind, &req.args).map(Json).map_err(ApiResponse)
}

async fn stop(State(h): State<Host>, UrlPath(id): UrlPath<String>) -> ApiResult<AgentInfo> {
    h.stop(&id).await.map(Json).map_err(ApiResponse)
}

async fn migrate(
    State(h): State<Host>,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<MigrateRequest>,
) -> Response {
    // Unknown agents are a plain 404, before any streaming starts.
    if let Err(e) = h.agent(&id) {
        return ApiResponse(e).into_response();
    }
    let (tx, rx) = mpsc::channel::<Progress>(16);
    tokio::spawn(async move {
        let _ = h.migrate(&id, req.to, tx).await;
    });
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx);
    let body = tokio_stream::StreamExt::map(lines, |p| {
        let mut line = serde_json::to_vec(&p).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No daemon answers at that socket.
    #[error("no roam host daemon for {host} (no control socket at {path}): is `roam host --listen {host}` running?")]
    NotRunning {
        /// The daemon's address.
        host: SocketAddr,
        /// Where its socket was looked for.
        path: PathBuf,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// The exchange failed.
    #[error("control API of {host}: {message}")]
    Protocol {
        /// The daemon's address.
        host: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// A client of one daemon's control API.
#[derive(Debug, Clone)]
pub struct Client {
    host: SocketAddr,
    path: PathBuf,
}

impl Client {
    /// The client of the daemon at `host` under the state directory `state`.
    pub fn new(state: &Path, host: SocketAddr) -> Client {
        Client {
            host,
            path: socket_path(state, host),
        }
    }

    /// A client of the control socket at `path` (a tunnel end's), named `label` in errors.
    pub fn at_socket(path: PathBuf, label: SocketAddr) -> Client {
        Client { host: label, path }
    }

    /// The daemon's address.
    pub fn host(&self) -> SocketAddr {
        self.host
    }

    /// `GET uri`, decoded.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        uri: &str,
    ) -> Result<T, ClientError> {
        self.json("GET", uri, None).await
    }

    /// `POST uri` with a JSON body, decoded.
    pub async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        uri: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol {
            host: self.host,
            message: e.to_string(),
        })?;
        self.json("POST", uri, Some(body)).await
    }

    async fn request(
        &self,
        method: &str,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let proto = |message: String| ClientError::Protocol {
            host: self.host,
            message,
        };
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|_| ClientError::NotRunning {
                    host: self.host,
                    path: self.path.clone(),
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| proto(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "roam")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| proto(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| proto(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| proto(e.to_string()))?
                .to_bytes();
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api(e),
                Err(_) => proto(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )),
            });
        }
        Ok(resp)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let resp = self.request(method, uri, body).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol {
                host: self.host,
                message: e.to_string(),
            })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            host: self.host,
            message: format!("bad answer: {e}"),
        })
    }

    /// `GET /v1/host`.
    pub async fn info(&self) -> Result<HostInfo, ClientError> {
        self.json("GET", "/v1/host", None).await
    }

    /// `GET /v1/agents`.
    pub async fn agents(&self) -> Result<Vec<AgentInfo>, ClientError> {
        self.json("GET", "/v1/agents", None).await
    }

    /// `GET /v1/agents/{id}`.
    pub async fn agent(&self, id: &str) -> Result<AgentInfo, ClientError> {
        self.json("GET", &format!("/v1/agents/{id}"), None).await
    }

    /// `POST /v1/agents`.
    pub async fn run(&self, kind: &str, args: &[String]) -> Result<AgentInfo, ClientError> {
        let body = serde_json::to_vec(&RunRequest {
            kind: kind.to_owned(),
            args: args.to_vec(),
        })
        .unwrap_or_default();
        self.json("POST", "/v1/agents", Some(body)).await
    }

    /// `POST /v1/agents/{id}/stop`.
    pub async fn stop(&self, id: &str) -> Result<AgentInfo, ClientError> {
        self.json("POST", &format!("/v1/agents/{id}/stop"), None)
            .await
    }

    /// `POST /v1/agents/{id}/migrate`: calls `on_progress` for each progress line; returns the
    /// last one (`Done` or `Error`).
    pub async fn migrate(
        &self,
        id: &str,
        to: SocketAddr,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<Progress, ClientError> {
        let body = serde_json::to_vec(&MigrateRequest { to }).unwrap_or_default();
        let resp = self
            .request("POST", &format!("/v1/agents/{id}/migrate"), Some(body))
            .await?;
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut last = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol {
                host: self.host,
                message: e.to_string(),
            })?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
            }
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let p: Progress =
                    serde_json::from_slice(&line).map_err(|e| ClientError::Protocol {
                        host: self.host,
                        message: format!("bad progress line: {e}"),
                    })?;
                on_progress(&p);
                last = Some(p);
            }
        }
        last.ok_or_else(|| ClientError::Protocol {
            host: self.host,
            message: "the migration stream ended without a result".into(),
        })
    }
}
