//! The roam benchmark suite behind `roam bench`: roam against raw tokio TCP and UDP, TLS 1.3
//! over TCP (tokio-rustls) and quinn (QUIC) on loopback (distinct 127.0.0.x addresses), all
//! measured in the same run and interleaved round by round, so they see the same machine
//! conditions.
//!
//! Every benchmark returns a [`Bench`]: rows of figures, each a median over repeated runs
//! with its spread, the baseline next to it and the ratio roam / baseline. [`Report`] adds the
//! machine and serializes to JSON; [`Bench::table`] renders the human table and
//! [`migration_chart`] draws the migration benchmark as an SVG chart.
//!
//! Every loop is bounded by a count and every wait by a timeout; only loopback addresses are
//! used.

use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

mod chart;
mod migration;
mod sessions;
mod tcp;
mod transport;
mod udp;

pub use chart::{migration_chart, write_migration_chart};
pub use migration::migration;
pub use sessions::sessions;
pub use tcp::{latency, throughput};
pub use udp::udp;

/// Errors of a benchmark run (setup failures, I/O errors, timeouts).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The benchmarks, in the order `roam bench` runs them. `sessions` runs first: memory the
/// other benchmarks freed stays in the process and would hide part of its RSS growth.
pub const NAMES: [&str; 5] = ["sessions", "throughput", "latency", "migration", "udp"];

/// Sizes and counts of one run. [`Params::full`] is `roam bench`, [`Params::quick`] is
/// `roam bench --quick`, [`Params::tiny`] is for tests.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Interleaved rounds (roam, then baseline) of the throughput, latency and UDP benchmarks.
    pub rounds: usize,
    /// Bytes sent one way per throughput round.
    pub throughput_bytes: u64,
    /// 64-byte round trips in all latency rounds together.
    pub latency_trips: usize,
    /// Migrations with 0, 64 KiB and 1 MiB in flight, and quinn rebinds.
    pub migrations: usize,
    /// Migrations with 8 MiB in flight (200 in the full suite, as issue 8 asks of every case).
    pub migrations_big: usize,
    /// Bytes in flight of the middle migration case (1 MiB; smaller in tests).
    pub mid_in_flight: usize,
    /// Bytes in flight of the large migration case (8 MiB; smaller in tests).
    pub big_in_flight: usize,
    /// Concurrent idle sessions (scaled down to the fd limit).
    pub idle_sessions: usize,
    /// Sessions frozen and thawed as one batch.
    pub batch_sessions: usize,
    /// Batch migrations (alternating between two endpoints).
    pub batch_rounds: usize,
    /// Datagrams per UDP throughput round.
    pub udp_datagrams: u64,
    /// Peers of the re-association benchmark.
    pub udp_peers: usize,
    /// Re-associations measured.
    pub udp_reassoc_rounds: usize,
}

impl Params {
    /// The full suite.
    pub fn full() -> Params {
        Params {
            rounds: 5,
            throughput_bytes: 1 << 30,
            latency_trips: 20_000,
            migrations: 200,
            migrations_big: 200,
            mid_in_flight: 1 << 20,
            big_in_flight: 8 << 20,
            idle_sessions: 10_000,
            batch_sessions: 1_000,
            batch_rounds: 5,
            udp_datagrams: 200_000,
            udp_peers: 100,
            udp_reassoc_rounds: 10,
        }
    }

    /// `--quick`: the same benchmarks, smaller (a minute or less).
    pub fn quick() -> Params {
        Params {
            rounds: 3,
            throughput_bytes: 64 << 20,
            latency_trips: 2_000,
            migrations: 30,
            migrations_big: 10,
            mid_in_flight: 1 << 20,
            big_in_flight: 8 << 20,
            idle_sessions: 1_000,
            batch_sessions: 200,
            batch_rounds: 3,
            udp_datagrams: 20_000,
            udp_peers: 20,
            udp_reassoc_rounds: 5,
        }
    }

    /// Tiny sizes for the smoke test (seconds in total, numbers meaningless).
    pub fn tiny() -> Params {
        Params {
            rounds: 2,
            throughput_bytes: 1 << 20,
            latency_trips: 100,
            migrations: 3,
            migrations_big: 2,
            mid_in_flight: 128 << 10,
            big_in_flight: 256 << 10,
            idle_sessions: 20,
            batch_sessions: 10,
            batch_rounds: 2,
            udp_datagrams: 500,
            udp_peers: 3,
            udp_reassoc_rounds: 2,
        }
    }
}

/// One figure over repeated runs: the median and its spread (`lo`..`hi`, what they are is
/// named by [`Row::spread`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Low end of the spread.
    pub lo: f64,
    /// High end of the spread.
    pub hi: f64,
    /// Number of samples.
    pub n: usize,
}

impl Stat {
    /// Median with min/max of `v` (empty: all zero).
    pub fn min_max(v: &[f64]) -> Stat {
        let s = sorted(v);
        Stat {
            median: pct(&s, 0.5),
            lo: s.first().copied().unwrap_or(0.0),
            hi: s.last().copied().unwrap_or(0.0),
            n: s.len(),
        }
    }

    /// Percentile `p` (0..=1) of `v` with min/max of the per-run percentiles `runs`.
    fn pct_over(all: &[f64], p: f64, runs: &[Vec<f64>]) -> Stat {
        let per_run: Vec<f64> = runs.iter().map(|r| pct(&sorted(r), p)).collect();
        let spread = Stat::min_max(&per_run);
        Stat {
            median: pct(&sorted(all), p),
            lo: spread.lo,
            hi: spread.hi,
            n: all.len(),
        }
    }
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

/// Nearest-rank percentile of sorted `s`.
fn pct(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// One line of a benchmark's table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What is measured, e.g. `"bulk MiB/s"`.
    pub name: String,
    /// Unit of `roam` and `baseline`.
    pub unit: String,
    /// What `lo`/`hi` are, e.g. `"min/max of 5 rounds"`.
    pub spread: String,
    /// roam's figure.
    pub roam: Stat,
    /// The baseline's figure, measured in the same run, if there is one.
    pub baseline: Option<Stat>,
    /// roam / baseline of the medians.
    pub ratio: Option<f64>,
    /// The baseline's short name (e.g. `"raw TCP"`, `"quinn"`), empty if there is none.
    pub against: String,
    /// Where the row sits in a chartable series, if it does (the migration rows).
    pub point: Option<Point>,
}

/// A row's place in a series: `series` (e.g. `"p50"`) at `x` (e.g. bytes in flight).
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// The series, e.g. `"p50"`.
    pub series: String,
    /// The independent variable, e.g. bytes in flight.
    pub x: f64,
}

impl Row {
    fn new(name: &str, unit: &str, spread: String, roam: Stat, baseline: Option<Stat>) -> Row {
        let ratio = baseline
            .filter(|b| b.median != 0.0)
            .map(|b| roam.median / b.median);
        Row {
            name: name.into(),
            unit: unit.into(),
            spread,
            roam,
            baseline,
            ratio,
            against: String::new(),
            point: None,
        }
    }

    /// Name the baseline.
    fn vs(mut self, against: &str) -> Row {
        self.against = against.into();
        self
    }

    /// Place the row in series `series` at `x`.
    fn at(mut self, series: &str, x: f64) -> Row {
        self.point = Some(Point {
            series: series.into(),
            x,
        });
        self
    }
}

/// The result of one benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Bench {
    /// One of [`NAMES`].
    pub name: String,
    /// What the baselines are (e.g. `"raw tokio TcpStream"`), empty or `"none"` if none.
    pub baseline: String,
    /// The figures.
    pub rows: Vec<Row>,
    /// What exactly was measured, and anything adjusted (e.g. a count scaled down).
    pub notes: Vec<String>,
}

impl Bench {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let base = if self.baseline.is_empty() {
            "none"
        } else {
            &self.baseline
        };
        let _ = writeln!(out, "{}  (baselines: {base})", self.name);
        let names: Vec<String> = self
            .rows
            .iter()
            .map(|r| format!("{} ({})", r.name, r.unit))
            .collect();
        let w = names
            .iter()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .max(6);
        let _ = writeln!(
            out,
            "  {:<w$} {:>10} {:>21}  {:<12} {:>10} {:>21} {:>6}  spread",
            "figure", "roam", "[lo .. hi]", "against", "baseline", "[lo .. hi]", "ratio"
        );
        for (r, name) in self.rows.iter().zip(&names) {
            let (b, bs) = match r.baseline {
                Some(b) => (num(b.median), format!("[{} .. {}]", num(b.lo), num(b.hi))),
                None => ("-".into(), String::new()),
            };
            let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}"));
            let against = if r.against.is_empty() {
                "-"
            } else {
                &r.against
            };
            // `{:<w$}` pads by chars, so "µs" lines up like the others.
            let _ = writeln!(
                out,
                "  {:<w$} {:>10} {:>21}  {:<12} {:>10} {:>21} {:>6}  {}",
                name,
                num(r.roam.median),
                format!("[{} .. {}]", num(r.roam.lo), num(r.roam.hi)),
                against,
                b,
                bs,
                ratio,
                r.spread
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out
    }
}

/// A number with about four significant digits.
fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `std::thread::available_parallelism`.
    pub cpus: usize,
    /// `/proc/version`.
    pub kernel: String,
    /// `/proc/self/limits` "Max open files" (soft), if readable.
    pub max_open_files: Option<u64>,
}

impl Machine {
    /// Look at this machine.
    pub fn detect() -> Machine {
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/version")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            max_open_files: fd_limit(),
        }
    }
}

/// The whole run, as `roam bench --json` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// Whether `--quick`.
    pub quick: bool,
    /// The sizes and counts used.
    pub params: Params,
    /// One entry per benchmark run.
    pub benches: Vec<Bench>,
}

impl Report {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Run the benchmark called `name` (one of [`NAMES`]).
pub async fn run(name: &str, p: &Params) -> Result<Bench, BoxError> {
    let mut b = run_one(name, p).await?;
    // Rows with a baseline that did not name it compare against the benchmark's one baseline.
    for r in &mut b.rows {
        if r.baseline.is_some() && r.against.is_empty() {
            r.against.clone_from(&b.baseline);
        }
    }
    Ok(b)
}

async fn run_one(name: &str, p: &Params) -> Result<Bench, BoxError> {
    match name {
        "throughput" => throughput(p).await,
        "latency" => latency(p).await,
        "migration" => migration(p).await,
        "sessions" => sessions(p).await,
        "udp" => udp(p).await,
        _ => Err(format!("unknown benchmark {name:?} (one of {})", NAMES.join(", ")).into()),
    }
}

/// `127.0.0.host:0`.
pub(crate) fn host(h: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, h)), 0)
}

/// Await `f` for at most `limit`, naming `what` in the error.
pub(crate) async fn within<T, E>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, BoxError>
where
    E: Into<BoxError>,
{
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(format!("{what}: timed out after {limit:?}").into()),
    }
}

/// Resident memory of this process (`VmRSS`), bytes; 0 if unknown.
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The soft limit on open files from `/proc/self/limits`.
pub fn fd_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_ratio() {
        let s = Stat::min_max(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.lo, s.hi, s.n), (2.0, 1.0, 3.0, 3));
        let r = Row::new("x", "u", String::new(), s, Some(Stat::min_max(&[4.0])));
        assert_eq!(r.ratio, Some(0.5));
        assert_eq!(pct(&[], 0.5), 0.0);
        assert!(fd_limit().is_some_and(|n| n > 0));
    }
}
