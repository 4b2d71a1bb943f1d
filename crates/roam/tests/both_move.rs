//! Both ends of a stream move at the same time (PROTOCOL.md §5.4, §5.5), on loopback.
//!
//! A stream between 127.0.0.11 and 127.0.0.12 carries seeded random data both ways. In each
//! round both ends write (and leave some bytes in flight), then one or both ends freeze
//! concurrently and are thawed on NEW endpoints (alternating with 127.0.0.13 / 127.0.0.14); each
//! old endpoint `forward`s the session to its new one, so the two moved ends find each other.
//! SHA-256 of everything sent must equal SHA-256 of everything received, in both directions.
//! Every wait is bounded by a timeout; nothing sleeps to synchronise.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::{Endpoint, Stream, StreamImage};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STEP: Duration = Duration::from_secs(20);

fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {STEP:?}"),
    }
}

/// One end's bookkeeping: what it wrote and what it read, by count and digest.
struct Side {
    gen: ChaCha8Rng,
    sent: u64,
    sent_hash: Sha256,
    received: u64,
    received_hash: Sha256,
}

impl Side {
    fn new(seed: u64) -> Side {
        Side {
            gen: ChaCha8Rng::seed_from_u64(seed),
            sent: 0,
            sent_hash: Sha256::new(),
            received: 0,
            received_hash: Sha256::new(),
        }
    }
}

/// Write `n` fresh random bytes on `s` while reading until `read_until` bytes were received
/// in total.
async fn pump(s: &mut Stream, side: &mut Side, n: usize, read_until: u64) {
    let mut data = vec![0u8; n];
    side.gen.fill_bytes(&mut data);
    side.sent_hash.update(&data);
    side.sent += n as u64;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.expect("write");
    };
    let received = &mut side.received;
    let hash = &mut side.received_hash;
    let read = async {
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded: each pass reads at least one byte, and at most `read_until` are expected.
        while *received < read_until {
            let want = (read_until - *received).min(buf.len() as u64) as usize;
            let k = r.read(&mut buf[..want]).await.expect("read");
            assert!(k > 0, "unexpected end of stream");
            hash.update(&buf[..k]);
            *received += k as u64;
        }
    };
    tokio::join!(write, read);
}

/// Write `n` bytes without reading: they are in flight (or buffered) when the freeze starts.
async fn tail(s: &mut Stream, side: &mut Side, n: usize) {
    let mut data = vec![0u8; n];
    side.gen.fill_bytes(&mut data);
    side.sent_hash.update(&data);
    side.sent += n as u64;
    s.write_all(&data).await.expect("write tail");
}

/// The session lives on `ep`; freeze it there.
async fn freeze(s: Stream) -> StreamImage {
    let image = s.freeze().await.expect("freeze");
    StreamImage::from_bytes(&image.to_bytes()).expect("image round-trips")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_ends_move_at_once_and_find_each_other_through_forwarding() {
    tokio::time::timeout(Duration::from_secs(120), run())
        .await
        .expect("whole test within two minutes");
}

async fn run() {
    // Endpoints are kept alive to the end: the old ones answer with `Moved`.
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let ea = Endpoint::bind(host(11)).await.unwrap();
    let eb = Endpoint::bind(host(12)).await.unwrap();
    let mut s = bounded("connect", ea.connect(eb.local_addr()))
        .await
        .unwrap();
    let mut t = bounded("accept", eb.accept()).await.unwrap();
    let (mut cur_a, mut cur_b) = (ea.clone(), eb.clone());
    endpoints.push(ea);
    endpoints.push(eb);
    let mut a = Side::new(1);
    let mut b = Side::new(2);
    let mut sizes = ChaCha8Rng::seed_from_u64(3);

    // (A moves, B moves) per round: both, only A, both, only B, both.
    let plan = [
        (true, true),
        (true, false),
        (true, true),
        (false, true),
        (true, true),
    ];
    for (round, &(move_a, move_b)) in plan.iter().enumerate() {
        let na = 50_000 + (sizes.next_u32() % 250_000) as usize;
        let nb = 50_000 + (sizes.next_u32() % 250_000) as usize;
        let (a_total, b_total) = (a.sent + na as u64, b.sent + nb as u64);
        bounded(&format!("round {round}: exchange"), async {
            tokio::join!(
                pump(&mut s, &mut a, na, b_total),
                pump(&mut t, &mut b, nb, a_total)
            )
        })
        .await;
        // Bytes in flight both ways when the freeze starts.
        let (ta, tb) = (
            10_000 + (sizes.next_u32() % 60_000) as usize,
            10_000 + (sizes.next_u32() % 60_000) as usize,
        );
        bounded("tails", async {
            tokio::join!(tail(&mut s, &mut a, ta), tail(&mut t, &mut b, tb))
        })
        .await;
        let id = s.session_id();
        // Alternate the hosts: A between .11 and .13, B between .12 and .14.
        let ip_a = if round % 2 == 0 { 13 } else { 11 };
        let ip_b = if round % 2 == 0 { 14 } else { 12 };
        match (move_a, move_b) {
            (true, true) => {
                let (ia, ib) = bounded(&format!("round {round}: freeze both"), async {
                    tokio::join!(freeze(s), freeze(t))
                })
                .await;
                let na_ep = Endpoint::bind(host(ip_a)).await.unwrap();
                let nb_ep = Endpoint::bind(host(ip_b)).await.unwrap();
                cur_a.forward(id, na_ep.contact_addr());
                cur_b.forward(id, nb_ep.contact_addr());
                let (rs, rt) = bounded(&format!("round {round}: thaw both"), async {
                    tokio::join!(na_ep.thaw(ia), nb_ep.thaw(ib))
                })
                .await;
                s = rs.expect("thaw A");
                t = rt.expect("thaw B");
                assert!(cur_a.stats().forwarded + cur_b.stats().forwarded >= 1);
                cur_a = na_ep.clone();
                cur_b = nb_ep.clone();
                endpoints.push(na_ep);
                endpoints.push(nb_ep);
            }
            (true, false) => {
                let ia = bounded("freeze A", freeze(s)).await;
                let na_ep = Endpoint::bind(host(ip_a)).await.unwrap();
                cur_a.forward(id, na_ep.contact_addr());
                s = bounded("thaw A", na_ep.thaw(ia)).await.expect("thaw A");
                cur_a = na_ep.clone();
                endpoints.push(na_ep);
            }
            (false, true) => {
                let ib = bounded("freeze B", freeze(t)).await;
                let nb_ep = Endpoint::bind(host(ip_b)).await.unwrap();
                cur_b.forward(id, nb_ep.contact_addr());
                t = bounded("thaw B", nb_ep.thaw(ib)).await.expect("thaw B");
                cur_b = nb_ep.clone();
                endpoints.push(nb_ep);
            }
            (false, false) => unreachable!(),
        }
        assert_eq!(s.session_id(), t.session_id());
    }
    // Drain everything still in flight, then compare.
    let (a_total, b_total) = (a.sent, b.sent);
    bounded("final exchange", async {
        tokio::join!(
            pump(&mut s, &mut a, 1, b_total),
            pump(&mut t, &mut b, 1, a_total + 1)
        )
    })
    .await;
    bounded("last byte", async {
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.expect("read");
        a.received_hash.update(one);
        a.received += 1;
    })
    .await;
    assert_eq!(a.sent, b.received, "A→B byte count");
    assert_eq!(b.sent, a.received, "B→A byte count");
    assert_eq!(
        a.sent_hash.finalize(),
        b.received_hash.finalize(),
        "A→B SHA-256"
    );
    assert_eq!(
        b.sent_hash.finalize(),
        a.received_hash.finalize(),
        "B→A SHA-256"
    );
    assert_eq!(s.epoch(), t.epoch(), "both ends at the same epoch");
    assert_eq!(
        s.epoch().0,
        plan.len() as u64,
        "one re-association per round"
    );
    drop(endpoints);
}
