//! Network namespaces for the tests that need real, different addresses (root and iproute2
//! only). Names are unique per test process and tag, so tests run concurrently; dropping a
//! [`Namespaces`] deletes every namespace it made (which deletes their veth pairs).
//!
//! Addresses used inside them are 10.231.x.x: they exist only inside the test's own
//! namespaces, so no traffic ever leaves them.

use std::ffi::OsStr;
use std::process::{Command, Output};

/// Run `cmd` to completion; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run `ip ARGS`; panics with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test, named `roam{pid}{tag}{h}`; deleted on drop.
pub struct Namespaces {
    prefix: String,
    names: Vec<String>,
}

impl Namespaces {
    /// Check that namespaces can be made here, or `Err` with the reason (not root, no `ip`).
    pub fn new(tag: &str) -> Result<Namespaces, String> {
        let prefix = format!("roam{}{tag}", std::process::id());
        let probe = format!("{prefix}probe");
        match Command::new("ip").args(["netns", "add", &probe]).output() {
            Ok(o) if o.status.success() => {
                let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            }
            Ok(o) => {
                return Err(format!(
                    "`ip netns add` failed (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Err(format!("`ip` is not available (iproute2): {e}")),
        }
        Ok(Namespaces {
            prefix,
            names: Vec::new(),
        })
    }

    /// The prefix of every name (unique to this process and tag).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Create namespace `h` with its loopback up; returns its full name.
    pub fn add(&mut self, h: &str) -> String {
        let ns = self.name(h);
        ip(&["netns", "add", &ns]);
        self.names.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// The full name of namespace `h`.
    pub fn name(&self, h: &str) -> String {
        format!("{}{h}", self.prefix)
    }

    /// `ip netns exec NS program`: a command that runs `program` inside namespace `h`.
    pub fn exec(&self, h: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name(h)]).arg(program);
        c
    }

    /// A veth pair: interface `a_if` in namespace `a`, `b_if` in namespace `b`, both down.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        ip(&[
            "-n",
            &self.name(a),
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            &self.name(b),
        ]);
    }

    /// Port `port` of bridge `br` (both in namespace `h`) attached to `ns_if` in namespace
    /// `ns`, which gets `addr` (CIDR) and is brought up.
    pub fn attach(&self, h: &str, br: &str, port: &str, ns: &str, ns_if: &str, addr: &str) {
        self.veth(h, port, ns, ns_if);
        let hn = self.name(h);
        ip(&["-n", &hn, "link", "set", port, "master", br]);
        ip(&["-n", &hn, "link", "set", port, "up"]);
        let n = self.name(ns);
        ip(&["-n", &n, "addr", "add", addr, "dev", ns_if]);
        ip(&["-n", &n, "link", "set", ns_if, "up"]);
    }

    /// A bridge `br` in namespace `h`, up.
    pub fn bridge(&self, h: &str, br: &str) {
        let hn = self.name(h);
        ip(&["-n", &hn, "link", "add", br, "type", "bridge"]);
        ip(&["-n", &hn, "link", "set", br, "up"]);
    }

    /// Bring interface `dev` of namespace `h` up or down.
    pub fn link(&self, h: &str, dev: &str, up: bool) {
        ip(&[
            "-n",
            &self.name(h),
            "link",
            "set",
            dev,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
