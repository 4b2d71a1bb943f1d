//! Datagram throughput (roam::Datagram against a raw tokio `UdpSocket`) and re-association time
//! with many peers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::{host, within, Bench, BoxError, Params, Row, Stat};

/// Payload of one measured datagram.
const SIZE: usize = 1200;
/// Datagrams the sender may have sent beyond what the receiver counted (at most ~150 KB of
/// payload, well inside the 4 MiB receive buffer both sockets ask for).
const WINDOW: u64 = 128;
/// The receiver signals the sender every this many datagrams.
const SIGNAL_EVERY: u64 = 16;
/// How long the sender waits for progress before writing the window off as lost.
const STALL: Duration = Duration::from_millis(20);
/// Receive buffer asked for on the raw socket (what roam asks for).
const RECV_BUFFER: usize = 4 << 20;

#[derive(Clone)]
enum Sock {
    Roam(Arc<roam::Datagram>),
    Raw(Arc<UdpSocket>),
}

impl Sock {
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> Result<(), BoxError> {
        match self {
            Sock::Roam(s) => drop(s.send_to(buf, to).await?),
            Sock::Raw(s) => drop(s.send_to(buf, to).await?),
        }
        Ok(())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> Result<usize, BoxError> {
        Ok(match self {
            Sock::Roam(s) => s.recv_from(buf).await?.0,
            Sock::Raw(s) => s.recv_from(buf).await?.0,
        })
    }

    fn local_addr(&self) -> Result<SocketAddr, BoxError> {
        Ok(match self {
            Sock::Roam(s) => s.local_addr(),
            Sock::Raw(s) => s.local_addr()?,
        })
    }
}

fn raw_bind(addr: SocketAddr) -> Result<Sock, BoxError> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort, as roam does.
    let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(Sock::Raw(Arc::new(UdpSocket::from_std(sock.into())?)))
}

/// Shared progress of the receiver, read by the pacing sender.
#[derive(Default)]
struct Progress {
    got: AtomicU64,
    sender_done: AtomicBool,
    signal: Notify,
    ready: Notify,
}

/// Send `count` datagrams from `tx` to `rx`; returns (received, seconds from the first send
/// to the last datagram received).
async fn blast(tx: Sock, rx: Sock, count: u64) -> Result<(u64, f64), BoxError> {
    let to = rx.local_addr()?;
    let prog = Arc::new(Progress::default());
    let receiver = {
        let prog = prog.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut last = None;
            let mut got = 0u64;
            let deadline = Instant::now() + Duration::from_secs(120);
            while got < count && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(200), rx.recv_from(&mut buf)).await
                {
                    Ok(Ok(1)) => prog.ready.notify_one(),
                    Ok(Ok(SIZE)) => {
                        got += 1;
                        last = Some(Instant::now());
                        prog.got.store(got, Ordering::Release);
                        if got % SIGNAL_EVERY == 0 {
                            prog.signal.notify_one();
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) if prog.sender_done.load(Ordering::Acquire) => break,
                    Err(_) => {}
                }
            }
            Ok((got, last))
        })
    };
    // Warm up (and, for roam, associate) until the receiver saw a 1-byte datagram.
    let mut warm = false;
    for _ in 0..20 {
        tx.send_to(&[0], to).await?;
        if tokio::time::timeout(Duration::from_millis(100), prog.ready.notified())
            .await
            .is_ok()
        {
            warm = true;
            break;
        }
    }
    if !warm {
        receiver.abort();
        return Err("udp: the receiver never got the warm-up datagram".into());
    }
    let payload = vec![0x3cu8; SIZE];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut written_off = 0u64;
    while sent < count {
        let counted = prog.got.load(Ordering::Acquire).max(written_off);
        if sent - counted >= WINDOW {
            if tokio::time::timeout(STALL, prog.signal.notified())
                .await
                .is_err()
            {
                written_off = sent;
            }
            continue;
        }
        tx.send_to(&payload, to).await?;
        sent += 1;
    }
    prog.sender_done.store(true, Ordering::Release);
    let (got, last) = within(Duration::from_secs(150), "udp receiver", async {
        receiver.await?
    })
    .await?;
    let secs = last.map_or(0.0, |l| l.duration_since(start).as_secs_f64());
    Ok((got, secs))
}

/// Re-associations: freeze a socket with `peers` peers, thaw it elsewhere, time until every
/// peer acknowledged. Returns (freeze → all re-associated, thaw → all re-associated), ms.
async fn reassoc(peers: usize, rounds: usize) -> Result<(Vec<f64>, Vec<f64>), BoxError> {
    let limit = Duration::from_secs(10);
    let mut u = roam::Datagram::bind(host(2)).await?;
    let mut ps = Vec::with_capacity(peers);
    for _ in 0..peers {
        ps.push(roam::Datagram::bind(host(3)).await?);
    }
    let addrs: Vec<SocketAddr> = ps.iter().map(|p| p.local_addr()).collect();
    for a in &addrs {
        u.send_to(b"hello", *a).await?;
    }
    wait_all(&u, peers, limit, |e| match e {
        roam::DatagramEvent::Associated { peer } => Some(peer),
        _ => None,
    })
    .await?;
    let (mut total, mut after_thaw) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let start = Instant::now();
        let image = within(limit, "datagram freeze", u.freeze()).await?;
        let image = roam::DatagramImage::from_bytes(&image.to_bytes())?;
        let to = host(if r % 2 == 0 { 4 } else { 2 });
        let thaw_start = Instant::now();
        u = within(limit, "datagram thaw", roam::Datagram::thaw(image, to)).await?;
        wait_all(&u, peers, limit, |e| match e {
            roam::DatagramEvent::Reassociated { peer } => Some(peer),
            _ => None,
        })
        .await?;
        total.push(start.elapsed().as_secs_f64() * 1e3);
        after_thaw.push(thaw_start.elapsed().as_secs_f64() * 1e3);
    }
    drop(ps);
    Ok((total, after_thaw))
}

/// Wait until `want` distinct peers produced the event `pick` selects.
async fn wait_all(
    u: &roam::Datagram,
    want: usize,
    limit: Duration,
    pick: impl Fn(roam::DatagramEvent) -> Option<SocketAddr>,
) -> Result<(), BoxError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = HashSet::new();
    while seen.len() < want {
        match tokio::time::timeout_at(deadline, u.next_event()).await {
            Ok(Some(roam::DatagramEvent::PeerUnreachable { peer })) => {
                return Err(format!("udp: peer {peer} unreachable").into())
            }
            Ok(Some(e)) => {
                if let Some(p) = pick(e) {
                    seen.insert(p);
                }
            }
            Ok(None) => return Err("udp: event stream ended".into()),
            Err(_) => {
                return Err(
                    format!("udp: only {} of {want} peers after {limit:?}", seen.len()).into(),
                )
            }
        }
    }
    Ok(())
}

/// Datagram throughput and re-association time.
pub async fn udp(p: &Params) -> Result<Bench, BoxError> {
    let count = p.udp_datagrams.max(1);
    let (mut roam_rate, mut raw_rate, mut roam_loss, mut raw_loss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..p.rounds.max(1) {
        let tx = Sock::Roam(Arc::new(roam::Datagram::bind(host(2)).await?));
        let rx = Sock::Roam(Arc::new(roam::Datagram::bind(host(3)).await?));
        let (got, secs) = blast(tx, rx, count).await?;
        roam_rate.push(got as f64 / secs.max(1e-9));
        roam_loss.push((count - got) as f64 * 100.0 / count as f64);
        let (got, secs) = blast(raw_bind(host(2))?, raw_bind(host(3))?, count).await?;
        raw_rate.push(got as f64 / secs.max(1e-9));
        raw_loss.push((count - got) as f64 * 100.0 / count as f64);
    }
    let peers = p.udp_peers.max(1);
    let (total, after_thaw) = reassoc(peers, p.udp_reassoc_rounds.max(1)).await?;
    let rounds = roam_rate.len();
    let mut loss = Row::new(
        "loss",
        "%",
        format!("min/max of {rounds} rounds"),
        Stat::min_max(&roam_loss),
        Some(Stat::min_max(&raw_loss)),
    )
    .vs("raw UDP");
    // A ratio of loss percentages means little (and is undefined at 0).
    loss.ratio = None;
    Ok(Bench {
        name: "udp".into(),
        baseline: "raw tokio UdpSocket".into(),
        rows: vec![
            Row::new(
                "1200 B datagrams received",
                "dgram/s",
                format!("min/max of {rounds} rounds"),
                Stat::min_max(&roam_rate),
                Some(Stat::min_max(&raw_rate)),
            )
            .vs("raw UDP"),
            loss,
            Row::new(
                &format!("reassoc {peers} peers, total"),
                "ms",
                format!("min/max of {} moves", total.len()),
                Stat::min_max(&total),
                None,
            ),
            Row::new(
                &format!("reassoc {peers} peers, thaw on"),
                "ms",
                format!("min/max of {} moves", after_thaw.len()),
                Stat::min_max(&after_thaw),
                None,
            ),
        ],
        notes: vec![
            format!(
                "throughput: {count} datagrams of {SIZE} B per round, one sender, one \
                 receiver; rate = datagrams received / (first send .. last receive); the \
                 sender keeps at most {WINDOW} datagrams ahead of the receiver's count \
                 (in-process), writing a window off as lost after {STALL:?} without progress; \
                 both sockets ask for a {} MiB receive buffer",
                RECV_BUFFER >> 20
            ),
            "reassoc total: from Datagram::freeze (which waits for the peers' acks) through \
             image to_bytes/from_bytes and Datagram::thaw on another address until every \
             peer's DatagramEvent::Reassociated arrived; 'thaw on': the same from the thaw"
                .into(),
        ],
    })
}
