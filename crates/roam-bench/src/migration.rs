//! Migration time of one stream with 0, 64 KiB and 8 MiB in flight.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{host, within, Bench, BoxError, Params, Row, Stat};

/// Session buffers large enough that the mover can write 8 MiB the peer does not read.
fn config() -> roam::EndpointConfig {
    let mut c = roam::EndpointConfig::default();
    c.session.send_capacity = 16 << 20;
    c.session.recv_capacity = 16 << 20;
    c
}

/// `n` migrations with `in_flight` bytes in flight; each one's time in milliseconds, and the
/// median image size in bytes.
async fn migrate(n: usize, in_flight: usize) -> Result<(Vec<f64>, f64), BoxError> {
    let cfg = config();
    let movers = [
        roam::Endpoint::bind_with(host(2), cfg.clone()).await?,
        roam::Endpoint::bind_with(host(4), cfg.clone()).await?,
        roam::Endpoint::bind_with(host(5), cfg.clone()).await?,
    ];
    let peer = roam::Endpoint::bind_with(host(3), cfg).await?;
    let (s, t) = tokio::join!(movers[0].connect(peer.local_addr()), peer.accept());
    let (mut s, mut t) = (s?, t?);
    let payload = vec![0xa5u8; in_flight];
    let mut sink = vec![0u8; in_flight + 1];
    let limit = Duration::from_secs(20);
    let mut times = Vec::with_capacity(n);
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        // In flight: written by the mover, not read by the peer (which reads nothing now).
        within(limit, "write in-flight data", s.write_all(&payload)).await?;
        let start = Instant::now();
        let image = within(limit, "freeze", s.freeze()).await?;
        let bytes = image.to_bytes();
        let image = roam::StreamImage::from_bytes(&bytes)?;
        s = within(limit, "thaw", movers[(i + 1) % movers.len()].thaw(image)).await?;
        let marker = i as u8;
        within(limit, "write marker", s.write_all(&[marker])).await?;
        within(limit, "peer read", t.read_exact(&mut sink)).await?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        sizes.push(bytes.len() as f64);
        if sink[in_flight] != marker || sink[..in_flight].iter().any(|&b| b != 0xa5) {
            return Err(format!("migration {i}: the peer read wrong bytes").into());
        }
    }
    Ok((times, Stat::min_max(&sizes).median))
}

/// Migration time of one stream: freeze → image bytes → from_bytes → thaw on another
/// endpoint → first new byte delivered at the peer, with 0, 64 KiB and 8 MiB in flight.
pub async fn migration(p: &Params) -> Result<Bench, BoxError> {
    let cases = [
        (0usize, p.migrations),
        (64 << 10, p.migrations),
        (p.big_in_flight, p.migrations_big),
    ];
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    for (in_flight, n) in cases {
        let n = n.max(1);
        let (times, image) = migrate(n, in_flight).await?;
        let label = if in_flight == 0 {
            "0 B".to_string()
        } else if in_flight >= 1 << 20 {
            format!("{} MiB", in_flight >> 20)
        } else {
            format!("{} KiB", in_flight >> 10)
        };
        let s = crate::sorted(&times);
        let at = |q| crate::pct(&s, q);
        for (name, (median, lo, hi), spread) in [
            ("p50", (at(0.5), at(0.1), at(0.9)), "p10/p90"),
            ("p99", (at(0.99), at(0.9), at(1.0)), "p90/max"),
        ] {
            rows.push(Row::new(
                &format!("{label} in flight {name}"),
                "ms",
                format!("{spread} of {n} migrations"),
                Stat { median, lo, hi, n },
                None,
            ));
        }
        sizes.push(format!("{label}: {image:.0} B"));
    }
    Ok(Bench {
        name: "migration".into(),
        baseline: "none yet (quinn rebind is future work)".into(),
        rows,
        notes: vec![
            "timed per migration: from just before Stream::freeze (the mover has already \
             written the in-flight bytes, which the peer has not read) through to_bytes, \
             from_bytes, Endpoint::thaw on another endpoint (3 endpoints in rotation), the \
             mover writing 1 new byte, until the peer has read all in-flight bytes plus that \
             byte (so the in-flight cases include the peer reading them)"
                .into(),
            "session send/receive capacity 16 MiB on all endpoints, so 8 MiB fit unread".into(),
            format!("median image size: {}", sizes.join(", ")),
        ],
    })
}
