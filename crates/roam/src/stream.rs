//! The application's handle: a migrateable stream with the API of a TCP stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use roam_proto::{
    FreezeError, PeerInfo, ReadError, SessionError, SessionId, Stats, StreamImage, WriteError,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::driver::{lock, SharedRef, Status};
use crate::endpoint::EndpointInner;
use crate::error::session_io_error;

/// A migrateable byte stream: reads and writes like a `TcpStream`, and can be frozen into a
/// [`StreamImage`] and thawed on another endpoint while the peer keeps using its end.
///
/// I/O errors carry a [`SessionError`] as their inner error
/// (`err.get_ref().and_then(|e| e.downcast_ref::<SessionError>())`): `TimedOut` when the peer
/// was unreachable for the whole session timeout, `ConnectionAborted` when it refused.
/// Dropping the stream ends its write half (like `shutdown`) and discards further input.
pub struct Stream {
    pub(crate) shared: SharedRef,
    // Keeps the endpoint listening (for re-associations) while the stream lives.
    endpoint: Arc<EndpointInner>,
    status: watch::Receiver<Status>,
    frozen: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("session", &self.session_id())
            .finish_non_exhaustive()
    }
}

impl Stream {
    pub(crate) fn new(
        shared: SharedRef,
        endpoint: Arc<EndpointInner>,
        status: watch::Receiver<Status>,
    ) -> Stream {
        Stream {
            shared,
            endpoint,
            status,
            frozen: false,
        }
    }

    pub(crate) fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The session's id (the same at both ends, and across migrations).
    pub fn session_id(&self) -> SessionId {
        lock(&self.shared).core.id()
    }

    /// The peer's identity and contact address, as last learned.
    pub fn peer(&self) -> PeerInfo {
        lock(&self.shared).core.peer()
    }

    /// Where this end is reachable (its endpoint's contact address).
    pub fn local_contact(&self) -> std::net::SocketAddr {
        self.endpoint.local().contact
    }

    /// Counters (bytes, re-associations, migrations, …).
    pub fn stats(&self) -> Stats {
        lock(&self.shared).core.stats()
    }

    /// The static public key the peer proved at association, if it has an identity.
    pub fn peer_identity(&self) -> Option<roam_proto::PublicKey> {
        lock(&self.shared).core.peer_identity()
    }

    /// Whether the stream's frames are encrypted and authenticated (false only in the
    /// insecure plaintext mode).
    pub fn is_secure(&self) -> bool {
        lock(&self.shared).core.is_secure()
    }

    /// The AEAD suite the stream's frames are sealed with (negotiated at association, kept
    /// across migrations; unused in the insecure plaintext mode).
    pub fn suite(&self) -> roam_proto::Suite {
        lock(&self.shared).core.suite()
    }

    /// The current epoch (completed re-associations).
    pub fn epoch(&self) -> roam_proto::Epoch {
        lock(&self.shared).core.epoch()
    }

    /// True while a transport connection carries the session.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared).core.link().is_some()
    }

    /// Watch the connection come and go (reconnections, migrations of the peer): the value is
    /// true while a transport connection carries the session. For status displays and tests;
    /// the stream itself needs no help to recover.
    pub fn watch_connected(&self) -> watch::Receiver<bool> {
        lock(&self.shared).connected.subscribe()
    }

    /// Planned migration (PROTOCOL.md §6): stop I/O, tell the peer, drain what is in flight
    /// into the synchronization buffers, close the connection and return the image.
    ///
    /// Completes within the session's freeze timeout even if the peer is unreachable; the image
    /// then holds every unacknowledged byte and nothing is lost.
    pub async fn freeze(mut self) -> Result<StreamImage, FreezeError> {
        {
            let mut s = lock(&self.shared);
            s.core.freeze(Instant::now())?;
            s.wake_driver();
        }
        self.frozen = true;
        let mut status = self.status.clone();
        loop {
            {
                let s = lock(&self.shared);
                if let Some(img) = s.core.image() {
                    drop(s);
                    // The session now lives in the image; free the id here at once, so it can
                    // even be thawed back onto this endpoint.
                    let id = img.session_id();
                    self.endpoint.unregister(id, &self.shared);
                    return Ok(img);
                }
                if let Some(e) = s.core.failure() {
                    return Err(FreezeError::Failed(e.clone()));
                }
            }
            if status.changed().await.is_err() {
                // The driver ended without producing an image: only if it failed.
                let s = lock(&self.shared);
                return match s.core.image() {
                    Some(img) => Ok(img),
                    None => {
                        Err(FreezeError::Failed(s.core.failure().cloned().unwrap_or(
                            SessionError::TimedOut(s.core.config().session_timeout),
                        )))
                    }
                };
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.frozen {
            return;
        }
        let mut s = lock(&self.shared);
        s.core.detach(Instant::now());
        s.wake_driver();
    }
}

impl Stream {
    /// Borrow the stream as a reader and a writer that can be used concurrently (for example
    /// in `tokio::select!` or `tokio::join!`), like `TcpStream::split`. When both halves are
    /// dropped the stream can be frozen.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (ReadHalf(self), WriteHalf(self))
    }

    fn do_poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.shared);
        let dst = buf.initialize_unfilled();
        match s.core.read(dst) {
            Ok(n) => {
                buf.advance(n);
                if s.core.wants_transmit() {
                    s.wake_driver();
                }
                Poll::Ready(Ok(()))
            }
            Err(ReadError::Blocked) => {
                s.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Err(ReadError::Failed(e)) => Poll::Ready(Err(session_io_error(e))),
            Err(e) => Poll::Ready(Err(io::Error::other(e))),
        }
    }

    fn do_poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.shared);
        match s.core.write(buf) {
            Ok(n) => {
                s.wake_driver();
                Poll::Ready(Ok(n))
            }
            Err(WriteError::Blocked) => {
                s.write_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Err(WriteError::Finished) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Err(WriteError::Failed(e)) => Poll::Ready(Err(session_io_error(e))),
            Err(e) => Poll::Ready(Err(io::Error::other(e))),
        }
    }

    fn do_shutdown(&self) -> Poll<io::Result<()>> {
        let mut s = lock(&self.shared);
        s.core.shutdown_write();
        s.wake_driver();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.do_poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.do_poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Like a TCP socket: written bytes are already the session's responsibility.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.do_shutdown()
    }
}

/// The reading half of a [`Stream`], from [`Stream::split`].
#[derive(Debug)]
pub struct ReadHalf<'a>(&'a Stream);

/// The writing half of a [`Stream`], from [`Stream::split`].
#[derive(Debug)]
pub struct WriteHalf<'a>(&'a Stream);

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.do_poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.do_poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.do_shutdown()
    }
}
