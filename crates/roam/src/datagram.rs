//! The tokio driver of a migrateable datagram socket (PROTOCOL.md §10): one task per socket
//! receives datagrams and runs the timers; the application's `send_to` sends directly.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use roam_proto::{
    DatagramConfig, DatagramError, DatagramEvent, DatagramImage, DatagramSocket, DatagramStats,
    PeerEntry, SocketId,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::error::BindError;

/// Events kept for [`Datagram::next_event`] before the oldest are dropped.
const EVENT_BACKLOG: usize = 1024;

pub(crate) struct State {
    pub(crate) core: DatagramSocket,
    recv_waker: Option<Waker>,
    /// Set when the socket is dropped or frozen: from then on the driver handles and sends
    /// nothing (aborting its task does not stop a poll already in progress).
    closed: bool,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Signalled when the core finished freezing.
    frozen: Notify,
    socket: Arc<UdpSocket>,
    /// Wakes the driver when the application queued something for it.
    kick: Notify,
    events_tx: mpsc::Sender<DatagramEvent>,
    events_rx: tokio::sync::Mutex<mpsc::Receiver<DatagramEvent>>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Held while taking datagrams out of the core and sending them, so they leave in the
    /// core's order whichever task sends (a `FreezingAck` must not overtake earlier data).
    send_order: tokio::sync::Mutex<()>,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Move events out of the core (the oldest are dropped if nobody reads them).
    fn drain_events(&self, st: &mut State) {
        while let Some(ev) = st.core.poll_event() {
            tracing::debug!(?ev, "datagram event");
            if ev == DatagramEvent::Frozen {
                self.frozen.notify_one();
                continue;
            }
            let _ = self.events_tx.try_send(ev);
        }
        if st.core.take_wake_recv() {
            if let Some(w) = st.recv_waker.take() {
                w.wake();
            }
        }
    }

    /// Send everything the core has queued, in order; a failed send is a lost datagram
    /// (datagrams are unreliable), logged.
    async fn flush(&self) {
        let _order = self.send_order.lock().await;
        loop {
            let out: Vec<(SocketAddr, Bytes)> = {
                let mut st = self.lock();
                if st.closed {
                    return;
                }
                let v = std::iter::from_fn(|| st.core.poll_transmit()).collect();
                self.drain_events(&mut st);
                v
            };
            if out.is_empty() {
                return;
            }
            for (to, bytes) in out {
                if let Err(e) = self.socket.send_to(&bytes, to).await {
                    tracing::debug!(%to, error = %e, "datagram send failed");
                }
            }
        }
    }
}

/// A migrateable UDP socket: talks to any number of roam datagram peers and can be frozen on
/// one host and thawed on another, after which every peer reaches it at its new address.
///
/// Peers are associated on first contact (each learns the other's socket id, address and a
/// shared key). After a thaw the socket re-associates with every peer in its table; each peer
/// updates its association and address translation tables, so its application can keep
/// sending to the address it first knew, and datagrams from the moved socket are reported
/// under that same address. Datagrams stay datagrams: no reliability or ordering beyond
/// holding, while a peer announced it is migrating, what is addressed to it (bounded, counted
/// in [`DatagramStats::dropped_hold`]).
pub struct Datagram {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Datagram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datagram")
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Datagram {
    /// Bind a datagram socket at `addr` with the default configuration.
    pub async fn bind(addr: SocketAddr) -> Result<Datagram, BindError> {
        Datagram::bind_with(addr, DatagramConfig::default()).await
    }

    /// Bind a datagram socket at `addr` with `config`.
    pub async fn bind_with(
        addr: SocketAddr,
        config: DatagramConfig,
    ) -> Result<Datagram, BindError> {
        let (socket, local) = bind_udp(addr).await?;
        let core = DatagramSocket::new(config, local, rand::random());
        Ok(Datagram::start(core, socket))
    }

    /// Bring a frozen socket to life at `addr` (port 0 picks one): re-associates with every
    /// peer in its table (claims 10, 11).
    pub async fn thaw(image: DatagramImage, addr: SocketAddr) -> Result<Datagram, BindError> {
        Datagram::thaw_with(image, addr, DatagramConfig::default()).await
    }

    /// [`Datagram::thaw`] with a configuration.
    pub async fn thaw_with(
        image: DatagramImage,
        addr: SocketAddr,
        config: DatagramConfig,
    ) -> Result<Datagram, BindError> {
        let (socket, local) = bind_udp(addr).await?;
        let core = DatagramSocket::from_image(image, local, config, rand::random(), Instant::now());
        let d = Datagram::start(core, socket);
        d.inner.kick.notify_one();
        Ok(d)
    }

    fn start(core: DatagramSocket, socket: UdpSocket) -> Datagram {
        let (events_tx, events_rx) = mpsc::channel(EVENT_BACKLOG);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                core,
                recv_waker: None,
                closed: false,
            }),
            socket: Arc::new(socket),
            frozen: Notify::new(),
            kick: Notify::new(),
            events_tx,
            events_rx: tokio::sync::Mutex::new(events_rx),
            task: Mutex::new(None),
            send_order: tokio::sync::Mutex::new(()),
        });
        let task = tokio::spawn(drive(inner.clone()));
        *inner.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Datagram { inner }
    }

    /// The bound address (this host's; peers' applications keep using the first one they knew).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.lock().core.local_addr()
    }

    /// The socket's id (kept across migrations).
    pub fn id(&self) -> SocketId {
        self.inner.lock().core.id()
    }

    /// Counters.
    pub fn stats(&self) -> DatagramStats {
        self.inner.lock().core.stats()
    }

    /// The association table: each peer's known and current address, epoch, state.
    pub fn peers(&self) -> Vec<PeerEntry> {
        self.inner.lock().core.peers()
    }

    /// Send one datagram to the peer the application knows as `dest`. Returns the payload
    /// length. A payload larger than one datagram can carry is an error, never truncated.
    pub async fn send_to(&self, buf: &[u8], dest: SocketAddr) -> Result<usize, DatagramError> {
        let rearmed = {
            let mut st = self.inner.lock();
            let before = st.core.poll_timeout();
            st.core.send_to(Instant::now(), dest, buf)?;
            st.core.poll_timeout() != before
        };
        // A first contact arms a retry timer: only then does the driver need to wake up.
        if rearmed {
            self.inner.kick.notify_one();
        }
        self.inner.flush().await;
        Ok(buf.len())
    }

    /// Receive one datagram and the address the application knows its sender by (the address
    /// it first had, even after it moved). A buffer too small for the next datagram is an
    /// error and the datagram stays queued.
    pub async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), DatagramError> {
        poll_fn(|cx| {
            let mut st = self.inner.lock();
            match st.core.peek() {
                Some((_, len)) if len > buf.len() => {
                    Poll::Ready(Err(DatagramError::BufferTooSmall {
                        len: buf.len(),
                        needed: len,
                    }))
                }
                Some(_) => {
                    // Just peeked, so there is one.
                    let (from, d) = st.core.recv().expect("peeked");
                    buf[..d.len()].copy_from_slice(&d);
                    Poll::Ready(Ok((d.len(), from)))
                }
                None if st.core.is_frozen() => Poll::Ready(Err(DatagramError::Frozen)),
                None => {
                    st.recv_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The next event (peer associated, peer moved, re-association acknowledged, peer
    /// unreachable). Events nobody reads are kept up to a bound, then the oldest dropped.
    pub async fn next_event(&self) -> Option<DatagramEvent> {
        self.inner.events_rx.lock().await.recv().await
    }

    /// Planned migration: tell every peer to hold datagrams for this socket, drain what they
    /// sent before into the receive queue (until each acknowledged, or the freeze timeout),
    /// stop, and return the image (association table, keys, epochs, datagrams not yet read).
    pub async fn freeze(self) -> Result<DatagramImage, DatagramError> {
        let frozen = self.inner.frozen.notified();
        tokio::pin!(frozen);
        // Register before the core can finish, so the signal cannot be missed.
        frozen.as_mut().enable();
        self.inner.lock().core.freeze(Instant::now())?;
        // Best effort: a peer that misses it only loses what it sends during the move.
        self.inner.flush().await;
        // The driver keeps receiving until the core is frozen (it has a deadline).
        self.inner.kick.notify_one();
        if !self.inner.lock().core.is_frozen() {
            frozen.await;
        }
        self.stop();
        let st = self.inner.lock();
        // The freeze completed, so the image exists.
        Ok(st.core.image().expect("frozen"))
    }

    fn stop(&self) {
        self.inner.lock().closed = true;
        if let Some(t) = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

impl Drop for Datagram {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kernel receive buffer asked for (the kernel may grant less): bursts of datagrams from many
/// peers must not overflow it while the driver task waits for a thread.
const SOCKET_RECV_BUFFER: usize = 4 << 20;

/// Bind a UDP socket at `addr` (with an enlarged receive buffer); returns it and its address.
async fn bind_udp(addr: SocketAddr) -> Result<(UdpSocket, SocketAddr), BindError> {
    let io = |source| BindError::Io { addr, source };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(io)?;
    if let Err(e) = sock.set_recv_buffer_size(SOCKET_RECV_BUFFER) {
        tracing::debug!(error = %e, "cannot enlarge the datagram receive buffer");
    }
    sock.set_nonblocking(true).map_err(io)?;
    sock.bind(&addr.into()).map_err(io)?;
    let socket = UdpSocket::from_std(sock.into()).map_err(io)?;
    let local = socket.local_addr().map_err(io)?;
    Ok((socket, local))
}

/// The driver: receive, hand to the core, send what it answers, run its timers. It ends when
/// the socket is frozen or dropped (its task is aborted).
async fn drive(inner: Arc<Inner>) {
    let socket = inner.socket.clone();
    let mut buf = vec![0u8; 65_536];
    loop {
        inner.flush().await;
        let deadline = inner.lock().core.poll_timeout();
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let mut st = inner.lock();
                    if st.closed {
                        return;
                    }
                    st.core.handle(Instant::now(), from, Bytes::copy_from_slice(&buf[..n]));
                    inner.drain_events(&mut st);
                }
                // ICMP errors surface here on some platforms; datagrams are unreliable.
                Err(e) => tracing::debug!(error = %e, "datagram receive error"),
            },
            () = sleep => {
                let mut st = inner.lock();
                if st.closed {
                    return;
                }
                st.core.handle_timeout(Instant::now());
                inner.drain_events(&mut st);
            }
            () = inner.kick.notified() => {}
        }
    }
}
