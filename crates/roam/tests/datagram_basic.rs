//! Loopback tests of migrateable datagram sockets: association, migration, translation.

use std::net::SocketAddr;
use std::time::Duration;

use roam::{Datagram, DatagramError, DatagramEvent, DatagramImage};

fn host(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 0))
}

async fn recv(d: &Datagram) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), d.recv_from(&mut buf))
        .await
        .expect("a datagram")
        .unwrap();
    (buf[..n].to_vec(), from)
}

#[tokio::test]
async fn a_socket_with_three_peers_moves_twice_and_every_peer_keeps_its_address() {
    let mut u = Datagram::bind(host(2)).await.unwrap();
    let first = u.local_addr();
    let mut peers = Vec::new();
    for h in [3, 5, 6] {
        peers.push(Datagram::bind(host(h)).await.unwrap());
    }
    for p in &peers {
        u.send_to(b"hi", p.local_addr()).await.unwrap();
        let (d, from) = recv(p).await;
        assert_eq!((d.as_slice(), from), (&b"hi"[..], first));
    }
    for (round, target) in [(1u8, 4u8), (2, 7)] {
        let image = u.freeze().await.unwrap();
        let image = DatagramImage::from_bytes(&image.to_bytes()).unwrap();
        assert_eq!(image.peer_count(), 3);
        u = Datagram::thaw(image, host(target)).await.unwrap();
        assert_ne!(u.local_addr(), first);
        for _ in 0..3 {
            assert!(matches!(
                u.next_event().await,
                Some(DatagramEvent::Reassociated { .. })
            ));
        }
        for (i, p) in peers.iter().enumerate() {
            // The peer's application still uses the address it first knew.
            let msg = format!("round {round} from peer {i}");
            p.send_to(msg.as_bytes(), first).await.unwrap();
            let (d, _) = recv(&u).await;
            assert_eq!(d, msg.as_bytes());
            u.send_to(b"back", p.local_addr()).await.unwrap();
            let (d, from) = recv(p).await;
            assert_eq!((d.as_slice(), from), (&b"back"[..], first));
            let entry = &p.peers()[0];
            assert_eq!(entry.known_addr, first);
            assert_eq!(entry.addr, u.local_addr());
        }
    }
    assert_eq!(u.stats().migrations, 2);
}

#[tokio::test]
async fn oversized_datagrams_and_small_buffers_are_typed_errors() {
    let a = Datagram::bind(host(2)).await.unwrap();
    let b = Datagram::bind(host(3)).await.unwrap();
    let err = a
        .send_to(&vec![0u8; 70_000], b.local_addr())
        .await
        .unwrap_err();
    assert!(matches!(err, DatagramError::TooLarge { len: 70_000, .. }));
    a.send_to(&[7u8; 100], b.local_addr()).await.unwrap();
    let mut small = [0u8; 10];
    let err = tokio::time::timeout(Duration::from_secs(5), b.recv_from(&mut small))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err,
        DatagramError::BufferTooSmall {
            len: 10,
            needed: 100
        }
    );
    // Still there for a big enough buffer.
    let (d, _) = recv(&b).await;
    assert_eq!(d, vec![7u8; 100]);
}
