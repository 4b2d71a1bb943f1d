//! `roam chaos` end to end: the relay binary in front of roam endpoints on loopback.
//!
//! - TCP: a roam stream pair whose every connection goes through `roam chaos tcp` with periodic
//!   resets, random resets, random stalls and a bandwidth limit; both directions' SHA-256 equal.
//! - UDP: roam datagram sockets through `roam chaos udp` with drop, duplicate, reorder, delay and
//!   corrupt; every datagram that arrives is intact and arrives once (sealed `Data` with a
//!   replay window, PROTOCOL §10), and every missing one is one the relay dropped, corrupted or
//!   could not queue (datagrams are not retransmitted).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::{Datagram, Endpoint, EndpointConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound of each test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A `roam chaos` child process; killed on drop.
struct Chaos {
    child: Child,
    out: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl Chaos {
    /// Start `roam chaos ARGS` and read the address it listens on from its first line.
    fn start(args: &[&str]) -> Chaos {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roam"))
            .arg("chaos")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start roam chaos");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("first line");
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Chaos { child, out, addr }
    }

    /// SIGTERM, then the rest of its output (the statistics).
    fn stop(mut self) -> String {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
        let mut rest = String::new();
        while self.out.read_line(&mut rest).unwrap_or(0) > 0 {}
        let st = self.child.wait().expect("wait");
        assert!(st.success(), "roam chaos exited with {st}");
        rest
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number after `label` in `text` (first occurrence).
fn number_after(text: &str, label: &str) -> u64 {
    text.split(label)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
}

fn config() -> EndpointConfig {
    let mut cfg = EndpointConfig::default();
    let s = &mut cfg.session;
    s.idle_timeout = Duration::from_millis(1500);
    s.keepalive_interval = Duration::from_millis(300);
    s.redial_initial = Duration::from_millis(2);
    s.redial_max = Duration::from_millis(50);
    s.session_timeout = Duration::from_secs(20);
    cfg
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_chaos_tcp_loses_nothing() {
    // B's contact address is the relay, so redials after a reset go through it too: pick the
    // relay's port first (free a moment ago; 127.0.0.6 is this test's own address).
    let listen = std::net::TcpListener::bind("127.0.0.6:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config();
    cfg.contact = Some(listen);
    let b = Endpoint::bind_with("127.0.0.3:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let target = b.local_addr().to_string();
    let listen = listen.to_string();
    let chaos = Chaos::start(&[
        "tcp",
        "--listen",
        &listen,
        "--to",
        &target,
        "--reset-every",
        "100ms",
        "--reset",
        "0.02",
        "--stall",
        "0.02",
        "--stall-for",
        "20ms",
        "--slow",
        "4M",
        "--seed",
        "7",
    ]);
    let a = Endpoint::bind_with("127.0.0.2:0".parse().unwrap(), config())
        .await
        .unwrap();
    let relay = chaos.addr;
    let run = async move {
        // The association handshake itself may be reset by the relay: retry it (bounded).
        let mut s = None;
        for _ in 0..20 {
            if let Ok(x) = a.connect(relay).await {
                s = Some(x);
                break;
            }
        }
        let s = s.expect("association through the relay");
        let t = b.accept().await.unwrap();
        let up = random(3 << 20, 1);
        let down = random(3 << 20, 2);
        let (up_hash, down_hash) = (Sha256::digest(&up), Sha256::digest(&down));
        let transfer = |mut st: roam::Stream, data: Vec<u8>| async move {
            let (mut rd, mut wr) = tokio::io::split(&mut st);
            let w = async {
                wr.write_all(&data).await?;
                wr.shutdown().await
            };
            let r = async {
                let mut got = Vec::new();
                rd.read_to_end(&mut got).await.map(|_| got)
            };
            let (w, r) = tokio::join!(w, r);
            w.unwrap();
            r.unwrap()
        };
        let (at_a, at_b) = tokio::join!(transfer(s, up.clone()), transfer(t, down.clone()));
        assert_eq!(at_b.len(), 3 << 20);
        assert_eq!(at_a.len(), 3 << 20);
        for (what, got, want) in [("a → b", &at_b, &up), ("b → a", &at_a, &down)] {
            if let Some(i) = got.iter().zip(want.iter()).position(|(x, y)| x != y) {
                // Where the wrong bytes came from, if from elsewhere in the data.
                let probe = &got[i..(i + 64).min(got.len())];
                let from = want.windows(probe.len()).position(|w| w == probe);
                panic!("{what}: first difference at offset {i}; the bytes there are the sent data's offset {from:?}");
            }
        }
        assert_eq!(Sha256::digest(&at_b), up_hash, "a → b differs");
        assert_eq!(Sha256::digest(&at_a), down_hash, "b → a differs");
    };
    tokio::time::timeout(TEST_TIMEOUT, run)
        .await
        .expect("transfer through roam chaos tcp timed out");
    let stats = chaos.stop();
    println!("{stats}");
    let resets = number_after(&stats, "connections reset");
    let accepted = number_after(&stats, "connections accepted");
    assert!(resets >= 1 && accepted >= 2, "no reset happened: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_through_chaos_udp_arrive_intact_or_are_accounted_for() {
    const N: u64 = 1000;
    let y = Datagram::bind("127.0.0.3:0".parse().unwrap())
        .await
        .unwrap();
    let target = y.local_addr().to_string();
    let chaos = Chaos::start(&[
        "udp",
        "--listen",
        "127.0.0.6:0",
        "--to",
        &target,
        "--drop",
        "0.05",
        "--dup",
        "0.01",
        "--reorder",
        "0.02",
        "--corrupt",
        "0.01",
        "--delay",
        "2ms",
        "--seed",
        "7",
    ]);
    let x = Datagram::bind("127.0.0.2:0".parse().unwrap())
        .await
        .unwrap();
    let relay = chaos.addr;
    // A datagram: seq (8 bytes) and the first 24 bytes of SHA-256(seq), so damage shows.
    let packet = |seq: u64| {
        let mut p = seq.to_be_bytes().to_vec();
        p.extend_from_slice(&Sha256::digest(seq.to_be_bytes())[..24]);
        p
    };
    let arrived = AtomicU64::new(0);
    let markers = AtomicU64::new(0);
    let run = async {
        let sender = async {
            for seq in 0..N {
                x.send_to(&packet(seq), relay).await.unwrap();
                // At most 4 datagrams per millisecond, and at most 64 ahead of the receiver
                // (waiting at most 2 ms: some are dropped), so no kernel socket buffer
                // overflows (the relay counts its own queue overflows; the kernel's drops show
                // as datagrams the relay never received).
                if seq % 4 == 3 {
                    for _ in 0..2 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        if seq < arrived.load(Ordering::Acquire) + 64 {
                            break;
                        }
                    }
                }
            }
            // End markers until the receiver has one (the relay may drop some).
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for _ in 0..500 {
                tick.tick().await;
                x.send_to(&packet(u64::MAX), relay).await.unwrap();
                markers.fetch_add(1, Ordering::AcqRel);
            }
        };
        let receiver = async {
            let mut seen = vec![0u32; N as usize];
            let mut damaged = 0u64;
            let mut buf = [0u8; 128];
            loop {
                let (n, _) = y.recv_from(&mut buf).await.unwrap();
                arrived.fetch_add(1, Ordering::AcqRel);
                let p = &buf[..n];
                let Some(seq) = p
                    .get(..8)
                    .and_then(|s| s.try_into().ok())
                    .map(u64::from_be_bytes)
                else {
                    damaged += 1;
                    continue;
                };
                if seq == u64::MAX && p == packet(u64::MAX) {
                    return (seen, damaged);
                }
                match seen.get_mut(seq as usize) {
                    Some(c) if p == packet(seq) => *c += 1,
                    _ => damaged += 1,
                }
            }
        };
        tokio::select! {
            r = receiver => r,
            () = sender => panic!("no end marker arrived"),
        }
    };
    let (seen, damaged) = tokio::time::timeout(TEST_TIMEOUT, run)
        .await
        .expect("datagrams through roam chaos udp timed out");
    let stats = chaos.stop();
    println!("{stats}");
    let up = stats
        .lines()
        .find(|l| l.trim_start().starts_with("up "))
        .expect("up line");
    let cols: Vec<u64> = up
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse().unwrap())
        .collect();
    let (received, dropped, duplicated, corrupted, overflowed) =
        (cols[0], cols[2], cols[3], cols[6], cols[7]);
    // Datagrams that never reached the relay (a kernel socket buffer overflowed on a slow
    // machine): sent (data and end markers) less received (which also counts the handshake's
    // `Hello`, hence the slack of 2).
    let before_relay = (N + markers.load(Ordering::Acquire) + 2).saturating_sub(received);
    let missing = seen.iter().filter(|c| **c == 0).count() as u64;
    let extra: u64 = seen.iter().map(|c| u64::from(c.saturating_sub(1))).sum();
    println!(
        "sent {N}, missing {missing}, duplicates {extra}, damaged {damaged}; relay dropped {dropped}, duplicated {duplicated}, corrupted {corrupted}, overflowed {overflowed}, never received {before_relay}"
    );
    // Every loss is the relay's doing (a drop, a corruption, a full queue); nothing else went
    // missing.
    assert!(
        missing <= dropped + corrupted + overflowed + before_relay,
        "lost more than the relay dropped: {stats}"
    );
    // Sealed datagrams (PROTOCOL §10): a corrupted one fails authentication and a duplicated
    // one falls in the replay window; neither reaches the application.
    assert_eq!(
        extra, 0,
        "duplicates delivered (the relay made {duplicated})"
    );
    assert_eq!(
        damaged, 0,
        "damaged payloads delivered (the relay corrupted {corrupted})"
    );
    assert!(missing >= 1 && dropped >= 1, "the faults did not happen");
}
