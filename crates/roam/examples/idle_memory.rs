//! User-space memory per idle session: open N sessions between two endpoints in this process,
//! exchange one message on each, let them go idle, and divide the growth in resident memory by
//! the number of session ends (a quick check; the full suite is `roam bench`).
//!
//! `cargo run --release -p roam --example idle_memory -- [sessions]` (Linux: reads /proc).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let a = roam::Endpoint::bind(SocketAddr::from(([127, 0, 0, 2], 0)))
        .await
        .unwrap();
    let b = roam::Endpoint::bind(SocketAddr::from(([127, 0, 0, 3], 0)))
        .await
        .unwrap();
    // Warm up allocator and runtime with a few sessions first.
    let mut keep = Vec::new();
    for _ in 0..16 {
        let s = a.connect(b.local_addr()).await.unwrap();
        let t = b.accept().await.unwrap();
        keep.push((s, t));
    }
    let before = rss_bytes();
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = a.connect(b.local_addr()).await.unwrap();
        let mut t = b.accept().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        t.read_exact(&mut buf).await.unwrap();
        pairs.push((s, t));
    }
    // Let delayed acknowledgements go out and buffers be released.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let after = rss_bytes();
    let per_end = after.saturating_sub(before) as f64 / (2 * n) as f64;
    println!("{n} idle sessions (2 ends each, both in this process)");
    println!(
        "  RSS growth {:.1} MiB",
        (after - before) as f64 / 1048576.0
    );
    println!("  per session end {:.1} KiB", per_end / 1024.0);
}
