//! Bulk throughput of one roam stream against raw tokio TCP on loopback, measured in the same
//! run and printed as a ratio (a quick check; the full benchmark suite is `roam bench`).
//!
//! `cargo run --release -p roam --example throughput -- [MiB] [rounds]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

async fn pump<W, R>(mut w: W, mut r: R, total: u64) -> Duration
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; CHUNK];
        let mut sent = 0u64;
        while sent < total {
            let n = ((total - sent) as usize).min(CHUNK);
            w.write_all(&buf[..n]).await.unwrap();
            sent += n as u64;
        }
        w.shutdown().await.unwrap();
        w
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, total);
    let elapsed = start.elapsed();
    drop(writer.await.unwrap());
    elapsed
}

async fn raw(total: u64) -> Duration {
    let l = TcpListener::bind("127.0.0.3:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    let c = c.unwrap();
    let (s, _) = s.unwrap();
    c.set_nodelay(true).unwrap();
    s.set_nodelay(true).unwrap();
    pump(c, s, total).await
}

async fn roam(total: u64) -> Duration {
    let a = roam::Endpoint::bind(SocketAddr::from(([127, 0, 0, 2], 0)))
        .await
        .unwrap();
    let b = roam::Endpoint::bind(SocketAddr::from(([127, 0, 0, 3], 0)))
        .await
        .unwrap();
    let s = a.connect(b.local_addr()).await.unwrap();
    let t = b.accept().await.unwrap();
    pump(s, t, total).await
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let total = mib << 20;
    let (mut r, mut t) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // Interleaved, so both see the same machine conditions.
        r.push(mib as f64 / raw(total).await.as_secs_f64());
        t.push(mib as f64 / roam(total).await.as_secs_f64());
    }
    let (r, t) = (median(r), median(t));
    println!("bulk, one stream, {mib} MiB x {rounds} rounds (median MiB/s)");
    println!("  raw tokio TCP  {r:>8.0}");
    println!("  roam           {t:>8.0}");
    println!("  ratio roam/raw {:>8.2}", t / r);
}
