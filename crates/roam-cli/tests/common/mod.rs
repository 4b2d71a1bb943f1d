//! Harness of the end-to-end tests: real `roam host` daemons on 127.0.0.x addresses, each test
//! with its own state directory, driven through the `roam` CLI.
//!
//! - [`Cluster`] owns a temporary state directory and the daemons started in it; dropping it
//!   kills every daemon it started (so a failing test never leaks processes) and, when the
//!   test is panicking, prints their stderr.
//! - Readiness is the "ready" line a daemon prints on stdout (an event, not a sleep).
//! - Every wait is a bounded poll (every [`POLL`]) of `roam ps --json` or of a process, with a
//!   deadline.
//!
//! [`netns`] makes network namespaces (root only); [`programs`] starts the real programs the
//! tunnel tests carry (PostgreSQL, psql, `roam tunnel`).
#![allow(dead_code)]

pub mod netns;
pub mod programs;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `roam` binary under test.
pub const ROAM: &str = env!("CARGO_BIN_EXE_roam");
/// Poll interval of every wait.
pub const POLL: Duration = Duration::from_millis(50);
/// Default deadline of a wait.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Deadline of one CLI command (a migration may wait out the daemons' 10 s step timeouts).
pub const CLI_DEADLINE: Duration = Duration::from_secs(45);

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system's temporary directory.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "roam-e2e-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create the state directory");
        TempDir(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `roam host` process.
pub struct Daemon {
    /// Its address, `IP:PORT`.
    pub addr: String,
    child: Child,
    stderr: PathBuf,
}

impl Daemon {
    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait (bounded) for the process to exit.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            assert!(
                Instant::now() < end,
                "daemon {} still running after {deadline:?}; stderr:\n{}",
                self.addr,
                self.stderr_text()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Kill it (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options of one daemon.
#[derive(Default, Clone)]
pub struct DaemonOpts {
    /// `--key-file`.
    pub key_file: Option<PathBuf>,
    /// `--max-agents`.
    pub max_agents: Option<usize>,
    /// `ROAM_CRASH_AT`.
    pub crash_at: Option<&'static str>,
}

/// What a CLI command did.
#[derive(Debug)]
pub struct Out {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Out {
    /// Exited with 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Panic unless it exited with 0.
    pub fn expect_ok(self, what: &str) -> Out {
        assert!(self.ok(), "{what} failed: {self:?}");
        self
    }

    /// Panic if it exited with 0; returns its stderr.
    pub fn expect_fail(self, what: &str) -> String {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "{what} should fail with a non-zero exit code: {self:?}"
        );
        assert!(
            !self.stderr.trim().is_empty(),
            "{what} failed without a message: {self:?}"
        );
        self.stderr
    }
}

/// An agent as `roam ps --json` reports it (api::AgentInfo).
#[derive(Debug, Clone)]
pub struct Agent {
    pub id: String,
    pub kind: String,
    pub host: String,
    /// running, migrating, moved, finished, failed, stopped.
    pub state: String,
    /// The detail of the state (destination, or the failure), as text.
    pub detail: String,
    pub status: String,
    pub migrations: u64,
    pub hosts: Vec<String>,
    pub sockets: usize,
}

impl Agent {
    fn from_json(v: &Value) -> Agent {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        Agent {
            id: s("id"),
            kind: s("kind"),
            host: s("host"),
            state: s("state"),
            detail: match &v["detail"] {
                Value::Null => String::new(),
                Value::String(t) => t.clone(),
                other => other.to_string(),
            },
            status: s("status"),
            migrations: v["migrations"].as_u64().unwrap_or(0),
            hosts: v["hosts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            sockets: v["sockets"].as_array().map_or(0, Vec::len),
        }
    }
}

/// The daemons of one test and their state directory.
pub struct Cluster {
    /// Daemons in start order (declared before `dir`: killed before it is removed).
    pub daemons: Vec<Daemon>,
    dir: TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.kill();
        }
        if std::thread::panicking() {
            for d in &self.daemons {
                eprintln!("---- stderr of daemon {} ----\n{}", d.addr, d.stderr_text());
            }
        }
    }
}

impl Cluster {
    /// An empty cluster with a fresh state directory.
    pub fn new(tag: &str) -> Cluster {
        Cluster {
            daemons: Vec::new(),
            dir: TempDir::new(tag),
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start a daemon with the shared deployment key of the state directory.
    pub fn start(&mut self, addr: &str) -> usize {
        self.start_with(addr, DaemonOpts::default())
    }

    /// Start a daemon and wait (bounded) for its "ready" line; returns its index.
    pub fn start_with(&mut self, addr: &str, opts: DaemonOpts) -> usize {
        let stderr = self
            .dir
            .path()
            .join(format!("daemon-{}.stderr", addr.replace(':', "_")));
        let mut cmd = Command::new(ROAM);
        cmd.arg("host")
            .arg("--listen")
            .arg(addr)
            .arg("--state-dir")
            .arg(self.dir.path())
            .env("ROAM_STATE_DIR", self.dir.path())
            .env_remove("ROAM_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("create the stderr file"));
        if let Some(k) = &opts.key_file {
            cmd.arg("--key-file").arg(k);
        }
        if let Some(m) = opts.max_agents {
            cmd.arg("--max-agents").arg(m.to_string());
        }
        if let Some(c) = opts.crash_at {
            cmd.env("ROAM_CRASH_AT", c);
        }
        let mut child = cmd.spawn().expect("spawn roam host");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Drain stdout until the daemon exits (so it never sees a broken pipe).
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let daemon = Daemon {
            addr: addr.to_owned(),
            child,
            stderr,
        };
        self.daemons.push(daemon);
        let i = self.daemons.len() - 1;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(" ready") => {
                    assert!(line.contains(addr), "ready line of another daemon: {line}");
                    return i;
                }
                Ok(_) => continue,
                Err(_) => panic!(
                    "daemon {addr} did not print its ready line (exited: {:?}); stderr:\n{}",
                    self.daemons[i].exited(),
                    self.daemons[i].stderr_text()
                ),
            }
        }
    }

    /// The daemon listening at `addr`.
    pub fn daemon(&mut self, addr: &str) -> &mut Daemon {
        self.daemons
            .iter_mut()
            .find(|d| d.addr == addr)
            .expect("a daemon of this cluster")
    }

    /// Start `roam ARGS --state-dir DIR` without waiting.
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        Command::new(ROAM)
            .args(args)
            .arg("--state-dir")
            .arg(self.dir.path())
            .env("ROAM_STATE_DIR", self.dir.path())
            .env_remove("ROAM_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn roam")
    }

    /// Run `roam ARGS` to completion (bounded by [`CLI_DEADLINE`]).
    pub fn cli(&self, args: &[&str]) -> Out {
        finish(self.spawn_cli(args), args)
    }

    /// `roam run KIND ARGS --on HOST`: the new agent's id.
    pub fn run(&self, on: &str, kind: &str, args: &[&str]) -> String {
        let mut a = vec!["run", kind];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--on", on, "--json"]);
        let out = self.cli(&a).expect_ok("roam run");
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("roam run --json printed no JSON ({e}): {out:?}"));
        let a = Agent::from_json(&v);
        assert_eq!(a.kind, kind);
        assert_eq!(a.host, on);
        assert_eq!(a.state, "running", "{a:?}");
        a.id
    }

    /// `roam ps --json --all`: every agent every live daemon reports.
    pub fn ps(&self) -> Vec<Agent> {
        let out = self.cli(&["ps", "--json", "--all"]).expect_ok("roam ps");
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("roam ps --json printed no JSON ({e}): {out:?}"));
        v.as_array()
            .unwrap_or_else(|| panic!("roam ps --json: not an array: {v}"))
            .iter()
            .map(Agent::from_json)
            .collect()
    }

    /// The records of agent `id` on every live daemon.
    pub fn records(&self, id: &str) -> Vec<Agent> {
        self.ps().into_iter().filter(|a| a.id == id).collect()
    }

    /// Poll `roam ps` until `f` holds of the records of agent `id` (deadline [`DEADLINE`]);
    /// returns them. Panics on a deadline or when a record shows the agent failed.
    pub fn wait_for(&self, id: &str, what: &str, f: impl Fn(&[Agent]) -> bool) -> Vec<Agent> {
        let end = Instant::now() + DEADLINE;
        loop {
            let recs = self.records(id);
            if f(&recs) {
                return recs;
            }
            if let Some(bad) = recs.iter().find(|a| a.state == "failed") {
                panic!("agent {id} failed while waiting for {what}: {bad:?}\nall: {recs:#?}");
            }
            assert!(
                Instant::now() < end,
                "agent {id}: no {what} within {DEADLINE:?}; records: {recs:#?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Wait until agent `id` runs on `host` (and nowhere else); returns its record there.
    pub fn wait_running_on(&self, id: &str, host: &str) -> Agent {
        let recs = self.wait_for(id, &format!("running on {host}"), |r| {
            r.iter().any(|a| a.host == host && a.state == "running")
        });
        assert_running_once(id, &recs);
        recs.into_iter()
            .find(|a| a.host == host && a.state == "running")
            .expect("found above")
    }

    /// Wait until agent `id` finished on `host`; returns its record there, after checking that
    /// every other record of it says it moved (it ran exactly once at a time, and ended once).
    pub fn wait_finished_on(&self, id: &str, host: &str) -> Agent {
        let recs = self.wait_for(id, &format!("finished on {host}"), |r| {
            r.iter().any(|a| a.host == host && a.state == "finished")
        });
        for a in &recs {
            if a.host != host {
                assert_eq!(
                    a.state, "moved",
                    "agent {id} finished on {host} but another record is not 'moved': {recs:#?}"
                );
            }
        }
        recs.into_iter()
            .find(|a| a.host == host)
            .expect("found above")
    }

    /// Wait until agent `id`'s status on `host` satisfies `f` while it runs there.
    pub fn wait_status(&self, id: &str, host: &str, what: &str, f: impl Fn(&str) -> bool) {
        self.wait_for(id, what, |r| {
            r.iter()
                .any(|a| a.host == host && a.state == "running" && f(&a.status))
        });
    }

    /// `roam migrate ID --to TO --json`: the report (panics on failure).
    pub fn migrate(&self, id: &str, to: &str) -> Value {
        let out = self
            .cli(&["migrate", id, "--to", to, "--json"])
            .expect_ok(&format!("roam migrate {id} --to {to}"));
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("roam migrate --json printed no JSON ({e}): {out:?}"));
        assert_eq!(v["agent"], id, "{v}");
        assert_eq!(v["to"], to, "{v}");
        v
    }
}

/// At most one record of `id` says it runs.
pub fn assert_running_once(id: &str, recs: &[Agent]) {
    let n = recs.iter().filter(|a| a.state == "running").count();
    assert!(n <= 1, "agent {id} runs {n} times: {recs:#?}");
}

/// Wait (bounded) for a CLI child and collect its output.
pub fn finish(mut child: Child, args: &[&str]) -> Out {
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let ro = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let re = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + CLI_DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("roam {args:?} did not finish within {CLI_DEADLINE:?}");
        }
        std::thread::sleep(POLL);
    };
    Out {
        code: status.code(),
        stdout: ro.join().unwrap_or_default(),
        stderr: re.join().unwrap_or_default(),
    }
}

/// The first number in `s` after `prefix`.
pub fn number_after(s: &str, prefix: &str) -> Option<u64> {
    let rest = &s[s.find(prefix)? + prefix.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}
