//! Real multi-host tests: three network namespaces, a `roam host` daemon in each, agents
//! migrated between them over real, different IP addresses, and a link brought down and up in
//! the middle of a bulk transfer.
//!
//! Topology (all created by the test, unique names per run, removed by a drop guard):
//!
//! ```text
//!   ns A  eth0 10.231.0.1/24 ──┐
//!   ns B  eth0 10.231.0.2/24 ──┼── br0 (bridge, in its own namespace)
//!   ns C  eth0 10.231.0.3/24 ──┘
//! ```
//!
//! The daemons run with `ip netns exec NS roam host --listen 10.231.0.X:7000 --state-dir DIR`;
//! their control sockets are Unix sockets under DIR, so the CLI drives them from outside.
//! Needs root and a working `ip netns` (iproute2); otherwise each test prints
//! "skipped: ..." and passes. No traffic leaves the test's own namespaces.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{run, Namespaces};
use common::ROAM;
use roam_host::api::{AgentInfo, AgentState};

/// Upper bound of each wait for agents to reach a state.
const WAIT: Duration = Duration::from_secs(120);
/// How long the link stays down: longer than roam's idle timeout (6 s).
const FLAP: Duration = Duration::from_secs(8);

/// Three namespaces on a bridge, and the daemons in them. Dropping it kills the daemons,
/// removes the state directory, then deletes the namespaces (which deletes their veth pairs).
struct Net {
    daemons: Vec<Child>,
    state: PathBuf,
    ns: Namespaces,
}

impl Net {
    /// Create the namespaces, or `Err` (with the reason) where that is not possible.
    fn create(tag: &str) -> Result<Net, String> {
        let ns = Namespaces::new(tag)?;
        let state = std::env::temp_dir().join(format!("{}-state", ns.prefix()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
        let mut net = Net {
            daemons: Vec::new(),
            state,
            ns,
        };
        net.ns.add("br");
        net.ns.bridge("br", "br0");
        for (i, h) in ["a", "b", "c"].iter().enumerate() {
            net.ns.add(h);
            let addr = format!("10.231.0.{}/24", i + 1);
            net.ns
                .attach("br", "br0", &format!("p{h}"), h, "eth0", &addr);
        }
        // One deployment key for the three daemons (written before any starts).
        std::fs::write(
            net.state.join("deployment.key"),
            format!("{}\n", "ab".repeat(32)),
        )
        .map_err(|e| e.to_string())?;
        Ok(net)
    }

    /// Start `roam host` in namespace `h` on `addr` and wait for its "ready" line.
    fn start_daemon(&mut self, h: &str, addr: &str) {
        let mut child = self
            .ns
            .exec(h, ROAM)
            .args(["host", "--listen", addr])
            .arg("--state-dir")
            .arg(&self.state)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start roam host");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        assert!(line.contains("ready"), "roam host {addr}: {line:?}");
        self.daemons.push(child);
    }

    /// `roam ARGS --state-dir DIR` from outside the namespaces; its standard output.
    fn roam(&self, args: &[&str]) -> String {
        let out = run(Command::new(ROAM)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state));
        assert!(
            out.status.success(),
            "roam {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every agent every daemon knows (running or not).
    fn agents(&self) -> Vec<AgentInfo> {
        let out = self.roam(&["ps", "--all", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ps --json: {e}: {out}"))
    }

    /// The record of `id` where it runs or ended (not the "moved" records it left behind).
    fn agent(&self, id: &str) -> Option<AgentInfo> {
        self.agents()
            .into_iter()
            .find(|a| a.id == id && !matches!(a.state, AgentState::Moved(_)))
    }

    /// Poll `roam ps` (every 100 ms, at most [`WAIT`]) until `pred` holds for agent `id`.
    fn wait_for(&self, id: &str, what: &str, pred: impl Fn(&AgentInfo) -> bool) -> AgentInfo {
        let start = Instant::now();
        loop {
            if let Some(a) = self.agent(id) {
                if pred(&a) {
                    return a;
                }
                if let AgentState::Failed(why) = &a.state {
                    panic!(
                        "agent {id} ({}) failed: {why}; status {:?}",
                        a.kind, a.status
                    );
                }
                assert!(
                    start.elapsed() < WAIT,
                    "agent {id} ({}) never {what}: {:?} {:?}",
                    a.kind,
                    a.state,
                    a.status
                );
            }
            assert!(start.elapsed() < WAIT, "agent {id} never {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_agent(&self, on: &str, kind: &str, args: &[&str]) -> String {
        let mut a = vec!["run", kind];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--on", on]);
        self.roam(&a).trim().to_owned()
    }

    fn migrate(&self, id: &str, to: &str) -> String {
        self.roam(&["migrate", id, "--to", to])
    }

    fn link(&self, h: &str, up: bool) {
        self.ns.link(h, "eth0", up);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn setup(tag: &str) -> Option<Net> {
    match Net::create(tag) {
        Ok(mut net) => {
            for (h, addr) in [("a", A), ("b", B), ("c", C)] {
                net.start_daemon(h, addr);
            }
            Some(net)
        }
        Err(why) => {
            println!("skipped: network namespaces unavailable: {why}");
            None
        }
    }
}

const A: &str = "10.231.0.1:7000";
const B: &str = "10.231.0.2:7000";
const C: &str = "10.231.0.3:7000";

fn running_on(a: &AgentInfo, host: &str) -> bool {
    a.state == AgentState::Running && a.host.to_string() == host
}

/// Bytes a bulk-recv reported so far (from "received N/T bytes").
fn received(a: &AgentInfo) -> u64 {
    a.status
        .strip_prefix("received ")
        .and_then(|r| r.split(['/', ' ']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn agents_migrate_between_namespaces_and_survive_a_link_flap() {
    let Some(net) = setup("m") else { return };
    let bytes: u64 = 192 << 20;
    let total = bytes.to_string();

    // chat (A) ↔ echo (B); telemetry (A) → collector (B); moved over real, different
    // addresses while they work.
    let echo = net.start_agent(B, "echo", &[]);
    let chat = net.start_agent(A, "chat", &[&format!("{B}/echo"), "300", "10"]);
    let collector = net.start_agent(B, "collector", &["9000"]);
    let telemetry = net.start_agent(A, "telemetry", &["10.231.0.2:9000", "600", "4"]);
    net.wait_for(&chat, "is chatting", |a| !a.status.starts_with("0/"));
    println!("{}", net.migrate(&chat, C).trim());
    println!("{}", net.migrate(&telemetry, C).trim());
    println!("{}", net.migrate(&echo, A).trim());
    // Datagrams sent while a link is down are lost (UDP): the readings finish before the flap.
    let t = net.wait_for(&telemetry, "finished", |a| a.state == AgentState::Finished);
    assert_eq!(
        t.status,
        "sent 600/600 readings, 600 acked, 0 duplicate acks"
    );
    assert_eq!(t.host.to_string(), C);

    // bulk-send (A) → bulk-recv (C), the sender moved mid-transfer A → B.
    let recv = net.start_agent(C, "bulk-recv", &[]);
    let send = net.start_agent(A, "bulk-send", &[&format!("{C}/bulk"), &total, "7"]);
    net.wait_for(&recv, "received data", |a| received(a) > 0);
    println!("{}", net.migrate(&send, B).trim());

    // Link flap during the bulk transfer: C's (the receiver's) link down for longer than the
    // idle timeout (6 s), so roam declares the connection lost and redials (failing while the
    // link is down) until it is back up; then re-associates and replays.
    let r0 = net.wait_for(&recv, "is receiving", |a| received(a) > 0);
    let before = received(&r0);
    assert!(before < bytes, "the transfer finished before the link flap");
    net.link("c", false);
    std::thread::sleep(FLAP);
    let during = net.agent(&recv).map(|a| received(&a)).unwrap_or(0);
    net.link("c", true);
    let r1 = net.wait_for(&recv, "receives again", |a| received(a) > during);
    let epoch = |a: &AgentInfo| a.sockets.first().map(|s| s.epoch);
    println!(
        "link flap: C's eth0 down {FLAP:?} at {before} bytes received ({during} when it came back up); receiver's stream epoch {:?} → {:?}",
        epoch(&r0),
        epoch(&r1)
    );
    assert!(
        epoch(&r1) > epoch(&r0),
        "the stream did not re-associate after the link flap"
    );
    // Once it is back, the sender moves again (B → A), mid-transfer.
    println!("{}", net.migrate(&send, A).trim());

    // The verdicts, byte-exact and count-exact.
    let s = net.wait_for(&send, "finished", |a| a.state == AgentState::Finished);
    assert_eq!(
        s.status,
        format!("sent {bytes} bytes, receiver verified: OK {bytes}")
    );
    assert_eq!(s.host.to_string(), A);
    let r = net.wait_for(&recv, "finished", |a| a.state == AgentState::Finished);
    assert_eq!(r.status, format!("received {bytes} bytes: OK {bytes}"));
    let c = net.wait_for(&chat, "finished", |a| a.state == AgentState::Finished);
    assert_eq!(c.status, "300/300 lines echoed intact");
    assert_eq!(c.host.to_string(), C);
    let col = net.wait_for(&collector, "counted every reading", |a| {
        a.status.starts_with("600 readings")
    });
    assert_eq!(col.status, "600 readings from 1 reporters, 0 duplicates");
    // The echo moved to A mid-chat and kept serving it: one stream served to its end.
    let e = net.wait_for(&echo, "served the chat", |a| {
        running_on(a, A) && a.status.contains("in 1 finished streams")
    });
    println!("echo: {}", e.status);

    // Every agent is alive (or finished) on exactly one host.
    let all = net.agents();
    for id in [&echo, &chat, &recv, &send, &collector, &telemetry] {
        let live = all
            .iter()
            .filter(|a| &a.id == id && !matches!(a.state, AgentState::Moved(_)))
            .count();
        assert_eq!(live, 1, "agent {id} is on {live} hosts");
    }
}
