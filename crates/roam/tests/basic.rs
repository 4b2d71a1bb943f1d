//! Loopback integration tests of the public API: association, data, freeze, thaw.

use std::net::SocketAddr;

use roam::{Endpoint, StreamImage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

#[tokio::test]
async fn connect_accept_and_exchange() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let mut s = a.connect(b.local_addr()).await.unwrap();
    let mut t = b.accept().await.unwrap();
    assert_eq!(s.session_id(), t.session_id());
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    t.write_all(b"pong").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn freeze_thaw_elsewhere_and_back() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let c = Endpoint::bind(host(4)).await.unwrap();
    let mut s = a.connect(b.local_addr()).await.unwrap();
    let mut t = b.accept().await.unwrap();
    s.write_all(b"before").await.unwrap();
    t.write_all(b"in flight").await.unwrap();
    let image = s.freeze().await.unwrap();
    // The peer writes while its partner is frozen.
    t.write_all(b" while frozen").await.unwrap();
    let bytes = image.to_bytes();
    let image = StreamImage::from_bytes(&bytes).unwrap();
    let mut s = c.thaw(image).await.unwrap();
    assert_eq!(s.local_contact(), c.contact_addr());
    let mut got = vec![0u8; "in flight while frozen".len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"in flight while frozen");
    s.write_all(b" and after").await.unwrap();
    let mut got = vec![0u8; "before and after".len()];
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before and after");
    // And back to the first host.
    let image = s.freeze().await.unwrap();
    let mut s = a.thaw(image).await.unwrap();
    s.write_all(b"!").await.unwrap();
    let mut one = [0u8; 1];
    t.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"!");
    assert_eq!(s.epoch().0, 2);
}

#[test]
fn public_types_have_the_promised_traits() {
    fn stream<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>() {}
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    fn send_sync<T: Send + Sync + 'static>() {}
    stream::<roam::Stream>();
    error::<roam::ConnectError>();
    error::<roam::ThawError>();
    error::<roam::AcceptError>();
    error::<roam::BindError>();
    error::<roam::FreezeError>();
    error::<roam::ImageError>();
    error::<roam::SessionError>();
    send_sync::<roam::Endpoint>();
    send_sync::<roam::StreamImage>();
}

#[tokio::test]
async fn split_halves_work_concurrently_and_the_stream_still_freezes() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let c = Endpoint::bind(host(4)).await.unwrap();
    let mut s = a.connect(b.local_addr()).await.unwrap();
    let mut t = b.accept().await.unwrap();
    let payload = vec![7u8; 3 << 20];
    {
        let (mut r, mut w) = s.split();
        let (mut tr, mut tw) = t.split();
        // Both sides write 3 MiB (more than the 1 MiB buffers) while reading: this only
        // finishes if reading and writing really proceed concurrently.
        let mut got_s = Vec::new();
        let mut got_t = Vec::new();
        let mut rs = (&mut r).take(payload.len() as u64);
        let mut rt = (&mut tr).take(payload.len() as u64);
        let (a1, a2, a3, a4) = tokio::join!(
            w.write_all(&payload),
            tw.write_all(&payload),
            rs.read_to_end(&mut got_s),
            rt.read_to_end(&mut got_t),
        );
        a1.unwrap();
        a2.unwrap();
        a3.unwrap();
        a4.unwrap();
        assert_eq!(got_s, payload);
        assert_eq!(got_t, payload);
    }
    let mut s = c.thaw(s.freeze().await.unwrap()).await.unwrap();
    s.write_all(b"ok").await.unwrap();
    let mut two = [0u8; 2];
    t.read_exact(&mut two).await.unwrap();
    assert_eq!(&two, b"ok");
}

#[tokio::test]
async fn end_of_stream_reaches_the_peer_across_a_migration() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let c = Endpoint::bind(host(4)).await.unwrap();
    let mut s = a.connect(b.local_addr()).await.unwrap();
    let mut t = b.accept().await.unwrap();
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let mut s = c.thaw(s.freeze().await.unwrap()).await.unwrap();
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"last words");
    // The other direction is still open, and closes in turn.
    t.write_all(b"reply").await.unwrap();
    t.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"reply");
}

/// Resolves when every handle to the session's state is gone (driver ended, table entry removed).
async fn session_released(mut w: tokio::sync::watch::Receiver<bool>) {
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while w.changed().await.is_ok() {}
    })
    .await
    .expect("session never released");
}

#[tokio::test]
async fn dropping_both_ends_closes_the_session_and_frees_both_endpoints() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let mut s = a.connect(b.local_addr()).await.unwrap();
    let mut t = b.accept().await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let ws = s.watch_connected();
    let wt = t.watch_connected();
    drop(s);
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hi");
    t.write_all(b"unread reply").await.unwrap();
    drop(t);
    session_released(ws).await;
    session_released(wt).await;
    assert_eq!(a.session_count(), 0);
    assert_eq!(b.session_count(), 0);
}

/// Regression: when the peer finished and closed first, a stream whose both directions are
/// done stops redialing at the peer's first refusal (unknown session) and closes once dropped
/// (it used to redial until the session timeout and never close).
#[tokio::test]
async fn a_finished_stream_whose_peer_closed_first_stops_redialing_and_closes() {
    let a = Endpoint::bind(host(2)).await.unwrap();
    let b = Endpoint::bind(host(3)).await.unwrap();
    let mut s = a.connect(b.local_addr()).await.unwrap();
    let mut t = b.accept().await.unwrap();
    s.write_all(b"question").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    t.write_all(b"answer").await.unwrap();
    t.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"answer");
    let wt = t.watch_connected();
    let mut ws = s.watch_connected();
    drop(t);
    session_released(wt).await;
    // The connection is gone; s, the dialer, sees it go.
    tokio::time::timeout(std::time::Duration::from_secs(5), ws.wait_for(|up| !*up))
        .await
        .expect("link loss noticed")
        .unwrap();
    drop(ws);
    let ws = s.watch_connected();
    drop(s);
    session_released(ws).await;
    assert!(
        b.stats().handshakes_rejected <= 1,
        "at most one redial after both ends finished: {:?}",
        b.stats()
    );
    assert_eq!(a.session_count(), 0);
}
