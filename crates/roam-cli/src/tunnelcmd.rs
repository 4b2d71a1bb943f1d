//! `roam tunnel listen | serve | rebind`: unmodified TCP programs over roam sessions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use roam_host::control::{self, Client};
use roam_host::tunnel::{
    self, RebindAnswer, RebindRequest, TunnelClient, TunnelEnd, TunnelInfo, TunnelServer,
};

use crate::hostcmd::Failure;

/// `roam tunnel`.
#[derive(clap::Args, Debug, Clone)]
pub struct TunnelArgs {
    #[command(subcommand)]
    pub command: TunnelCommand,
}

/// The tunnel's subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum TunnelCommand {
    /// The client end: accept local TCP connections and carry each over its own roam session
    /// to the peer tunnel.
    Listen(ListenArgs),
    /// The server end: forward each roam session to the real server.
    Serve(ServeArgs),
    /// Move a running client end to a new local address (its network changed).
    Rebind(RebindArgs),
}

/// Options shared by the tunnel commands.
#[derive(clap::Args, Debug, Clone)]
pub struct TunnelCommon {
    /// State directory (control sockets). Default: $ROAM_STATE_DIR, else
    /// $XDG_RUNTIME_DIR/roam, else /tmp/roam-$USER.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// On Ctrl-C or SIGTERM, wait this long for open connections to finish before dropping
    /// them (and saying which).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
    /// A file with a 32-byte pre-shared key (64 hex digits) both tunnel ends hold: only the
    /// other end is accepted. Without it the first association is trust-on-first-use.
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
}

impl TunnelCommon {
    fn psk(&self) -> Result<Option<[u8; 32]>, Failure> {
        let Some(path) = &self.psk_file else {
            eprintln!(
                "roam tunnel: no --psk-file: the tunnel ends authenticate nobody at first contact (trust on first use); \
                 traffic is encrypted and every reconnection is bound to that first association"
            );
            return Ok(None);
        };
        crate::hostcmd::read_key(path, false).map(Some)
    }
}

impl TunnelCommon {
    fn state(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(control::state_dir)
    }
}

/// `roam tunnel listen`.
#[derive(clap::Args, Debug, Clone)]
pub struct ListenArgs {
    /// Where local programs connect.
    #[arg(long)]
    pub local: SocketAddr,
    /// The peer tunnel (`roam tunnel serve`).
    #[arg(long)]
    pub to_peer: SocketAddr,
    /// Local address of this end's roam endpoint (default: --local's IP, any port).
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    #[command(flatten)]
    pub common: TunnelCommon,
}

/// `roam tunnel serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Where the roam endpoint listens.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The real server.
    #[arg(long)]
    pub forward: SocketAddr,
    /// The address clients should redial after a break, if not --listen (a relay in front).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    #[command(flatten)]
    pub common: TunnelCommon,
}

/// `roam tunnel rebind`.
#[derive(clap::Args, Debug, Clone)]
pub struct RebindArgs {
    /// The running client end, by its --local address.
    #[arg(long)]
    pub local: SocketAddr,
    /// The new local address: an IP (any port) or IP:PORT.
    #[arg(long, value_parser = ip_or_addr)]
    pub to: SocketAddr,
    /// State directory.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn ip_or_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 0))
        })
        .map_err(|_| format!("{s:?} is not an IP or IP:PORT"))
}

/// `10s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m)")),
    }
}

/// Run a tunnel command.
pub async fn run(args: TunnelArgs) -> Result<(), Failure> {
    match args.command {
        TunnelCommand::Listen(a) => listen(a).await,
        TunnelCommand::Serve(a) => serve(a).await,
        TunnelCommand::Rebind(a) => rebind(a).await,
    }
}

async fn listen(a: ListenArgs) -> Result<(), Failure> {
    let bind = a.bind.unwrap_or(SocketAddr::new(a.local.ip(), 0));
    let client = TunnelClient::start(a.local, a.to_peer, bind, a.common.psk()?)
        .await
        .map_err(|e| Failure(e.to_string()))?;
    let path = tunnel::control_path(&a.common.state(), client.local_addr());
    let control = spawn_control(TunnelEnd::Client(client.clone()), path.clone()).await?;
    say!(
        "roam tunnel: {} → roam → {} ready (control socket {})",
        client.local_addr(),
        a.to_peer,
        path.display()
    );
    let run = {
        let c = client.clone();
        tokio::spawn(async move { c.run().await })
    };
    crate::hostcmd::shutdown_signal().await;
    run.abort();
    drain(client.open(), client.drained(), a.common.drain).await;
    control.abort();
    let _ = std::fs::remove_file(&path);
    finish(client.open(), &client.info())
}

async fn serve(a: ServeArgs) -> Result<(), Failure> {
    let server = TunnelServer::start(a.listen, a.forward, a.advertise, a.common.psk()?)
        .await
        .map_err(|e| Failure(e.to_string()))?;
    let path = tunnel::control_path(&a.common.state(), server.local_addr());
    let control = spawn_control(TunnelEnd::Server(server.clone()), path.clone()).await?;
    say!(
        "roam tunnel: {} → {} ready (control socket {})",
        server.local_addr(),
        a.forward,
        path.display()
    );
    let run = {
        let s = server.clone();
        tokio::spawn(async move { s.run().await })
    };
    crate::hostcmd::shutdown_signal().await;
    run.abort();
    drain(server.open(), server.drained(), a.common.drain).await;
    control.abort();
    let _ = std::fs::remove_file(&path);
    finish(server.open(), &server.info())
}

/// Bind the end's control socket (before "ready" is printed, so it answers once it is) and
/// serve it on a task.
async fn spawn_control(
    end: TunnelEnd,
    path: PathBuf,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, Failure> {
    let listener = control::bind(&path)
        .await
        .map_err(|e| Failure(format!("control socket {}: {e}", path.display())))?;
    Ok(tokio::spawn(tunnel::serve_control(end, listener)))
}

/// Wait (bounded by `limit`, or cut short by a second Ctrl-C) for the `open` connections to end
/// on their own; `drained` resolves when none is left.
async fn drain(open: usize, drained: impl std::future::Future<Output = ()>, limit: Duration) {
    if open > 0 {
        eprintln!(
            "roam tunnel: waiting up to {limit:?} for {open} open connection(s) to finish (Ctrl-C again to drop them)"
        );
    }
    tokio::select! {
        _ = tokio::time::timeout(limit, drained) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn finish(open: usize, info: &TunnelInfo) -> Result<(), Failure> {
    eprintln!(
        "roam tunnel: carried {} connection(s), {} refused",
        info.carried, info.refused
    );
    if open == 0 {
        return Ok(());
    }
    for s in &info.sessions {
        eprintln!(
            "roam tunnel: dropped {} (session {}, {} up, {} down)",
            s.from, s.session, s.up, s.down
        );
    }
    Err(Failure(format!("{open} connection(s) dropped at shutdown")))
}

async fn rebind(a: RebindArgs) -> Result<(), Failure> {
    let state = a.state_dir.unwrap_or_else(control::state_dir);
    let path = tunnel::control_path(&state, a.local);
    if !path.exists() {
        return Err(Failure(format!(
            "no tunnel client end listens at {} (no control socket at {})",
            a.local,
            path.display()
        )));
    }
    let client = Client::at_socket(path, a.local);
    let ans: RebindAnswer = client
        .post_json("/v1/tunnel/rebind", &RebindRequest { to: a.to })
        .await?;
    if a.json {
        say!("{}", serde_json::to_string(&ans).unwrap_or_default());
    } else {
        say!(
            "tunnel {} now reaches its peer from {} ({} connection(s) moved)",
            a.local,
            ans.endpoint,
            ans.sessions
        );
    }
    Ok(())
}

/// Tunnel ends under the state directory, for `roam ps`.
pub async fn tunnels(state: &std::path::Path) -> Vec<TunnelInfo> {
    let mut out = Vec::new();
    for path in tunnel::known_tunnels(state) {
        let c = Client::at_socket(path, SocketAddr::from(([0, 0, 0, 0], 0)));
        if let Ok(i) = c.get_json::<TunnelInfo>("/v1/tunnel").await {
            out.push(i);
        }
    }
    out
}
