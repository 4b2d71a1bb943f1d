//! `roam tunnel` across a real network change (issue 7): a psql session whose tunnel client end
//! moves from one network to another (a laptop leaving one network for another), over real,
//! different links, while a transaction is open and megabytes are in flight both ways.
//!
//! Topology (all created by the test, unique names per run, removed by drop guards):
//!
//! ```text
//!   ns srv                                 ns net                        ns cli
//!   lo   10.231.0.1/32  roam tunnel serve → postgres on srv's 127.0.0.1:5432
//!   eth1 10.231.1.1/24 ── p1s ─ br1 ─ p1c ── eth1 10.231.1.2/24   network 1
//!   eth2 10.231.2.1/24 ── p2s ─ br2 ─ p2c ── eth2 10.231.2.2/24   network 2
//!                                            roam tunnel listen on cli's 127.0.0.1:5433
//!                                            psql → 127.0.0.1:5433
//! ```
//!
//! The client namespace reaches 10.231.0.1 from each of its addresses over that address's own
//! network (source-address routing rules), as a host with two uplinks does. The tunnel client
//! end starts bound to 10.231.1.2; `roam tunnel rebind` moves it to 10.231.2.2; then network 1
//! goes away (`eth1` down, which also removes its routes). The psql session must keep its
//! server backend, its open transaction and every byte.
//!
//! Needs root, a working `ip netns` (iproute2), PostgreSQL server and client and `setpriv`
//! (`.ci/run` installs them); otherwise it prints "skipped: ..." and passes. No traffic leaves
//! the test's own namespaces.

mod common;

use std::process::Command;

use common::netns::{ip, run, Namespaces};
use common::programs::{
    postgres_bin, postgres_missing, rebind, server_peers, tunnel, tunnel_ps, Postgres, Procs, Psql,
};
use common::ROAM;
use sha2::{Digest, Sha256};

/// The tunnel server end's address (on srv's loopback, routed from both networks).
const SERVER: &str = "10.231.0.1";
/// The client namespace's address on network 1 and on network 2.
const NET1: &str = "10.231.1.2";
const NET2: &str = "10.231.2.2";
/// Where psql connects inside the client namespace.
const LOCAL: &str = "127.0.0.1:5433";

/// The two networks: srv and cli on both, each through its own bridge in `net`.
fn topology(ns: &mut Namespaces) {
    for h in ["net", "srv", "cli"] {
        ns.add(h);
    }
    let srv = ns.name("srv");
    let cli = ns.name("cli");
    ip(&[
        "-n",
        &srv,
        "addr",
        "add",
        &format!("{SERVER}/32"),
        "dev",
        "lo",
    ]);
    for (n, client) in [(1, NET1), (2, NET2)] {
        let br = format!("br{n}");
        let dev = format!("eth{n}");
        ns.bridge("net", &br);
        ns.attach(
            "net",
            &br,
            &format!("p{n}s"),
            "srv",
            &dev,
            &format!("10.231.{n}.1/24"),
        );
        ns.attach(
            "net",
            &br,
            &format!("p{n}c"),
            "cli",
            &dev,
            &format!("{client}/24"),
        );
        // Traffic from this network's address goes out over this network.
        let table = format!("10{n}");
        ip(&["-n", &cli, "rule", "add", "from", client, "table", &table]);
        ip(&[
            "-n",
            &cli,
            "route",
            "add",
            &format!("{SERVER}/32"),
            "via",
            &format!("10.231.{n}.1"),
            "dev",
            &dev,
            "table",
            &table,
        ]);
    }
}

/// `n` bytes of hex text, deterministic (a SHA-256 chain).
fn payload(n: usize) -> String {
    let mut out = String::with_capacity(n + 64);
    let mut h = Sha256::digest(b"roam tunnel netns");
    while out.len() < n {
        out.push_str(&hex::encode(h));
        h = Sha256::digest(h);
    }
    out.truncate(n);
    out
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A psql session through the tunnel survives the client end moving from network 1 to network
/// 2, and network 1 disappearing: same server backend, the transaction open across the move
/// commits everything, 1 MiB written and 2 MiB read across the move arrive intact.
#[test]
fn psql_session_survives_the_client_moving_to_another_network() {
    if let Some(why) = postgres_missing() {
        println!("skipped: {why}");
        return;
    }
    let bin = postgres_bin().expect("checked above");
    let mut ns = match Namespaces::new("tun") {
        Ok(ns) => ns,
        Err(why) => {
            println!("skipped: network namespaces unavailable: {why}");
            return;
        }
    };
    topology(&mut ns);
    // Declared after `ns`, so dropped before it: the processes end before their namespaces go.
    let pg = Postgres::start(&bin, 5432, Some((&ns, "srv")));
    let state = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let psk = state.path().join("tunnel.key");
    std::fs::write(&psk, format!("{}\n", "6b".repeat(32))).unwrap();
    let psk = psk.to_str().unwrap().to_owned();
    let serve = format!("{SERVER}:7100");
    tunnel(
        &mut procs,
        ns.exec("srv", ROAM),
        state.path(),
        &[
            "serve",
            "--listen",
            &serve,
            "--forward",
            &format!("127.0.0.1:{}", pg.port),
            "--psk-file",
            &psk,
        ],
    );
    tunnel(
        &mut procs,
        ns.exec("cli", ROAM),
        state.path(),
        &[
            "listen",
            "--local",
            LOCAL,
            "--to-peer",
            &serve,
            "--bind",
            &format!("{NET1}:0"),
            "--psk-file",
            &psk,
        ],
    );

    let (host, port) = LOCAL.split_once(':').unwrap();
    let mut psql = Psql::start(ns.exec("cli", "psql"), host, port.parse().unwrap());
    let pid = psql.ask("select pg_backend_pid();");
    assert!(pid.parse::<u32>().is_ok(), "psql answered {pid:?}");
    let peers = server_peers(state.path());
    assert!(
        peers.len() == 1 && peers[0].starts_with(&format!("{NET1}:")),
        "the server end should reach the client on network 1: {peers:?}"
    );
    assert_eq!(
        psql.ask("create temp table t(i int); create temp table up(v text); select 1;"),
        "1"
    );
    assert_eq!(
        psql.ask("begin; with x as (insert into t select generate_series(1,100) returning i) select count(*) from x;"),
        "100"
    );

    // In flight across the move: 1 MiB up (an insert in the open transaction) and 2 MiB down
    // (a result with its SHA-256 computed by the server), sent before the move and read after.
    let up = payload(1 << 20);
    psql.send(&format!(
        "insert into up values ('{up}'); select length(v), encode(sha256(convert_to(v, 'UTF8')), 'hex') from up;"
    ));
    psql.send(
        "select encode(sha256(convert_to(s, 'UTF8')), 'hex') || '|' || s from \
         (select string_agg(md5(i::text), '' order by i) as s from generate_series(1, 65536) i) x;",
    );

    // The laptop moves to network 2, then network 1 is gone.
    let said = rebind(state.path(), LOCAL, NET2);
    assert!(
        said.contains(&format!("{NET2}:")) && said.contains("1 connection"),
        "{said}"
    );
    ns.link("cli", "eth1", false);
    // Network 1 is gone: its address reaches nothing any more.
    let gone =
        run(Command::new("ip").args(["-n", &ns.name("cli"), "route", "get", SERVER, "from", NET1]));
    assert!(
        !gone.status.success(),
        "{SERVER} is still reachable from {NET1}: {}",
        String::from_utf8_lossy(&gone.stdout)
    );

    assert_eq!(
        psql.answer("the 1 MiB insert"),
        format!("{}|{}", up.len(), sha256_hex(&up)),
        "the 1 MiB sent across the move arrived intact"
    );
    let down = psql.answer("the 2 MiB select");
    let (hash, s) = down.split_once('|').expect("hash|data");
    assert_eq!(s.len(), 2 << 20, "the 2 MiB read across the move");
    assert_eq!(
        sha256_hex(s),
        hash,
        "the 2 MiB read across the move arrived intact"
    );

    assert_eq!(
        psql.ask("select pg_backend_pid();"),
        pid,
        "the same server backend after the move"
    );
    let peers = server_peers(state.path());
    assert!(
        peers.len() == 1 && peers[0].starts_with(&format!("{NET2}:")),
        "the server end should reach the client on network 2: {peers:?}"
    );
    assert_eq!(psql.ask("select count(*) from t;"), "100");
    assert_eq!(
        psql.ask("insert into t select generate_series(101,200); commit; select sum(i) from t;"),
        "20100"
    );
    assert_eq!(
        psql.ask("select count(*) || '|' || sum(length(v)) from up;"),
        format!("1|{}", 1 << 20)
    );
    print!("{}", tunnel_ps(state.path()));
    psql.finish();
    println!(
        "psql backend {pid} kept across the move {NET1} → {NET2}, network 1 down; 1 MiB up and 2 MiB down in flight verified"
    );
}
