//! `roam host`, `roam run`, `roam ps`, `roam migrate`, `roam stop`: the daemon and its CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use roam_host::api::{AgentInfo, AgentState, MigrationReport, Progress};
use roam_host::control::{self, Client, ClientError};
use roam_host::{CrashPoint, Host, HostConfig};

/// Default port of a host daemon.
pub const DEFAULT_PORT: u16 = 7000;

/// Parse `IP[:PORT]` (port 7000 by default).
pub fn host_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, DEFAULT_PORT)),
        Err(_) => Err(format!(
            "{s:?} is not a host address (IP or IP:PORT, e.g. 127.0.0.2:7000)"
        )),
    }
}

/// Options shared by the daemon commands.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// State directory (control sockets, deployment key). Default: $ROAM_STATE_DIR, else
    /// $XDG_RUNTIME_DIR/roam, else /tmp/roam-$USER.
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Common {
    fn state(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(control::state_dir)
    }
}

/// `roam host`.
#[derive(clap::Args, Debug, Clone)]
pub struct HostArgs {
    /// The daemon's address (agents' streams and other daemons reach it here).
    #[arg(long, value_parser = host_addr, default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// The deployment key (64 hex digits): agents move only between daemons with the same
    /// key. Default: STATE_DIR/deployment.key, created on first use.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Most agents running at once; more are refused.
    #[arg(long, default_value_t = 1000)]
    pub max_agents: usize,
    #[command(flatten)]
    pub common: Common,
}

/// `roam run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Agent kind (`roam run --list` shows them).
    #[arg(required_unless_present = "list")]
    pub kind: Option<String>,
    /// The agent's arguments (put `--` before any that start with `-`).
    pub args: Vec<String>,
    /// The daemon to run it on.
    #[arg(long, value_parser = host_addr, required_unless_present = "list")]
    pub on: Option<SocketAddr>,
    /// List the agent kinds and their arguments.
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub common: Common,
}

/// `roam ps`.
#[derive(clap::Args, Debug, Clone)]
pub struct PsArgs {
    /// Only this daemon (default: every daemon under the state directory).
    #[arg(long, value_parser = host_addr)]
    pub host: Option<SocketAddr>,
    /// Also agents that moved away, finished, failed or were stopped.
    #[arg(long, short)]
    pub all: bool,
    #[command(flatten)]
    pub common: Common,
}

/// `roam migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The agent's id (see `roam ps`).
    pub agent: String,
    /// Destination daemon.
    #[arg(long, value_parser = host_addr)]
    pub to: SocketAddr,
    /// The daemon the agent runs on (default: found among the local daemons).
    #[arg(long, value_parser = host_addr)]
    pub from: Option<SocketAddr>,
    #[command(flatten)]
    pub common: Common,
}

/// `roam stop`.
#[derive(clap::Args, Debug, Clone)]
pub struct StopArgs {
    /// The agent's id.
    pub agent: String,
    /// The daemon it runs on (default: found among the local daemons).
    #[arg(long, value_parser = host_addr)]
    pub host: Option<SocketAddr>,
    #[command(flatten)]
    pub common: Common,
}

/// A CLI failure: message and exit code.
#[derive(Debug)]
pub struct Failure(pub String);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure(e.to_string())
    }
}

pub fn read_key(path: &Path, create: bool) -> Result<[u8; 32], Failure> {
    if !path.exists() && create {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Failure(format!("cannot create {}: {e}", dir.display())))?;
        }
        let key: [u8; 32] = rand::random();
        // Daemons starting together race to create it: write a private temporary file and
        // link it into place, which fails if another won; then everyone reads the winner's.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, &format!("{}\n", hex::encode(key)))
            .map_err(|e| Failure(format!("cannot write {}: {e}", tmp.display())))?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Failure(format!("cannot create {}: {e}", path.display()))),
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure(format!("cannot read the key file {}: {e}", path.display())))?;
    let bytes = hex::decode(text.trim()).map_err(|_| {
        Failure(format!(
            "{} is not a key: 64 hex digits expected",
            path.display()
        ))
    })?;
    bytes.try_into().map_err(|_| {
        Failure(format!(
            "{} is not a key: 64 hex digits (32 bytes) expected",
            path.display()
        ))
    })
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

/// Run the daemon until Ctrl-C or SIGTERM.
pub async fn host(args: HostArgs) -> Result<(), Failure> {
    let state = args.common.state();
    let key_path = args
        .key_file
        .clone()
        .unwrap_or_else(|| state.join("deployment.key"));
    let key = read_key(&key_path, args.key_file.is_none())?;
    let mut config = HostConfig::new(args.listen, key);
    config.max_agents = args.max_agents;
    if let Ok(point) = std::env::var("ROAM_CRASH_AT") {
        config.crash_at = Some(point.parse::<CrashPoint>().map_err(Failure)?);
    }
    let host = Host::start(config)
        .await
        .map_err(|e| Failure(e.to_string()))?;
    let path = control::socket_path(&state, host.addr());
    // Bound before "ready" is printed, so the socket answers once it is.
    let listener = control::bind(&path)
        .await
        .map_err(|e| Failure(format!("control socket {}: {e}", path.display())))?;
    let serve = tokio::spawn(control::serve(host.clone(), listener));
    say!(
        "roam host {} ready (control socket {}, deployment key {})",
        host.addr(),
        path.display(),
        key_path.display()
    );
    shutdown_signal().await;
    eprintln!("roam host {}: shutting down", host.addr());
    host.shutdown().await;
    serve.abort();
    let _ = std::fs::remove_file(&path);
    Ok(())
}

pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn json_out<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => say!("{s}"),
        Err(e) => eprintln!("roam: cannot encode JSON: {e}"),
    }
}

/// `roam run`.
pub async fn run(args: RunArgs) -> Result<(), Failure> {
    if args.list {
        for (kind, about) in roam_host::Registry::builtin().kinds() {
            say!("{kind:<10} {about}");
        }
        return Ok(());
    }
    let (Some(kind), Some(on)) = (args.kind, args.on) else {
        return Err(Failure("roam run needs KIND and --on HOST".into()));
    };
    let client = Client::new(&args.common.state(), on);
    let info = client.run(&kind, &args.args).await?;
    if args.common.json {
        json_out(&info);
    } else {
        say!("{}", info.id);
        eprintln!("started {} ({}) on {}", info.id, info.kind, info.host);
    }
    Ok(())
}

/// The daemons to ask: the one given, or every live one under the state directory.
async fn clients(state: &Path, host: Option<SocketAddr>) -> Vec<Client> {
    match host {
        Some(h) => vec![Client::new(state, h)],
        None => {
            let mut out = Vec::new();
            for h in control::known_hosts(state) {
                let c = Client::new(state, h);
                if c.info().await.is_ok() {
                    out.push(c);
                }
            }
            out
        }
    }
}

fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn state_text(s: &AgentState) -> String {
    match s {
        AgentState::Migrating(t) => format!("migrating→{t}"),
        AgentState::Moved(t) => format!("moved→{t}"),
        AgentState::Lost(t) => format!("lost with {t}"),
        AgentState::Failed(_) => "failed".into(),
        other => other.name().into(),
    }
}

/// `roam ps`.
pub async fn ps(args: PsArgs) -> Result<(), Failure> {
    let state = args.common.state();
    let clients = clients(&state, args.host).await;
    let tunnels = if args.host.is_none() {
        crate::tunnelcmd::tunnels(&state).await
    } else {
        Vec::new()
    };
    if !tunnels.is_empty() && !args.common.json {
        say!(
            "{:<7} {:<22} {:<22} {:<22} {:>8} {:>8}",
            "TUNNEL",
            "LISTEN",
            "ENDPOINT",
            "TO",
            "CARRIED",
            "REFUSED"
        );
        for t in &tunnels {
            say!(
                "{:<7} {:<22} {:<22} {:<22} {:>8} {:>8}",
                t.role,
                t.listen.to_string(),
                t.endpoint.to_string(),
                t.to.to_string(),
                t.carried,
                t.refused
            );
            for s in &t.sessions {
                say!(
                    "    {} session {}  up {}  down {}  {}  reassociations {}  connections lost {}",
                    s.from,
                    s.session,
                    fmt_bytes(s.up),
                    fmt_bytes(s.down),
                    if s.connected {
                        "connected"
                    } else {
                        "reconnecting"
                    },
                    s.reassociations,
                    s.connections_lost
                );
            }
        }
        say!("");
    }
    if clients.is_empty() && !tunnels.is_empty() {
        if args.common.json {
            // The JSON lists agents only; a tunnel end's status is `GET /v1/tunnel` on its
            // control socket.
            say!("[]");
        }
        return Ok(());
    }
    if clients.is_empty() {
        return Err(Failure(format!(
            "no roam host daemon is running under {} (start one with `roam host --listen 127.0.0.2:7000`)",
            state.display()
        )));
    }
    let mut all: Vec<AgentInfo> = Vec::new();
    for c in &clients {
        all.extend(c.agents().await?);
    }
    if !args.all {
        all.retain(|a| matches!(a.state, AgentState::Running | AgentState::Migrating(_)));
    }
    if args.common.json {
        json_out(&all);
        return Ok(());
    }
    say!(
        "{:<10} {:<10} {:<16} {:<24} {:>4}  STATUS",
        "AGENT",
        "KIND",
        "HOST",
        "STATE",
        "MIGR"
    );
    for a in &all {
        say!(
            "{:<10} {:<10} {:<16} {:<24} {:>4}  {}",
            a.id,
            a.kind,
            a.host.to_string(),
            state_text(&a.state),
            a.migrations,
            a.status
        );
        if let AgentState::Failed(why) = &a.state {
            say!("    error: {why}");
        }
        for s in &a.sockets {
            let peers: Vec<String> = s.peers.iter().map(|p| p.to_string()).collect();
            let (sent, recv) = if s.kind == "stream" {
                (fmt_bytes(s.sent), fmt_bytes(s.received))
            } else {
                (
                    format!("{} dgrams", s.sent),
                    format!("{} dgrams", s.received),
                )
            };
            say!(
                "    {:<8} {:<6} {}peer {}  sent {}  received {}{}  epoch {}",
                s.kind,
                s.name,
                s.local.map(|l| format!("{l} ")).unwrap_or_default(),
                if peers.is_empty() {
                    "-".into()
                } else {
                    peers.join(",")
                },
                sent,
                recv,
                if s.kind == "stream" && !s.connected {
                    "  (reconnecting)"
                } else {
                    ""
                },
                s.epoch
            );
        }
    }
    if all.is_empty() {
        eprintln!(
            "(no agents{}; {} daemon(s) asked)",
            if args.all { "" } else { " running" },
            clients.len()
        );
    }
    Ok(())
}

/// Find the daemon that runs `agent` now.
async fn locate(state: &Path, agent: &str, hint: Option<SocketAddr>) -> Result<Client, Failure> {
    if let Some(h) = hint {
        return Ok(Client::new(state, h));
    }
    let clients = clients(state, None).await;
    let mut moved_to = None;
    for c in &clients {
        if let Ok(a) = c.agent(agent).await {
            match a.state {
                AgentState::Running | AgentState::Migrating(_) => return Ok(c.clone()),
                AgentState::Moved(t) => moved_to = Some(t),
                _ => {}
            }
        }
    }
    let looked: Vec<String> = clients.iter().map(|c| c.host().to_string()).collect();
    Err(Failure(match moved_to {
        Some(t) => {
            format!("agent {agent} moved to {t}, which is not a local daemon; pass --from {t}")
        }
        None => format!(
            "no running agent {agent} on any local daemon (asked: {})",
            if looked.is_empty() {
                "none running".into()
            } else {
                looked.join(", ")
            }
        ),
    }))
}

/// Print a migration report in one line.
pub fn report_line(r: &MigrationReport) -> String {
    format!(
        "{} moved {} → {}: freeze {}, transfer {} ({} in {} sockets), start {}, streams re-associated after {}{}; agent paused {}",
        r.agent,
        r.from,
        r.to,
        ms(r.freeze_us),
        ms(r.transfer_us),
        fmt_bytes(r.bytes),
        r.sockets,
        ms(r.start_us),
        ms(r.resume_us),
        if r.all_connected { "" } else { " (not all yet)" },
        ms(r.total_us)
    )
}

/// `roam migrate`.
pub async fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    let state = args.common.state();
    let client = locate(&state, &args.agent, args.from).await?;
    let json = args.common.json;
    let last = client
        .migrate(&args.agent, args.to, |p| {
            if json {
                return;
            }
            match p {
                Progress::Accepted => eprintln!("  offer accepted by {}", args.to),
                Progress::Frozen {
                    sockets,
                    bytes,
                    freeze_us,
                } => eprintln!(
                    "  paused and frozen: {sockets} sockets, {} in {}",
                    fmt_bytes(*bytes),
                    ms(*freeze_us)
                ),
                Progress::Prepared { transfer_us } => {
                    eprintln!(
                        "  shipped and prepared at {} in {}",
                        args.to,
                        ms(*transfer_us)
                    )
                }
                Progress::Started { thaw_us } => {
                    eprintln!(
                        "  committed; running at {} (thawed in {})",
                        args.to,
                        ms(*thaw_us)
                    )
                }
                Progress::Done(_) | Progress::Error(_) => {}
            }
        })
        .await?;
    match last {
        Progress::Done(r) => {
            if json {
                json_out(&r);
            } else {
                say!("{}", report_line(&r));
            }
            Ok(())
        }
        Progress::Error(e) => {
            if json {
                json_out(&e);
            }
            Err(Failure(format!("migration of {} failed: {e}", args.agent)))
        }
        other => Err(Failure(format!("migration ended unexpectedly: {other:?}"))),
    }
}

/// `roam stop`.
pub async fn stop(args: StopArgs) -> Result<(), Failure> {
    let state = args.common.state();
    let client = locate(&state, &args.agent, args.host).await?;
    let info = client.stop(&args.agent).await?;
    if args.common.json {
        json_out(&info);
    } else {
        say!("{} {} on {}", info.id, state_text(&info.state), info.host);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_parse() {
        assert_eq!(
            host_addr("127.0.0.2"),
            Ok("127.0.0.2:7000".parse().unwrap())
        );
        assert_eq!(
            host_addr("127.0.0.2:7100"),
            Ok("127.0.0.2:7100".parse().unwrap())
        );
        assert!(host_addr("nowhere").is_err());
    }
}
