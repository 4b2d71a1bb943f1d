//! Bulk throughput and 64-byte ping-pong latency of one roam stream against its baselines
//! (raw TCP, TLS 1.3 over TCP, a quinn stream; see [`Transport`]), each round running every
//! transport in turn on a fresh connection.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::transport::{Crypto, Transport};
use crate::{within, Bench, BoxError, Params, Row, Stat};

const CHUNK: usize = 64 * 1024;
const MSG: usize = 64;

/// The throughput benchmark's transports, in the order each round runs them.
const THROUGHPUT: [Transport; 6] = [
    Transport::Roam,
    Transport::RawTcp,
    Transport::RoamEncrypted,
    Transport::Tls,
    Transport::RoamChaCha,
    Transport::Quinn,
];
/// Its rows: (measured, baseline). Plaintext roam against raw TCP; encrypted roam (either
/// suite) against the encrypted baselines.
const THROUGHPUT_ROWS: [(Transport, Transport); 4] = [
    (Transport::Roam, Transport::RawTcp),
    (Transport::RoamEncrypted, Transport::Tls),
    (Transport::RoamChaCha, Transport::Tls),
    (Transport::RoamEncrypted, Transport::Quinn),
];
/// The latency benchmark's transports, and its rows.
const LATENCY: [Transport; 4] = [
    Transport::Roam,
    Transport::RawTcp,
    Transport::RoamEncrypted,
    Transport::Quinn,
];
const LATENCY_ROWS: [(Transport, Transport); 3] = [
    (Transport::Roam, Transport::RawTcp),
    (Transport::RoamEncrypted, Transport::RawTcp),
    (Transport::Roam, Transport::Quinn),
];

/// Samples per transport, in the order of `of`.
struct Samples<T> {
    of: Vec<Transport>,
    runs: Vec<Vec<T>>,
}

impl<T> Samples<T> {
    fn new(of: &[Transport]) -> Samples<T> {
        Samples {
            of: of.to_vec(),
            runs: of.iter().map(|_| Vec::new()).collect(),
        }
    }

    fn get(&self, t: Transport) -> &[T] {
        self.of
            .iter()
            .position(|&x| x == t)
            .map_or(&[], |i| &self.runs[i])
    }
}

/// The baselines of `rows`, described, without duplicates.
fn baselines(rows: &[(Transport, Transport)]) -> String {
    let mut v: Vec<&str> = Vec::new();
    for (_, b) in rows {
        if !v.contains(&b.describe()) {
            v.push(b.describe());
        }
    }
    v.join("; ")
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

/// Bulk throughput, one stream, `throughput_bytes` one way: MiB/s of roam and of each
/// baseline, with the ratios roam / baseline.
pub async fn throughput(p: &Params) -> Result<Bench, BoxError> {
    let mib = p.throughput_bytes as f64 / f64::from(1u32 << 20);
    let crypto = Crypto::new()?;
    let mut mibs = Samples::new(&THROUGHPUT);
    for _ in 0..p.rounds.max(1) {
        for (i, t) in THROUGHPUT.into_iter().enumerate() {
            let pair = t.pair(&crypto).await?;
            let secs = pump(pair.client, pair.server, p.throughput_bytes)
                .await
                .map_err(|e| format!("{}: {e}", t.short()))?
                .as_secs_f64();
            drop(pair.keep);
            mibs.runs[i].push(mib / secs);
        }
    }
    let rounds = p.rounds.max(1);
    let rows = THROUGHPUT_ROWS
        .iter()
        .map(|&(m, b)| {
            let name = if b == Transport::RawTcp {
                "bulk one stream, plaintext".to_string()
            } else {
                format!("bulk one stream, {} vs {}", m.short(), b.short())
            };
            Row::new(
                &name,
                "MiB/s",
                format!("min/max of {rounds} rounds"),
                Stat::min_max(mibs.get(m)),
                Some(Stat::min_max(mibs.get(b))),
            )
            .vs(b.short())
        })
        .collect();
    Ok(Bench {
        name: "throughput".into(),
        baseline: baselines(&THROUGHPUT_ROWS),
        rows,
        notes: vec![
            format!(
                "{mib:.0} MiB one way per round, 64 KiB writes; timed from the first write to \
                 end-of-stream at the reader; fresh connection each round, the transports \
                 interleaved (plaintext roam, raw TCP, encrypted roam, TLS, roam ChaCha20, quinn) \
                 in every round"
            ),
            "plaintext roam = EndpointConfig::insecure_plaintext (benchmarks only) against raw \
             TCP; encrypted roam (the default: AES-256-GCM sealed frames, negotiated) and roam \
             restricted to ChaCha20-Poly1305 against TLS 1.3 and quinn"
                .into(),
        ],
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

/// 64-byte ping-pong: p50/p99 round trip of roam and of each baseline.
pub async fn latency(p: &Params) -> Result<Bench, BoxError> {
    let rounds = p.rounds.max(1);
    let per = (p.latency_trips / rounds).max(1);
    let crypto = Crypto::new()?;
    let mut trips = Samples::new(&LATENCY);
    for _ in 0..rounds {
        for (i, t) in LATENCY.into_iter().enumerate() {
            let pair = t.pair(&crypto).await?;
            let times = ping_pong(pair.client, pair.server, per)
                .await
                .map_err(|e| format!("{}: {e}", t.short()))?;
            drop(pair.keep);
            trips.runs[i].push(times);
        }
    }
    let spread = format!("min/max of the {rounds} rounds' percentile");
    let mut rows = Vec::new();
    for (m, b) in LATENCY_ROWS {
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let stat = |t| {
                let runs = trips.get(t);
                Stat::pct_over(&runs.concat(), q, runs)
            };
            let name = if (m, b) == (Transport::Roam, Transport::RawTcp) {
                format!("64 B round trip {name}")
            } else if b == Transport::RawTcp {
                format!("64 B round trip {name}, {} vs {}", m.short(), b.short())
            } else {
                format!("64 B round trip {name}, vs {}", b.short())
            };
            rows.push(Row::new(&name, "µs", spread.clone(), stat(m), Some(stat(b))).vs(b.short()));
        }
    }
    Ok(Bench {
        name: "latency".into(),
        baseline: baselines(&LATENCY_ROWS),
        rows,
        notes: vec![format!(
            "{} round trips each ({rounds} rounds of {per}, fresh connection per round, \
             transports interleaved); one round trip = write 64 B, echo, read 64 B back",
            per * rounds
        )],
    })
}
