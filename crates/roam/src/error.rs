//! Errors of the async API. Each operation has its own enum; the stream's I/O errors carry a
//! [`SessionError`] inside the `io::Error` (see [`crate::Stream`]).

use std::io;
use std::time::Duration;

use roam_proto::{FrameError, SessionId};
pub use roam_proto::{FreezeError, HandshakeError, ImageError, RefuseReason, SessionError};

/// Why [`crate::Endpoint::bind`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The cause.
        source: io::Error,
    },
}

/// Why [`crate::Endpoint::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The transport connection could not be opened or broke during the handshake.
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    /// The peer did not complete the handshake in time.
    #[error("handshake timed out after {0:?}")]
    TimedOut(Duration),
    /// The peer sent something that is not a roam frame.
    #[error("peer is not speaking roam: {0}")]
    Frame(#[from] FrameError),
    /// The association handshake failed.
    #[error("association failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The session id the peer chose is already in use here (astronomically unlikely).
    #[error("session id collision")]
    Collision,
    /// The connection was lost before the listener confirmed the association, and the session
    /// failed while re-associating (PROTOCOL.md §5.1 step 5).
    #[error("association failed before the listener confirmed it: {0}")]
    Failed(SessionError),
}

/// Why [`crate::Endpoint::accept`] returned no stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The endpoint stopped listening.
    #[error("endpoint closed")]
    Closed,
}

/// Why [`crate::Endpoint::thaw`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ThawError {
    /// A session with this id is already live on this endpoint.
    #[error("session {0} is already running on this endpoint")]
    AlreadyRunning(SessionId),
    /// The peer refused to re-associate (for example a stale epoch: the image was thawed before).
    #[error("peer refused re-association: {0}")]
    Refused(RefuseReason),
    /// The session failed before it could re-associate.
    #[error(transparent)]
    Failed(SessionError),
    /// The image's security mode (encrypted or insecure plaintext) differs from this
    /// endpoint's.
    #[error("image and endpoint differ in security mode (insecure plaintext on one only)")]
    SecurityMismatch,
    /// A sealed image could not be opened (no identity here, another recipient, or altered).
    #[error("sealed image: {0}")]
    Image(ImageError),
}

impl From<SessionError> for ThawError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Refused(r) => ThawError::Refused(r),
            other => ThawError::Failed(other),
        }
    }
}

/// Map a session error to the `io::Error` a stream returns, keeping it as the inner error.
pub(crate) fn session_io_error(e: SessionError) -> io::Error {
    let kind = match e {
        SessionError::TimedOut(_) => io::ErrorKind::TimedOut,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, e)
}
