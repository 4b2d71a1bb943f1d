//! The properties the datagram fuzz targets (`packet_decode`, `datagram_image_decode`) check,
//! shared with the stable smoke test: both the targets and
//! `crates/roam-proto/tests/fuzz_smoke.rs` include this file with `#[path]`.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use roam_proto::datagram::{Packet, DATAGRAM_IMAGE_MAGIC, MAX_UDP_PAYLOAD};
use roam_proto::{DatagramConfig, DatagramImage, DatagramSocket, ImageError};
use sha2::{Digest, Sha256};

/// Decode `data` as one datagram-socket packet. A packet that decodes re-encodes to exactly the
/// bytes it came from and decodes back to itself. Either way, a socket handed the bytes does
/// not panic, and counts them as refused if they do not decode. Returns whether they decoded.
pub fn check_packet(data: &[u8]) -> bool {
    let decoded = Packet::decode(Bytes::copy_from_slice(data)).ok();
    if let Some(p) = &decoded {
        let again = p.encode();
        assert_eq!(&again[..], data, "{p:?} re-encodes differently");
        assert_eq!(Packet::decode(again).ok().as_ref(), Some(p));
    }
    let now = Instant::now();
    let mut s = DatagramSocket::new(
        DatagramConfig::default(),
        SocketAddr::from(([127, 0, 0, 2], 4000)),
        [3; 32],
    );
    s.handle(
        now,
        SocketAddr::from(([127, 0, 0, 9], 9)),
        Bytes::copy_from_slice(data),
    );
    if decoded.is_none() {
        assert_eq!(s.stats().refused, 1, "a malformed packet is counted");
    }
    while let Some((_, b)) = s.poll_transmit() {
        assert!(b.len() <= MAX_UDP_PAYLOAD);
    }
    while s.poll_event().is_some() {}
    decoded.is_some()
}

/// Length of an image's fixed prefix (magic, version, body length) and of its digest.
const PREFIX: usize = 14;
const DIGEST: usize = 32;

/// Make `body` pass a datagram image's outer checks (magic, version, length, digest), so what
/// follows exercises the field decoders and the consistency checks.
pub fn seal_datagram_image(body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(PREFIX + body.len() + DIGEST);
    b.extend_from_slice(&DATAGRAM_IMAGE_MAGIC);
    b.extend_from_slice(&roam_proto::datagram::DATAGRAM_IMAGE_VERSION.to_be_bytes());
    b.extend_from_slice(&(body.len() as u32).to_be_bytes());
    b.extend_from_slice(body);
    let digest = Sha256::digest(&b);
    b.extend_from_slice(&digest);
    b
}

/// The body of a sealed image (inverse of [`seal_datagram_image`], for images long enough).
pub fn datagram_image_body(image: &[u8]) -> Option<&[u8]> {
    (image.len() >= PREFIX + DIGEST).then(|| &image[PREFIX..image.len() - DIGEST])
}

/// Decode `data` as a datagram image. An image that decodes re-encodes to exactly the same
/// bytes (an older version's image: to an image that decodes to the same value); a socket thawed from it re-associates, sends, resends and gives up without
/// panicking, its timers stop, and it can freeze again into an image that decodes (or is
/// refused with a typed error when a forged counter grew past its bound). Returns whether it
/// decoded.
pub fn check_datagram_image(data: &[u8]) -> bool {
    let Ok(image) = DatagramImage::from_bytes(data) else {
        return false;
    };
    let current =
        data.get(8..10) == Some(&roam_proto::datagram::DATAGRAM_IMAGE_VERSION.to_be_bytes()[..]);
    if current {
        assert_eq!(image.to_bytes(), data, "image re-encodes differently");
    } else {
        let again = DatagramImage::from_bytes(&image.to_bytes()).expect("re-encoded image decodes");
        assert!(again == image, "an older image re-encodes to another value");
    }
    let peers = image.peer_count();
    let buffered = image.buffered_datagrams();
    let config = DatagramConfig::default();
    let mut now = Instant::now();
    let here = SocketAddr::from(([127, 0, 0, 77], 7777));
    let mut s = DatagramSocket::from_image(image, here, config.clone(), [9; 32], now);
    assert_eq!(s.peers().len(), peers);
    let drain = |s: &mut DatagramSocket| {
        while let Some((_, b)) = s.poll_transmit() {
            assert!(b.len() <= MAX_UDP_PAYLOAD);
        }
        while s.poll_event().is_some() {}
    };
    drain(&mut s);
    let mut read = 0;
    while s.recv().is_some() {
        read += 1;
    }
    assert_eq!(read, buffered);
    if let Some(p) = s.peers().first() {
        let _ = s.send_to(now, p.known_addr, b"after thaw");
    }
    let _ = s.send_to(now, SocketAddr::from(([127, 0, 0, 78], 1)), b"new peer");
    drain(&mut s);
    // Nobody answers: every resend happens and then stops.
    let mut steps = 0;
    while let Some(t) = s.poll_timeout() {
        assert!(t >= now, "a timer in the past");
        now = t;
        s.handle_timeout(now);
        drain(&mut s);
        steps += 1;
        assert!(steps < 64, "timers never stop");
    }
    s.freeze(now).expect("not frozen");
    s.handle_timeout(now + config.freeze_timeout);
    drain(&mut s);
    assert!(s.is_frozen());
    let img = s.image().expect("frozen");
    match DatagramImage::from_bytes(&img.to_bytes()) {
        Ok(again) => assert_eq!(again, img),
        // Counters or the epoch forged just below their bound grow past it.
        Err(ImageError::Inconsistent(_)) => {}
        Err(e) => panic!("a thawed and refrozen image does not decode: {e}"),
    }
    true
}
