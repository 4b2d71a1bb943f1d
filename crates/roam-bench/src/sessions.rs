//! Many sessions: memory per idle session, and a batch of sessions frozen and thawed at once.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::{host, rss_bytes, within, Bench, BoxError, Params, Row, Stat};

/// Connections opened at once while setting up.
const CONCURRENT: usize = 64;
/// File descriptors kept free for everything else.
const FD_RESERVE: u64 = 512;

/// Open `n` sessions from `a` to `b`, `CONCURRENT` at a time.
async fn open(
    a: &roam::Endpoint,
    b: &roam::Endpoint,
    n: usize,
) -> Result<Vec<(roam::Stream, roam::Stream)>, BoxError> {
    let limit = Duration::from_secs(30);
    let mut pairs = Vec::with_capacity(n);
    while pairs.len() < n {
        let k = (n - pairs.len()).min(CONCURRENT);
        let mut dials = JoinSet::new();
        for _ in 0..k {
            let (a, to) = (a.clone(), b.local_addr());
            dials.spawn(async move { a.connect(to).await });
        }
        let accepts = async {
            let mut v = Vec::with_capacity(k);
            for _ in 0..k {
                v.push(b.accept().await?);
            }
            Ok::<_, roam::AcceptError>(v)
        };
        let dialed = async {
            let mut v = Vec::with_capacity(k);
            while let Some(r) = dials.join_next().await {
                v.push(r.map_err(BoxError::from)?.map_err(BoxError::from)?);
            }
            Ok::<_, BoxError>(v)
        };
        let (d, acc) = tokio::join!(
            within(limit, "connect", dialed),
            within(limit, "accept", accepts)
        );
        // Which accepted stream belongs to which dialed one does not matter for idle
        // sessions; for the batch each pair is checked by a message below.
        pairs.extend(d?.into_iter().zip(acc?));
    }
    Ok(pairs)
}

/// Send one byte on each pair from the first to the second stream, matching the second
/// stream by session id (accept order may differ from dial order).
async fn pair_up(
    pairs: Vec<(roam::Stream, roam::Stream)>,
) -> Result<Vec<(roam::Stream, roam::Stream)>, BoxError> {
    let (dialed, mut accepted): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    accepted.sort_by_key(|t| t.session_id());
    let mut accepted: Vec<Option<roam::Stream>> = accepted.into_iter().map(Some).collect();
    let ids: Vec<_> = accepted
        .iter()
        .map(|t| t.as_ref().map(|t| t.session_id()))
        .collect();
    let mut out = Vec::with_capacity(dialed.len());
    let limit = Duration::from_secs(10);
    for mut s in dialed {
        let i = ids
            .binary_search(&Some(s.session_id()))
            .map_err(|_| "a dialed session was not accepted")?;
        let mut t = accepted[i].take().ok_or("session accepted twice")?;
        within(limit, "write", s.write_all(b"x")).await?;
        let mut b = [0u8; 1];
        within(limit, "read", t.read_exact(&mut b)).await?;
        out.push((s, t));
    }
    Ok(out)
}

/// Sessions the fd limit allows (2 sockets per session, both ends in this process), and a
/// note if `want` had to be scaled down.
fn fd_bound(want: usize) -> (usize, Option<String>) {
    match crate::fd_limit() {
        Some(limit) => {
            let max = (limit.saturating_sub(FD_RESERVE) / 2) as usize;
            if want > max {
                (
                    max.max(1),
                    Some(format!(
                        "open-file limit {limit}: {want} sessions scaled down to {} \
                         (2 sockets per session, {FD_RESERVE} fds kept free)",
                        max.max(1)
                    )),
                )
            } else {
                (want, None)
            }
        }
        None => (want, None),
    }
}

/// Idle memory per session end, and batch freeze + thaw time.
pub async fn sessions(p: &Params) -> Result<Bench, BoxError> {
    let mut notes = Vec::new();
    let (n, note) = fd_bound(p.idle_sessions.max(1));
    notes.extend(note);

    // Idle sessions.
    let per_end = {
        let a = roam::Endpoint::bind(host(2)).await?;
        let b = roam::Endpoint::bind(host(3)).await?;
        // Warm the allocator and the runtime up first.
        let warm = pair_up(open(&a, &b, 16).await?).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = rss_bytes();
        let pairs = pair_up(open(&a, &b, n).await?).await?;
        // Let delayed acknowledgements go out and buffers be released.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = rss_bytes();
        drop((pairs, warm));
        after.saturating_sub(before) as f64 / (2 * n) as f64 / 1024.0
    };
    notes.push(format!(
        "idle: {n} sessions between two endpoints, one byte exchanged on each, then idle \
         300 ms; VmRSS growth / (2 × {n}): both ends live in this process, so each session \
         counts twice; single sample"
    ));
    // Give the closed sessions time to go away before the batch.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Batch migration.
    let (m, note) = fd_bound(p.batch_sessions.max(1));
    notes.extend(note);
    let eps = [
        roam::Endpoint::bind(host(2)).await?,
        roam::Endpoint::bind(host(4)).await?,
    ];
    let peer = roam::Endpoint::bind(host(3)).await?;
    let pairs = pair_up(open(&eps[0], &peer, m).await?).await?;
    let (mut movers, mut peers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    let limit = Duration::from_secs(60);
    let mut times = Vec::new();
    for round in 0..p.batch_rounds.max(1) {
        let target = eps[(round + 1) % 2].clone();
        let start = Instant::now();
        let mut freezes = JoinSet::new();
        for (i, s) in movers.drain(..).enumerate() {
            freezes.spawn(async move { (i, s.freeze().await) });
        }
        let mut thaws = JoinSet::new();
        let collect = async {
            while let Some(r) = freezes.join_next().await {
                let (i, image) = r?;
                let image = roam::StreamImage::from_bytes(&image?.to_bytes())?;
                let target = target.clone();
                thaws.spawn(async move { (i, target.thaw(image).await) });
            }
            let mut thawed = Vec::with_capacity(m);
            while let Some(r) = thaws.join_next().await {
                let (i, s) = r?;
                thawed.push((i, s?));
            }
            Ok::<_, BoxError>(thawed)
        };
        let mut thawed = within(limit, "batch freeze + thaw", collect).await?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        thawed.sort_by_key(|(i, _)| *i);
        movers = thawed.into_iter().map(|(_, s)| s).collect();
        // Check every session still works (not timed).
        for (s, t) in movers.iter_mut().zip(peers.iter_mut()) {
            within(limit, "write after batch", s.write_all(&[round as u8])).await?;
            let mut b = [0u8; 1];
            within(limit, "read after batch", t.read_exact(&mut b)).await?;
            if b[0] != round as u8 {
                return Err("batch: a session delivered a wrong byte".into());
            }
        }
    }
    notes.push(format!(
        "batch: {m} sessions, timed from the first freeze until the last thaw returned (all \
         frozen concurrently, each image serialized and parsed, all thawed concurrently onto \
         the other endpoint); each session checked with one byte afterwards, not timed"
    ));
    drop(peers);
    Ok(Bench {
        name: "sessions".into(),
        baseline: "none".into(),
        rows: vec![
            Row::new(
                &format!("idle memory, {n} sessions"),
                "KiB/end",
                "single sample".into(),
                Stat::min_max(&[per_end]),
                None,
            ),
            Row::new(
                &format!("batch freeze+thaw, {m}"),
                "ms",
                format!("min/max of {} batches", times.len()),
                Stat::min_max(&times),
                None,
            ),
        ],
        notes,
    })
}
