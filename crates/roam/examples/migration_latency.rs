//! Migration time of one stream with nothing in flight: freeze → image bytes → thaw on another
//! endpoint → first byte delivered to the peer, the image handed over in process. Prints the
//! median and 99th percentile over many migrations (a quick check; the full suite is
//! `roam bench`).
//!
//! `cargo run --release -p roam --example migration_latency -- [migrations]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let hosts = [2u8, 4, 5].map(|h| SocketAddr::from(([127, 0, 0, h], 0)));
    let mut eps = Vec::new();
    for h in hosts {
        eps.push(roam::Endpoint::bind(h).await.unwrap());
    }
    let b = roam::Endpoint::bind(SocketAddr::from(([127, 0, 0, 3], 0)))
        .await
        .unwrap();
    let mut s = eps[0].connect(b.local_addr()).await.unwrap();
    let mut t = b.accept().await.unwrap();
    let mut times = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for i in 0..n {
        let start = Instant::now();
        let image = s.freeze().await.unwrap();
        let bytes = image.to_bytes();
        let image = roam::StreamImage::from_bytes(&bytes).unwrap();
        s = eps[(i + 1) % eps.len()].thaw(image).await.unwrap();
        s.write_all(&[i as u8]).await.unwrap();
        t.read_exact(&mut byte).await.unwrap();
        times.push(start.elapsed());
        assert_eq!(byte[0], i as u8);
    }
    times.sort();
    println!("{n} migrations, nothing in flight (freeze -> thaw -> first byte at the peer)");
    println!("  p50 {:>8.3} ms", pct(&times, 0.5).as_secs_f64() * 1e3);
    println!("  p99 {:>8.3} ms", pct(&times, 0.99).as_secs_f64() * 1e3);
    println!("  epoch after {}", s.epoch());
}
