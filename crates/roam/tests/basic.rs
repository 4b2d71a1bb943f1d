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
