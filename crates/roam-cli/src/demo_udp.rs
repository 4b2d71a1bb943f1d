//! The UDP part of `roam demo`: a telemetry reporter on host A sends numbered readings to
//! several collectors on host B, which acknowledge each one to the address they first knew.
//! Mid-run the reporter is frozen and thawed on host C, and back. Every reading and every
//! acknowledgement is accounted for: none lost, none duplicated, all reported under the
//! reporter's first address.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roam::{Datagram, DatagramImage};

use crate::demo_sockets::{ms, BoxError};

/// Readings sent before waiting for the previous window's acknowledgements.
const WINDOW: u64 = 32;
/// How long the reporter waits for one window's acknowledgements before giving up on them.
const ACK_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Collected {
    seqs: BTreeSet<u64>,
    duplicates: u64,
    wrong_sender: u64,
}

async fn collector(sock: Arc<Datagram>, reporter: SocketAddr, seen: Arc<Mutex<Collected>>) {
    let mut buf = [0u8; 256];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            return;
        };
        if n < 8 {
            continue;
        }
        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
        {
            let mut c = seen.lock().unwrap_or_else(|p| p.into_inner());
            if from != reporter {
                c.wrong_sender += 1;
            }
            if !c.seqs.insert(seq) {
                c.duplicates += 1;
            }
        }
        // Acknowledge to the address the application knows the reporter by.
        let _ = sock.send_to(&seq.to_be_bytes(), from).await;
    }
}

/// Send readings `from..to` to every collector, a window at a time, collecting
/// acknowledgements. The last window's acknowledgements are left in flight: the migration that
/// follows must carry them (drained into the image, or held by the collectors).
async fn run_leg(
    u: &Datagram,
    collectors: &[SocketAddr],
    acks: &mut [BTreeSet<u64>],
    from: u64,
    to: u64,
) -> Result<(), BoxError> {
    let mut reading = [0u8; 64];
    let mut seq = from;
    while seq < to {
        let end = (seq + WINDOW).min(to);
        // Before sending more, the window before this one must be acknowledged.
        collect_acks(u, collectors, acks, seq.saturating_sub(WINDOW)).await?;
        for s in seq..end {
            reading[..8].copy_from_slice(&s.to_be_bytes());
            reading[8..16].copy_from_slice(&(s * 37 % 1000).to_be_bytes());
            for c in collectors {
                u.send_to(&reading, *c).await?;
            }
        }
        seq = end;
    }
    Ok(())
}

/// Receive acknowledgements until every reading below `upto` is acknowledged by every
/// collector, or [`ACK_WAIT`] passes without completing.
async fn collect_acks(
    u: &Datagram,
    collectors: &[SocketAddr],
    acks: &mut [BTreeSet<u64>],
    upto: u64,
) -> Result<(), BoxError> {
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    let mut buf = [0u8; 64];
    while acks.iter().any(|a| a.range(..upto).count() < upto as usize) {
        match tokio::time::timeout_at(deadline, u.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) if n >= 8 => {
                if let Some(i) = collectors.iter().position(|c| *c == from) {
                    acks[i].insert(u64::from_be_bytes(buf[..8].try_into()?));
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(())
}

/// Run the UDP part; `Ok(true)` when every check held.
pub async fn run(
    hosts: [std::net::IpAddr; 3],
    readings: u64,
    migrations: u32,
    n_collectors: usize,
) -> Result<bool, BoxError> {
    let t0 = Instant::now();
    let stamp = || format!("[{:>8.3}s]", t0.elapsed().as_secs_f64());
    let mut u = Datagram::bind(SocketAddr::new(hosts[0], 0)).await?;
    let first = u.local_addr();
    let mut collectors = Vec::new();
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..n_collectors {
        let c = Arc::new(Datagram::bind(SocketAddr::new(hosts[1], 0)).await?);
        let s = Arc::new(Mutex::new(Collected::default()));
        collectors.push(c.local_addr());
        tasks.push(tokio::spawn(collector(c.clone(), first, s.clone())));
        seen.push((c, s));
    }
    say!("UDP: telemetry reporter on host A ({first}) -> {n_collectors} collectors on host B");
    say!(
        "  {readings} readings to each collector, acknowledged to the reporter's first address; {migrations} planned migrations A <-> C"
    );
    say!("");
    let mut acks = vec![BTreeSet::new(); n_collectors];
    let m = u64::from(migrations);
    let here_hosts = [(hosts[0], "A"), (hosts[2], "C")];
    let mut here = 0usize;
    let mut sent_at = 0u64;
    for k in 1..=m {
        let point = readings * k / (m + 1);
        run_leg(&u, &collectors, &mut acks, sent_at, point).await?;
        sent_at = point;
        let started = Instant::now();
        let image = u.freeze().await?;
        let freeze = started.elapsed();
        let bytes = image.to_bytes();
        let image = DatagramImage::from_bytes(&bytes)?;
        let next = 1 - here;
        let thaw_start = Instant::now();
        u = Datagram::thaw(image, SocketAddr::new(here_hosts[next].0, 0)).await?;
        // Wait until every collector acknowledged the re-association.
        let mut pending = n_collectors;
        while pending > 0 {
            match tokio::time::timeout(ACK_WAIT, u.next_event()).await {
                Ok(Some(roam::DatagramEvent::Reassociated { .. })) => pending -= 1,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        say!(
            "{} migration {k}: {} -> {} ({}) after reading {point}",
            stamp(),
            here_hosts[here].1,
            here_hosts[next].1,
            u.local_addr()
        );
        say!(
            "             freeze {} | image {} B ({} peers) | all {n_collectors} peers re-associated after {}",
            ms(freeze),
            bytes.len(),
            n_collectors,
            ms(thaw_start.elapsed())
        );
        here = next;
    }
    run_leg(&u, &collectors, &mut acks, sent_at, readings).await?;
    collect_acks(&u, &collectors, &mut acks, readings).await?;
    let stats = u.stats();
    say!("{} all readings sent", stamp());
    say!("");
    say!("verification (UDP)");
    let mut ok = stats.migrations == m;
    for (i, (c, s)) in seen.iter().enumerate() {
        let s = s.lock().unwrap_or_else(|p| p.into_inner());
        let got = s.seqs.len() as u64;
        let lost = readings - got;
        let acked = acks[i].len() as u64;
        let cstats = c.stats();
        let good = lost == 0 && s.duplicates == 0 && s.wrong_sender == 0 && acked == readings;
        ok &= good;
        say!(
            "  collector {} {:<21} received {got}/{readings}  lost {lost}  duplicates {}  acks back {acked}/{readings}  held during moves {}  {}",
            i + 1,
            c.local_addr().to_string(),
            s.duplicates,
            cstats.held_and_sent,
            if good { "ok" } else { "MISMATCH" }
        );
    }
    say!(
        "  reporter: migrations {}/{m}, re-association requests {} ({} resent on data), dropped {}  {}",
        stats.migrations,
        stats.reassoc_sent,
        stats.reassoc_resent_on_data,
        stats.dropped_hold + stats.dropped_recv + stats.dropped_unreachable,
        if stats.migrations == m { "ok" } else { "MISMATCH" }
    );
    for t in tasks {
        t.abort();
    }
    Ok(ok)
}
