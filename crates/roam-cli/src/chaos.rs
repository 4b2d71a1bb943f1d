//! `roam chaos`: a fault-injecting relay for trying roam (or anything else) under a bad network.
//!
//! `roam chaos tcp` forwards every TCP connection accepted on `--listen` to `--to`, and resets,
//! stalls and slows them (`roam_testkit::Relay` with `TcpFaults`); `roam chaos udp` relays
//! datagrams and drops, duplicates, reorders, delays and corrupts them (`roam_testkit::UdpRelay`).
//! Every random decision comes from a seeded generator per flow, so a run can be replayed. Both
//! print what they did when stopped (Ctrl-C, SIGTERM or `--duration`).

use std::net::SocketAddr;
use std::time::Duration;

use roam_testkit::{Faults, Relay, RelayStats, TcpFaults, UdpRelay, UdpRelayStats};

/// `roam chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    #[command(subcommand)]
    pub proto: Proto,
}

/// Which relay.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Proto {
    /// Relay TCP connections: periodic and random resets, stalls, bandwidth limit.
    Tcp(TcpArgs),
    /// Relay UDP datagrams: drop, duplicate, reorder, delay, corrupt.
    Udp(UdpArgs),
}

/// Options every relay takes.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address to relay to.
    #[arg(long)]
    pub to: SocketAddr,
    /// Seed of the random decisions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stop after this long (e.g. 30s) instead of waiting for Ctrl-C / SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// `roam chaos tcp`.
#[derive(clap::Args, Debug, Clone)]
pub struct TcpArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Reset every relayed connection (both sides get a TCP RST) this often, e.g. 500ms.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub reset_every: Option<Duration>,
    /// Probability, per chunk read (≤ 64 KiB), that its connection is reset.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub reset: f64,
    /// Probability, per chunk read, that its direction pauses for --stall-for.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub stall: f64,
    /// How long a stall lasts.
    #[arg(long, default_value = "200ms", value_parser = parse_duration, value_name = "DURATION")]
    pub stall_for: Duration,
    /// Bandwidth limit of each direction of each connection, bytes per second (K, M, G).
    #[arg(long, value_parser = crate::parse_size, value_name = "BYTES_PER_S")]
    pub slow: Option<u64>,
}

/// `roam chaos udp`.
#[derive(clap::Args, Debug, Clone)]
pub struct UdpArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Probability that a datagram is dropped.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub drop: f64,
    /// Probability that a datagram is sent twice.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub dup: f64,
    /// Probability that a datagram is held back and sent after the next one.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub reorder: f64,
    /// Probability that one bit of a datagram is flipped.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub corrupt: f64,
    /// Delay of every datagram: a fixed `5ms` or a uniform range `1ms..20ms`.
    #[arg(long, value_parser = parse_delay, value_name = "DURATION[..DURATION]")]
    pub delay: Option<(Duration, Duration)>,
}

/// A probability in `[0, 1]`.
fn rate(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a probability (e.g. 0.01)"))?;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("{s} is not in [0, 1]"));
    }
    Ok(p)
}

/// `500ms`, `2s`, `1.5s`, `100us`, `1m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 2s)"))?;
    let secs = match unit {
        "" | "ms" => v / 1e3,
        "us" => v / 1e6,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (us, ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// `5ms` (fixed) or `1ms..20ms` (uniform).
fn parse_delay(s: &str) -> Result<(Duration, Duration), String> {
    match s.split_once("..") {
        Some((a, b)) => Ok((parse_duration(a)?, parse_duration(b)?)),
        None => {
            let d = parse_duration(s)?;
            Ok((d, d))
        }
    }
}

/// Run the relay until stopped; prints the statistics at the end.
pub async fn run(args: ChaosArgs) -> Result<(), String> {
    match args.proto {
        Proto::Tcp(a) => tcp(a).await,
        Proto::Udp(a) => udp(a).await,
    }
}

async fn tcp(a: TcpArgs) -> Result<(), String> {
    let c = &a.common;
    let relay = Relay::start(c.listen, c.to)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", c.listen))?;
    let faults = TcpFaults {
        seed: c.seed,
        reset: a.reset,
        stall: a.stall,
        stall_for: a.stall_for,
        rate: a.slow,
    };
    relay.set_faults(faults);
    say!(
        "roam chaos tcp: listening on {}, relaying to {} (seed {}, reset every {}, reset {}, stall {} for {:?}, slow {})",
        relay.local_addr(),
        c.to,
        c.seed,
        a.reset_every.map_or("never".into(), |d| format!("{d:?}")),
        a.reset,
        a.stall,
        a.stall_for,
        a.slow.map_or("off".into(), |r| format!("{r} B/s")),
    );
    let mut periodic = 0u64;
    let mut rounds = 0u64;
    let stop = stop_signal(c.duration);
    tokio::pin!(stop);
    match a.reset_every {
        Some(every) if !every.is_zero() => {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = tick.tick() => {
                        rounds += 1;
                        periodic += relay.kill_all() as u64;
                    }
                }
            }
        }
        _ => stop.await,
    }
    relay.shutdown();
    print_tcp(&relay.stats(), rounds, periodic);
    Ok(())
}

fn print_tcp(s: &RelayStats, rounds: u64, periodic: u64) {
    say!("roam chaos tcp: stopped");
    say!("  connections accepted   {}", s.accepted);
    say!(
        "  connections reset      {} ({} by --reset-every in {} rounds, {} by --reset, the rest at shutdown)",
        s.killed,
        periodic,
        rounds,
        s.fault_resets
    );
    say!("  stalls                 {}", s.stalls);
    say!("  bytes client→target    {}", s.bytes_up);
    say!("  bytes target→client    {}", s.bytes_down);
}

async fn udp(a: UdpArgs) -> Result<(), String> {
    let c = &a.common;
    let faults = Faults {
        seed: c.seed,
        drop: a.drop,
        duplicate: a.dup,
        reorder: a.reorder,
        delay: a.delay,
        corrupt: a.corrupt,
    };
    let relay = UdpRelay::start(c.listen, c.to, faults)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", c.listen))?;
    say!(
        "roam chaos udp: listening on {}, relaying to {} (seed {}, drop {}, dup {}, reorder {}, corrupt {}, delay {})",
        relay.local_addr(),
        c.to,
        c.seed,
        a.drop,
        a.dup,
        a.reorder,
        a.corrupt,
        a.delay
            .map_or("none".into(), |(lo, hi)| format!("{lo:?}..{hi:?}")),
    );
    stop_signal(c.duration).await;
    let stats = relay.stats();
    relay.shutdown();
    print_udp(&stats);
    Ok(())
}

fn print_udp(s: &UdpRelayStats) {
    say!("roam chaos udp: stopped ({} clients)", s.clients);
    say!(
        "  {:<10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "direction",
        "received",
        "forwarded",
        "dropped",
        "dup",
        "reorder",
        "delayed",
        "corrupt",
        "overflow"
    );
    for (name, d) in [("up", &s.up), ("down", &s.down)] {
        say!(
            "  {:<10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
            name,
            d.received,
            d.forwarded,
            d.dropped,
            d.duplicated,
            d.reordered,
            d.delayed,
            d.corrupted,
            d.overflowed
        );
    }
    if s.rejected + s.foreign > 0 {
        say!(
            "  discarded: {} from clients over the limit, {} from other than the target",
            s.rejected,
            s.foreign
        );
    }
}

/// Completes on Ctrl-C, SIGTERM, or after `limit`.
async fn stop_signal(limit: Option<Duration>) {
    let limit = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                () = limit => {}
            }
            return;
        }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = limit => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(
            parse_delay("1ms..20ms"),
            Ok((Duration::from_millis(1), Duration::from_millis(20)))
        );
        assert_eq!(
            parse_delay("5ms"),
            Ok((Duration::from_millis(5), Duration::from_millis(5)))
        );
    }

    #[test]
    fn rates_are_probabilities() {
        assert_eq!(rate("0.05"), Ok(0.05));
        assert!(rate("1.5").is_err());
        assert!(rate("-0.1").is_err());
        assert!(rate("x").is_err());
    }
}
