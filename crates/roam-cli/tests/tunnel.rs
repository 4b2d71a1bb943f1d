//! `roam tunnel` with real programs nobody here wrote: redis-server/redis-cli/redis-benchmark
//! through a tunnel whose roam connection a fault relay keeps killing, and a psql session that
//! survives the tunnel client changing its address. Plus bad input: a refusing server, a peer
//! tunnel that is down, a port already in use.
//!
//! Loopback only (127.0.0.41–127.0.0.49 and 127.0.0.1 for the real servers). The real servers
//! come from Debian packages that `.ci/run` installs (redis-server, redis-tools, postgresql);
//! where one is missing (a developer machine), its test says so and returns.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::programs::{
    have, postgres_bin, postgres_missing, rebind, server_peers, tunnel, Postgres, Procs, Psql,
};
use common::ROAM;

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until a TCP server answers at `addr` (bounded).
fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens at {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn redis_server(procs: &mut Procs) -> u16 {
    let port = free_port("127.0.0.1");
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    procs.0.push(child);
    wait_listening(&format!("127.0.0.1:{port}"));
    port
}

/// Both tunnel ends with a fault relay between them. `[serve, relay, local]` are the IPs: the
/// server end listens on `serve` and forwards to `forward`, advertising the relay (on `relay`)
/// so every connection and reconnection goes through it; the client end listens on `local`.
/// The relay and the client end's local address.
fn tunnel_ends_through_relay(
    rt: &tokio::runtime::Runtime,
    procs: &mut Procs,
    state: &Path,
    [serve, relay, local]: [&str; 3],
    forward: &str,
) -> (roam_testkit::Relay, String) {
    let serve: SocketAddr = format!("{serve}:{}", free_port(serve)).parse().unwrap();
    let relay = rt
        .block_on(roam_testkit::Relay::start(
            format!("{relay}:0").parse().unwrap(),
            serve,
        ))
        .unwrap();
    let relay_addr = relay.local_addr().to_string();
    tunnel(
        procs,
        Command::new(ROAM),
        state,
        &[
            "serve",
            "--listen",
            &serve.to_string(),
            "--forward",
            forward,
            "--advertise",
            &relay_addr,
        ],
    );
    let local = format!("{local}:{}", free_port(local));
    tunnel(
        procs,
        Command::new(ROAM),
        state,
        &["listen", "--local", &local, "--to-peer", &relay_addr],
    );
    (relay, local)
}

/// redis through the tunnel while the fault relay between the tunnel ends kills every roam
/// connection again and again, and stalls them now and then: every command is answered, no client sees a connection error,
/// and the server holds exactly what was written.
#[test]
fn redis_through_a_tunnel_whose_connection_is_killed_repeatedly() {
    if !have("redis-server") || !have("redis-cli") || !have("redis-benchmark") {
        eprintln!("skipped: redis-server/redis-tools are not installed (.ci/run installs them)");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let redis = redis_server(&mut procs);
    let (relay, local) = tunnel_ends_through_relay(
        &rt,
        &mut procs,
        state.path(),
        ["127.0.0.42", "127.0.0.43", "127.0.0.41"],
        &format!("127.0.0.1:{redis}"),
    );
    let relay = std::sync::Arc::new(relay);
    let (host, port) = local.split_once(':').unwrap();

    // The fault schedule: every 150 ms, for as long as the clients run (bounded), kill every
    // roam connection; every fourth time stall them for 400 ms instead (bytes held, windows
    // fill up, nothing closes).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kills = {
        let stop = stop.clone();
        let relay = relay.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            for round in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(150));
                if round % 4 == 3 {
                    relay.stall(Duration::from_millis(400));
                } else {
                    kills += relay.kill_all();
                }
            }
            kills
        })
    };

    // 1. One redis-cli connection writing N keys, commands from stdin.
    const N: usize = 3000;
    let mut cli = Command::new("redis-cli")
        .args(["-h", host, "-p", port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = cli.stdin.take().unwrap();
        let mut cmds = String::new();
        for i in 0..N {
            cmds.push_str(&format!("SET tk:{i} value-{i}-{}\n", "x".repeat(i % 50)));
        }
        stdin.write_all(cmds.as_bytes()).unwrap();
    }
    let out = cli.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-cli failed: {stderr}");
    assert!(!stderr.contains("rror"), "redis-cli saw an error: {stderr}");
    assert_eq!(
        stdout.lines().filter(|l| *l == "OK").count(),
        N,
        "every SET answered OK"
    );

    // 2. redis-benchmark with kept-alive connections.
    let bench = Command::new("redis-benchmark")
        .args([
            "-h", host, "-p", port, "-n", "20000", "-c", "8", "-k", "1", "-t", "set,get", "-q",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bench.stdout).to_string()
        + &String::from_utf8_lossy(&bench.stderr);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = kills.join().unwrap();
    assert!(bench.status.success(), "redis-benchmark failed: {text}");
    assert!(
        !text.contains("rror") && !text.contains("reset"),
        "redis-benchmark saw a connection error: {text}"
    );
    assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    assert!(
        kills >= 3,
        "the relay killed only {kills} connections: the test proved nothing"
    );
    let stalls = relay.stats().stalls;
    assert!(
        stalls >= 1,
        "the relay stalled no connection: the test proved nothing"
    );

    // 3. The data set on the server, asked directly (not through the tunnel).
    let direct = |args: &[&str]| {
        let o = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &redis.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    for i in [0, 1, 777, N - 1] {
        assert_eq!(
            direct(&["GET", &format!("tk:{i}")]),
            format!("value-{i}-{}", "x".repeat(i % 50))
        );
    }
    let keys: usize = direct(&["EVAL", "return #redis.call('keys','tk:*')", "0"])
        .parse()
        .unwrap();
    assert_eq!(keys, N);
    eprintln!("redis through the tunnel: {N} SETs and a benchmark answered through {kills} killed connections and {stalls} stalls");
}

/// A psql session through the tunnel survives the tunnel client end changing its address
/// (`roam tunnel rebind`, i.e. `Endpoint::rebind`) mid-session: same server backend, same
/// transaction state, every query answered.
#[test]
fn psql_session_survives_the_client_end_changing_its_address() {
    if let Some(why) = postgres_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let bin = postgres_bin().expect("checked above");
    let mut procs = Procs(Vec::new());
    let pg = Postgres::start(&bin, free_port("127.0.0.1"), None);
    let pg_port = pg.port;

    let state = tempfile::tempdir().unwrap();
    // This tunnel's ends authenticate each other with a pre-shared key.
    let psk = state.path().join("tunnel.key");
    std::fs::write(&psk, format!("{}\n", "5a".repeat(32))).unwrap();
    let psk = psk.to_str().unwrap().to_owned();
    let serve = format!("127.0.0.46:{}", free_port("127.0.0.46"));
    tunnel(
        &mut procs,
        Command::new(ROAM),
        state.path(),
        &[
            "serve",
            "--listen",
            &serve,
            "--forward",
            &format!("127.0.0.1:{pg_port}"),
            "--psk-file",
            &psk,
        ],
    );
    // A client end without the key is refused at its start-up probe.
    let stranger = Command::new(ROAM)
        .args([
            "tunnel",
            "listen",
            "--local",
            "127.0.0.45:0",
            "--to-peer",
            &serve,
            "--state-dir",
        ])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!stranger.status.success());
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("not accepted"),
        "{}",
        String::from_utf8_lossy(&stranger.stderr)
    );
    let local = format!("127.0.0.45:{}", free_port("127.0.0.45"));
    tunnel(
        &mut procs,
        Command::new(ROAM),
        state.path(),
        &[
            "listen",
            "--local",
            &local,
            "--to-peer",
            &serve,
            "--bind",
            "127.0.0.47:0",
            "--psk-file",
            &psk,
        ],
    );
    let (host, port) = local.split_once(':').unwrap();

    // -q keeps BEGIN/COMMIT silent: each answer below is the one row of its last query.
    let mut psql = Psql::start(Command::new("psql"), host, port.parse().unwrap());
    let pid = psql.ask("select pg_backend_pid();");
    assert!(pid.parse::<u32>().is_ok(), "psql answered {pid:?}");
    assert_eq!(psql.ask("create temp table t(i int); select 1;"), "1");
    assert_eq!(
        psql.ask("begin; with x as (insert into t select generate_series(1,100) returning i) select count(*) from x;"),
        "100"
    );
    // The client end moves to 127.0.0.48, then to 127.0.0.49, mid-transaction.
    for ip in ["127.0.0.48", "127.0.0.49"] {
        let said = rebind(state.path(), &local, ip);
        assert!(said.contains(ip) && said.contains("1 connection"), "{said}");
        assert_eq!(
            psql.ask("select pg_backend_pid();"),
            pid,
            "the same server backend after moving to {ip}"
        );
        // The server end's session now reaches the client end at its new address.
        let peers = server_peers(state.path());
        assert!(
            peers.len() == 1 && peers[0].starts_with(&format!("{ip}:")),
            "the server end does not see {ip}: {peers:?}"
        );
        assert_eq!(psql.ask("select count(*) from t;"), "100");
    }
    assert_eq!(psql.ask("commit; select sum(i) from t;"), "5050");
    psql.finish();
}

fn roam_fails(args: &[&str], state: &Path, expect: &str) {
    let start = Instant::now();
    let o = Command::new(ROAM)
        .arg("tunnel")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "roam tunnel {args:?} should fail");
    assert!(
        err.contains(expect),
        "roam tunnel {args:?}: expected {expect:?} in {err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "roam tunnel {args:?} hung"
    );
}

/// A server that refuses, a peer tunnel that is down, a port already in use: a clear message
/// and a non-zero exit each, no hang.
#[test]
fn bad_input_is_a_clear_message_and_a_nonzero_exit() {
    let state = tempfile::tempdir().unwrap();
    let dead = format!("127.0.0.44:{}", free_port("127.0.0.44"));
    roam_fails(
        &["serve", "--listen", "127.0.0.44:0", "--forward", &dead],
        state.path(),
        "refuses connections",
    );
    roam_fails(
        &["listen", "--local", "127.0.0.44:0", "--to-peer", &dead],
        state.path(),
        "is down or unreachable",
    );
    let taken = std::net::TcpListener::bind("127.0.0.44:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let mut procs = Procs(Vec::new());
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let serve = format!("127.0.0.44:{}", free_port("127.0.0.44"));
    tunnel(
        &mut procs,
        Command::new(ROAM),
        state.path(),
        &[
            "serve",
            "--listen",
            &serve,
            "--forward",
            &upstream.local_addr().unwrap().to_string(),
        ],
    );
    roam_fails(
        &["listen", "--local", &taken, "--to-peer", &serve],
        state.path(),
        "cannot listen on",
    );
    roam_fails(
        &["rebind", "--local", "127.0.0.44:1", "--to", "127.0.0.45"],
        state.path(),
        "no tunnel client end",
    );
}

/// A real server for the tunnel to forward to: echoes every line, on a thread per connection
/// (at most 16 connections: the tunnel ends' start-up checks connect too). Its address.
fn line_echo_server() -> String {
    use std::io::{BufRead, BufReader};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forward = upstream.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in upstream.incoming().take(16).map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    if writeln!(w, "{line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
    forward
}

/// The roam connection that would carry a new local connection is reset in the middle of the
/// association handshake (by the relay, after 40 bytes): the tunnel client end opens another
/// session, and the local program never notices.
#[test]
fn a_session_cut_mid_handshake_is_opened_again_and_the_program_never_notices() {
    use std::io::{BufRead, BufReader};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let forward = line_echo_server();
    let (relay, local) =
        tunnel_ends_through_relay(&rt, &mut procs, state.path(), ["127.0.0.45"; 3], &forward);
    for round in 0..3 {
        // The next connection through the relay dies 40 bytes in: inside the dialer's Hello.
        relay.kill_after_bytes(40);
        let killed = relay.stats().killed;
        let mut conn = std::net::TcpStream::connect(&local).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        writeln!(conn, "round {round}").unwrap();
        let mut got = String::new();
        BufReader::new(&conn).read_line(&mut got).unwrap();
        assert_eq!(got.trim_end(), format!("round {round}"));
        assert!(
            relay.stats().killed > killed,
            "the relay killed no handshake: the test proved nothing"
        );
    }
}

/// Ctrl-C (SIGINT) on a tunnel end with a connection open: it stops accepting, says it waits,
/// keeps carrying the open connection, and exits 0 as soon as that connection ends — long before
/// its `--drain` limit (60 s here; the test gives up after 20 s).
#[test]
fn ctrl_c_finishes_open_connections_then_exits() {
    use common::programs::{lines, wait_line};
    use std::io::{BufRead, BufReader};
    let state = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let forward = line_echo_server();
    let serve = format!("127.0.0.46:{}", free_port("127.0.0.46"));
    tunnel(
        &mut procs,
        Command::new(ROAM),
        state.path(),
        &["serve", "--listen", &serve, "--forward", &forward],
    );
    let local = format!("127.0.0.46:{}", free_port("127.0.0.46"));
    let mut client = Command::new(ROAM)
        .args(["tunnel", "listen", "--local", &local, "--to-peer", &serve])
        .args(["--drain", "60s", "--state-dir"])
        .arg(state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(client.stdout.take().unwrap());
    let err = lines(client.stderr.take().unwrap());
    if let Err(e) = wait_line(&out, "ready", Duration::from_secs(30)) {
        let said: Vec<String> = err.try_iter().collect();
        panic!("roam tunnel listen did not start: {e}; stderr: {said:?}");
    }

    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut echo = BufReader::new(conn.try_clone().unwrap());
    let mut ask = |what: &str| {
        writeln!(conn, "{what}").unwrap();
        let mut got = String::new();
        echo.read_line(&mut got).unwrap();
        assert_eq!(got.trim_end(), what);
    };
    ask("before the signal");

    let pid = client.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    wait_line(
        &err,
        "for 1 open connection(s) to finish",
        Duration::from_secs(20),
    )
    .unwrap();
    // Still carried while the end drains.
    ask("during the drain");
    drop(echo);
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(client.wait());
    });
    let status = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the tunnel end should exit once its last connection ended, not at --drain")
        .unwrap();
    assert!(status.success(), "exit: {status}");
    let said = wait_line(&err, "carried", Duration::from_secs(5)).unwrap();
    assert!(said.contains("carried 1 connection(s)"), "{said}");
}
