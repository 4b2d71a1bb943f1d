//! Helpers shared by the stream tests (`attacks.rs`, `suites.rs`).
#![allow(dead_code)] // each test crate uses its own subset

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::Stream;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest any single step may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(20);

/// An address on 127.0.0.n with a port the kernel picks.
pub fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

/// `f`, or a panic naming `what` after [`BOUND`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {BOUND:?}"),
    }
}

/// `n` seeded pseudo-random bytes.
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Send `data` from `w` to `r` and return the SHA-256 of what `r` read (exactly `data.len()`
/// bytes).
pub async fn transfer(w: &mut Stream, r: &mut Stream, data: &[u8]) -> [u8; 32] {
    let n = data.len();
    let send = async {
        for c in data.chunks(16 * 1024) {
            w.write_all(c).await.unwrap();
        }
        w.flush().await.unwrap();
    };
    let recv = async {
        let mut h = Sha256::new();
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < n {
            let k = r.read(&mut buf[..(n - got).min(64 * 1024)]).await.unwrap();
            assert!(k > 0, "unexpected end of stream after {got} bytes");
            h.update(&buf[..k]);
            got += k;
        }
        <[u8; 32]>::from(h.finalize())
    };
    let ((), digest) = within("transfer", async { tokio::join!(send, recv) }).await;
    digest
}
