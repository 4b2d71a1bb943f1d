//! In-process host daemons on 127.0.0.81–127.0.0.89: migration between daemons, refusal of a
//! daemon with another deployment key, and garbage on a daemon's address.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roam_host::api::{AgentState, Progress};
use roam_host::{Host, HostConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

async fn host(ip: &str, key: [u8; 32]) -> Host {
    let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
    Host::start(HostConfig::new(addr, key)).await.unwrap()
}

/// Poll until `f` holds (bounded).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn migrate(from: &Host, id: &str, to: SocketAddr) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel(16);
    let r = from.migrate(id, to, tx).await;
    let mut last = None;
    while let Ok(p) = rx.try_recv() {
        last = Some(p);
    }
    match (r, last) {
        (Ok(rep), Some(Progress::Done(done))) => {
            assert_eq!(rep, done);
            Ok(())
        }
        (Err(e), Some(Progress::Error(e2))) => {
            assert_eq!(e, e2);
            eprintln!("migration refused: {e}");
            Err(e.code)
        }
        other => panic!("progress and result disagree: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_echo_migrate_back_and_forth_and_a_stranger_is_refused() {
    let key = [7u8; 32];
    let a = host("127.0.0.81", key).await;
    let b = host("127.0.0.82", key).await;
    let c = host("127.0.0.83", key).await;
    let stranger = host("127.0.0.84", [9u8; 32]).await;

    let echo = b.run("echo", &[]).unwrap().id;
    let chat = a
        .run(
            "chat",
            &[format!("{}/echo", b.addr()), "150".into(), "2".into()],
        )
        .unwrap()
        .id;
    until("a few lines", || {
        a.agent(&chat).unwrap().status.starts_with("1")
    })
    .await;

    // A daemon of another deployment is refused before anything is frozen.
    assert_eq!(
        migrate(&a, &chat, stranger.addr()).await,
        Err("auth".into())
    );
    assert_eq!(a.agent(&chat).unwrap().state, AgentState::Running);
    // Nobody listening there: unreachable, and the agent keeps running.
    let nowhere: SocketAddr = "127.0.0.85:9".parse().unwrap();
    assert_eq!(migrate(&a, &chat, nowhere).await, Err("unreachable".into()));
    assert_eq!(a.agent(&chat).unwrap().state, AgentState::Running);

    // A → C → A, and the echo B → C, while the chat works.
    migrate(&a, &chat, c.addr()).await.unwrap();
    assert_eq!(a.agent(&chat).unwrap().state, AgentState::Moved(c.addr()));
    migrate(&b, &echo, c.addr()).await.unwrap();
    migrate(&c, &chat, a.addr()).await.unwrap();
    until("the chat to finish", || {
        a.agent(&chat).unwrap().state != AgentState::Running
    })
    .await;
    let info = a.agent(&chat).unwrap();
    assert_eq!(info.state, AgentState::Finished, "{info:?}");
    assert_eq!(info.status, "150/150 lines echoed intact");
    assert_eq!(info.migrations, 2);
    assert_eq!(info.hosts, vec![a.addr(), c.addr(), a.addr()]);
    // Exactly once: the chat's record elsewhere says where it went.
    assert!(matches!(
        c.agent(&chat).unwrap().state,
        AgentState::Moved(_)
    ));
    assert!(stranger.agent(&chat).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_a_daemons_address_changes_nothing() {
    let key = [3u8; 32];
    let a = host("127.0.0.86", key).await;
    let b = host("127.0.0.87", key).await;
    // An endpoint outside the deployment cannot even associate with a daemon.
    let stranger = roam::Endpoint::bind("127.0.0.88:0".parse().unwrap())
        .await
        .unwrap();
    let refused = stranger.connect(a.addr()).await.unwrap_err();
    assert!(refused.to_string().contains("not accepted"), "{refused}");
    // One of the deployment gets to the preamble, where garbage is dropped.
    let probe = roam::Endpoint::bind_with(
        "127.0.0.88:0".parse().unwrap(),
        roam_host::endpoint_config(&key),
    )
    .await
    .unwrap();

    // Raw TCP garbage, a roam stream with a bad preamble, an unknown service, and a daemon
    // channel whose Noise handshake is garbage.
    let mut raw = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
    // The daemon may close before reading it all: a reset here is fine.
    let _ = raw.write_all(&[0xAB; 4096]).await;
    let mut s = probe.connect(a.addr()).await.unwrap();
    s.write_all(b"XXXX\x03abc").await.unwrap();
    s.flush().await.unwrap();
    let mut s2 = probe.connect(a.addr()).await.unwrap();
    s2.write_all(b"RMSV\x0aagent/none").await.unwrap();
    s2.flush().await.unwrap();
    let mut answer = [0u8; 1];
    s2.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], 1, "unknown service is answered 1");
    let mut s3 = probe.connect(a.addr()).await.unwrap();
    s3.write_all(b"RMSV\x09roam.host\x00\x05hello")
        .await
        .unwrap();
    s3.flush().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(15), s3.read_to_end(&mut rest)).await;
    assert!(
        n.is_ok(),
        "the daemon closes a channel whose handshake fails"
    );

    // The daemon still works.
    let recv = b.run("bulk-recv", &[]).unwrap().id;
    let send = a
        .run("bulk-send", &[format!("{}/bulk", b.addr()), "64M".into()])
        .unwrap()
        .id;
    if let Err(e) = migrate(&a, &send, b.addr()).await {
        panic!("migration failed ({e}): {:?}", a.agent(&send));
    }
    until("the transfer", || {
        b.agent(&recv).unwrap().state != AgentState::Running
    })
    .await;
    let r = b.agent(&recv).unwrap();
    assert_eq!(r.status, "received 67108864 bytes: OK 67108864", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors() {
    let a = host("127.0.0.89", [1u8; 32]).await;
    assert_eq!(a.run("nosuch", &[]).unwrap_err().code, "bad_request");
    assert_eq!(
        a.run("chat", &["not-an-address".into()]).unwrap_err().code,
        "bad_request"
    );
    assert_eq!(
        a.run("bulk-send", &["127.0.0.1:1/x".into(), "lots".into()])
            .unwrap_err()
            .code,
        "bad_request"
    );
    assert_eq!(a.agent("a00000000").unwrap_err().code, "unknown_agent");
    assert_eq!(a.stop("a00000000").await.unwrap_err().code, "unknown_agent");
    let echo = a.run("echo", &[]).unwrap().id;
    assert_eq!(
        migrate(&a, &echo, a.addr()).await,
        Err("bad_request".into())
    );
    let stopped = a.stop(&echo).await.unwrap();
    assert_eq!(stopped.state, AgentState::Stopped);
    assert_eq!(a.stop(&echo).await.unwrap_err().code, "bad_request");
}

/// `run` returns once the agent's services are registered: a client started right after
/// finds them, and a second agent wanting the same service is refused at once (before, both
/// runs succeeded and the loser failed later; a client could race the listener).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_with_the_agents_services_registered() {
    let a = host("127.0.0.90", [4u8; 32]).await;
    let b = host("127.0.0.91", [4u8; 32]).await;
    for round in 0..20 {
        let service = format!("bulk{round}");
        let recv = b
            .run("bulk-recv", std::slice::from_ref(&service))
            .unwrap()
            .id;
        let again = b
            .run("bulk-recv", std::slice::from_ref(&service))
            .unwrap_err();
        assert_eq!(again.code, "busy", "{again:?}");
        assert!(again.message.contains("already in use"), "{again:?}");
        let echo = b.run("echo", std::slice::from_ref(&service)).unwrap_err();
        assert_eq!(echo.code, "busy", "{echo:?}");
        // The sender starts at once; it must find the receiver listening.
        let send = a
            .run(
                "bulk-send",
                &[format!("{}/{service}", b.addr()), "4K".into()],
            )
            .unwrap()
            .id;
        until("the transfer", || {
            b.agent(&recv).unwrap().state != AgentState::Running
        })
        .await;
        let r = b.agent(&recv).unwrap();
        assert_eq!(
            r.status, "received 4096 bytes: OK 4096",
            "round {round}: {r:?}"
        );
        let s = a.agent(&send).unwrap();
        assert_ne!(s.state.name(), "failed", "round {round}: {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_of_a_stream_move_at_the_same_time() {
    let key = [5u8; 32];
    let hosts = [
        host("127.0.0.91", key).await,
        host("127.0.0.92", key).await,
        host("127.0.0.93", key).await,
        host("127.0.0.94", key).await,
    ];
    let [a, b, c, d] = &hosts;
    let echo = b.run("echo", &[]).unwrap().id;
    let chat = a
        .run(
            "chat",
            &[format!("{}/echo", b.addr()), "200".into(), "2".into()],
        )
        .unwrap()
        .id;
    until("a few lines", || {
        a.agent(&chat).unwrap().status.starts_with("1")
    })
    .await;
    // Both at once, each to a host the other never knew; then both again, crossing.
    let (r1, r2) = tokio::join!(migrate(a, &chat, c.addr()), migrate(b, &echo, d.addr()));
    r1.unwrap();
    r2.unwrap();
    let (r1, r2) = tokio::join!(migrate(c, &chat, b.addr()), migrate(d, &echo, a.addr()));
    r1.unwrap();
    r2.unwrap();
    until("the chat to finish", || {
        b.agent(&chat).unwrap().state != AgentState::Running
    })
    .await;
    let info = b.agent(&chat).unwrap();
    assert_eq!(info.state, AgentState::Finished, "{info:?}");
    assert_eq!(info.status, "200/200 lines echoed intact");
    assert_eq!(a.agent(&echo).unwrap().state, AgentState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_ends_while_a_migration_waits_for_it_is_reported_at_once() {
    let key = [6u8; 32];
    let a = host("127.0.0.95", key).await;
    let b = host("127.0.0.96", key).await;
    // A chat to an echo that is not there fails at once, racing the migration's offer.
    for _ in 0..5 {
        let chat = a
            .run(
                "chat",
                &[format!("{}/echo", b.addr()), "5".into(), "1".into()],
            )
            .unwrap()
            .id;
        let started = Instant::now();
        let r = migrate(&a, &chat, b.addr()).await;
        // Either it moved before failing, or the migration says it ended; never a 10 s wait.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{r:?} after {:?}",
            started.elapsed()
        );
        if let Err(code) = r {
            assert_eq!(code, "bad_request");
        }
    }
}
