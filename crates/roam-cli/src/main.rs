//! `roam`: the command-line tool. `roam demo` runs the main job: three hosts on one machine, a
//! stream migrated between them mid-transfer, verified byte-exact.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that stops the process quietly when standard output is closed (for example
/// piped into `head`), instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(141);
            }
        }
    }};
}

mod bench;
mod chaos;
mod demo;
mod demo_sockets;
mod demo_udp;
mod hostcmd;
mod tunnelcmd;

/// Connections that survive moving.
#[derive(Parser, Debug)]
#[command(name = "roam", version, about)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job: three host daemons on this machine, six example agents talking across
    /// them, migrated while they work; prints a timeline and a verification table.
    Demo(demo::DemoArgs),
    /// Run a host daemon: it runs agents, receives agents that migrate in, sends agents out.
    Host(hostcmd::HostArgs),
    /// Start an agent on a host daemon; prints its id.
    Run(hostcmd::RunArgs),
    /// List agents: their host, state, sockets, peers, bytes and migrations.
    Ps(hostcmd::PsArgs),
    /// Move a running agent with its sockets to another host daemon.
    Migrate(hostcmd::MigrateArgs),
    /// Stop an agent.
    Stop(hostcmd::StopArgs),
    /// Carry unmodified TCP programs' connections over roam sessions (`listen`, `serve`,
    /// `rebind`).
    Tunnel(tunnelcmd::TunnelArgs),
    /// The socket-level demo (no daemons): stream data to an echo peer, migrate the sender to a
    /// third host mid-stream (several times), verify every byte both ways; then UDP.
    DemoSockets(DemoArgs),
    /// Measure roam against raw tokio TCP and UDP on loopback (baselines interleaved in the
    /// same run): throughput, latency, migration, sessions, udp.
    Bench(BenchArgs),
    /// A fault-injecting relay: TCP (resets, stalls, bandwidth limit) or UDP (drop, duplicate,
    /// reorder, delay, corrupt), seeded; prints what it did when stopped.
    Chaos(chaos::ChaosArgs),
}

/// Options of `roam bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Smaller sizes and counts (about a minute in total).
    #[arg(long)]
    pub quick: bool,
    /// Write the results as JSON on standard output (the tables go to standard error).
    #[arg(long)]
    pub json: bool,
    /// Run only this benchmark.
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(roam_bench::NAMES))]
    pub only: Option<String>,
    /// Also draw migration time against bytes in flight (SVG) to this file.
    #[arg(long, value_name = "PATH")]
    pub chart: Option<std::path::PathBuf>,
}

/// Options of `roam demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Loopback addresses of the three hosts: application, echo peer, migration target.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.2,127.0.0.3,127.0.0.4", value_parser = loopback)]
    pub hosts: Vec<IpAddr>,
    /// Bytes the application sends (and gets echoed back). Suffixes K, M, G (binary).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub bytes: u64,
    /// Planned migrations during the transfer (alternating between the two application hosts).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub migrations: u32,
    /// Seed of the pseudo-random payload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// UDP part: readings the telemetry reporter sends to each collector.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub readings: u64,
    /// UDP part: collectors (datagram peers) on host B.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub collectors: u64,
}

pub fn loopback(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !ip.is_loopback() {
        return Err(format!(
            "{ip} is not a loopback address: the demo only runs on this machine (127.0.0.0/8 or ::1)"
        ));
    }
    Ok(ip)
}

/// Parse `123`, `64K`, `64M`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 64M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roam: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = |name: &str, r: Result<(), hostcmd::Failure>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(hostcmd::Failure(msg)) => {
            eprintln!("roam {name}: {msg}");
            ExitCode::FAILURE
        }
    };
    match cli.command {
        Command::Demo(args) => match rt.block_on(demo::run(args)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("roam demo: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Host(args) => daemon("host", rt.block_on(hostcmd::host(args))),
        Command::Run(args) => daemon("run", rt.block_on(hostcmd::run(args))),
        Command::Ps(args) => daemon("ps", rt.block_on(hostcmd::ps(args))),
        Command::Migrate(args) => daemon("migrate", rt.block_on(hostcmd::migrate(args))),
        Command::Stop(args) => daemon("stop", rt.block_on(hostcmd::stop(args))),
        Command::Tunnel(args) => daemon("tunnel", rt.block_on(tunnelcmd::run(args))),
        Command::DemoSockets(args) => {
            if args.hosts.len() != 3 {
                eprintln!("roam demo-sockets: --hosts needs exactly three addresses");
                return ExitCode::from(2);
            }
            match rt.block_on(demo_sockets::run(args)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("roam demo-sockets: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Chaos(args) => match rt.block_on(chaos::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("roam chaos: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match rt.block_on(bench::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("roam bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn only_loopback_hosts_are_accepted() {
        assert!(loopback("127.0.0.9").is_ok());
        assert!(loopback("10.0.0.1").is_err());
        assert!(loopback("nonsense").is_err());
    }
}
