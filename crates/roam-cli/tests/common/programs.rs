//! Real programs nobody here wrote, for the tunnel tests: a PostgreSQL server and psql sessions,
//! and the `roam tunnel` ends that carry them. Each runs on loopback or inside a namespace of
//! the test ([`super::netns::Namespaces::exec`]); every process is ended by a drop guard, so a
//! failing test leaks none.
//!
//! The servers come from the Debian packages `.ci/run` installs (postgresql, postgresql-client,
//! redis-server, redis-tools); where one is missing a test says so and returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::netns::Namespaces;

/// Deadline of a server's or tunnel end's start.
pub const START: Duration = Duration::from_secs(60);

/// Kills its processes when dropped.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the tests run as root.
pub fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
}

/// Read `out` line by line on a thread until it ends; every line goes to the returned channel.
/// The thread keeps draining after the receiver is dropped, so the process never blocks on a
/// full pipe.
pub fn lines(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// Wait (at most `deadline`) for a line containing `needle`; `Err` with every line seen when
/// the stream ended or the deadline passed first.
pub fn wait_line(
    rx: &mpsc::Receiver<String>,
    needle: &str,
    deadline: Duration,
) -> Result<String, String> {
    let end = Instant::now() + deadline;
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(needle) => return Ok(line),
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(e) => return Err(format!("no {needle:?} ({e}); output:\n{seen}")),
        }
    }
}

/// Start `roam tunnel ARGS --state-dir STATE` through `roam` (the binary, or
/// `ip netns exec NS roam`) and wait for its "ready" line (the event it prints once it
/// listens). Its stdout is drained from then on; stderr is the test's.
pub fn tunnel(procs: &mut Procs, mut roam: Command, state: &Path, args: &[&str]) {
    let mut child = roam
        .arg("tunnel")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn roam tunnel");
    let out = lines(child.stdout.take().expect("piped stdout"));
    procs.0.push(child);
    if let Err(e) = wait_line(&out, "ready", START) {
        panic!("roam tunnel {args:?} did not start: {e}");
    }
}

/// `roam tunnel rebind --local LOCAL --to TO`: what it printed (panics on failure).
pub fn rebind(state: &Path, local: &str, to: &str) -> String {
    let out = super::netns::run(
        Command::new(super::ROAM)
            .args([
                "tunnel",
                "rebind",
                "--local",
                local,
                "--to",
                to,
                "--state-dir",
            ])
            .arg(state),
    );
    assert!(
        out.status.success(),
        "roam tunnel rebind --to {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `roam ps` prints about the tunnel ends under `state`.
pub fn tunnel_ps(state: &Path) -> String {
    let out = super::netns::run(
        Command::new(super::ROAM)
            .arg("ps")
            .arg("--state-dir")
            .arg(state),
    );
    assert!(
        out.status.success(),
        "roam ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The addresses the server tunnel ends under `state` reach their clients at now, one per
/// carried connection (the session lines under each `server` row of `roam ps`).
pub fn server_peers(state: &Path) -> Vec<String> {
    let mut peers = Vec::new();
    let mut in_server = false;
    for line in tunnel_ps(state).lines() {
        if let Some(session) = line.strip_prefix("    ") {
            if in_server {
                peers.extend(session.split_whitespace().next().map(str::to_owned));
            }
        } else {
            in_server = line.starts_with("server ");
        }
    }
    peers
}

/// The newest PostgreSQL server binaries (`/usr/lib/postgresql/N/bin`), if installed.
pub fn postgres_bin() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    let mut versions: Vec<PathBuf> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .collect();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|b| b.join("postgres").exists() && b.join("initdb").exists())
}

/// Why the PostgreSQL tests cannot run here (server or client not installed, or no `setpriv`
/// to drop root), or `None`.
pub fn postgres_missing() -> Option<&'static str> {
    if postgres_bin().is_none() {
        return Some("PostgreSQL server binaries are not installed (.ci/run installs postgresql)");
    }
    if !have("psql") {
        return Some("psql is not installed (.ci/run installs postgresql-client)");
    }
    if as_root() && !have("setpriv") {
        return Some("setpriv is not installed (util-linux): postgres cannot drop root");
    }
    None
}

/// PostgreSQL refuses to run as root: as root, it runs as the `postgres` user through
/// `setpriv`, which execs (unlike `runuser`, which forks and would leave the server behind
/// when killed).
const AS_POSTGRES: [&str; 4] = [
    "--reuid=postgres",
    "--regid=postgres",
    "--init-groups",
    "--",
];

/// A command running `program` (inside namespace `ns`, if given), as the `postgres` user when
/// the tests run as root.
fn postgres_cmd(ns: Option<(&Namespaces, &str)>, program: &Path) -> Command {
    let root = as_root();
    let mut c = match (ns, root) {
        (Some((n, h)), true) => n.exec(h, "setpriv"),
        (Some((n, h)), false) => return n.exec(h, program),
        (None, true) => Command::new("setpriv"),
        (None, false) => return Command::new(program),
    };
    c.args(AS_POSTGRES).arg(program);
    c
}

/// A PostgreSQL server with its own data directory, listening on 127.0.0.1 (of its
/// namespace, if any) with trust authentication. Dropping it shuts it down (fast shutdown,
/// then SIGKILL if it does not exit within 10 s) and removes the data directory.
pub struct Postgres {
    child: Option<Child>,
    /// Its TCP port.
    pub port: u16,
    /// Data and socket directory, removed after the server stopped.
    _data: tempfile::TempDir,
}

impl Postgres {
    /// `initdb` a fresh cluster and start `postgres` on 127.0.0.1:`port`, inside namespace
    /// `ns` if given; waits for its "ready to accept connections" log line.
    pub fn start(bin: &Path, port: u16, ns: Option<(&Namespaces, &str)>) -> Postgres {
        let data = tempfile::tempdir().expect("data directory");
        if as_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(data.path())
                .status()
                .expect("chown");
            assert!(chown.success(), "chown postgres {}", data.path().display());
        }
        let pgdata = data.path().join("pg");
        let init = postgres_cmd(None, &bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&pgdata)
            .current_dir(data.path())
            .output()
            .expect("run initdb");
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let mut child = postgres_cmd(ns, &bin.join("postgres"))
            .arg("-D")
            .arg(&pgdata)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(data.path())
            .current_dir(data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postgres");
        let log = lines(child.stderr.take().expect("piped stderr"));
        let pg = Postgres {
            child: Some(child),
            port,
            _data: data,
        };
        if let Err(e) = wait_line(&log, "ready to accept connections", START) {
            panic!("postgres did not start: {e}");
        }
        pg
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = child.wait();
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        let _ = waiter.join();
    }
}

/// One psql session (`-Atq`, stops at the first error) fed statements on its stdin. Every
/// statement sent should end with a query printing one row, so each answer is one line.
/// Killed on drop unless [`Psql::finish`]ed.
pub struct Psql {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Psql {
    /// Start `psql` (the command: `psql`, or `ip netns exec NS psql`) against database
    /// `postgres` at `host:port` as user `postgres`.
    pub fn start(mut psql: Command, host: &str, port: u16) -> Psql {
        let mut child = psql
            .args(["-h", host, "-p", &port.to_string()])
            .args([
                "-U",
                "postgres",
                "-Atq",
                "-v",
                "ON_ERROR_STOP=1",
                "postgres",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        Psql {
            stdin: child.stdin.take(),
            out: BufReader::new(child.stdout.take().expect("piped stdout")),
            child: Some(child),
        }
    }

    /// Send `sql` without waiting for the answer.
    pub fn send(&mut self, sql: &str) {
        let stdin = self.stdin.as_mut().expect("psql's stdin is open");
        writeln!(stdin, "{sql}").expect("write to psql");
        stdin.flush().expect("flush psql's stdin");
    }

    /// The next answer line; panics with psql's stderr if it ended instead.
    pub fn answer(&mut self, what: &str) -> String {
        let mut line = String::new();
        let n = self.out.read_line(&mut line).expect("read psql's stdout");
        if n == 0 {
            let mut err = String::new();
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
                if let Some(mut e) = c.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
            }
            panic!("psql ended before answering {what}: {err}");
        }
        line.trim_end_matches(['\n', '\r']).to_owned()
    }

    /// Send `sql` and return its one-line answer.
    pub fn ask(&mut self, sql: &str) -> String {
        self.send(sql);
        self.answer(sql)
    }

    /// Close its stdin and wait for it to exit; panics unless it exited with 0.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let child = self.child.take().expect("psql still running");
        let out = child.wait_with_output().expect("wait for psql");
        assert!(
            out.status.success(),
            "psql exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
