//! `roam demo`: the main job. Three host daemons on this machine, the example agents talking
//! to each other across them, migrated between the hosts while they work (one in the middle
//! of a bulk transfer, one whose peer moves too), then a verification table; exit 0 only when
//! every check holds.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use roam_host::api::{AgentInfo, AgentState, MigrationReport, Progress};
use roam_host::control::Client;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::hostcmd::report_line;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Migrations the demo performs.
const PLANNED: usize = 8;

/// Options of `roam demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Loopback addresses of the three host daemons.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.2,127.0.0.3,127.0.0.4", value_parser = crate::loopback)]
    pub hosts: Vec<IpAddr>,
    /// The daemons' port.
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// Bytes of the bulk transfer (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = crate::parse_size)]
    pub bytes: u64,
    /// Lines the chat agent sends to the echo agent.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub lines: u64,
    /// Readings the telemetry agent sends over UDP.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub readings: u64,
    /// Give up (and fail) after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// The daemons, killed when dropped.
struct Daemons {
    children: Vec<Child>,
    state: PathBuf,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

async fn start_daemons(hosts: &[SocketAddr]) -> Result<Daemons, BoxError> {
    let state = std::env::temp_dir().join(format!("roam-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let exe = std::env::current_exe()?;
    let mut daemons = Daemons {
        children: Vec::new(),
        state: state.clone(),
    };
    for h in hosts {
        let mut child = Command::new(&exe)
            .arg("host")
            .arg("--listen")
            .arg(h.to_string())
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        daemons.children.push(child);
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(l))) if l.contains("ready") => {}
            other => return Err(format!("host daemon {h} did not start: {other:?}").into()),
        }
        // Keep draining its stdout so it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    }
    Ok(daemons)
}

fn number_after(s: &str, key: &str) -> Option<u64> {
    let i = s.find(key)? + key.len();
    let digits: String = s[i..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Where each agent runs now, and its info there.
async fn locate(clients: &[Client], id: &str) -> Vec<AgentInfo> {
    let mut out = Vec::new();
    for c in clients {
        if let Ok(a) = c.agent(id).await {
            if !matches!(a.state, AgentState::Moved(_)) {
                out.push(a);
            }
        }
    }
    out
}

async fn current(clients: &[Client], id: &str) -> Option<AgentInfo> {
    locate(clients, id).await.into_iter().next()
}

struct Timeline {
    t0: Instant,
    bar: ProgressBar,
}

impl Timeline {
    fn event(&self, msg: impl AsRef<str>) {
        let line = format!(
            "{:>7.3} s  {}",
            self.t0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
        if self.bar.is_hidden() {
            say!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

/// One migration, reported on the timeline.
async fn migrate(
    tl: &Timeline,
    clients: &[Client],
    id: &str,
    name: &str,
    to: SocketAddr,
    reports: &mut Vec<(String, MigrationReport)>,
) -> Result<(), BoxError> {
    let from = current(clients, id)
        .await
        .ok_or_else(|| format!("{name} ({id}) is not running anywhere"))?;
    let src = clients
        .iter()
        .find(|c| c.host() == from.host)
        .ok_or("unknown source host")?;
    tl.event(format!("migrate {name} {} → {to} …", from.host));
    let last = src.migrate(id, to, |_| {}).await?;
    match last {
        Progress::Done(r) => {
            tl.event(format!("  {}", report_line(&r)));
            reports.push((name.to_owned(), r));
            Ok(())
        }
        Progress::Error(e) => Err(format!("migrating {name}: {e}").into()),
        other => Err(format!("migrating {name}: ended with {other:?}").into()),
    }
}

/// Wait until the bulk receiver has `at` bytes (updating the bar).
async fn bulk_reaches(
    clients: &[Client],
    recv_id: &str,
    at: u64,
    bar: &ProgressBar,
    deadline: Instant,
) -> Result<u64, BoxError> {
    loop {
        if let Some(a) = current(clients, recv_id).await {
            let got = number_after(&a.status, "received").unwrap_or(0);
            bar.set_position(got);
            if got >= at || !matches!(a.state, AgentState::Running) {
                return Ok(got);
            }
        }
        if Instant::now() > deadline {
            return Err("timed out waiting for the bulk transfer".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run the demo; `Ok(true)` when every check holds.
pub async fn run(args: DemoArgs) -> Result<bool, BoxError> {
    if args.hosts.len() != 3 {
        return Err("--hosts needs exactly three addresses".into());
    }
    let hosts: Vec<SocketAddr> = args
        .hosts
        .iter()
        .map(|ip| SocketAddr::new(*ip, args.port))
        .collect();
    let (a, b, c) = (hosts[0], hosts[1], hosts[2]);
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    say!("roam demo: three host daemons on this machine — A {a}, B {b}, C {c}");
    let daemons = start_daemons(&hosts).await?;
    let clients: Vec<Client> = hosts
        .iter()
        .map(|h| Client::new(&daemons.state, *h))
        .collect();
    let (ca, cb) = (&clients[0], &clients[1]);

    // The agents: echo, bulk receiver and telemetry collector on B; their peers on A.
    let collector_port = args.port + 100;
    let echo = cb.run("echo", &[]).await?.id;
    let recv = cb.run("bulk-recv", &[]).await?.id;
    let coll = cb.run("collector", &[collector_port.to_string()]).await?.id;
    let chat = ca
        .run(
            "chat",
            &[format!("{b}/echo"), args.lines.to_string(), "10".into()],
        )
        .await?
        .id;
    let send = ca
        .run(
            "bulk-send",
            &[format!("{b}/bulk"), args.bytes.to_string(), "7".into()],
        )
        .await?
        .id;
    let tele = ca
        .run(
            "telemetry",
            &[
                SocketAddr::new(b.ip(), collector_port).to_string(),
                args.readings.to_string(),
                "2".into(),
            ],
        )
        .await?
        .id;
    say!("agents: chat {chat} (A) ↔ echo {echo} (B); bulk-send {send} (A) → bulk-recv {recv} (B); telemetry {tele} (A) → collector {coll} (B, UDP)");

    let bar = ProgressBar::with_draw_target(Some(args.bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "  bulk transfer [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let tl = Timeline {
        t0: Instant::now(),
        bar: bar.clone(),
    };
    tl.event("all six agents running");
    let mut reports = Vec::new();

    // The moves, while everything works.
    bulk_reaches(&clients, &recv, args.bytes / 4, &bar, deadline).await?;
    migrate(&tl, &clients, &send, "bulk-send", c, &mut reports).await?;
    migrate(&tl, &clients, &chat, "chat", c, &mut reports).await?;
    migrate(&tl, &clients, &tele, "telemetry", c, &mut reports).await?;
    bulk_reaches(&clients, &recv, args.bytes / 2, &bar, deadline).await?;
    migrate(
        &tl,
        &clients,
        &echo,
        "echo (the chat's peer)",
        a,
        &mut reports,
    )
    .await?;
    migrate(&tl, &clients, &send, "bulk-send", a, &mut reports).await?;
    migrate(&tl, &clients, &tele, "telemetry", a, &mut reports).await?;
    bulk_reaches(&clients, &recv, args.bytes * 3 / 4, &bar, deadline).await?;
    migrate(&tl, &clients, &chat, "chat", b, &mut reports).await?;
    migrate(&tl, &clients, &send, "bulk-send", c, &mut reports).await?;

    // Let everything finish.
    let finite = [
        (&chat, "chat"),
        (&send, "bulk-send"),
        (&recv, "bulk-recv"),
        (&tele, "telemetry"),
    ];
    loop {
        bulk_reaches(&clients, &recv, args.bytes, &bar, deadline)
            .await
            .ok();
        let mut running = 0;
        for (id, _) in finite {
            if let Some(a) = current(&clients, id).await {
                if matches!(a.state, AgentState::Running | AgentState::Migrating(_)) {
                    running += 1;
                }
            }
        }
        if running == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    tl.event("agents done");

    // Verification.
    let mut checks: Vec<(String, String, String, bool)> = Vec::new();
    let mut check = |what: &str, expected: String, observed: String, ok: bool| {
        checks.push((what.to_owned(), expected, observed, ok));
    };
    let mut infos = Vec::new();
    for (id, name) in [
        (&chat, "chat"),
        (&echo, "echo"),
        (&send, "bulk-send"),
        (&recv, "bulk-recv"),
        (&tele, "telemetry"),
        (&coll, "collector"),
    ] {
        let places = locate(&clients, id).await;
        let where_: Vec<String> = places
            .iter()
            .map(|p| format!("{} on {}", p.state.name(), p.host))
            .collect();
        check(
            &format!("{name} lives exactly once"),
            "1 host".into(),
            where_.join(", "),
            places.len() == 1,
        );
        infos.push((name, places.into_iter().next()));
    }
    let status = |n: &str| {
        infos
            .iter()
            .find(|(k, _)| *k == n)
            .and_then(|(_, i)| i.as_ref())
            .map(|i| (i.state.clone(), i.status.clone()))
            .unwrap_or((AgentState::Failed("gone".into()), String::new()))
    };
    let (st, s) = status("chat");
    check(
        "chat lines echoed intact",
        format!("{0}/{0}", args.lines),
        s.clone(),
        st == AgentState::Finished && s.starts_with(&format!("{0}/{0} ", args.lines)),
    );
    let (st, s) = status("bulk-recv");
    check(
        "bulk bytes verified by the receiver",
        format!("OK {}", args.bytes),
        s.clone(),
        st == AgentState::Finished && s.ends_with(&format!("OK {}", args.bytes)),
    );
    let (st, s) = status("bulk-send");
    check(
        "bulk sender got the verdict",
        "verified".into(),
        s.clone(),
        st == AgentState::Finished && s.contains("receiver verified: OK"),
    );
    let (st, s) = status("telemetry");
    check(
        "telemetry readings acked",
        format!("{0}/{0}, 0 duplicate acks", args.readings),
        s.clone(),
        st == AgentState::Finished
            && s.contains(&format!(
                "sent {0}/{0} readings, {0} acked, 0 duplicate",
                args.readings
            )),
    );
    let (_, s) = status("collector");
    check(
        "collector readings, duplicates",
        format!("{} from 1 reporter, 0 duplicates", args.readings),
        s.clone(),
        s.starts_with(&format!(
            "{} readings from 1 reporters, 0 duplicates",
            args.readings
        )),
    );
    let all_connected = reports.iter().all(|(_, r)| r.all_connected);
    check(
        "migrations completed",
        format!("{PLANNED}, streams re-associated"),
        format!(
            "{}, {}",
            reports.len(),
            if all_connected {
                "all re-associated"
            } else {
                "some not re-associated"
            }
        ),
        reports.len() == PLANNED && all_connected,
    );

    say!("");
    say!(
        "{:<36} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "migration",
        "bytes",
        "freeze",
        "transfer",
        "start",
        "resume",
        "paused"
    );
    for (name, r) in &reports {
        say!(
            "{:<36} {:>9} {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>7.2} ms",
            format!("{name} → {}", r.to.ip()),
            r.bytes,
            r.freeze_us as f64 / 1e3,
            r.transfer_us as f64 / 1e3,
            r.start_us as f64 / 1e3,
            r.resume_us as f64 / 1e3,
            r.total_us as f64 / 1e3
        );
    }
    say!("");
    say!("{:<36} {:<34} {:<50} ", "check", "expected", "observed");
    let mut ok = true;
    for (what, exp, obs, pass) in &checks {
        ok &= pass;
        say!(
            "{:<36} {:<34} {:<50} {}",
            what,
            exp,
            obs,
            if *pass { "ok" } else { "FAILED" }
        );
    }
    for c in &clients {
        for a in c.agents().await.unwrap_or_default() {
            if let AgentState::Failed(why) = a.state {
                say!("agent {} ({}) failed on {}: {why}", a.id, a.kind, a.host);
            }
        }
    }
    say!("");
    say!(
        "{} in {:.1} s",
        if ok {
            "every check holds"
        } else {
            "SOME CHECKS FAILED"
        },
        tl.t0.elapsed().as_secs_f64()
    );
    drop(daemons);
    Ok(ok)
}
