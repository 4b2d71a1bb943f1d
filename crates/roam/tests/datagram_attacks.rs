//! Datagram sockets against an in-path attacker (issue 5; PROTOCOL.md §10.3, §10.5, §10.6).
//!
//! A [`UdpAttacker`] sits between two roam datagram sockets on loopback (M sends to the
//! attacker's front socket; P sees M at its back socket): it records every datagram and may
//! drop, modify, repeat or inject. Each test names its attack: eavesdropping (the payload never
//! appears in clear), tampering (altered packets are never delivered), replay (never delivered
//! twice), a spoofed re-association from a third socket (never redirects traffic), and a flood
//! of 10,000 garbage datagrams and Hellos (the established association keeps delivering every
//! datagram, at the same order of throughput).
//!
//! Every wait is bounded; sleeps only pace senders.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam::proto::datagram::{dkind, Packet};
use roam::{Datagram, DatagramConfig, DatagramEvent, SocketId};
use roam_testkit::{AttackAction, AttackDir, UdpAttacker};
use tokio::net::UdpSocket;

const BOUND: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(250);
/// What an eavesdropper looks for in every captured datagram.
const MARKER: &[u8; 32] = b"roam/secret-marker/0123456789abc";

fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

async fn recv(d: &Datagram) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = within("a datagram", d.recv_from(&mut buf))
        .await
        .expect("recv_from");
    buf.truncate(n);
    (buf, from)
}

async fn recv_quiet(d: &Datagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(QUIET, d.recv_from(&mut buf)).await {
        Ok(r) => {
            let (n, _) = r.expect("recv_from");
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}

/// Wait (bounded) until `cond` holds, polling.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// A numbered test datagram carrying the marker.
fn msg(seq: u32) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend_from_slice(MARKER);
    v
}

fn seq_of(d: &[u8]) -> u32 {
    assert_eq!(&d[4..], MARKER, "an intact test datagram");
    u32::from_be_bytes(d[..4].try_into().unwrap())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn counter_of(p: &[u8]) -> u64 {
    u64::from_be_bytes(p[9..17].try_into().unwrap())
}

/// P at 127.0.0.3, the attacker in front of it at 127.0.0.5, M at 127.0.0.2, associated (M
/// sent the first datagram, P read it).
async fn setup(cfg: DatagramConfig) -> (Datagram, Datagram, UdpAttacker) {
    let p = Datagram::bind_with(host(3), cfg.clone()).await.unwrap();
    let x = UdpAttacker::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)), p.local_addr())
        .await
        .unwrap();
    let m = Datagram::bind_with(host(2), cfg).await.unwrap();
    m.send_to(b"hello", x.front()).await.unwrap();
    let (d, from) = recv(&p).await;
    assert_eq!((d.as_slice(), from), (&b"hello"[..], x.back()));
    (m, p, x)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eavesdropper_never_sees_the_payload_in_clear() {
    // The control (plaintext mode, for benchmarks only) shows the search would find it.
    for plaintext in [false, true] {
        let mut cfg = DatagramConfig::default();
        cfg.insecure_plaintext = plaintext;
        let (m, p, x) = setup(cfg).await;
        for seq in 0..50 {
            m.send_to(&msg(seq), x.front()).await.unwrap();
            p.send_to(&msg(seq), x.back()).await.unwrap();
        }
        for _ in 0..50 {
            recv(&p).await;
            recv(&m).await;
        }
        let record = x.record();
        assert!(record.len() >= 100);
        let seen = record.iter().filter(|(_, b)| contains(b, MARKER)).count();
        if plaintext {
            assert_eq!(seen, 100, "control: the marker is found in clear packets");
        } else {
            assert_eq!(seen, 0, "the payload appears in clear on the wire");
            // Not even with a bit of the marker: no 8-byte window of it either.
            assert!(!record
                .iter()
                .any(|(_, b)| MARKER.windows(8).any(|w| contains(b, w))));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_data_is_detected_dropped_and_never_delivered() {
    let (m, p, x) = setup(DatagramConfig::default()).await;
    // Every third Data packet from M gets one bit flipped: in the counter, the ciphertext or
    // the tag (a position that cycles with the counter).
    x.set_policy(|dir, pkt| {
        if dir != AttackDir::FromClient || pkt.first() != Some(&dkind::DATA) {
            return AttackAction::Forward;
        }
        let c = counter_of(pkt);
        if c % 3 != 1 {
            return AttackAction::Forward;
        }
        let mut v = pkt.to_vec();
        let at = 17 + (c as usize * 7) % (v.len() - 17);
        v[at] ^= 1 << (c % 8);
        AttackAction::Replace(v)
    });
    let before = p.stats();
    const N: u32 = 300;
    for seq in 0..N {
        m.send_to(&msg(seq), x.front()).await.unwrap();
        if seq % 32 == 31 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // seq s travels with counter s + 1 (the first contact's datagram was counter 0).
    let tampered: Vec<u32> = (0..N).filter(|s| (s + 1) % 3 == 1).collect();
    let mut got = Vec::new();
    while got.len() < (N as usize - tampered.len()) {
        let (d, _) = recv(&p).await;
        got.push(seq_of(&d));
    }
    assert!(recv_quiet(&p).await.is_none(), "nothing more is delivered");
    let expect: Vec<u32> = (0..N).filter(|s| !tampered.contains(s)).collect();
    assert_eq!(got, expect, "exactly the untouched datagrams, intact");
    let after = p.stats();
    assert_eq!(
        after.auth_failed - before.auth_failed,
        tampered.len() as u64
    );
    assert_eq!(after.refused - before.refused, tampered.len() as u64);
    // The association survives.
    x.set_policy(|_, _| AttackAction::Forward);
    m.send_to(&msg(N), x.front()).await.unwrap();
    assert_eq!(seq_of(&recv(&p).await.0), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_data_is_never_delivered_twice() {
    let (m, p, x) = setup(DatagramConfig::default()).await;
    // Every Data packet is replayed at once, twice (in the window)...
    x.set_policy(|dir, pkt| {
        if dir == AttackDir::FromClient && pkt.first() == Some(&dkind::DATA) {
            AttackAction::Repeat(2)
        } else {
            AttackAction::Forward
        }
    });
    const N: u32 = 200;
    for seq in 0..N {
        m.send_to(&msg(seq), x.front()).await.unwrap();
        if seq % 32 == 31 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut got = Vec::new();
    for _ in 0..N {
        got.push(seq_of(&recv(&p).await.0));
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    until("the immediate replays handled", || {
        p.stats().replayed >= 2 * u64::from(N)
    })
    .await;
    // ... and every Data packet ever recorded is replayed again later, from the attacker.
    x.set_policy(|_, _| AttackAction::Forward);
    let recorded: Vec<Vec<u8>> = x
        .record()
        .into_iter()
        .filter(|(d, b)| *d == AttackDir::FromClient && b[0] == dkind::DATA)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(recorded.len(), N as usize + 1);
    for b in &recorded {
        x.inject(AttackDir::FromClient, b).await.unwrap();
    }
    let expect = 2 * u64::from(N) + recorded.len() as u64;
    until("the late replays handled", || p.stats().replayed >= expect).await;
    assert!(recv_quiet(&p).await.is_none(), "no replay was delivered");
    assert_eq!(p.stats().replayed, expect);
    assert_eq!(p.stats().received, u64::from(N) + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_reassoc_from_a_third_socket_never_redirects_traffic() {
    let (m, p, x) = setup(DatagramConfig::default()).await;
    // The attacker withholds M's re-association requests (keeping a copy) until told otherwise.
    let withhold = Arc::new(AtomicBool::new(true));
    {
        let withhold = withhold.clone();
        x.set_policy(move |dir, pkt| {
            if dir == AttackDir::FromClient
                && pkt.first() == Some(&dkind::REASSOC)
                && withhold.load(Ordering::SeqCst)
            {
                AttackAction::Drop
            } else {
                AttackAction::Forward
            }
        });
    }
    let image = within("the freeze", m.freeze()).await.unwrap();
    let m = Datagram::thaw(image, host(4)).await.unwrap();
    let seen = x.seen();
    x.wait_seen(seen + 1).await;
    let reassoc = loop {
        let r = x.record();
        if let Some((_, b)) = r
            .iter()
            .find(|(d, b)| *d == AttackDir::FromClient && b[0] == dkind::REASSOC)
        {
            break b.clone();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };

    // Eve, a third socket, replays the genuine (new-epoch) request as her own.
    let eve = UdpSocket::bind(host(9)).await.unwrap();
    eve.send_to(&reassoc, p.local_addr()).await.unwrap();
    let sent_by_eve = reassoc.len() as u64;
    // P challenges Eve's address. Eve cannot answer: she relays the challenge to the mover
    // (which answers only challenges from P's address) and forges a response.
    let mut buf = vec![0u8; 2048];
    let (n, _) = within("the challenge", eve.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!(buf[0], dkind::PATH_CHALLENGE);
    let mut received_by_eve = n as u64;
    let challenge = buf[..n].to_vec();
    let m_refused = m.stats().refused;
    eve.send_to(&challenge, m.local_addr()).await.unwrap();
    let Ok(Packet::PathChallenge { assoc, data, .. }) = Packet::decode(challenge.clone().into())
    else {
        panic!("a challenge")
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut mac = [0u8; 32];
    rng.fill_bytes(&mut mac);
    let forged = Packet::PathResponse { assoc, data, mac }.encode();
    eve.send_to(&forged, p.local_addr()).await.unwrap();
    until("M refused the relayed challenge", || {
        m.stats().refused > m_refused
    })
    .await;
    assert!(
        p.peers()[0].migrating,
        "P holds for the unvalidated address"
    );
    assert_eq!(p.peers()[0].addr, x.back(), "not redirected");
    // P's application keeps sending to M meanwhile: held, not sent to Eve.
    p.send_to(&msg(1), x.back()).await.unwrap();

    // The genuine requests get through again; P completes the move where M really is.
    withhold.store(false, Ordering::SeqCst);
    let moved = within("PeerMoved", async {
        loop {
            match p.next_event().await {
                Some(e @ DatagramEvent::PeerMoved { .. }) => return e,
                Some(_) => {}
                None => panic!("events closed"),
            }
        }
    })
    .await;
    assert_eq!(
        moved,
        DatagramEvent::PeerMoved {
            peer: x.back(),
            now_at: x.back()
        }
    );
    assert_eq!(seq_of(&recv(&m).await.0), 1, "what P held reaches M");
    p.send_to(&msg(2), x.back()).await.unwrap();
    assert_eq!(seq_of(&recv(&m).await.0), 2);

    // Eve got nothing but path challenges, within the anti-amplification limit.
    while let Ok(r) = tokio::time::timeout(QUIET, eve.recv_from(&mut buf)).await {
        let (n, _) = r.unwrap();
        assert_eq!(buf[0], dkind::PATH_CHALLENGE, "only challenges reach Eve");
        received_by_eve += n as u64;
    }
    assert!(
        received_by_eve <= 3 * sent_by_eve,
        "{received_by_eve} bytes sent to an unvalidated address for {sent_by_eve} received"
    );
    assert_eq!(p.peers()[0].addr, x.back());
    assert!(p.stats().refused >= 1, "the forged response");
}

/// Delivers `n` numbered datagrams from `m` to `p` (at most 32 ahead of what `p` read) and
/// returns the elapsed time; asserts every one arrived exactly once, in order.
async fn transfer(m: &Datagram, p: &Datagram, to: SocketAddr, first: u32, n: u32) -> Duration {
    let read = Arc::new(AtomicU64::new(0));
    let reader = {
        let read = read.clone();
        async move {
            for k in 0..n {
                let (d, _) = recv(p).await;
                assert_eq!(seq_of(&d), first + k, "every datagram once, in order");
                read.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let writer = async {
        for k in 0..n {
            while u64::from(k) >= read.load(Ordering::SeqCst) + 32 {
                tokio::task::yield_now().await;
            }
            m.send_to(&msg(first + k), to).await.unwrap();
        }
    };
    let t = Instant::now();
    tokio::join!(reader, writer);
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_10000_garbage_datagrams_and_hellos_leaves_the_association_delivering() {
    let (m, p, x) = setup(DatagramConfig::default()).await;
    let assoc = {
        let r = x.record();
        let (_, b) = r
            .iter()
            .find(|(d, b)| *d == AttackDir::FromClient && b[0] == dkind::DATA)
            .expect("the first datagram");
        u64::from_be_bytes(b[1..9].try_into().unwrap())
    };
    const N: u32 = 3000;
    let quiet = transfer(&m, &p, x.front(), 0, N).await;

    // 10,000 datagrams from 40 source ports: random bytes, Data on the genuine association
    // with forged tags and fresh counters, and Hellos with fresh keys (half-open associations).
    let stop = Arc::new(AtomicBool::new(false));
    let target = p.local_addr();
    let flood = tokio::spawn(async move {
        let mut socks = Vec::new();
        for _ in 0..40 {
            socks.push(UdpSocket::bind(host(9)).await.unwrap());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        for k in 0..10_000u32 {
            let b = match k % 3 {
                0 => {
                    let mut v = vec![0u8; rng.gen_range(1..1200)];
                    rng.fill_bytes(&mut v);
                    v
                }
                1 => {
                    let mut sealed = vec![0u8; rng.gen_range(16..200)];
                    rng.fill_bytes(&mut sealed);
                    Packet::Data {
                        assoc,
                        counter: rng.gen_range(1_000..1u64 << 40),
                        sealed: sealed.into(),
                    }
                    .encode()
                    .to_vec()
                }
                _ => {
                    let mut s = [0u8; 16];
                    let mut eph = [0u8; 32];
                    let mut nonce = [0u8; 16];
                    rng.fill_bytes(&mut s);
                    rng.fill_bytes(&mut eph);
                    rng.fill_bytes(&mut nonce);
                    Packet::Hello {
                        socket: SocketId(s),
                        eph,
                        nonce,
                        suites: vec![2, 1],
                    }
                    .encode()
                    .to_vec()
                }
            };
            let _ = socks[k as usize % socks.len()].send_to(&b, target).await;
            if k % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        stop.store(true, Ordering::SeqCst);
    });
    let before = p.stats();
    let flooded = transfer(&m, &p, x.front(), N, N).await;
    within("the flood", flood).await.unwrap();
    // The flood is handled (every garbage datagram refused or a half-open association).
    until("the flood handled", || {
        let s = p.stats();
        s.refused - before.refused
            + (p.peers().len() as u64 - 1)
            + (s.half_open_evicted - before.half_open_evicted)
            + (s.hello_limited - before.hello_limited)
            >= 10_000 - 40
    })
    .await;
    let s = p.stats();
    assert!(s.auth_failed - before.auth_failed >= 3000, "{s:?}");
    assert!(s.half_open_evicted > 0, "{s:?}");
    assert!(
        p.peers().len() <= 1 + DatagramConfig::default().max_half_open,
        "half-open associations are bounded"
    );
    // The established association is untouched and still delivers, at the same order of
    // throughput.
    assert_eq!(
        p.peers()
            .iter()
            .filter(|e| e.known_addr == x.back())
            .count(),
        1
    );
    let after = transfer(&m, &p, x.front(), 2 * N, N).await;
    let rate = |d: Duration| f64::from(N) / d.as_secs_f64();
    eprintln!(
        "datagrams/s: quiet {:.0}, during the flood {:.0}, after {:.0}",
        rate(quiet),
        rate(flooded),
        rate(after)
    );
    assert!(
        rate(flooded) * 10.0 >= rate(quiet),
        "throughput under the flood {:.0}/s vs {:.0}/s",
        rate(flooded),
        rate(quiet)
    );
}
