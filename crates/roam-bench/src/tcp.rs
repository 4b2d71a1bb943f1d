//! Bulk throughput and 64-byte ping-pong latency: one roam stream against one raw tokio
//! `TcpStream` (nodelay on both), rounds interleaved.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{host, within, Bench, BoxError, Params, Row, Stat};

const CHUNK: usize = 64 * 1024;
const MSG: usize = 64;

/// A connected raw TCP pair, 127.0.0.2 → 127.0.0.3, nodelay on both ends.
async fn raw_pair() -> Result<(TcpStream, TcpStream), BoxError> {
    let l = TcpListener::bind(host(3)).await?;
    let addr = l.local_addr()?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(host(2))?;
    let (c, s) = tokio::join!(sock.connect(addr), l.accept());
    let (c, (s, _)) = (c?, s?);
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

/// A connected roam pair on endpoints at 127.0.0.2 and 127.0.0.3 (the endpoints are returned
/// too: they must outlive the streams).
async fn roam_pair() -> Result<(roam::Stream, roam::Stream, [roam::Endpoint; 2]), BoxError> {
    let a = roam::Endpoint::bind(host(2)).await?;
    let b = roam::Endpoint::bind(host(3)).await?;
    let (s, t) = tokio::join!(a.connect(b.local_addr()), b.accept());
    Ok((s?, t?, [a, b]))
}

/// Write `total` bytes on `w`, read them on `r`; the time from the first write to the end of
/// stream at the reader.
async fn pump<W, R>(mut w: W, mut r: R, total: u64) -> Result<Duration, BoxError>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let limit = Duration::from_secs(60 + total / (16 << 20));
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; CHUNK];
        let mut sent = 0u64;
        while sent < total {
            let n = ((total - sent) as usize).min(CHUNK);
            w.write_all(&buf[..n]).await?;
            sent += n as u64;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let reader = async {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok::<_, std::io::Error>(got)
    };
    let got = within(limit, "bulk transfer", reader).await;
    let elapsed = start.elapsed();
    let w = within(limit, "bulk writer", async { writer.await? }).await;
    let got = got?;
    drop(w?);
    if got != total {
        return Err(format!("bulk transfer: read {got} bytes of {total}").into());
    }
    Ok(elapsed)
}

/// Bulk throughput, one stream, `throughput_bytes` one way: MiB/s of roam and raw TCP.
pub async fn throughput(p: &Params) -> Result<Bench, BoxError> {
    let mib = p.throughput_bytes as f64 / f64::from(1u32 << 20);
    let (mut roam, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..p.rounds.max(1) {
        let (s, t, eps) = roam_pair().await?;
        roam.push(mib / pump(s, t, p.throughput_bytes).await?.as_secs_f64());
        drop(eps);
        let (c, s) = raw_pair().await?;
        raw.push(mib / pump(c, s, p.throughput_bytes).await?.as_secs_f64());
    }
    Ok(Bench {
        name: "throughput".into(),
        baseline: "raw tokio TcpStream, nodelay".into(),
        rows: vec![Row::new(
            "bulk one stream",
            "MiB/s",
            format!("min/max of {} rounds", roam.len()),
            Stat::min_max(&roam),
            Some(Stat::min_max(&raw)),
        )],
        notes: vec![format!(
            "{mib:.0} MiB one way per round, 64 KiB writes; timed from the first write to \
             end-of-stream at the reader; fresh connection each round, roam and raw interleaved"
        )],
    })
}

/// `trips` 64-byte round trips (client writes 64 bytes, server echoes them); each one's time in
/// microseconds.
async fn ping_pong<C, S>(mut c: C, mut s: S, trips: usize) -> Result<Vec<f64>, BoxError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; MSG];
        for _ in 0..trips {
            s.read_exact(&mut buf).await?;
            s.write_all(&buf).await?;
        }
        Ok::<_, std::io::Error>(s)
    });
    let limit = Duration::from_secs(30 + trips as u64 / 1000);
    let client = async {
        let mut times = Vec::with_capacity(trips);
        let mut msg = [0u8; MSG];
        let mut back = [0u8; MSG];
        for i in 0..trips {
            msg[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let t = Instant::now();
            c.write_all(&msg).await?;
            c.read_exact(&mut back).await?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
            if back != msg {
                return Err(std::io::Error::other("echo differs"));
            }
        }
        Ok(times)
    };
    let times = within(limit, "ping-pong", client).await;
    if times.is_err() {
        echo.abort();
    }
    let times = times?;
    drop(within(limit, "echo", async { echo.await? }).await?);
    Ok(times)
}

/// 64-byte ping-pong: p50/p99 round trip of roam and raw TCP.
pub async fn latency(p: &Params) -> Result<Bench, BoxError> {
    let rounds = p.rounds.max(1);
    let per = (p.latency_trips / rounds).max(1);
    let (mut roam, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (s, t, eps) = roam_pair().await?;
        roam.push(ping_pong(s, t, per).await?);
        drop(eps);
        let (c, s) = raw_pair().await?;
        raw.push(ping_pong(c, s, per).await?);
    }
    let all = |v: &[Vec<f64>]| v.concat();
    let spread = format!("min/max of the {rounds} rounds' percentile");
    let row = |name: &str, q: f64| {
        Row::new(
            name,
            "µs",
            spread.clone(),
            Stat::pct_over(&all(&roam), q, &roam),
            Some(Stat::pct_over(&all(&raw), q, &raw)),
        )
    };
    Ok(Bench {
        name: "latency".into(),
        baseline: "raw tokio TcpStream, nodelay".into(),
        rows: vec![
            row("64 B round trip p50", 0.5),
            row("64 B round trip p99", 0.99),
        ],
        notes: vec![format!(
            "{} round trips each ({rounds} rounds of {per}, fresh connection per round, \
             interleaved); one round trip = write 64 B, echo, read 64 B back",
            per * rounds
        )],
    })
}
