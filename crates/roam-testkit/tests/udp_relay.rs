//! Integration tests for the lossy UDP relay, with plain Tokio UDP sockets on 127.0.0.x.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roam_testkit::{Faults, UdpDirectionStats, UdpRelay, UdpRelayStats};
use tokio::net::UdpSocket;

/// Safety net for awaiting events that must happen; never reached when the code works.
const DEADLINE: Duration = Duration::from_secs(1);
/// How long to wait when asserting that nothing arrives.
const SILENCE: Duration = Duration::from_millis(100);
/// Datagrams sent before waiting for the relay to take them (below the client queue length).
const BATCH: u32 = 32;

const CLIENT_IP: &str = "127.0.0.21";
const RELAY_IP: &str = "127.0.0.22";
const TARGET_IP: &str = "127.0.0.23";
const OTHER_IP: &str = "127.0.0.24";

/// Await `fut`, failing the test if it does not complete within [`DEADLINE`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn bind(ip: &str) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .await
        .unwrap()
}

/// Receive one datagram on `sock` within [`DEADLINE`].
async fn recv(sock: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 64 * 1024];
    let (n, from) = within(what, sock.recv_from(&mut buf)).await.unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Assert that nothing arrives on `sock` for [`SILENCE`].
async fn assert_silent(sock: &UdpSocket, what: &str) {
    let mut buf = [0u8; 2048];
    if let Ok(r) = tokio::time::timeout(SILENCE, sock.recv_from(&mut buf)).await {
        panic!("{what}: expected silence, got {r:?}");
    }
}

/// Assert that no datagram is waiting on `sock` right now.
fn assert_empty(sock: &UdpSocket, what: &str) {
    let mut buf = [0u8; 2048];
    match sock.try_recv_from(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        r => panic!("{what}: expected nothing pending, got {r:?}"),
    }
}

/// A 32-byte datagram carrying `i` twice (plainly and inverted), so that a single flipped bit
/// can never turn one valid datagram into another.
fn indexed(i: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(32);
    d.extend_from_slice(&i.to_le_bytes());
    d.extend_from_slice(&(!i).to_le_bytes());
    d.extend_from_slice(&[0xa5; 24]);
    d
}

/// The index carried by `d`, or `None` if it is not an intact [`indexed`] datagram.
fn index_of(d: &[u8]) -> Option<u32> {
    let (head, tail) = d.split_at_checked(8)?;
    let i = u32::from_le_bytes(head[..4].try_into().ok()?);
    let j = u32::from_le_bytes(head[4..].try_into().ok()?);
    (i == !j && tail == [0xa5; 24]).then_some(i)
}

/// True when every datagram a direction took in is accounted for (nothing held or queued).
fn idle(d: &UdpDirectionStats) -> bool {
    d.received + d.duplicated == d.dropped + d.overflowed + d.forwarded + d.send_errors
}

/// A client, a target and a relay between them.
struct Net {
    client: UdpSocket,
    target: UdpSocket,
    relay: UdpRelay,
}

async fn net(faults: Faults) -> Net {
    let target = bind(TARGET_IP).await;
    let listen = SocketAddr::new(RELAY_IP.parse().unwrap(), 0);
    let relay = UdpRelay::start(listen, target.local_addr().unwrap(), faults)
        .await
        .unwrap();
    let client = bind(CLIENT_IP).await;
    Net {
        client,
        target,
        relay,
    }
}

impl Net {
    /// Send `data` from the client to the relay.
    async fn up(&self, data: &[u8]) {
        self.client
            .send_to(data, self.relay.local_addr())
            .await
            .unwrap();
    }

    /// Send `count` indexed datagrams starting at `first`, in batches that the relay is made to
    /// take in before the next batch, so its client queue never overflows.
    async fn up_indexed(&self, first: u32, count: u32) {
        let base = self.relay.stats().up.received;
        for i in 0..count {
            self.up(&indexed(first + i)).await;
            if (i + 1) % BATCH == 0 || i + 1 == count {
                let taken = base + u64::from(i + 1);
                within(
                    "the relay to take a batch",
                    self.relay.wait_stats(|s| s.up.received == taken),
                )
                .await;
            }
        }
    }

    /// Receive a datagram at the target; returns it and the upstream address it came from.
    async fn at_target(&self) -> (Vec<u8>, SocketAddr) {
        let (data, from) = recv(&self.target, "a datagram at the target").await;
        assert_eq!(from.ip(), self.relay.local_addr().ip());
        assert_ne!(from, self.relay.local_addr());
        (data, from)
    }

    /// Receive a datagram at the client, checking that it comes from the relay.
    async fn at_client(&self) -> Vec<u8> {
        let (data, from) = recv(&self.client, "a datagram at the client").await;
        assert_eq!(from, self.relay.local_addr());
        data
    }

    /// Wait until the relay has taken `received` datagrams from clients and is idle upwards.
    async fn settle_up(&self, received: u64) -> UdpRelayStats {
        within(
            "the relay to settle",
            self.relay
                .wait_stats(|s| s.up.received == received && idle(&s.up)),
        )
        .await
    }
}

fn stats(received: u64, forwarded: u64) -> UdpDirectionStats {
    UdpDirectionStats {
        received,
        forwarded,
        ..Default::default()
    }
}

#[tokio::test]
async fn clean_forwarding_both_ways() {
    let n = net(Faults::default()).await;
    for i in 0..3 {
        n.up(&indexed(i)).await;
    }
    let mut upstream = None;
    for i in 0..3 {
        let (data, from) = n.at_target().await;
        assert_eq!(data, indexed(i));
        assert_eq!(*upstream.get_or_insert(from), from, "one upstream socket");
    }
    let upstream = upstream.unwrap();
    for i in 100..103 {
        n.target.send_to(&indexed(i), upstream).await.unwrap();
    }
    for i in 100..103 {
        assert_eq!(n.at_client().await, indexed(i));
    }
    let s = n.relay.stats();
    assert_eq!(s.up, stats(3, 3));
    assert_eq!(s.down, stats(3, 3));
    assert_eq!((s.clients, s.rejected, s.foreign), (1, 0, 0));
    assert_eq!(s.total(), stats(6, 6));
}

#[tokio::test]
async fn each_client_gets_its_own_upstream_socket() {
    let n = net(Faults::default()).await;
    let other = bind(OTHER_IP).await;
    n.up(b"from-client").await;
    other
        .send_to(b"from-other", n.relay.local_addr())
        .await
        .unwrap();
    let (d1, u1) = n.at_target().await;
    let (d2, u2) = n.at_target().await;
    assert_eq!(
        (d1.as_slice(), d2.as_slice()),
        (&b"from-client"[..], &b"from-other"[..])
    );
    assert_ne!(u1, u2, "distinct source addresses at the target");
    n.target.send_to(b"to-other", u2).await.unwrap();
    n.target.send_to(b"to-client", u1).await.unwrap();
    let (d, from) = recv(&other, "the reply at the other client").await;
    assert_eq!(
        (d.as_slice(), from),
        (&b"to-other"[..], n.relay.local_addr())
    );
    assert_eq!(n.at_client().await, b"to-client");
    assert_eq!(n.relay.stats().clients, 2);
}

#[tokio::test]
async fn drop_all_drops_everything_both_ways() {
    let n = net(Faults::default()).await;
    n.up(b"hello").await;
    let (_, upstream) = n.at_target().await;
    n.relay.set_faults(Faults {
        drop: 1.0,
        ..Faults::default()
    });
    for i in 0..5 {
        n.up(&indexed(i)).await;
        n.target.send_to(&indexed(i), upstream).await.unwrap();
    }
    tokio::join!(
        assert_silent(&n.target, "target"),
        assert_silent(&n.client, "client"),
    );
    let s = n.relay.stats();
    assert_eq!(
        s.up,
        UdpDirectionStats {
            received: 6,
            forwarded: 1,
            dropped: 5,
            ..Default::default()
        }
    );
    assert_eq!(
        s.down,
        UdpDirectionStats {
            received: 5,
            dropped: 5,
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn duplicate_all_delivers_each_twice_both_ways() {
    let n = net(Faults {
        duplicate: 1.0,
        ..Faults::default()
    })
    .await;
    n.up(b"a").await;
    n.up(b"b").await;
    let mut got = Vec::new();
    let mut upstream = None;
    for _ in 0..4 {
        let (d, from) = n.at_target().await;
        upstream = Some(from);
        got.push(d);
    }
    assert_eq!(got, [b"a", b"a", b"b", b"b"]);
    n.target.send_to(b"x", upstream.unwrap()).await.unwrap();
    assert_eq!(n.at_client().await, b"x");
    assert_eq!(n.at_client().await, b"x");
    let s = n.relay.stats();
    let dup = |received, forwarded, duplicated| UdpDirectionStats {
        received,
        forwarded,
        duplicated,
        ..Default::default()
    };
    assert_eq!(s.up, dup(2, 4, 2));
    assert_eq!(s.down, dup(1, 2, 1));
    assert_empty(&n.target, "target after the duplicates");
    assert_empty(&n.client, "client after the duplicates");
}

#[tokio::test]
async fn reorder_all_swaps_neighbours() {
    let n = net(Faults {
        reorder: 1.0,
        ..Faults::default()
    })
    .await;
    for d in [b"a", b"b", b"c", b"d"] {
        n.up(d).await;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(n.at_target().await.0);
    }
    assert_eq!(got, [b"b", b"a", b"d", b"c"]);
    let s = n.relay.stats();
    assert_eq!(
        s.up,
        UdpDirectionStats {
            received: 4,
            forwarded: 4,
            reordered: 2,
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn held_datagram_is_released_after_max_hold() {
    let n = net(Faults {
        reorder: 1.0,
        ..Faults::default()
    })
    .await;
    let start = Instant::now();
    n.up(b"lonely").await;
    assert_eq!(n.at_target().await.0, b"lonely");
    assert!(
        start.elapsed() >= UdpRelay::MAX_HOLD,
        "{:?}",
        start.elapsed()
    );
    // Released by the timeout, not overtaken: not counted as reordered.
    assert_eq!(n.relay.stats().up, stats(1, 1));
}

#[tokio::test]
async fn corrupt_all_flips_exactly_one_bit() {
    let n = net(Faults {
        seed: 3,
        corrupt: 1.0,
        ..Faults::default()
    })
    .await;
    for i in 0..16 {
        n.up(&indexed(i)).await;
    }
    n.up(b"").await;
    for i in 0..16 {
        let (d, _) = n.at_target().await;
        let sent = indexed(i);
        assert_eq!(d.len(), sent.len());
        let flipped: u32 = d.iter().zip(&sent).map(|(a, b)| (a ^ b).count_ones()).sum();
        assert_eq!(flipped, 1, "datagram {i}: {d:?}");
    }
    assert_eq!(n.at_target().await.0, b"", "empty datagrams are left alone");
    let s = n.relay.stats();
    assert_eq!(
        s.up,
        UdpDirectionStats {
            received: 17,
            forwarded: 17,
            corrupted: 16,
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn delay_holds_datagrams_back() {
    let min = Duration::from_millis(40);
    let n = net(Faults {
        delay: Some((min, Duration::from_millis(60))),
        ..Faults::default()
    })
    .await;
    let start = Instant::now();
    n.up(b"late").await;
    assert_eq!(n.at_target().await.0, b"late");
    assert!(start.elapsed() >= min, "{:?}", start.elapsed());

    // A fixed delay keeps the order.
    let fixed = Duration::from_millis(20);
    n.relay.set_faults(Faults {
        delay: Some((fixed, fixed)),
        ..Faults::default()
    });
    let start = Instant::now();
    for i in 0..5 {
        n.up(&indexed(i)).await;
    }
    for i in 0..5 {
        assert_eq!(n.at_target().await.0, indexed(i));
    }
    assert!(start.elapsed() >= fixed, "{:?}", start.elapsed());
    let s = n.relay.stats();
    assert_eq!(
        s.up,
        UdpDirectionStats {
            received: 6,
            forwarded: 6,
            delayed: 6,
            ..Default::default()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_account_for_every_datagram_under_mixed_faults() {
    const N: u32 = 200;
    let n = net(Faults {
        seed: 42,
        drop: 0.2,
        duplicate: 0.2,
        reorder: 0.2,
        delay: Some((Duration::ZERO, Duration::from_millis(2))),
        corrupt: 0.2,
    })
    .await;
    n.up_indexed(0, N).await;
    let s = n.settle_up(N.into()).await;
    let mut valid = BTreeSet::new();
    let mut invalid = 0;
    for _ in 0..s.up.forwarded {
        match index_of(&n.at_target().await.0) {
            Some(i) => {
                valid.insert(i);
            }
            None => invalid += 1,
        }
    }
    assert_empty(&n.target, "target after the forwarded datagrams");
    let u = s.up;
    assert_eq!((u.overflowed, u.send_errors), (0, 0));
    for (what, count) in [
        ("dropped", u.dropped),
        ("duplicated", u.duplicated),
        ("reordered", u.reordered),
        ("corrupted", u.corrupted),
    ] {
        assert!(count > 0 && count < u64::from(N), "{what}: {count} ({u:?})");
    }
    // Every copy went through the delay queue, except a held datagram released by the
    // MAX_HOLD timeout at the end (sent at once, with its duplicate if any).
    assert!(u.forwarded - u.delayed <= 2, "{u:?}");
    assert!(
        (u.corrupted..=2 * u.corrupted).contains(&invalid),
        "{invalid} corrupted copies, {u:?}"
    );
    // Each intact index is a datagram that was neither dropped nor corrupted (maybe twice).
    assert!(valid.len() as u64 + u.dropped + u.corrupted >= u64::from(N));
    assert_eq!(s.down, UdpDirectionStats::default());
}

/// Send indexed datagrams 0..64 through a fresh relay and return the indices that arrived.
async fn arrivals(n: &Net) -> BTreeSet<u32> {
    n.up_indexed(0, 64).await;
    let s = n.settle_up(64).await;
    let mut got = BTreeSet::new();
    for _ in 0..s.up.forwarded {
        got.insert(index_of(&n.at_target().await.0).expect("no corruption"));
    }
    got
}

#[tokio::test]
async fn same_seed_same_drop_pattern() {
    let lossy = |seed| Faults {
        seed,
        drop: 0.5,
        ..Faults::default()
    };
    let first = arrivals(&net(lossy(7)).await).await;
    assert!(!first.is_empty() && first.len() < 64, "{first:?}");
    let n = net(lossy(7)).await;
    assert_eq!(
        arrivals(&n).await,
        first,
        "a second relay with the same seed"
    );
    let other = arrivals(&net(lossy(8)).await).await;
    assert_ne!(other, first, "another seed gives another pattern");
    // Other rates do not change which datagrams are dropped.
    let dup = net(Faults {
        duplicate: 0.5,
        ..lossy(7)
    })
    .await;
    assert_eq!(arrivals(&dup).await, first, "with duplicates as well");
    // Setting the faults again restarts the generators.
    n.relay.set_faults(lossy(7));
    let forwarded = n.relay.stats().up.forwarded;
    n.up_indexed(0, 64).await;
    let s = n.settle_up(128).await;
    let mut again = BTreeSet::new();
    for _ in forwarded..s.up.forwarded {
        again.insert(index_of(&n.at_target().await.0).unwrap());
    }
    assert_eq!(again, first, "after set_faults with the same seed");
}

#[tokio::test]
async fn retarget_sends_to_the_new_target_and_ignores_the_old() {
    let n = net(Faults::default()).await;
    n.up(b"a").await;
    let (_, upstream) = n.at_target().await;
    let new_target = bind(OTHER_IP).await;
    n.relay.set_target(new_target.local_addr().unwrap());
    assert_eq!(n.relay.target(), new_target.local_addr().unwrap());
    n.up(b"b").await;
    let (d, from) = recv(&new_target, "a datagram at the new target").await;
    assert_eq!(
        (d.as_slice(), from),
        (&b"b"[..], upstream),
        "same upstream socket"
    );
    assert_empty(&n.target, "old target");
    n.target.send_to(b"stale", upstream).await.unwrap();
    new_target.send_to(b"fresh", upstream).await.unwrap();
    assert_eq!(n.at_client().await, b"fresh");
    let s = n.relay.stats();
    assert_eq!(s.foreign, 1);
    assert_eq!(s.down, stats(1, 1));
    assert_eq!(s.up, stats(2, 2));
}

#[tokio::test]
async fn shutdown_stops_forwarding_and_closes_sockets() {
    let n = net(Faults::default()).await;
    n.up(b"a").await;
    let (_, upstream) = n.at_target().await;
    n.relay.shutdown();
    within("the relay's tasks to end", n.relay.stopped()).await;
    n.up(b"b").await;
    n.target.send_to(b"c", upstream).await.unwrap();
    tokio::join!(
        assert_silent(&n.target, "target after shutdown"),
        assert_silent(&n.client, "client after shutdown"),
    );
    // Both the listening and the upstream socket are closed.
    UdpSocket::bind(n.relay.local_addr()).await.unwrap();
    UdpSocket::bind(upstream).await.unwrap();
    assert_eq!(n.relay.stats().up, stats(1, 1));
    n.relay.shutdown(); // idempotent
}

#[tokio::test]
async fn drop_ends_all_tasks() {
    let Net {
        client,
        target,
        relay,
    } = net(Faults::default()).await;
    client.send_to(b"a", relay.local_addr()).await.unwrap();
    let (_, upstream) = recv(&target, "a datagram at the target").await;
    let stopped = relay.stopped();
    let local = relay.local_addr();
    drop(relay);
    within("the relay's tasks to end", stopped).await;
    UdpSocket::bind(local).await.unwrap();
    UdpSocket::bind(upstream).await.unwrap();
}

#[tokio::test]
async fn delay_queue_is_bounded_and_shutdown_discards_it() {
    let long = Duration::from_secs(5);
    let n = net(Faults {
        delay: Some((long, long)),
        ..Faults::default()
    })
    .await;
    let extra = 8;
    let total = UdpRelay::DELAY_QUEUE_LEN as u32 + extra;
    n.up_indexed(0, total).await;
    let s = within(
        "the relay to queue or discard everything",
        n.relay.wait_stats(|s| {
            s.up.received == u64::from(total) && s.up.delayed + s.up.overflowed == s.up.received
        }),
    )
    .await;
    assert_eq!(s.up.delayed, UdpRelay::DELAY_QUEUE_LEN as u64);
    assert_eq!(s.up.overflowed, u64::from(extra));
    assert_eq!(s.up.forwarded, 0);
    let start = Instant::now();
    n.relay.shutdown();
    within("the relay's tasks to end", n.relay.stopped()).await;
    assert!(start.elapsed() < long);
    assert_empty(&n.target, "target after shutdown");
}

#[tokio::test]
async fn clients_beyond_the_limit_are_rejected() {
    let n = net(Faults::default()).await;
    let max = UdpRelay::MAX_CLIENTS as u32;
    let mut clients = Vec::new();
    for _ in 0..=max {
        clients.push(bind(CLIENT_IP).await);
    }
    for (i, c) in (0..).zip(&clients) {
        c.send_to(&indexed(i), n.relay.local_addr()).await.unwrap();
    }
    let s = within(
        "all clients to be handled",
        n.relay
            .wait_stats(|s| s.rejected == 1 && s.up.forwarded == u64::from(max)),
    )
    .await;
    assert_eq!(s.clients, u64::from(max));
    let mut got = BTreeSet::new();
    for _ in 0..max {
        got.insert(index_of(&n.at_target().await.0).unwrap());
    }
    assert_eq!(
        got,
        (0..max).collect(),
        "the last client was the one rejected"
    );
    assert_empty(&n.target, "target");
}

#[test]
fn faults_are_clamped() {
    let wild = Faults {
        seed: 9,
        drop: 2.0,
        duplicate: -1.0,
        reorder: f64::NAN,
        delay: Some((Duration::from_millis(20), Duration::from_millis(10))),
        corrupt: 0.25,
    };
    let tame = Faults {
        seed: 9,
        drop: 1.0,
        duplicate: 0.0,
        reorder: 0.0,
        delay: Some((Duration::from_millis(10), Duration::from_millis(20))),
        corrupt: 0.25,
    };
    assert_eq!(wild.clamped(), tame);
    let huge = Faults {
        delay: Some((Duration::ZERO, Duration::from_secs(3600))),
        ..Faults::default()
    };
    assert_eq!(
        huge.clamped().delay,
        Some((Duration::ZERO, Duration::from_secs(60)))
    );
    assert_eq!(Faults::default().clamped(), Faults::default());
}

#[tokio::test]
async fn relay_reports_clamped_faults() {
    let n = net(Faults {
        drop: 7.0,
        ..Faults::default()
    })
    .await;
    assert_eq!(n.relay.faults().drop, 1.0);
    n.relay.set_faults(Faults {
        corrupt: -3.0,
        duplicate: 0.5,
        ..Faults::default()
    });
    let f = n.relay.faults();
    assert_eq!((f.drop, f.corrupt, f.duplicate), (0.0, 0.0, 0.5));
}
