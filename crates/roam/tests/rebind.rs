//! `Endpoint::rebind`: an endpoint whose address changes (a laptop moving between networks)
//! moves every session to the new address; the streams notice nothing (PROTOCOL.md §8.1).
//!
//! Loopback only: 127.0.0.21–127.0.0.26. Each stream carries seeded random data both ways
//! while its endpoint rebinds several times; SHA-256 of what each side sent equals what the
//! other received. Every wait is bounded.

use std::net::SocketAddr;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::{Endpoint, Stream};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STEP: Duration = Duration::from_secs(20);

fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

/// Write `len` seeded bytes and read `len` bytes concurrently; return (sent, received) digests.
async fn exchange(s: &mut Stream, seed: u64, len: usize) -> ([u8; 32], [u8; 32]) {
    let mut data = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    let sent: [u8; 32] = Sha256::digest(&data).into();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
    };
    let read = async {
        let mut got = vec![0u8; len];
        r.read_exact(&mut got).await.unwrap();
        <[u8; 32]>::from(Sha256::digest(&got))
    };
    let ((), received) = tokio::time::timeout(STEP, async { tokio::join!(write, read) })
        .await
        .expect("exchange timed out");
    (sent, received)
}

async fn check_round(a: &mut Stream, b: &mut Stream, round: u64) {
    let len = 256 * 1024 + round as usize * 777;
    let ((a_sent, a_got), (b_sent, b_got)) =
        tokio::join!(exchange(a, round, len), exchange(b, 1000 + round, len));
    assert_eq!(a_sent, b_got, "round {round}: a → b differs");
    assert_eq!(b_sent, a_got, "round {round}: b → a differs");
}

/// The endpoint that opened the stream rebinds (it redials from the new address), and the
/// one that accepted it rebinds (it must dial the peer itself: the peer has no way to learn
/// its new address otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_their_endpoint_to_a_new_address() {
    let a = Endpoint::bind(host(21)).await.unwrap();
    let b = Endpoint::bind(host(22)).await.unwrap();
    let mut sa = a.connect(b.local_addr()).await.unwrap();
    let mut sb = b.accept().await.unwrap();
    check_round(&mut sa, &mut sb, 0).await;
    let old = a.local_addr();
    for (round, (ep, ip)) in [(&a, 23), (&b, 24), (&a, 25), (&b, 26), (&a, 21)]
        .into_iter()
        .enumerate()
    {
        // Data in flight while the address changes.
        let pending = vec![round as u8; 100_000];
        sa.write_all(&pending).await.unwrap();
        let new = ep.rebind(host(ip)).await.unwrap();
        assert_eq!(new.ip(), host(ip).ip());
        assert_eq!(ep.local_addr(), new);
        let mut got = vec![0u8; pending.len()];
        tokio::time::timeout(STEP, sb.read_exact(&mut got))
            .await
            .expect("in-flight bytes after rebind")
            .unwrap();
        assert_eq!(got, pending);
        check_round(&mut sa, &mut sb, round as u64 + 1).await;
        // The peer learned the new contact through the re-association.
        let (moved, other) = if std::ptr::eq(ep, &a) {
            (&sa, &sb)
        } else {
            (&sb, &sa)
        };
        assert_eq!(other.peer().contact, new, "round {round}");
        assert_eq!(moved.local_contact(), new);
    }
    assert_ne!(a.local_addr(), old, "port 0 picked a fresh port");
    // The old address no longer listens.
    assert!(tokio::net::TcpStream::connect(old).await.is_err());
    assert!(sa.stats().reassociations >= 5);
}

/// A rebind to an address that cannot be bound changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rebind_changes_nothing() {
    let a = Endpoint::bind(host(21)).await.unwrap();
    let b = Endpoint::bind(host(22)).await.unwrap();
    let mut sa = a.connect(b.local_addr()).await.unwrap();
    let mut sb = b.accept().await.unwrap();
    let before = a.local_addr();
    // b's own address is taken (by b's listener).
    assert!(a.rebind(b.local_addr()).await.is_err());
    assert_eq!(a.local_addr(), before);
    check_round(&mut sa, &mut sb, 7).await;
    assert_eq!(sa.stats().reassociations, 0);
}
