//! `roam demo`: an application on host A streams pseudo-random data to an echo peer on host B;
//! mid-stream it is frozen and thawed on host C, and back, several times. Every byte is hashed
//! on both sides; the demo succeeds only if both directions match exactly.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::{Endpoint, Stream, StreamImage};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::DemoArgs;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CHUNK: usize = 64 * 1024;

/// One direction's running totals.
#[derive(Default)]
struct Tally {
    bytes: u64,
    hash: Sha256,
}

impl Tally {
    fn add(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        self.hash.update(b);
    }

    fn finish(self) -> (u64, [u8; 32]) {
        (self.bytes, self.hash.finalize().into())
    }
}

/// A migration whose "first byte after thaw" is still to be seen.
struct PendingMigration {
    n: u32,
    from: &'static str,
    to: &'static str,
    at_sent: u64,
    freeze: Duration,
    image_len: usize,
    unacked: usize,
    buffered: usize,
    thaw: Duration,
    started: Instant,
}

struct Timeline {
    t0: Instant,
    pending: Option<PendingMigration>,
    downtimes: Vec<Duration>,
}

impl Timeline {
    fn stamp(&self) -> String {
        format!("[{:>8.3}s]", self.t0.elapsed().as_secs_f64())
    }

    /// The first byte after the last migration arrived: print that migration's line.
    fn first_byte(&mut self) {
        if let Some(m) = self.pending.take() {
            let down = m.started.elapsed();
            self.downtimes.push(down);
            self.print(&m, &format!("first byte after {}", ms(down)));
        }
    }

    /// A migration follows the last one before any byte arrived: print the last one as such.
    fn no_byte(&mut self) {
        if let Some(m) = self.pending.take() {
            self.print(&m, "no byte before the next move");
        }
    }

    fn print(&self, m: &PendingMigration, resumed: &str) {
        say!(
            "{} migration {}: {} -> {} at {} sent",
            self.stamp(),
            m.n,
            m.from,
            m.to,
            size(m.at_sent)
        );
        say!(
            "             freeze {} | image {} ({} unacknowledged, {} buffered input) | thaw {} | {resumed}",
            ms(m.freeze),
            size(m.image_len as u64),
            size(m.unacked as u64),
            size(m.buffered as u64),
            ms(m.thaw),
        );
    }
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn size(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f >= K * K * K {
        format!("{:.2} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.1} KiB", f / K)
    } else {
        format!("{n} B")
    }
}

/// The echo peer: reads everything, writes it back, ends its write half at end of stream.
async fn echo_peer(ep: Endpoint) -> io::Result<(Tally, Tally)> {
    let mut t = ep
        .accept()
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e))?;
    let mut received = Tally::default();
    let mut echoed = Tally::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = t.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received.add(&buf[..n]);
        t.write_all(&buf[..n]).await?;
        echoed.add(&buf[..n]);
    }
    t.shutdown().await?;
    // Keep the stream until the application has read the echo to its end.
    let mut rest = [0u8; 1];
    let _ = t.read(&mut rest).await;
    Ok((received, echoed))
}

/// Run the application's I/O until `until` bytes are sent (and, when `finish`, to the end).
async fn leg(
    s: &mut Stream,
    rng: &mut ChaCha8Rng,
    sent: &mut Tally,
    recv: &mut Tally,
    timeline: &mut Timeline,
    until: u64,
    finish: bool,
) -> io::Result<()> {
    let (mut r, mut w) = s.split();
    let writer = async {
        let mut chunk = vec![0u8; CHUNK];
        while sent.bytes < until {
            let n = ((until - sent.bytes) as usize).min(CHUNK);
            rng.fill_bytes(&mut chunk[..n]);
            w.write_all(&chunk[..n]).await?;
            sent.add(&chunk[..n]);
            // Let the reader run between chunks, as a real application's event loop would.
            tokio::task::yield_now().await;
        }
        if finish {
            w.shutdown().await?;
        }
        Ok::<(), io::Error>(())
    };
    let reader = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            timeline.first_byte();
            recv.add(&buf[..n]);
        }
    };
    if finish {
        let (w, r) = tokio::join!(writer, reader);
        w.and(r)
    } else {
        tokio::select! {
            w = writer => w,
            r = reader => r.and(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer ended the stream early"))),
        }
    }
}

/// Run the demo; `Ok(true)` when every check held.
pub async fn run(args: DemoArgs) -> Result<bool, BoxError> {
    let [ha, hb, hc] = [args.hosts[0], args.hosts[1], args.hosts[2]];
    let a = Endpoint::bind(SocketAddr::new(ha, 0)).await?;
    let b = Endpoint::bind(SocketAddr::new(hb, 0)).await?;
    let c = Endpoint::bind(SocketAddr::new(hc, 0)).await?;
    say!("roam demo: three hosts on one machine");
    say!(
        "  host A  {:<22} application (sends, reads the echo)",
        a.local_addr()
    );
    say!("  host B  {:<22} echo peer (never moves)", b.local_addr());
    say!("  host C  {:<22} migration target", c.local_addr());
    say!(
        "  {} each way, {} planned migrations A <-> C mid-stream",
        size(args.bytes),
        args.migrations
    );
    say!("");

    let mut timeline = Timeline {
        t0: Instant::now(),
        pending: None,
        downtimes: Vec::new(),
    };
    let peer = tokio::spawn(echo_peer(b.clone()));
    let mut s = a.connect(b.local_addr()).await?;
    say!(
        "{} associated: session {} A -> B",
        timeline.stamp(),
        s.session_id()
    );

    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut sent = Tally::default();
    let mut recv = Tally::default();
    let hosts: [(&Endpoint, &'static str); 2] = [(&a, "A"), (&c, "C")];
    let mut here = 0usize;
    let m = u64::from(args.migrations);
    for k in 1..=m {
        let point = args.bytes * k / (m + 1);
        leg(
            &mut s,
            &mut rng,
            &mut sent,
            &mut recv,
            &mut timeline,
            point,
            false,
        )
        .await?;
        timeline.no_byte();
        let started = Instant::now();
        let image = s.freeze().await?;
        let freeze = started.elapsed();
        let bytes = image.to_bytes();
        let image = StreamImage::from_bytes(&bytes)?;
        let (unacked, buffered) = (image.unacked_bytes(), image.buffered_input_bytes());
        let thaw_start = Instant::now();
        let next = 1 - here;
        s = hosts[next].0.thaw(image).await?;
        let thaw = thaw_start.elapsed();
        timeline.pending = Some(PendingMigration {
            n: k as u32,
            from: hosts[here].1,
            to: hosts[next].1,
            at_sent: sent.bytes,
            freeze,
            image_len: bytes.len(),
            unacked,
            buffered,
            thaw,
            started,
        });
        here = next;
    }
    leg(
        &mut s,
        &mut rng,
        &mut sent,
        &mut recv,
        &mut timeline,
        args.bytes,
        true,
    )
    .await?;
    // A migration right at the end may have had no byte after it.
    timeline.no_byte();
    let epoch = s.epoch();
    let stats = s.stats();
    drop(s);
    let (peer_recv, peer_echoed) = peer.await??;
    let elapsed = timeline.t0.elapsed();
    say!(
        "{} transfer complete: {} each way in {:.2} s",
        timeline.stamp(),
        size(args.bytes),
        elapsed.as_secs_f64()
    );
    say!("");

    let (sent_n, sent_h) = sent.finish();
    let (precv_n, precv_h) = peer_recv.finish();
    let (pecho_n, pecho_h) = peer_echoed.finish();
    let (recv_n, recv_h) = recv.finish();
    let up = sent_n == precv_n && sent_h == precv_h && sent_n == args.bytes;
    let down = pecho_n == recv_n && pecho_h == recv_h && recv_n == args.bytes;
    let moved = epoch.0 == m;
    say!("verification");
    say!(
        "  A -> B  sent {:>10}  received {:>10}  sha256 {}  {}",
        size(sent_n),
        size(precv_n),
        &hex::encode(sent_h)[..16],
        verdict(up)
    );
    say!(
        "  B -> A  sent {:>10}  received {:>10}  sha256 {}  {}",
        size(pecho_n),
        size(recv_n),
        &hex::encode(recv_h)[..16],
        verdict(down)
    );
    say!(
        "  migrations completed {}/{} (epoch {}), replayed {}, duplicates dropped {}  {}",
        epoch.0,
        m,
        epoch,
        size(stats.bytes_replayed),
        size(stats.bytes_duplicate),
        verdict(moved)
    );
    if let Some(med) = median(&mut timeline.downtimes) {
        say!(
            "  median time from freeze to first byte on the new host: {}",
            ms(med)
        );
    }
    let stream_ok = up && down && moved;
    say!("");
    let udp_ok = crate::demo_udp::run(
        [ha, hb, hc],
        args.readings,
        args.migrations.min(2).max(u32::from(args.migrations > 0)),
        args.collectors as usize,
    )
    .await?;
    let ok = stream_ok && udp_ok;
    say!("");
    say!(
        "{}",
        if ok {
            "result: OK - nothing lost, duplicated or reordered"
        } else {
            "result: FAILED"
        }
    );
    Ok(ok)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISMATCH"
    }
}

fn median(v: &mut [Duration]) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some(v[v.len() / 2])
}
