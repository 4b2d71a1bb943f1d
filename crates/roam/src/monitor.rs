//! Read-only views of a socket for status displays (a host daemon's `roam ps`), taken while
//! the application keeps the socket itself busy.

use std::sync::{Arc, Weak};

use roam_proto::{DatagramStats, Epoch, PeerEntry, PeerInfo, SessionId, SocketId, Stats};

use crate::datagram::{Datagram, Inner};
use crate::driver::{lock, Shared};
use crate::stream::Stream;

/// A cloneable, read-only view of a [`Stream`]'s counters and peer, valid while the stream's
/// session lives. It keeps nothing alive: once the session is gone, every getter returns `None`.
#[derive(Debug, Clone)]
pub struct StreamMonitor {
    shared: Weak<std::sync::Mutex<Shared>>,
    session: SessionId,
}

/// What a [`StreamMonitor`] reads in one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStatus {
    /// The peer as last learned.
    pub peer: PeerInfo,
    /// Counters.
    pub stats: Stats,
    /// Completed re-associations.
    pub epoch: Epoch,
    /// True while a transport connection carries the session.
    pub connected: bool,
}

impl StreamMonitor {
    /// The session this monitor watches.
    pub fn session_id(&self) -> SessionId {
        self.session
    }

    /// The stream's status now, or `None` once its session is gone.
    pub fn status(&self) -> Option<StreamStatus> {
        let shared = self.shared.upgrade()?;
        let s = lock(&shared);
        Some(StreamStatus {
            peer: s.core.peer(),
            stats: s.core.stats(),
            epoch: s.core.epoch(),
            connected: s.core.link().is_some(),
        })
    }
}

impl Stream {
    /// A read-only view of this stream for status displays (see [`StreamMonitor`]).
    pub fn monitor(&self) -> StreamMonitor {
        StreamMonitor {
            shared: Arc::downgrade(&self.shared),
            session: self.session_id(),
        }
    }
}

/// A cloneable, read-only view of a [`Datagram`] socket's counters and association table.
#[derive(Debug, Clone)]
pub struct DatagramMonitor {
    inner: Weak<Inner>,
    id: SocketId,
    local: std::net::SocketAddr,
}

impl DatagramMonitor {
    /// The socket this monitor watches.
    pub fn socket_id(&self) -> SocketId {
        self.id
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }

    /// Counters and the association table now, or `None` once the socket is gone.
    pub fn status(&self) -> Option<(DatagramStats, Vec<PeerEntry>)> {
        let inner = self.inner.upgrade()?;
        let st = inner.lock();
        Some((st.core.stats(), st.core.peers()))
    }
}

impl Datagram {
    /// A read-only view of this socket for status displays (see [`DatagramMonitor`]).
    pub fn monitor(&self) -> DatagramMonitor {
        DatagramMonitor {
            inner: Arc::downgrade(&self.inner),
            id: self.id(),
            local: self.local_addr(),
        }
    }
}
