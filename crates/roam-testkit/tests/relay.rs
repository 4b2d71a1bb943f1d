//! Integration tests for the fault-injecting relay, run against small local TCP servers.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use roam_testkit::{Relay, RelayStats, TcpFaults};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Safety net for awaiting events that must happen; never reached when the code works.
const DEADLINE: Duration = Duration::from_secs(1);
/// How long to wait when asserting that nothing arrives.
const SILENCE: Duration = Duration::from_millis(100);
/// Size of one relay copy buffer (bounds how much budget can be in flight).
const RELAY_BUF: u64 = 64 * 1024;

/// Await `fut`, failing the test if it does not complete within [`DEADLINE`].
async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Read until EOF or an error; returns the byte count and the error, if any.
async fn drain<R: AsyncRead + Unpin>(rd: &mut R) -> (u64, Option<io::Error>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => return (total, None),
            Ok(n) => total += n as u64,
            Err(e) => return (total, Some(e)),
        }
    }
}

/// Assert that the peer of `stream` is gone: the next read gives EOF or an error.
async fn assert_dead(what: &str, stream: &mut TcpStream) {
    let mut byte = [0u8; 1];
    match within(what, stream.read(&mut byte)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{what}: expected a dead connection, read {n} bytes"),
    }
}

/// Send `msg` and expect it echoed back.
async fn roundtrip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within("echo", stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

/// A TCP echo server on 127.0.0.1 that half-closes when its client does.
struct Echo {
    addr: SocketAddr,
    /// Connections accepted so far.
    conns: Arc<AtomicUsize>,
    /// One message per finished connection: `Ok` on EOF, `Err` on an I/O error.
    ended: mpsc::UnboundedReceiver<io::Result<()>>,
    task: JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind(addr("127.0.0.1:0")).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let (tx, ended) = mpsc::unbounded_channel();
        let counter = Arc::clone(&conns);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(echo(stream).await);
                });
            }
        });
        Echo {
            addr,
            conns,
            ended,
            task,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

#[tokio::test]
async fn forwards_one_mebibyte_intact_with_half_close() {
    let echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
    let data = random_bytes(1 << 20, 1);

    let client = TcpStream::connect(relay.local_addr()).await.unwrap();
    let (mut rd, mut wr) = client.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&to_send).await?;
        // Half-close: the echo keeps answering until it has sent everything back.
        wr.shutdown().await
    });
    let mut got = Vec::with_capacity(data.len());
    within("echoed data", rd.read_to_end(&mut got))
        .await
        .unwrap();
    within("writer", writer).await.unwrap().unwrap();
    assert!(got == data, "relayed data differs from what was sent");

    // The client sees EOF only after the relay counted every byte in both directions.
    assert_eq!(
        relay.stats(),
        RelayStats {
            accepted: 1,
            killed: 0,
            bytes_up: 1 << 20,
            bytes_down: 1 << 20,
            stalls: 0,
            fault_resets: 0,
        }
    );
}

#[tokio::test]
async fn kill_all_resets_both_sides() {
    let mut echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
    assert_eq!(relay.kill_all(), 0);

    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut client, b"ping").await;

    assert_eq!(relay.kill_all(), 1);
    assert_eq!(relay.kill_all(), 0, "a connection is only killed once");
    assert_dead("client after kill_all", &mut client).await;
    let end = within("server to notice", echo.ended.recv()).await;
    assert!(
        matches!(end, Some(Err(_))),
        "server saw {end:?}, not a reset"
    );

    let stats = relay.stats();
    assert_eq!((stats.accepted, stats.killed), (1, 1));
    assert_eq!((stats.bytes_up, stats.bytes_down), (4, 4));
}

#[tokio::test]
async fn kill_all_interrupts_a_blocked_transfer() {
    // A target that reads one byte and then stops reading until told to resume, so the relay
    // ends up blocked writing to it.
    let listener = TcpListener::bind(addr("127.0.0.1:0")).await.unwrap();
    let target = listener.local_addr().unwrap();
    let (first_tx, first_rx) = oneshot::channel();
    let (resume_tx, resume_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        first_tx.send(()).unwrap();
        resume_rx.await.unwrap();
        drain(&mut stream).await
    });
    let relay = Relay::start(addr("127.0.0.1:0"), target).await.unwrap();

    let client = TcpStream::connect(relay.local_addr()).await.unwrap();
    let (_rd, mut wr) = client.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        loop {
            if let Err(e) = wr.write_all(&chunk).await {
                return e;
            }
        }
    });
    within("first byte at target", first_rx).await.unwrap();

    assert_eq!(relay.kill_all(), 1);
    let err = within("blocked writer to fail", writer).await.unwrap();
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        "unexpected client error: {err}"
    );
    resume_tx.send(()).unwrap();
    let (_, server_err) = within("target to notice", server).await.unwrap();
    assert!(server_err.is_some(), "target saw a clean EOF, not a reset");
}

#[tokio::test]
async fn refuse_mode_kills_existing_and_resets_new_connections() {
    let echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();

    let mut before = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut before, b"hello").await;

    relay.set_refuse(true);
    assert_dead("existing connection after set_refuse", &mut before).await;

    // The kernel may complete the handshake, but the relay resets the connection at once.
    if let Ok(mut refused) = TcpStream::connect(relay.local_addr()).await {
        assert_dead("refused connection", &mut refused).await;
    }
    let stats = relay.stats();
    assert_eq!((stats.accepted, stats.killed), (2, 2));
    assert_eq!(
        echo.conns.load(Ordering::SeqCst),
        1,
        "a refused connection must not reach the target"
    );

    relay.set_refuse(false);
    let mut after = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut after, b"again").await;
    assert_eq!(echo.conns.load(Ordering::SeqCst), 2);
    let stats = relay.stats();
    assert_eq!((stats.accepted, stats.killed), (3, 2));
}

#[tokio::test]
async fn blackhole_swallows_bytes_but_keeps_connections_open() {
    let echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut client, b"ping").await;

    relay.set_blackhole(true);
    client.write_all(b"lost").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(SILENCE, client.read(&mut buf)).await;
    assert!(read.is_err(), "read during blackhole returned {read:?}");

    relay.set_blackhole(false);
    roundtrip(&mut client, b"back").await;

    let stats = relay.stats();
    assert_eq!((stats.bytes_up, stats.bytes_down), (8, 8));
    assert_eq!((stats.accepted, stats.killed), (1, 0));
}

#[tokio::test]
async fn stall_holds_bytes_and_delivers_them_after() {
    let echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut client, b"ping").await;

    relay.stall(Duration::from_secs(30));
    client.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(SILENCE, client.read(&mut buf)).await;
    assert!(read.is_err(), "read during a stall returned {read:?}");

    // Lifting the stall releases what was held: nothing is lost, unlike a blackhole.
    relay.stall(Duration::ZERO);
    within("held bytes", client.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"held");
    let stats = relay.stats();
    assert_eq!((stats.bytes_up, stats.bytes_down, stats.killed), (8, 8, 0));
    assert!(stats.stalls >= 1, "{stats:?}");
}

#[tokio::test]
async fn bandwidth_limit_paces_a_transfer() {
    let echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
    relay.set_faults(TcpFaults {
        rate: Some(100_000),
        ..TcpFaults::default()
    });
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    let data = random_bytes(30_000, 3);
    let started = std::time::Instant::now();
    client.write_all(&data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back))
        .await
        .expect("paced echo timed out")
        .unwrap();
    assert!(back == data);
    // 30 kB at 100 kB/s each way (pipelined): at least ~0.25 s, not loopback speed.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200), "took only {took:?}");
}

#[tokio::test]
async fn random_faults_reset_and_stall_reproducibly() {
    // Run the same seeded schedule twice: the same chunk of the same connection is reset.
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let echo = Echo::start().await;
        let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
        relay.set_faults(TcpFaults {
            seed: 7,
            reset: 0.2,
            stall: 0.3,
            stall_for: Duration::from_millis(1),
            rate: None,
        });
        let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
        let mut ok = 0u32;
        for i in 0..50u32 {
            // One message at a time, each waited for: one chunk per message per direction.
            let msg = i.to_be_bytes();
            client.write_all(&msg).await.unwrap();
            let mut back = [0u8; 4];
            match within("echo or reset", client.read_exact(&mut back)).await {
                Ok(_) => {
                    assert_eq!(back, msg);
                    ok += 1;
                }
                Err(_) => break,
            }
        }
        let stats = relay.stats();
        assert_eq!(stats.fault_resets, 1, "{stats:?}");
        assert_eq!(stats.killed, 1, "{stats:?}");
        outcomes.push((ok, stats.stalls));
    }
    assert_eq!(outcomes[0], outcomes[1], "same seed, different schedule");
    assert!(outcomes[0].0 < 50, "{outcomes:?}");
}

#[tokio::test]
async fn kill_after_bytes_is_exact_in_one_direction() {
    // A target that only reads, so all budget is spent in the upstream direction.
    let listener = TcpListener::bind(addr("127.0.0.1:0")).await.unwrap();
    let target = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        drain(&mut stream).await
    });
    let relay = Relay::start(addr("127.0.0.1:0"), target).await.unwrap();

    const N: u64 = 300_000;
    relay.kill_after_bytes(N);
    let client = TcpStream::connect(relay.local_addr()).await.unwrap();
    let (mut rd, mut wr) = client.into_split();
    let data = random_bytes(1 << 20, 2);
    let writer = tokio::spawn(async move { wr.write_all(&data).await });

    let (_, client_err) = within("client to notice", drain(&mut rd)).await;
    assert!(client_err.is_some(), "client saw a clean EOF, not a reset");
    // The whole megabyte may already sit in socket buffers, so the writer may even succeed.
    let _ = within("writer", writer).await.unwrap();
    let stats = relay.stats();
    assert_eq!(stats.bytes_up, N, "relay must forward exactly the budget");
    assert_eq!((stats.bytes_down, stats.killed), (0, 1));

    let (received, err) = within("target to notice", server).await.unwrap();
    assert!(received <= N, "target received {received} > {N} bytes");
    assert!(err.is_some(), "target saw a clean EOF, not a reset");
}

#[tokio::test]
async fn kill_after_bytes_kills_mid_stream_then_disarms() {
    let echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut client, b"ping").await;
    let before = relay.stats();

    const N: u64 = 200_000;
    relay.kill_after_bytes(N);
    let (mut rd, mut wr) = client.into_split();
    let data = random_bytes(1 << 20, 3);
    let writer = tokio::spawn(async move { wr.write_all(&data).await });
    let (echoed, client_err) = within("client to notice", drain(&mut rd)).await;
    assert!(client_err.is_some(), "client saw a clean EOF, not a reset");
    let _ = within("writer", writer).await.unwrap();

    let after = relay.stats();
    let forwarded = (after.bytes_up - before.bytes_up) + (after.bytes_down - before.bytes_down);
    // Both directions share the budget; the direction that did not trip may lose at most one
    // buffer that was taken from the budget but not yet written when the connection died.
    assert!(
        forwarded <= N && forwarded + RELAY_BUF >= N,
        "forwarded {forwarded} bytes for a budget of {N}"
    );
    assert!(echoed <= after.bytes_down - before.bytes_down);
    assert_eq!(after.killed, 1);

    // Disarmed: a reconnect carries far more than the budget.
    let mut again = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut again, &random_bytes(512 * 1024, 4)).await;
    assert_eq!(relay.stats().killed, 1);
}

#[tokio::test]
async fn kill_after_bytes_armed_before_connecting_applies_to_the_next_connection() {
    let echo = Echo::start().await;
    let relay = Relay::start(addr("127.0.0.1:0"), echo.addr).await.unwrap();
    relay.kill_after_bytes(1000);

    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    client.write_all(&[1u8; 10_000]).await.unwrap();
    let (echoed, err) = within("client to notice", drain(&mut client)).await;
    assert!(
        echoed <= 1000,
        "echoed {echoed} bytes through a 1000-byte budget"
    );
    assert!(err.is_some(), "client saw a clean EOF, not a reset");
    let stats = relay.stats();
    assert!(stats.bytes_up + stats.bytes_down <= 1000);
    assert_eq!(stats.killed, 1);

    let mut again = TcpStream::connect(relay.local_addr()).await.unwrap();
    roundtrip(&mut again, &[2u8; 10_000]).await;
}

/// Tear a relay with three live connections down (by `shutdown` or by drop) and check that
/// every connection dies, every task ends and the port stops accepting.
async fn check_teardown(listen: &str, by_drop: bool) {
    let mut echo = Echo::start().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    let relay = Relay::start(addr(listen), echo.addr).await.unwrap();
    let relay_addr = relay.local_addr();
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let mut client = TcpStream::connect(relay_addr).await.unwrap();
        roundtrip(&mut client, &[i; 100]).await;
        clients.push(client);
    }
    assert!(metrics.num_alive_tasks() > baseline);

    if by_drop {
        drop(relay);
    } else {
        relay.shutdown();
        relay.shutdown();
        assert_eq!(relay.stats().killed, 3);
    }
    for client in &mut clients {
        assert_dead("client after teardown", client).await;
    }
    for _ in 0..3 {
        let end = within("server to notice", echo.ended.recv()).await;
        assert!(
            matches!(end, Some(Err(_))),
            "server saw {end:?}, not a reset"
        );
    }
    // No event marks a task's end, so yield until the count settles (bounded by DEADLINE).
    within("relay tasks to end", async {
        while metrics.num_alive_tasks() > baseline {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The accept loop has ended, so the listener is closed. The address is only used by this
    // test, so nothing else can have bound the port since.
    let err = TcpStream::connect(relay_addr).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn shutdown_kills_everything_and_ends_all_tasks() {
    check_teardown("127.0.0.9:0", false).await;
}

#[tokio::test]
async fn drop_kills_everything_and_ends_all_tasks() {
    check_teardown("127.0.0.10:0", true).await;
}

#[test]
fn relay_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Relay>();
}
