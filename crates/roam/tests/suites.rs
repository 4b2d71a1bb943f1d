//! AEAD suite negotiation (PROTOCOL.md §3.1, §5.1, §10.2): the dialer's preference decides
//! among the suites both ends accept, no common suite is a typed refusal, and a migrated stream
//! or datagram socket keeps its suite wherever it is thawed. The downgrade attempts through an
//! in-path attacker are in `attacks.rs`.
//!
//! No timed assertions: every wait is bounded only to turn a hang into a failure.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use roam::error::HandshakeError;
use roam::{
    ConnectError, Datagram, DatagramConfig, DatagramEvent, Endpoint, EndpointConfig, RefuseReason,
    Stream, Suite,
};

use common::{host, random_bytes, sha, transfer, within};

fn config(suites: &[Suite]) -> EndpointConfig {
    let mut c = EndpointConfig::default();
    c.suites = suites.to_vec();
    c
}

/// Associate a dialer accepting `dialer` with a listener accepting `listener`.
async fn pair(dialer: &[Suite], listener: &[Suite]) -> (Endpoint, Endpoint, Stream, Stream) {
    let a = Endpoint::bind_with(host(2), config(dialer)).await.unwrap();
    let b = Endpoint::bind_with(host(3), config(listener))
        .await
        .unwrap();
    let s = within("connect", a.connect(b.local_addr())).await.unwrap();
    let t = within("accept", b.accept()).await.unwrap();
    (a, b, s, t)
}

#[tokio::test]
async fn the_default_is_aes_256_gcm_and_the_dialers_preference_decides() {
    use Suite::{Aes256Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    // (dialer's list, listener's list, expected suite)
    let cases: [(&[Suite], &[Suite], Suite); 6] = [
        (&Suite::DEFAULT_PREFERENCE, &Suite::DEFAULT_PREFERENCE, Aes),
        (&[ChaCha, Aes], &Suite::DEFAULT_PREFERENCE, ChaCha),
        (&Suite::DEFAULT_PREFERENCE, &[ChaCha, Aes], Aes),
        (&[Aes], &Suite::DEFAULT_PREFERENCE, Aes),
        (&Suite::DEFAULT_PREFERENCE, &[ChaCha], ChaCha),
        (&[ChaCha], &[ChaCha], ChaCha),
    ];
    for (i, (d, l, want)) in cases.into_iter().enumerate() {
        let (_a, _b, mut s, mut t) = pair(d, l).await;
        assert_eq!((s.suite(), t.suite()), (want, want), "case {i}");
        assert!(s.is_secure() && t.is_secure());
        let data = random_bytes(i as u64, 200_000);
        assert!(
            transfer(&mut s, &mut t, &data).await == sha(&data),
            "case {i}"
        );
        assert!(
            transfer(&mut t, &mut s, &data).await == sha(&data),
            "case {i}"
        );
    }
    assert_eq!(EndpointConfig::default().suites, Suite::DEFAULT_PREFERENCE);
}

#[tokio::test]
async fn no_suite_in_common_is_refused_with_a_typed_error_both_ways() {
    use Suite::{Aes256Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    for (d, l) in [([Aes], [ChaCha]), ([ChaCha], [Aes])] {
        let a = Endpoint::bind_with(host(2), config(&d)).await.unwrap();
        let b = Endpoint::bind_with(host(3), config(&l)).await.unwrap();
        let r = within("connect", a.connect(b.local_addr())).await;
        assert!(
            matches!(
                r,
                Err(ConnectError::Handshake(HandshakeError::Refused(
                    RefuseReason::SecurityMismatch
                )))
            ),
            "{d:?} to {l:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn a_migrated_stream_keeps_its_suite_wherever_it_is_thawed() {
    use Suite::{Aes256Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    for (i, suite) in [Aes, ChaCha].into_iter().enumerate() {
        let (_a, _b, s, mut t) = pair(&[suite], &Suite::DEFAULT_PREFERENCE).await;
        assert_eq!(s.suite(), suite);
        let image = within("freeze", s.freeze()).await.unwrap();
        assert_eq!(image.suite(), suite);
        // Through bytes, to an endpoint that would prefer the other suite for new sessions.
        let image = roam::StreamImage::from_bytes(&image.to_bytes()).unwrap();
        assert_eq!(image.suite(), suite);
        let other = if suite == Aes { ChaCha } else { Aes };
        let c = Endpoint::bind_with(host(4), config(&[other]))
            .await
            .unwrap();
        let mut s = within("thaw", c.thaw(image)).await.unwrap();
        assert_eq!((s.suite(), t.suite()), (suite, suite));
        let data = random_bytes(10 + i as u64, 300_000);
        assert!(
            transfer(&mut s, &mut t, &data).await == sha(&data),
            "{suite}"
        );
        assert!(
            transfer(&mut t, &mut s, &data).await == sha(&data),
            "{suite}"
        );
        assert_eq!(s.epoch(), roam::Epoch(1));
    }
}

fn dgram_config(suites: &[Suite]) -> DatagramConfig {
    let mut c = DatagramConfig::default();
    c.suites = suites.to_vec();
    c
}

async fn recv(d: &Datagram) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = within("recv", d.recv_from(&mut buf)).await.unwrap();
    buf.truncate(n);
    (buf, from)
}

async fn associated(d: &Datagram) -> SocketAddr {
    loop {
        match within("an Associated event", d.next_event()).await {
            Some(DatagramEvent::Associated { peer }) => return peer,
            Some(_) => continue,
            None => panic!("socket closed"),
        }
    }
}

#[tokio::test]
async fn datagram_sockets_negotiate_both_ways_and_keep_the_suite_across_a_move() {
    use Suite::{Aes256Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    let cases: [(&[Suite], &[Suite], Suite); 4] = [
        (&Suite::DEFAULT_PREFERENCE, &Suite::DEFAULT_PREFERENCE, Aes),
        (&[ChaCha, Aes], &Suite::DEFAULT_PREFERENCE, ChaCha),
        (&Suite::DEFAULT_PREFERENCE, &[ChaCha], ChaCha),
        (&[Aes], &[ChaCha, Aes], Aes),
    ];
    for (i, (mine, theirs, want)) in cases.into_iter().enumerate() {
        let m = Datagram::bind_with(host(2), dgram_config(mine))
            .await
            .unwrap();
        let p = Datagram::bind_with(host(3), dgram_config(theirs))
            .await
            .unwrap();
        m.send_to(b"first", p.local_addr()).await.unwrap();
        let (got, m_addr) = recv(&p).await;
        assert_eq!(got, b"first");
        associated(&m).await;
        assert_eq!(m.peers()[0].suite, want, "case {i}");
        assert_eq!(p.peers()[0].suite, want, "case {i}");
        // The move: the image carries the suite, the thawed socket (whose own preference is
        // the other suite) keeps it, and data flows both ways.
        let image = within("freeze", m.freeze()).await.unwrap();
        let image = roam::DatagramImage::from_bytes(&image.to_bytes()).unwrap();
        let other = if want == Aes { ChaCha } else { Aes };
        let m = within(
            "thaw",
            Datagram::thaw_with(image, host(4), dgram_config(&[other])),
        )
        .await
        .unwrap();
        assert_eq!(m.peers()[0].suite, want, "case {i}");
        m.send_to(b"after", p.local_addr()).await.unwrap();
        let (got, from) = recv(&p).await;
        assert_eq!((got.as_slice(), from), (&b"after"[..], m_addr));
        p.send_to(b"back", m_addr).await.unwrap();
        let (got, _) = recv(&m).await;
        assert_eq!(got, b"back");
        assert_eq!(p.stats().auth_failed, 0);
    }
}

#[tokio::test]
async fn datagram_sockets_without_a_common_suite_never_associate() {
    use Suite::{Aes256Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    let mut cfg = dgram_config(&[Aes]);
    cfg.retry_initial = Duration::from_millis(5);
    cfg.retry_max = Duration::from_millis(10);
    cfg.max_tries = 3;
    let m = Datagram::bind_with(host(2), cfg).await.unwrap();
    let p = Datagram::bind_with(host(3), dgram_config(&[ChaCha]))
        .await
        .unwrap();
    m.send_to(b"never", p.local_addr()).await.unwrap();
    let e = within("PeerUnreachable", m.next_event()).await;
    assert!(
        matches!(e, Some(DatagramEvent::PeerUnreachable { .. })),
        "{e:?}"
    );
    assert!(p.peers().is_empty());
    assert!(p.stats().refused >= 1);
}
