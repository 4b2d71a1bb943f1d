//! An in-path attacker: a TCP relay under the test's control that sees every byte and can
//! drop, replay, modify and inject roam frames.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Frames longer than this are not roam frames: the relay passes such bytes through unparsed.
const MAX_FRAME: usize = 2 << 20;
/// Bytes captured per direction at most (the rest is forwarded, not recorded).
const CAPTURE_LIMIT: usize = 256 << 20;

/// A direction through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the dialing client to the target.
    Up,
    /// From the target back to the client.
    Down,
}

/// One frame passing through, as the hook sees it.
#[derive(Debug)]
pub struct FrameEvent<'a> {
    /// Its direction.
    pub dir: Dir,
    /// The connection (numbered from 0 in accept order).
    pub conn: u64,
    /// Its position among the frames of this direction on this connection (from 0).
    pub index: u64,
    /// The whole frame: `type u8 | length u32 | body`.
    pub frame: &'a [u8],
}

/// What the relay does with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it unchanged.
    Forward,
    /// Drop it.
    Drop,
    /// Forward these bytes instead.
    Replace(Vec<u8>),
    /// Forward it twice (a replay of the frame right after itself).
    Duplicate,
}

/// The hook deciding each frame's fate.
pub type Hook = Arc<dyn Fn(&FrameEvent<'_>) -> Verdict + Send + Sync>;

/// Where injected bytes for one direction of one connection go.
type Injector = mpsc::UnboundedSender<Vec<u8>>;

#[derive(Default)]
struct Captured {
    up: Vec<u8>,
    down: Vec<u8>,
    frames: Vec<(Dir, u64, Vec<u8>)>,
}

struct Shared {
    target: Mutex<Option<SocketAddr>>,
    hook: Mutex<Option<Hook>>,
    captured: Mutex<Captured>,
    injectors: Mutex<HashMap<(u64, Dir), Injector>>,
    next_conn: AtomicU64,
    stop: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An in-path attacker between a client and a target: every accepted connection is relayed to
/// the target frame by frame (roam framing: `type u8 | length u32 | body`), and every frame is
/// recorded and passed to a test-supplied [`Hook`] that may forward, drop, replace or duplicate
/// it. [`Mitm::inject`] writes arbitrary bytes into a connection.
///
/// Create it before the target ([`Mitm::bind`]) so the target can advertise the relay as its
/// contact address, then [`Mitm::set_target`]. Dropping it stops accepting.
pub struct Mitm {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl Mitm {
    /// Listen on `addr`; connections are refused until a target is set.
    pub async fn bind(addr: SocketAddr) -> io::Result<Mitm> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            target: Mutex::new(None),
            hook: Mutex::new(None),
            captured: Mutex::new(Captured::default()),
            injectors: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            stop,
        });
        tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        Ok(Mitm { shared, local_addr })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Relay new connections to `target`.
    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.shared.target) = Some(target);
    }

    /// Decide the fate of every later frame with `hook`.
    pub fn set_hook(&self, hook: impl Fn(&FrameEvent<'_>) -> Verdict + Send + Sync + 'static) {
        *lock(&self.shared.hook) = Some(Arc::new(hook));
    }

    /// Forward every later frame unchanged.
    pub fn clear_hook(&self) {
        *lock(&self.shared.hook) = None;
    }

    /// Every byte received from the sender in direction `dir` so far, before any change.
    pub fn captured(&self, dir: Dir) -> Vec<u8> {
        let c = lock(&self.shared.captured);
        match dir {
            Dir::Up => c.up.clone(),
            Dir::Down => c.down.clone(),
        }
    }

    /// Every frame seen so far: direction, connection, bytes.
    pub fn frames(&self) -> Vec<(Dir, u64, Vec<u8>)> {
        lock(&self.shared.captured).frames.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.next_conn.load(Ordering::Relaxed)
    }

    /// Write `bytes` into connection `conn` in direction `dir` (after the frames already
    /// forwarded). False if that connection is gone.
    pub fn inject(&self, conn: u64, dir: Dir, bytes: Vec<u8>) -> bool {
        if bytes.is_empty() {
            return true;
        }
        lock(&self.shared.injectors)
            .get(&(conn, dir))
            .is_some_and(|tx| tx.send(bytes).is_ok())
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        let _ = self.shared.stop.send(true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let Some(target) = *lock(&shared.target) else {
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let (up_tx, up_rx) = mpsc::unbounded_channel();
            let (down_tx, down_rx) = mpsc::unbounded_channel();
            {
                let mut inj = lock(&shared.injectors);
                inj.insert((id, Dir::Up), up_tx.clone());
                inj.insert((id, Dir::Down), down_tx.clone());
            }
            let pumps = async {
                tokio::join!(
                    read_side(cr, Dir::Up, id, shared.clone(), up_tx),
                    read_side(sr, Dir::Down, id, shared.clone(), down_tx),
                    write_side(sw, up_rx),
                    write_side(cw, down_rx),
                )
            };
            let mut stop = stop;
            tokio::select! {
                _ = pumps => {}
                _ = stop.changed() => {}
            }
            let mut inj = lock(&shared.injectors);
            inj.remove(&(id, Dir::Up));
            inj.remove(&(id, Dir::Down));
        });
    }
}

/// Read one side, cut its bytes into frames, record them and pass each through the hook.
async fn read_side(
    mut r: OwnedReadHalf,
    dir: Dir,
    conn: u64,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut index = 0u64;
    let mut raw = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut c = lock(&shared.captured);
            let cap = match dir {
                Dir::Up => &mut c.up,
                Dir::Down => &mut c.down,
            };
            if cap.len() + n <= CAPTURE_LIMIT {
                cap.extend_from_slice(&chunk[..n]);
            }
        }
        if raw {
            if tx.send(chunk[..n].to_vec()).is_err() {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            if buf.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > MAX_FRAME {
                // Not roam framing: pass everything through from here on.
                raw = true;
                let _ = tx.send(std::mem::take(&mut buf));
                break;
            }
            if buf.len() < 5 + len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..5 + len).collect();
            let hook = lock(&shared.hook).clone();
            let verdict = match &hook {
                Some(h) => h(&FrameEvent {
                    dir,
                    conn,
                    index,
                    frame: &frame,
                }),
                None => Verdict::Forward,
            };
            index += 1;
            lock(&shared.captured)
                .frames
                .push((dir, conn, frame.clone()));
            let ok = match verdict {
                Verdict::Forward => tx.send(frame).is_ok(),
                Verdict::Drop => true,
                Verdict::Replace(b) => tx.send(b).is_ok(),
                Verdict::Duplicate => tx.send(frame.clone()).is_ok() && tx.send(frame).is_ok(),
            };
            if !ok {
                return;
            }
        }
    }
    // End of stream: stop the writer once it drained (the sender is dropped here; injectors
    // hold another, removed when the connection ends).
    let _ = tx.send(Vec::new());
}

/// Write what the reader (and injections) send; an empty message ends the direction.
async fn write_side(mut w: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(b) = rx.recv().await {
        if b.is_empty() {
            break;
        }
        if w.write_all(&b).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}
