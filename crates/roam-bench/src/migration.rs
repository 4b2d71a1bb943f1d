//! Migration time of one stream with 0, 64 KiB, 1 MiB and 8 MiB in flight, against quinn's
//! `Endpoint::rebind` (with nothing in flight) measured interleaved with the 0-byte case.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::{Crypto, QuinnPair};
use crate::{host, within, Bench, BoxError, Params, Row, Stat};

/// Bound of each step of one migration or rebind.
const STEP: Duration = Duration::from_secs(20);
/// The hosts the mover (roam) or the quinn client moves between, in rotation; the peer or
/// server is 127.0.0.3.
const MOVER_HOSTS: [u8; 3] = [2, 4, 5];

/// Session buffers large enough that the mover can write 8 MiB the peer does not read.
fn config() -> roam::EndpointConfig {
    let mut c = roam::EndpointConfig::default();
    c.session.send_capacity = 16 << 20;
    c.session.recv_capacity = 16 << 20;
    c
}

/// One roam stream migrating between three endpoints, its peer on a fourth.
struct RoamMover {
    movers: Vec<roam::Endpoint>,
    _peer: roam::Endpoint,
    s: Option<roam::Stream>,
    t: roam::Stream,
    payload: Vec<u8>,
    sink: Vec<u8>,
    done: usize,
}

impl RoamMover {
    async fn new(in_flight: usize) -> Result<RoamMover, BoxError> {
        let cfg = config();
        let mut movers = Vec::new();
        for h in MOVER_HOSTS {
            movers.push(roam::Endpoint::bind_with(host(h), cfg.clone()).await?);
        }
        let peer = roam::Endpoint::bind_with(host(3), cfg).await?;
        let (s, t) = within(STEP, "roam connect", async {
            let (s, t) = tokio::join!(movers[0].connect(peer.local_addr()), peer.accept());
            Ok::<_, BoxError>((s?, t?))
        })
        .await?;
        Ok(RoamMover {
            movers,
            _peer: peer,
            s: Some(s),
            t,
            payload: vec![0xa5u8; in_flight],
            sink: vec![0u8; in_flight + 1],
            done: 0,
        })
    }

    /// One migration: its time in milliseconds, the image size in bytes, and the time of
    /// each phase (freeze, image bytes, thaw, marker delivered) in milliseconds.
    async fn step(&mut self) -> Result<(f64, usize, [f64; 4]), BoxError> {
        let i = self.done;
        let in_flight = self.payload.len();
        let mut s = self.s.take().ok_or("an earlier migration failed")?;
        // In flight: written by the mover, not read by the peer (which reads nothing now).
        within(STEP, "write in-flight data", s.write_all(&self.payload)).await?;
        let start = Instant::now();
        let image = within(STEP, "freeze", s.freeze()).await?;
        let frozen = Instant::now();
        let bytes = image.to_bytes();
        let image = roam::StreamImage::from_bytes(&bytes)?;
        let imaged = Instant::now();
        let to = &self.movers[(i + 1) % self.movers.len()];
        let mut s = within(STEP, "thaw", to.thaw(image)).await?;
        let thawed = Instant::now();
        let marker = i as u8;
        within(STEP, "write marker", s.write_all(&[marker])).await?;
        within(STEP, "peer read", self.t.read_exact(&mut self.sink)).await?;
        let end = Instant::now();
        let ms = (end - start).as_secs_f64() * 1e3;
        let phase = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let phases = [
            phase(start, frozen),
            phase(frozen, imaged),
            phase(imaged, thawed),
            phase(thawed, end),
        ];
        self.s = Some(s);
        self.done += 1;
        if self.sink[in_flight] != marker || self.sink[..in_flight].iter().any(|&b| b != 0xa5) {
            return Err(format!("migration {i}: the peer read wrong bytes").into());
        }
        Ok((ms, bytes.len(), phases))
    }
}

/// A quinn client with one open stream whose endpoint rebinds to a new UDP socket on another
/// 127.0.0.x address each step.
struct QuinnRebinder {
    q: QuinnPair,
    done: usize,
}

impl QuinnRebinder {
    async fn new(crypto: &Crypto) -> Result<QuinnRebinder, BoxError> {
        let q = QuinnPair::connect(crypto, host(MOVER_HOSTS[0])).await?;
        Ok(QuinnRebinder { q, done: 0 })
    }

    /// One rebind: the time in milliseconds from `Endpoint::rebind` until one byte written on
    /// the stream after it has been read by the server.
    async fn step(&mut self) -> Result<f64, BoxError> {
        let i = self.done;
        let h = MOVER_HOSTS[(i + 1) % MOVER_HOSTS.len()];
        // Bound before the clock starts, as roam's endpoints are.
        let sock = std::net::UdpSocket::bind(host(h))?;
        sock.set_nonblocking(true)?;
        let marker = i as u8;
        let mut got = [0u8; 1];
        let start = Instant::now();
        self.q.client.rebind(sock)?;
        within(STEP, "quinn write", self.q.send.write_all(&[marker])).await?;
        within(
            STEP,
            "quinn server read",
            self.q.server_recv.read_exact(&mut got),
        )
        .await?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        self.done += 1;
        if got[0] != marker {
            return Err(format!("rebind {i}: the server read a wrong byte").into());
        }
        let now = self.q.conns.1.remote_address();
        if now.ip() != host(h).ip() {
            return Err(format!("rebind {i}: the server still sees {now}").into());
        }
        Ok(ms)
    }
}

/// Percentile rows of `times` (milliseconds): p50 with p10/p90, p99 with p90/max.
fn percentiles(times: &[f64]) -> [(&'static str, Stat, &'static str); 2] {
    let s = crate::sorted(times);
    let at = |q| crate::pct(&s, q);
    let n = s.len();
    [
        (
            "p50",
            Stat {
                median: at(0.5),
                lo: at(0.1),
                hi: at(0.9),
                n,
            },
            "p10/p90",
        ),
        (
            "p99",
            Stat {
                median: at(0.99),
                lo: at(0.9),
                hi: at(1.0),
                n,
            },
            "p90/max",
        ),
    ]
}

fn label(in_flight: usize) -> String {
    if in_flight == 0 {
        "0 B".to_string()
    } else if in_flight >= 1 << 20 {
        format!("{} MiB", in_flight >> 20)
    } else {
        format!("{} KiB", in_flight >> 10)
    }
}

/// Migration time of one stream: freeze → image bytes → from_bytes → thaw on another
/// endpoint → first new byte delivered at the peer, with 0, 64 KiB, 1 MiB and 8 MiB in flight;
/// the 0-byte case alternates, migration by migration, with a quinn `Endpoint::rebind`.
pub async fn migration(p: &Params) -> Result<Bench, BoxError> {
    let cases = [
        (0usize, p.migrations),
        (64 << 10, p.migrations),
        (p.mid_in_flight, p.migrations),
        (p.big_in_flight, p.migrations_big),
    ];
    let crypto = Crypto::new()?;
    let mut quinn = Vec::new();
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    let mut phase_notes = Vec::new();
    for (in_flight, n) in cases {
        let n = n.max(1);
        let mut mover = RoamMover::new(in_flight).await?;
        let mut rebinder = if in_flight == 0 {
            Some(QuinnRebinder::new(&crypto).await?)
        } else {
            None
        };
        let mut times = Vec::with_capacity(n);
        let mut image = Vec::with_capacity(n);
        let mut phases: [Vec<f64>; 4] = Default::default();
        for _ in 0..n {
            let (ms, size, phase) = mover.step().await?;
            times.push(ms);
            image.push(size as f64);
            for (all, t) in phases.iter_mut().zip(phase) {
                all.push(t);
            }
            if let Some(r) = rebinder.as_mut() {
                quinn.push(r.step().await?);
            }
        }
        let label = label(in_flight);
        let base = if in_flight == 0 {
            Some(percentiles(&quinn))
        } else {
            None
        };
        for (k, (name, stat, spread)) in percentiles(&times).into_iter().enumerate() {
            let mut row = Row::new(
                &format!("{label} in flight {name}"),
                "ms",
                format!("{spread} of {n} migrations"),
                stat,
                base.map(|b| b[k].1),
            )
            .at(name, in_flight as f64);
            if base.is_some() {
                row = row.vs("quinn rebind");
            }
            rows.push(row);
        }
        sizes.push(format!("{label}: {:.0} B", Stat::min_max(&image).median));
        let p50 = |v: &[f64]| crate::pct(&crate::sorted(v), 0.5);
        phase_notes.push(format!(
            "{label}: freeze {:.3}, image {:.3}, thaw {:.3}, until the peer read the marker {:.3}",
            p50(&phases[0]),
            p50(&phases[1]),
            p50(&phases[2]),
            p50(&phases[3])
        ));
    }
    Ok(Bench {
        name: "migration".into(),
        baseline: "quinn rebind = quinn 0.11 Endpoint::rebind with nothing in flight (0 B rows)"
            .into(),
        rows,
        notes: vec![
            "timed per migration: from just before Stream::freeze (the mover has already \
             written the in-flight bytes, which the peer has not read) through to_bytes, \
             from_bytes, Endpoint::thaw on another endpoint (3 endpoints in rotation), the \
             mover writing 1 new byte, until the peer has read all in-flight bytes plus that \
             byte (so the in-flight cases include the peer reading them)"
                .into(),
            format!(
                "quinn rebind, {} times, alternating with the 0 B migrations: from \
                 Endpoint::rebind to a UDP socket already bound on another 127.0.0.x address \
                 (3 in rotation) until 1 byte written on the open stream after it has been \
                 read by the server; quinn moves no state (nothing in flight, same process), \
                 so it is a floor rather than a like-for-like migration",
                quinn.len()
            ),
            "session send/receive capacity 16 MiB on all roam endpoints, so 8 MiB fit unread"
                .into(),
            format!("median image size: {}", sizes.join(", ")),
            format!(
                "phases, p50 of each (ms; they need not add up to the total's p50): {}",
                phase_notes.join("; ")
            ),
        ],
    })
}
