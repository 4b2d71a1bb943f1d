//! Loopback integration tests of migrateable datagram sockets (PROTOCOL.md §10): a socket with
//! three peers moving twice without losing a datagram, re-association across a lossy relay, the
//! claim-28 resend rule end to end, unreachable peers, forged and replayed re-association
//! messages, and bad input (garbage datagrams, damaged images).
//!
//! Hosts are distinct loopback addresses (127.0.0.x). Every wait is bounded by a timeout and
//! waits on an event (`Datagram::next_event`, relay counters, a packet recorded by a proxy, a
//! marker datagram arriving after the packets under test); a timeout alone only ever asserts
//! that nothing happens. Sleeps only pace senders.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::proto::datagram::{dkind, Packet};
use roam::proto::DatagramSocket;
use roam::{
    Datagram, DatagramConfig, DatagramEvent, DatagramImage, Endpoint, ImageError, SocketId,
    StreamImage,
};
use roam_testkit::{Faults, UdpRelay};
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Longest any single step may take before the test fails.
const BOUND: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(250);
/// `who` of datagrams the moving socket sends.
const MOVER: u8 = 0xFF;

fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A test datagram: who sent it, its sequence number, and filler.
fn msg(who: u8, seq: u32) -> Vec<u8> {
    let mut v = vec![who];
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&[0xA5; 11]);
    v
}

fn parse(d: &[u8]) -> (u8, u32) {
    assert_eq!(d.len(), 16, "not a test datagram: {d:?}");
    (d[0], u32::from_be_bytes([d[1], d[2], d[3], d[4]]))
}

async fn recv(d: &Datagram) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = within("a datagram", d.recv_from(&mut buf))
        .await
        .expect("recv_from");
    buf.truncate(n);
    (buf, from)
}

/// The next datagram, or `None` once nothing arrived for [`QUIET`].
async fn recv_quiet(d: &Datagram) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(QUIET, d.recv_from(&mut buf)).await {
        Ok(r) => {
            let (n, from) = r.expect("recv_from");
            buf.truncate(n);
            Some((buf, from))
        }
        Err(_) => None,
    }
}

/// The first event satisfying `pred` (others are skipped).
async fn event_where(
    d: &Datagram,
    what: &str,
    pred: impl Fn(&DatagramEvent) -> bool,
) -> DatagramEvent {
    within(what, async {
        loop {
            let ev = d.next_event().await.expect("event channel open");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
}

/// The epoch field of a `Reassoc`, `ReassocAck` or `Freezing` packet.
fn epoch_of(p: &[u8]) -> u64 {
    u64::from_be_bytes(p[9..17].try_into().expect("8 bytes"))
}

fn arr<const N: usize>(rng: &mut ChaCha8Rng) -> [u8; N] {
    let mut a = [0u8; N];
    rng.fill_bytes(&mut a);
    a
}

/// Which way a packet crossed a [`Tap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Sent to the front socket by a client; forwarded to the target from the back socket.
    FromClient,
    /// Sent to the back socket (by the target or anyone); forwarded to the last client from the
    /// front socket.
    FromTarget,
}

type Log = Vec<(Dir, Vec<u8>)>;

/// A hand-written UDP proxy: clients send to `front` and the proxy forwards to the target from
/// `back`; whatever reaches `back` goes to the last client, from `front`. Every packet is
/// recorded (after forwarding) and forwarded only if `filter` says so.
struct Tap {
    front: SocketAddr,
    back: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    log: watch::Receiver<Log>,
    tasks: Vec<JoinHandle<()>>,
}

impl Tap {
    async fn start(
        ip: u8,
        target: SocketAddr,
        filter: impl Fn(Dir, &[u8]) -> bool + Send + Sync + 'static,
    ) -> Tap {
        let front = Arc::new(UdpSocket::bind(host(ip)).await.unwrap());
        let back = Arc::new(UdpSocket::bind(host(ip)).await.unwrap());
        let (log_tx, log) = watch::channel(Log::new());
        let log_tx = Arc::new(log_tx);
        let filter = Arc::new(filter);
        let target = Arc::new(Mutex::new(target));
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let mut tasks = Vec::new();
        for dir in [Dir::FromClient, Dir::FromTarget] {
            let (rx, tx) = match dir {
                Dir::FromClient => (front.clone(), back.clone()),
                Dir::FromTarget => (back.clone(), front.clone()),
            };
            let (log_tx, filter) = (log_tx.clone(), filter.clone());
            let (target, client) = (target.clone(), client.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Ok((n, from)) = rx.recv_from(&mut buf).await else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    let pkt = buf[..n].to_vec();
                    let to = match dir {
                        Dir::FromClient => {
                            *client.lock().unwrap() = Some(from);
                            Some(*target.lock().unwrap())
                        }
                        Dir::FromTarget => *client.lock().unwrap(),
                    };
                    if let (true, Some(to)) = (filter(dir, &pkt), to) {
                        let _ = tx.send_to(&pkt, to).await;
                    }
                    log_tx.send_modify(|l| l.push((dir, pkt)));
                }
            }));
        }
        Tap {
            front: front.local_addr().unwrap(),
            back: back.local_addr().unwrap(),
            target,
            log,
            tasks,
        }
    }

    fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    /// Wait until some recorded packet satisfies `pred`; return it.
    async fn wait_packet(&self, what: &str, pred: impl Fn(Dir, &[u8]) -> bool) -> Vec<u8> {
        let mut rx = self.log.clone();
        let log = within(what, rx.wait_for(|l| l.iter().any(|(d, p)| pred(*d, p))))
            .await
            .expect("tap running");
        let (_, p) = log.iter().find(|(d, p)| pred(*d, p)).expect("just seen");
        p.clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Receive `n` datagrams at the mover from its peers; each must come under the address its
/// sender has (`addrs[who]`) and be new.
async fn take(u: &Datagram, addrs: &[SocketAddr], got: &mut HashSet<(u8, u32)>, n: usize) {
    for _ in 0..n {
        let (d, from) = recv(u).await;
        let (who, seq) = parse(&d);
        assert_eq!(from, addrs[who as usize], "datagram {seq} of peer {who}");
        assert!(got.insert((who, seq)), "peer {who}'s datagram {seq} twice");
    }
}

/// Claims 8-11, 21-27, 38-43: one socket, three peers, two planned moves (A → C → D). Every
/// peer's application sends, all along, to the address it first knew, and is answered from it;
/// with no network loss not one datagram is lost or duplicated in either direction — including
/// those the peers send while the mover is frozen, which they hold and deliver after it
/// re-associated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_keep_every_datagram_across_two_moves() {
    let mut u = Datagram::bind(host(2)).await.unwrap();
    let first = u.local_addr();
    let mut peers = Vec::new();
    for h in [3u8, 5, 6] {
        peers.push(Arc::new(Datagram::bind(host(h)).await.unwrap()));
    }
    let addrs: Vec<SocketAddr> = peers.iter().map(|p| p.local_addr()).collect();

    // Each peer's receiver hands what it gets to the test.
    let mut inboxes = Vec::new();
    let mut tasks = Vec::new();
    for p in &peers {
        let (tx, rx) = mpsc::unbounded_channel();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = p.recv_from(&mut buf).await {
                if tx.send((from, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }));
        inboxes.push(rx);
    }

    let mut at_u = HashSet::new();
    // The next sequence number the mover sends each peer.
    let mut u_next = [0u32; 3];
    // Peer 0 makes first contact; the mover makes it with the other two.
    peers[0].send_to(&msg(0, 0), first).await.unwrap();
    take(&u, &addrs, &mut at_u, 1).await;
    for i in 1..3 {
        u.send_to(&msg(MOVER, 0), addrs[i]).await.unwrap();
        u_next[i] = 1;
    }

    // Every peer sends, paced, to the address it first knew, through both moves.
    let stop = Arc::new(AtomicBool::new(false));
    let mut sent = Vec::new();
    let mut senders = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let start = u32::from(i == 0);
        let (tx, rx) = watch::channel(start);
        let (p, stop) = (p.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut seq = start;
            while !stop.load(Ordering::Relaxed) {
                p.send_to(&msg(i as u8, seq), first).await.unwrap();
                seq += 1;
                tx.send_replace(seq);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seq
        }));
        sent.push(rx);
    }

    for (round, target) in [(1u64, 4u8), (2, 7)] {
        take(&u, &addrs, &mut at_u, 30).await;
        for i in 0..3 {
            for _ in 0..5 {
                u.send_to(&msg(MOVER, u_next[i]), addrs[i]).await.unwrap();
                u_next[i] += 1;
            }
        }
        let held_before: u64 = peers.iter().map(|p| p.stats().held_and_sent).sum();
        let was_at = u.local_addr();
        let image = within("the freeze", u.freeze()).await.unwrap();
        for p in &peers {
            let e = &p.peers()[0];
            assert!(e.migrating, "every peer answered the freeze and holds");
            assert_eq!((e.known_addr, e.addr), (first, was_at));
        }
        // The peers' applications go on sending while the mover is frozen.
        for rx in &mut sent {
            let mark = *rx.borrow() + 5;
            within("sends while frozen", rx.wait_for(|n| *n >= mark))
                .await
                .unwrap();
        }
        let image = DatagramImage::from_bytes(&image.to_bytes()).unwrap();
        assert_eq!(image.peer_count(), 3);
        u = within("the thaw", Datagram::thaw(image, host(target)))
            .await
            .unwrap();
        let now_at = u.local_addr();
        assert_eq!(now_at.ip(), host(target).ip());
        let mut acked = HashSet::new();
        while acked.len() < 3 {
            match event_where(&u, "Reassociated", |_| true).await {
                DatagramEvent::Reassociated { peer } => assert!(acked.insert(peer)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acked, addrs.iter().copied().collect());
        for p in &peers {
            let moved = DatagramEvent::PeerMoved {
                peer: first,
                now_at,
            };
            event_where(p, "PeerMoved", |e| *e == moved).await;
            // The translation: known as `first`, reached at `now_at`.
            let e = &p.peers()[0];
            assert_eq!((e.known_addr, e.addr), (first, now_at));
            assert_eq!(e.peer_epoch, round);
            assert!(!e.migrating);
        }
        let held_after: u64 = peers.iter().map(|p| p.stats().held_and_sent).sum();
        assert!(
            held_after > held_before,
            "datagrams sent during move {round} were held and sent after it"
        );
        for (e, a) in u.peers().iter().zip(&addrs) {
            assert_eq!((e.known_addr, e.addr), (*a, *a));
            assert!(!e.reassociating);
        }
        for i in 0..3 {
            for _ in 0..5 {
                u.send_to(&msg(MOVER, u_next[i]), addrs[i]).await.unwrap();
                u_next[i] += 1;
            }
        }
    }

    stop.store(true, Ordering::Relaxed);
    let mut totals = Vec::new();
    for s in senders {
        totals.push(within("a sender", s).await.unwrap());
    }
    // Every datagram every peer sent, before, during and after the moves: exactly once.
    let expected: usize = totals.iter().map(|&n| n as usize).sum();
    let missing = expected - at_u.len();
    take(&u, &addrs, &mut at_u, missing).await;
    for (i, &n) in totals.iter().enumerate() {
        assert!((0..n).all(|s| at_u.contains(&(i as u8, s))), "peer {i}");
    }
    assert!(recv_quiet(&u).await.is_none(), "nothing more");
    // Every datagram the mover sent, reported under the address each peer first knew.
    for (i, rx) in inboxes.iter_mut().enumerate() {
        let mut got = HashSet::new();
        while got.len() < u_next[i] as usize {
            let (from, d) = within("the mover's datagrams", rx.recv()).await.unwrap();
            assert_eq!(from, first);
            let (who, seq) = parse(&d);
            assert_eq!(who, MOVER);
            assert!(
                seq < u_next[i] && got.insert(seq),
                "datagram {seq} at peer {i}"
            );
        }
        assert!(rx.try_recv().is_err(), "nothing more at peer {i}");
    }
    let s = u.stats();
    assert_eq!(s.migrations, 2);
    assert_eq!(
        (s.dropped_hold, s.dropped_recv, s.dropped_unreachable),
        (0, 0, 0)
    );
    for p in &peers {
        let s = p.stats();
        assert_eq!(
            (s.dropped_hold, s.dropped_recv, s.dropped_unreachable),
            (0, 0, 0)
        );
        assert_eq!(s.reassoc_accepted, 2);
    }
    for t in tasks {
        t.abort();
    }
}

/// Every datagram received from `from` until nothing arrives for a while: sequence number →
/// copies.
async fn collect(d: &Datagram, from: SocketAddr, who: u8) -> HashMap<u32, u32> {
    let mut got = HashMap::new();
    while let Some((m, f)) = within("collecting", recv_quiet(d)).await {
        assert_eq!(f, from);
        let (w, seq) = parse(&m);
        assert_eq!(w, who);
        *got.entry(seq).or_insert(0) += 1;
    }
    got
}

/// Re-association across a lossy network: the peer P sits behind a seeded relay (drop 20 %,
/// duplicate 10 %, reorder 10 %), so the mover M's `Freezing`, `Reassoc` and data to P cross it.
/// A moved M has a new source address, so the relay gives it a new upstream socket: P sees M's
/// packets from a new address, which is a migration from P's point of view too.
///
/// The `Reassoc` names M's bound address, and P acknowledges it and sends there directly
/// (PROTOCOL.md §10.5): after the move only M → P crosses the relay.
///
/// Datagrams stay datagrams (§10.3): no retransmission, and a packet the network duplicates is
/// delivered twice. So this asserts "most arrive" and that nothing is delivered more often than
/// the network copied it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassociation_completes_across_a_lossy_relay() {
    let faults = Faults {
        seed: 2,
        drop: 0.2,
        duplicate: 0.1,
        reorder: 0.1,
        ..Faults::default()
    };
    let p = Datagram::bind(host(3)).await.unwrap();
    let relay = UdpRelay::start(host(5), p.local_addr(), faults)
        .await
        .unwrap();
    let r = relay.local_addr();
    let m = Datagram::bind(host(2)).await.unwrap();
    // First contact through the relay: a lost Hello or Welcome is resent.
    m.send_to(&msg(MOVER, 0), r).await.unwrap();
    event_where(&m, "Associated at M", |e| {
        *e == DatagramEvent::Associated { peer: r }
    })
    .await;
    let ev = event_where(&p, "Associated at P", |e| {
        matches!(e, DatagramEvent::Associated { .. })
    })
    .await;
    let DatagramEvent::Associated { peer: m_seen } = ev else {
        unreachable!()
    };
    // P knows M by the relay's upstream socket for it.
    assert_eq!(m_seen.ip(), r.ip());
    assert_ne!(m_seen, m.local_addr());

    // Before the move: both ways through the relay.
    for seq in 1..=60 {
        m.send_to(&msg(MOVER, seq), r).await.unwrap();
        p.send_to(&msg(0, seq), m_seen).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (mut at_p, at_m) = tokio::join!(collect(&p, m_seen, MOVER), collect(&m, r, 0));
    let before_p = (1..=60).filter(|s| at_p.contains_key(s)).count();
    let before_m = (1..=60).filter(|s| at_m.contains_key(s)).count();
    assert!(before_p >= 30 && before_m >= 30, "{before_p} {before_m}");

    // The move: Freezing may be lost (the freeze then ends at its timeout), Reassoc may be
    // lost, duplicated or reordered; re-association completes all the same.
    let image = within("the freeze", m.freeze()).await.unwrap();
    let m = within("the thaw", Datagram::thaw(image, host(4)))
        .await
        .unwrap();
    event_where(&m, "Reassociated", |e| {
        *e == DatagramEvent::Reassociated { peer: r }
    })
    .await;
    // With this seed the relay loses the first `Reassoc` (the first datagram of the moved
    // socket's flow; the relay's decisions depend only on the seed and the position), so it was
    // resent.
    assert!(m.stats().reassoc_sent >= 2, "{:?}", m.stats());
    // P takes the address the `Reassoc` came from (PROTOCOL.md §10.5): the relay's upstream
    // socket for M's new address, as behind a NAT, once it answered P's path challenge.
    let ev = event_where(
        &p,
        "PeerMoved",
        |e| matches!(e, DatagramEvent::PeerMoved { peer, .. } if *peer == m_seen),
    )
    .await;
    let DatagramEvent::PeerMoved { now_at, .. } = ev else {
        unreachable!()
    };
    assert_eq!(now_at.ip(), r.ip());
    assert_ne!(now_at, m_seen);
    assert_ne!(now_at, m.local_addr());
    let e = &p.peers()[0];
    assert_eq!((e.known_addr, e.addr, e.peer_epoch), (m_seen, now_at, 1));
    assert!(!e.migrating);
    let e = &m.peers()[0];
    assert_eq!((e.known_addr, e.addr), (r, r));
    // The relay saw M's new address as a new client.
    assert!(relay.stats().clients >= 2);

    // After the move, both applications use the addresses they first knew.
    for seq in 100..200 {
        m.send_to(&msg(MOVER, seq), r).await.unwrap();
        p.send_to(&msg(0, seq), m_seen).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (after_p, after_m) = tokio::join!(collect(&p, m_seen, MOVER), collect(&m, r, 0));
    let n_p = (100..200).filter(|s| after_p.contains_key(s)).count();
    let n_m = (100..200).filter(|s| after_m.contains_key(s)).count();
    assert!(n_p >= 60, "M → P after the move: {n_p} of 100");
    assert!(n_m >= 60, "P → M after the move: {n_m} of 100");

    // Only what was sent arrives, and never more often than the network copied it.
    let stats = relay.stats();
    assert!(
        stats.up.dropped > 0 && stats.total().duplicated > 0,
        "{stats:?}"
    );
    for (seq, n) in after_p.iter() {
        *at_p.entry(*seq).or_insert(0) += n;
    }
    let extra = |got: &HashMap<u32, u32>| got.values().map(|&n| u64::from(n) - 1).sum::<u64>();
    assert!(at_p.keys().all(|s| *s <= 60 || (100..200).contains(s)));
    assert!(at_p.values().all(|&n| n <= 2));
    assert!(extra(&at_p) <= stats.up.duplicated, "{at_p:?} {stats:?}");
    assert!(at_m.values().chain(after_m.values()).all(|&n| n <= 2));
    assert!(extra(&at_m) + extra(&after_m) <= stats.down.duplicated);
}

/// Claim 28: the re-association request is resent when data from the peer arrives before its
/// acknowledgement. A hand-written proxy sits in front of M (P knows M by the proxy's front
/// address); it withholds M's `Freezing` (so P keeps sending) and M's first `Reassoc`, and the
/// "network" then routes P's traffic for M's old address to M's new one, as a NAT rebinding
/// would. M's backoff timer is 2 s, so only P's data can trigger the resend that completes the
/// re-association.
///
/// P sees M's packets come from the proxy's front address before and after the move (as behind
/// a NAT), so it completes the re-association without a path challenge: that address is the
/// validated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassoc_is_resent_when_data_arrives_before_the_acknowledgement() {
    let mut cfg = DatagramConfig::default();
    cfg.freeze_timeout = Duration::from_millis(100);
    let m = Datagram::bind_with(host(2), cfg).await.unwrap();
    let p = Arc::new(Datagram::bind(host(3)).await.unwrap());
    let reassocs = Arc::new(AtomicU32::new(0));
    let x = {
        let reassocs = reassocs.clone();
        Tap::start(5, m.local_addr(), move |dir, pkt| {
            match (dir, pkt.first().copied()) {
                (Dir::FromTarget, Some(dkind::FREEZING)) => false,
                // The first Reassoc is lost.
                (Dir::FromTarget, Some(dkind::REASSOC)) => {
                    reassocs.fetch_add(1, Ordering::SeqCst) > 0
                }
                _ => true,
            }
        })
        .await
    };
    p.send_to(b"hello", x.front).await.unwrap();
    let (d, from) = recv(&m).await;
    assert_eq!((d.as_slice(), from), (&b"hello"[..], x.back));

    let image = within("the freeze", m.freeze()).await.unwrap();
    assert!(!p.peers()[0].migrating, "P never heard of the freeze");
    let mut cfg = DatagramConfig::default();
    cfg.retry_initial = Duration::from_secs(2);
    cfg.retry_max = Duration::from_secs(2);
    let m = Datagram::thaw_with(image, host(4), cfg).await.unwrap();
    let now_at = m.local_addr();
    x.wait_packet("the first Reassoc", |d, p| {
        d == Dir::FromTarget && p[0] == dkind::REASSOC
    })
    .await;
    assert_eq!(reassocs.load(Ordering::SeqCst), 1);
    assert!(!p.peers()[0].migrating && p.peers()[0].peer_epoch == 0);
    x.set_target(now_at);

    // P's application keeps sending to the address it knows.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (p, stop, to) = (p.clone(), stop.clone(), x.front);
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                p.send_to(&msg(0, seq), to).await.unwrap();
                seq += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    event_where(&m, "Reassociated", |e| {
        *e == DatagramEvent::Reassociated { peer: x.back }
    })
    .await;
    let s = m.stats();
    assert!(s.reassoc_resent_on_data >= 1, "{s:?}");
    // The backoff timer never fired: every resend came from data.
    assert_eq!(s.reassoc_sent, 1 + s.reassoc_resent_on_data, "{s:?}");
    assert!(reassocs.load(Ordering::SeqCst) >= 2);
    let moved = DatagramEvent::PeerMoved {
        peer: x.front,
        now_at: x.front,
    };
    event_where(&p, "PeerMoved", |e| *e == moved).await;
    let e = &p.peers()[0];
    assert_eq!((e.known_addr, e.addr, e.peer_epoch), (x.front, x.front, 1));
    assert_ne!(now_at, x.front);
    stop.store(true, Ordering::Relaxed);
    within("the sender", sender).await.unwrap();

    // What P sent reached M, under the address M knows P by; and M reaches P.
    let (d, from) = recv(&m).await;
    assert_eq!((parse(&d).0, from), (0, x.back));
    m.send_to(b"back", x.back).await.unwrap();
    let (d, from) = recv(&p).await;
    assert_eq!((d.as_slice(), from), (&b"back"[..], x.front));
}

/// Claim 28's resends are bounded too: when the peer's data keeps arriving but no `Reassoc` ever
/// reaches it (a one-way path failure: the proxy in front of M drops every `Reassoc`), the
/// data-triggered resends must not postpone the backoff timer forever: after `max_tries` timer
/// sends the peer is reported unreachable and the resending stops (PROTOCOL.md §10.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_triggered_resends_do_not_keep_an_unacknowledged_reassoc_alive_forever() {
    let mut cfg = DatagramConfig::default();
    cfg.freeze_timeout = Duration::from_millis(100);
    let m = Datagram::bind_with(host(2), cfg).await.unwrap();
    let p = Arc::new(Datagram::bind(host(3)).await.unwrap());
    let x = Tap::start(5, m.local_addr(), |dir, pkt| {
        !(dir == Dir::FromTarget
            && matches!(pkt.first(), Some(&(dkind::FREEZING | dkind::REASSOC))))
    })
    .await;
    p.send_to(b"hello", x.front).await.unwrap();
    recv(&m).await;
    let image = within("the freeze", m.freeze()).await.unwrap();
    let mut cfg = DatagramConfig::default();
    cfg.retry_initial = Duration::from_millis(50);
    cfg.retry_max = Duration::from_millis(100);
    cfg.max_tries = 4;
    let m = Datagram::thaw_with(image, host(4), cfg).await.unwrap();
    x.set_target(m.local_addr());
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (p, stop, to) = (p.clone(), stop.clone(), x.front);
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                p.send_to(&msg(0, seq), to).await.unwrap();
                seq += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    // Timer sends at 0, 50, 150 and 250 ms; given up at 350 ms.
    let ev = event_where(&m, "PeerUnreachable", |_| true).await;
    assert_eq!(ev, DatagramEvent::PeerUnreachable { peer: x.back });
    let s = m.stats();
    assert!(s.reassoc_resent_on_data > 0, "{s:?}");
    assert!(!m.peers()[0].reassociating);
    // P's data still arrives; no further Reassoc is sent for it.
    let (d, _) = recv(&m).await;
    assert_eq!(parse(&d).0, 0);
    let mut rx = x.log.clone();
    let seen = rx.borrow_and_update().len();
    within(
        "more data through the proxy",
        rx.wait_for(|l| l.len() >= seen + 20),
    )
    .await
    .unwrap();
    assert_eq!(
        m.stats().reassoc_sent,
        s.reassoc_sent,
        "no resend after giving up"
    );
    stop.store(true, Ordering::Relaxed);
    within("the sender", sender).await.unwrap();
}

/// A peer that never answers: the thawed socket resends its `Reassoc` with backoff `max_tries`
/// times, reports `PeerUnreachable` and stops. The same for a first contact's `Hello`, counted
/// on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_is_reported_unreachable_and_not_retried_forever() {
    let m = Datagram::bind(host(2)).await.unwrap();
    let p = Datagram::bind(host(3)).await.unwrap();
    let p_addr = p.local_addr();
    m.send_to(b"hi", p_addr).await.unwrap();
    recv(&p).await;
    let image = within("the freeze", m.freeze()).await.unwrap();
    drop(p);

    let mut cfg = DatagramConfig::default();
    cfg.retry_initial = Duration::from_millis(20);
    cfg.retry_max = Duration::from_millis(80);
    cfg.max_tries = 4;
    let started = Instant::now();
    let m = Datagram::thaw_with(image, host(4), cfg.clone())
        .await
        .unwrap();
    let ev = within("PeerUnreachable", m.next_event()).await;
    let took = started.elapsed();
    assert_eq!(ev, Some(DatagramEvent::PeerUnreachable { peer: p_addr }));
    // Sends at 0, 20, 60 and 140 ms; given up at 220 ms.
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(m.stats().reassoc_sent, 4);
    assert!(!m.peers()[0].reassociating);
    assert!(tokio::time::timeout(QUIET, m.next_event()).await.is_err());
    assert_eq!(m.stats().reassoc_sent, 4, "no retry after giving up");

    // First contact with a socket that reads but never answers.
    let silent = UdpSocket::bind(host(7)).await.unwrap();
    let silent_at = silent.local_addr().unwrap();
    let q = Datagram::bind_with(host(2), cfg).await.unwrap();
    q.send_to(b"never delivered", silent_at).await.unwrap();
    let ev = within("PeerUnreachable", q.next_event()).await;
    assert_eq!(ev, Some(DatagramEvent::PeerUnreachable { peer: silent_at }));
    let mut hellos = 0;
    let mut buf = [0u8; 2048];
    while let Ok(r) = tokio::time::timeout(QUIET, silent.recv_from(&mut buf)).await {
        let (n, from) = r.unwrap();
        assert_eq!((buf[0], from), (dkind::HELLO, q.local_addr()));
        assert!(n > 1);
        hellos += 1;
    }
    assert_eq!(hellos, 4);
    assert_eq!(q.stats().dropped_unreachable, 1);
}

/// Secure re-association: forged and replayed `Reassoc` (and `Freezing`) from a third socket are
/// refused; the peer's table still points at the genuine mover, nothing is redirected to the
/// third socket, and the mover keeps receiving. A proxy in front of P records M's packets (the
/// association id from a `Data` packet, genuine `Reassoc` and `Freezing` from earlier moves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_reassociation_is_refused_and_redirects_nothing() {
    let p = Datagram::bind(host(3)).await.unwrap();
    let x = Tap::start(5, p.local_addr(), |_, _| true).await;
    let mut m = Datagram::bind(host(2)).await.unwrap();
    m.send_to(&msg(MOVER, 0), x.front).await.unwrap();
    let (_, from) = recv(&p).await;
    // P knows M by the proxy's back address.
    assert_eq!(from, x.back);
    let data = x
        .wait_packet("a Data packet", |d, p| {
            d == Dir::FromClient && p[0] == dkind::DATA
        })
        .await;
    let assoc = u64::from_be_bytes(data[1..9].try_into().unwrap());

    for (epoch, target) in [(1u64, 4u8), (2, 6)] {
        let image = within("the freeze", m.freeze()).await.unwrap();
        m = Datagram::thaw(image, host(target)).await.unwrap();
        event_where(&m, "Reassociated", |e| {
            *e == DatagramEvent::Reassociated { peer: x.front }
        })
        .await;
        // P sees the mover behind the proxy's back address, before and after (as behind a NAT).
        let moved = DatagramEvent::PeerMoved {
            peer: x.back,
            now_at: x.back,
        };
        event_where(&p, "PeerMoved", |e| *e == moved).await;
        assert_eq!(p.peers()[0].peer_epoch, epoch);
    }
    let captured = |ty: u8, epoch: u64| {
        x.wait_packet("a captured packet", move |d, p| {
            d == Dir::FromClient && p[0] == ty && epoch_of(p) == epoch
        })
    };
    let reassoc_1 = captured(dkind::REASSOC, 1).await;
    let reassoc_2 = captured(dkind::REASSOC, 2).await;
    let freezing_0 = captured(dkind::FREEZING, 0).await;
    let freezing_1 = captured(dkind::FREEZING, 1).await;

    let genuine = p.peers();
    assert_eq!(genuine[0].addr, x.back);
    let refused = p.stats().refused;
    let third = UdpSocket::bind(host(9)).await.unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let forge_reassoc = |rng: &mut ChaCha8Rng, epoch: u64| {
        Packet::Reassoc {
            assoc,
            epoch,
            nonce: arr(rng),
            mac: arr(rng),
        }
        .encode()
    };
    let refused_ones: Vec<Vec<u8>> = vec![
        // Forged: the real association, a newer epoch or the current one, a random MAC.
        forge_reassoc(&mut rng, 3).to_vec(),
        forge_reassoc(&mut rng, 2).to_vec(),
        forge_reassoc(&mut rng, u64::MAX).to_vec(),
        // Replayed: the genuine request of the first move (an older epoch), and of the
        // current one from another address than the mover's (PROTOCOL.md §10.5).
        reassoc_1,
        reassoc_2,
        // Replayed freezes (would make P hold M's datagrams), and a forged one.
        freezing_0,
        freezing_1,
        Packet::Freezing {
            assoc,
            epoch: 2,
            mac: arr(&mut rng),
        }
        .encode()
        .to_vec(),
        // Forged acknowledgements.
        Packet::ReassocAck {
            assoc,
            epoch: 0,
            mac: arr(&mut rng),
        }
        .encode()
        .to_vec(),
        Packet::FreezingAck {
            assoc,
            epoch: 0,
            mac: arr(&mut rng),
        }
        .encode()
        .to_vec(),
    ];
    for pkt in &refused_ones {
        third.send_to(pkt, p.local_addr()).await.unwrap();
    }
    // M's datagram arrives after all of them: once P has it, P has handled them.
    m.send_to(&msg(MOVER, 1), x.front).await.unwrap();
    let (d, from) = recv(&p).await;
    assert_eq!((parse(&d), from), ((MOVER, 1), x.back));
    assert_eq!(p.stats().refused - refused, refused_ones.len() as u64);
    assert_eq!(
        p.peers(),
        genuine,
        "the table still points at the genuine mover"
    );

    // Nothing is redirected to the third socket; the genuine mover keeps receiving.
    p.send_to(&msg(0, 7), x.back).await.unwrap();
    let (d, from) = recv(&m).await;
    assert_eq!((parse(&d), from), ((0, 7), x.front));
    let mut buf = [0u8; 2048];
    assert!(
        tokio::time::timeout(QUIET, third.recv_from(&mut buf))
            .await
            .is_err(),
        "the third socket receives nothing"
    );
    assert_eq!(m.stats().refused, 0);
}

/// Every packet type with random fields.
fn sample_packets(rng: &mut ChaCha8Rng) -> Vec<Packet> {
    vec![
        Packet::Hello {
            socket: SocketId(arr(rng)),
            eph: arr(rng),
            nonce: arr(rng),
            suites: vec![2, 1],
        },
        Packet::Welcome {
            socket: SocketId(arr(rng)),
            to: SocketId(arr(rng)),
            eph: arr(rng),
            nonce: arr(rng),
            suite: roam::Suite::Aes256Gcm,
            mac: arr(rng),
        },
        Packet::Data {
            assoc: rng.gen(),
            counter: rng.gen(),
            sealed: bytes::Bytes::from_static(b"payload and a 16-byte tag"),
        },
        Packet::PlainData {
            assoc: rng.gen(),
            counter: rng.gen(),
            payload: bytes::Bytes::from_static(b"payload"),
        },
        Packet::Reassoc {
            assoc: rng.gen(),
            epoch: rng.gen(),
            nonce: arr(rng),
            mac: arr(rng),
        },
        Packet::PathChallenge {
            assoc: rng.gen(),
            data: arr(rng),
            mac: arr(rng),
        },
        Packet::PathResponse {
            assoc: rng.gen(),
            data: arr(rng),
            mac: arr(rng),
        },
        Packet::ReassocAck {
            assoc: rng.gen(),
            epoch: rng.gen(),
            mac: arr(rng),
        },
        Packet::Freezing {
            assoc: rng.gen(),
            epoch: rng.gen(),
            mac: arr(rng),
        },
        Packet::FreezingAck {
            assoc: rng.gen(),
            epoch: rng.gen(),
            mac: arr(rng),
        },
    ]
}

/// Garbage datagrams — random bytes, every packet type truncated at every length or whole with
/// fields nobody agreed to, an empty datagram, an HTTP request — are each counted in
/// `stats().refused`; nothing is answered, and the socket carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_are_refused_and_the_socket_keeps_working() {
    let d = Datagram::bind(host(3)).await.unwrap();
    let e = Datagram::bind(host(2)).await.unwrap();
    e.send_to(&msg(1, 0), d.local_addr()).await.unwrap();
    recv(&d).await;

    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut garbage: Vec<Vec<u8>> =
        vec![Vec::new(), b"GET / HTTP/1.1\r\nHost: roam\r\n\r\n".to_vec()];
    for _ in 0..200 {
        let mut v = vec![0u8; rng.gen_range(1..1400)];
        rng.fill_bytes(&mut v);
        if rng.gen_bool(0.5) {
            v[0] = rng.gen_range(dkind::HELLO..=dkind::PLAIN_DATA);
        }
        garbage.push(v);
    }
    for p in sample_packets(&mut rng) {
        let b = p.encode();
        garbage.extend((1..b.len()).map(|n| b[..n].to_vec()));
        // A whole Hello with a fresh key is a genuine first contact, not garbage.
        if !matches!(p, Packet::Hello { .. }) {
            garbage.push(b.to_vec());
        }
    }

    let attacker = UdpSocket::bind(host(9)).await.unwrap();
    let mut refused = d.stats().refused;
    for (k, batch) in garbage.chunks(50).enumerate() {
        for g in batch {
            attacker.send_to(g, d.local_addr()).await.unwrap();
        }
        // E's datagram arrives after the batch: once D delivers it, D has handled the batch.
        let k = k as u32 + 1;
        e.send_to(&msg(1, k), d.local_addr()).await.unwrap();
        let (m, from) = recv(&d).await;
        assert_eq!((parse(&m), from), ((1, k), e.local_addr()));
        let now = d.stats().refused;
        assert_eq!(now - refused, batch.len() as u64, "batch {k}");
        refused = now;
    }
    assert_eq!(d.peers().len(), 1);
    d.send_to(&msg(2, 0), e.local_addr()).await.unwrap();
    let (m, from) = recv(&e).await;
    assert_eq!((parse(&m), from), ((2, 0), d.local_addr()));
    let mut buf = [0u8; 2048];
    assert!(
        tokio::time::timeout(QUIET, attacker.recv_from(&mut buf))
            .await
            .is_err(),
        "garbage is never answered"
    );
}

/// The image with a fresh digest (as anyone can compute: it detects damage, not forgery).
fn reseal(mut v: Vec<u8>) -> Vec<u8> {
    let n = v.len() - 32;
    let digest = Sha256::digest(&v[..n]);
    v[n..].copy_from_slice(&digest);
    v
}

/// Damaged images are typed errors, never a panic: truncated anywhere, a bit flipped anywhere,
/// trailing bytes, a body rewritten under a fresh digest (then a decodable one thaws without a
/// panic), a stream image, not an image at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_and_foreign_images_are_typed_errors() {
    // An image with two peers and two datagrams not yet read.
    let m = Datagram::bind(host(2)).await.unwrap();
    let p = Datagram::bind(host(3)).await.unwrap();
    let q = Datagram::bind(host(5)).await.unwrap();
    for peer in [&p, &q] {
        m.send_to(b"hi", peer.local_addr()).await.unwrap();
        recv(peer).await;
    }
    p.send_to(&msg(0, 1), m.local_addr()).await.unwrap();
    p.send_to(&msg(0, 2), m.local_addr()).await.unwrap();
    let image = within("the freeze", m.freeze()).await.unwrap();
    assert_eq!((image.peer_count(), image.buffered_datagrams()), (2, 2));
    let bytes = image.to_bytes();
    assert_eq!(DatagramImage::from_bytes(&bytes).unwrap(), image);

    for n in 0..bytes.len() {
        let r = DatagramImage::from_bytes(&bytes[..n]);
        assert!(matches!(r, Err(ImageError::Truncated)), "{n}: {r:?}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        DatagramImage::from_bytes(&longer),
        Err(ImageError::Trailing(1))
    ));
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut c = bytes.clone();
            c[i] ^= 1 << bit;
            let r = DatagramImage::from_bytes(&c);
            let ok = match i {
                0..=7 => matches!(r, Err(ImageError::Foreign)),
                // Version 2 is still read (so its digest then fails); any other is refused.
                8..=9 => matches!(
                    r,
                    Err(ImageError::UnsupportedVersion(_) | ImageError::Corrupt)
                ),
                10..=13 => matches!(r, Err(ImageError::Truncated | ImageError::Trailing(_))),
                _ => matches!(r, Err(ImageError::Corrupt)),
            };
            assert!(ok, "bit {bit} of byte {i}: {r:?}");
        }
    }

    // Rewritten under a fresh digest: the body decoder gets them.
    let body = 14..bytes.len() - 32;
    let at = |off: usize, val: u8| {
        let mut c = bytes.clone();
        c[14 + off] = val;
        DatagramImage::from_bytes(&reseal(c))
    };
    // Socket id (16), then the epoch: out of range.
    assert!(matches!(at(16, 0xFF), Err(ImageError::Inconsistent(_))));
    // Then the origin (7 bytes for IPv4), then the peer count: far more peers than bytes (the
    // bytes read as the next association may also name a suite that does not exist).
    assert!(matches!(
        at(31, 0xFF),
        Err(ImageError::Malformed(_) | ImageError::UnknownSuite(_))
    ));
    // An address family that does not exist.
    assert!(matches!(at(24, 5), Err(ImageError::Malformed(_))));
    let now = Instant::now();
    for i in body {
        for val in [bytes[i] ^ 0xFF, bytes[i] ^ 0x01, 0x00, 0xFF] {
            let mut c = bytes.clone();
            c[i] = val;
            match DatagramImage::from_bytes(&reseal(c)) {
                Ok(img) => {
                    // Well-formed but saying something else: it still thaws and runs.
                    let mut s = DatagramSocket::from_image(
                        img,
                        SocketAddr::from(([127, 0, 0, 4], 4000)),
                        DatagramConfig::default(),
                        [7; 32],
                        now,
                    );
                    while s.poll_transmit().is_some() {}
                    s.handle_timeout(now + Duration::from_secs(60));
                    while s.poll_transmit().is_some() {}
                    while s.poll_event().is_some() {}
                }
                Err(
                    ImageError::Malformed(_)
                    | ImageError::Inconsistent(_)
                    | ImageError::UnknownSuite(_),
                ) => {}
                Err(e) => panic!("byte {i} = {val:#x}: {e:?}"),
            }
        }
    }

    // Other things than a datagram image.
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let s = within("connect", a.connect(b.local_addr())).await.unwrap();
    let _t = within("accept", b.accept()).await.unwrap();
    let stream_image = within("the stream's freeze", s.freeze()).await.unwrap();
    assert!(matches!(
        DatagramImage::from_bytes(&stream_image.to_bytes()),
        Err(ImageError::Foreign)
    ));
    assert!(matches!(
        StreamImage::from_bytes(&bytes),
        Err(ImageError::Foreign)
    ));
    assert!(matches!(
        DatagramImage::from_bytes(b""),
        Err(ImageError::Truncated)
    ));
    assert!(matches!(
        DatagramImage::from_bytes(b"ROAMDG"),
        Err(ImageError::Truncated)
    ));
    assert!(matches!(
        DatagramImage::from_bytes(b"GET / HTTP/1.1\r\nHost: roam\r\n\r\n"),
        Err(ImageError::Foreign)
    ));
}
