//! The tokio driver of one session: moves bytes between its TCP connection and the sans-IO
//! [`Session`], runs its timers and carries out its events (ARCHITECTURE.md, "data path").

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::BytesMut;
use roam_proto::{ConnId, Event, Frame, Session, SessionError, Transmit};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::endpoint::EndpointInner;

/// What the application side can observe of a session's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    /// Re-associating (after a thaw).
    Connecting,
    /// A connection is current.
    Established,
    /// The freeze finished; the image is ready.
    Frozen,
    /// Both directions finished.
    Closed,
    /// Failed for good.
    Failed(SessionError),
}

/// A connection handed to the driver after a completed handshake.
pub(crate) struct Handover {
    pub(crate) id: ConnId,
    pub(crate) stream: TcpStream,
    /// Bytes read past the handshake's last frame.
    pub(crate) leftover: BytesMut,
}

/// State shared by the driver task, the application's [`crate::Stream`] and handshake tasks.
pub(crate) struct Shared {
    pub(crate) core: Session,
    pub(crate) handover: Option<Handover>,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    pub(crate) driver_waker: Option<Waker>,
    /// Whether a transport connection currently carries the session.
    pub(crate) connected: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn wake_driver(&mut self) {
        if let Some(w) = self.driver_waker.take() {
            w.wake();
        }
    }
}

pub(crate) type SharedRef = Arc<Mutex<Shared>>;

/// Lock, tolerating poisoning: the core's invariants hold between calls even if a holder
/// panicked, and refusing service would lose data.
pub(crate) fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most bytes of frames queued for one vectored write.
const OUT_QUEUE_BYTES: usize = 256 * 1024;
/// Most buffers in one vectored write.
const MAX_IOVECS: usize = 64;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// Socket reads per wake-up before yielding to other tasks.
const READS_PER_POLL: usize = 32;

struct Conn {
    id: ConnId,
    stream: TcpStream,
    rbuf: BytesMut,
    out: VecDeque<Transmit>,
    /// Bytes of `out[0]` already written (header first, then payload).
    out_pos: usize,
    out_bytes: usize,
}

impl Conn {
    fn new(h: Handover) -> Conn {
        Conn {
            id: h.id,
            stream: h.stream,
            rbuf: h.leftover,
            out: VecDeque::new(),
            out_pos: 0,
            out_bytes: 0,
        }
    }
}

/// Runs one session until it is frozen, closed or failed.
pub(crate) struct Driver {
    shared: SharedRef,
    endpoint: Arc<EndpointInner>,
    status: watch::Sender<Status>,
    conn: Option<Conn>,
    timer: Pin<Box<Sleep>>,
}

enum ConnOutcome {
    Ok,
    Lost,
}

impl Driver {
    pub(crate) fn spawn(
        shared: SharedRef,
        endpoint: Arc<EndpointInner>,
        status: watch::Sender<Status>,
        first: Option<Handover>,
    ) {
        let d = Driver {
            shared,
            endpoint,
            status,
            conn: first.map(Conn::new),
            timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        };
        tokio::spawn(d.run());
    }

    async fn run(mut self) {
        poll_fn(|cx| self.poll(cx)).await;
        let sid = lock(&self.shared).core.id();
        self.endpoint.unregister(sid, &self.shared);
        tracing::debug!(session = %sid, "driver finished");
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let shared = self.shared.clone();
        let mut s = lock(&shared);
        s.driver_waker = Some(cx.waker().clone());
        // Bounded: each pass either makes progress or breaks out; the bound keeps a busy
        // session from starving the runtime.
        for _ in 0..64 {
            let now = Instant::now();
            if let Some(h) = s.handover.take() {
                if s.core.link() == Some(h.id) {
                    self.conn = Some(Conn::new(h));
                }
            }
            let mut progressed = false;
            if let Some(c) = self.conn.as_mut() {
                if s.core.link() != Some(c.id) && c.out.is_empty() {
                    self.conn = None;
                }
            }
            if let Some(c) = self.conn.as_mut() {
                match read_conn(c, &mut s.core, now, cx, &mut progressed) {
                    ConnOutcome::Ok => {}
                    ConnOutcome::Lost => {
                        let id = c.id;
                        self.conn = None;
                        s.core.handle_connection_lost(now, id);
                        tracing::debug!(session = %s.core.id(), conn = ?id, core = ?s.core, "connection lost");
                    }
                }
            }
            if let Some(c) = self.conn.as_mut() {
                let current = s.core.link() == Some(c.id);
                match write_conn(c, &mut s.core, current, now, cx) {
                    ConnOutcome::Ok => {}
                    ConnOutcome::Lost => {
                        let id = c.id;
                        self.conn = None;
                        s.core.handle_connection_lost(now, id);
                    }
                }
            }
            while let Some(ev) = s.core.poll_event() {
                progressed = true;
                self.on_event(ev);
            }
            let up = s.core.link().is_some();
            s.connected
                .send_if_modified(|v| std::mem::replace(v, up) != up);
            if s.core.take_wake_read() {
                if let Some(w) = s.read_waker.take() {
                    w.wake();
                }
            }
            if s.core.take_wake_write() {
                if let Some(w) = s.write_waker.take() {
                    w.wake();
                }
            }
            if s.core.is_finished() && self.conn.as_ref().is_none_or(|c| c.out.is_empty()) {
                return Poll::Ready(());
            }
            if let Some(t) = s.core.poll_timeout() {
                if t <= now {
                    s.core.handle_timeout(now);
                    continue;
                }
                self.timer.as_mut().reset(tokio::time::Instant::from_std(t));
                if self.timer.as_mut().poll(cx).is_ready() {
                    s.core.handle_timeout(Instant::now());
                    continue;
                }
            }
            if !progressed && s.handover.is_none() {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Dial(addr) => {
                tracing::debug!(%addr, "dialing to re-associate");
                tokio::spawn(crate::endpoint::dial_reassoc(
                    self.shared.clone(),
                    self.endpoint.clone(),
                    addr,
                ));
            }
            Event::CloseConnection(id) if self.conn.as_ref().is_some_and(|c| c.id == id) => {
                self.conn = None;
            }
            Event::Established { conn, epoch } => {
                tracing::debug!(?conn, %epoch, "established");
                self.status.send_replace(Status::Established);
            }
            Event::Frozen => {
                self.status.send_replace(Status::Frozen);
            }
            Event::Closed => {
                self.status.send_replace(Status::Closed);
            }
            Event::Failed(e) => {
                tracing::debug!(error = %e, "session failed");
                self.status.send_replace(Status::Failed(e));
            }
            _ => {}
        }
    }
}

fn read_conn(
    c: &mut Conn,
    core: &mut Session,
    now: Instant,
    cx: &mut Context<'_>,
    progressed: &mut bool,
) -> ConnOutcome {
    // Frames left over from a handshake are handled before reading more.
    if !c.rbuf.is_empty() && handle_frames(c, core, now).is_err() {
        return ConnOutcome::Lost;
    }
    for _ in 0..READS_PER_POLL {
        if c.rbuf.capacity() - c.rbuf.len() < READ_CHUNK / 4 {
            c.rbuf.reserve(READ_CHUNK);
        }
        match c.stream.try_read_buf(&mut c.rbuf) {
            Ok(0) => return ConnOutcome::Lost,
            Ok(_) => {
                *progressed = true;
                if handle_frames(c, core, now).is_err() {
                    return ConnOutcome::Lost;
                }
                if core.link() != Some(c.id) {
                    return ConnOutcome::Ok;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match c.stream.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(_)) => return ConnOutcome::Lost,
                    Poll::Pending => {
                        if c.rbuf.is_empty() {
                            // Idle: hold no read buffer (received payloads keep their own
                            // slices of it alive until read).
                            c.rbuf = BytesMut::new();
                        }
                        return ConnOutcome::Ok;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "read failed");
                return ConnOutcome::Lost;
            }
        }
    }
    // More may be waiting: come back after other tasks ran.
    cx.waker().wake_by_ref();
    ConnOutcome::Ok
}

fn handle_frames(c: &mut Conn, core: &mut Session, now: Instant) -> Result<(), ()> {
    loop {
        match Frame::decode(&mut c.rbuf) {
            Ok(Some(f)) => {
                if let Err(v) = core.handle_frame(now, c.id, f) {
                    tracing::debug!(error = %v, "dropping connection");
                    return Err(());
                }
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "undecodable frame; dropping connection");
                return Err(());
            }
        }
    }
}

fn write_conn(
    c: &mut Conn,
    core: &mut Session,
    current: bool,
    now: Instant,
    cx: &mut Context<'_>,
) -> ConnOutcome {
    loop {
        if current {
            while c.out_bytes < OUT_QUEUE_BYTES {
                let Some(t) = core.poll_transmit(now) else {
                    break;
                };
                c.out_bytes += t.len();
                c.out.push_back(t);
            }
        }
        if c.out.is_empty() {
            return ConnOutcome::Ok;
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS);
        let mut skip = c.out_pos;
        for t in c.out.iter() {
            if slices.len() + 2 > MAX_IOVECS {
                break;
            }
            let h = t.header();
            if skip < h.len() {
                slices.push(IoSlice::new(&h[skip..]));
                skip = 0;
            } else {
                skip -= h.len();
            }
            if skip < t.payload.len() {
                slices.push(IoSlice::new(&t.payload[skip..]));
            }
            skip = 0;
        }
        match c.stream.try_write_vectored(&slices) {
            Ok(0) => return ConnOutcome::Lost,
            Ok(mut n) => {
                c.out_bytes -= n;
                while n > 0 {
                    // n ≤ bytes queued, so the front exists.
                    let front_left = c.out[0].len() - c.out_pos;
                    if n >= front_left {
                        n -= front_left;
                        c.out.pop_front();
                        c.out_pos = 0;
                    } else {
                        c.out_pos += n;
                        n = 0;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match c.stream.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(_)) => return ConnOutcome::Lost,
                    Poll::Pending => return ConnOutcome::Ok,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "write failed");
                return ConnOutcome::Lost;
            }
        }
    }
}
