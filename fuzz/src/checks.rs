//! The properties the decoder fuzz targets check, shared with the stable smoke test
//! (`crates/roam-proto/tests/fuzz_smoke.rs` includes this file with `#[path]`).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use roam_proto::{EndpointId, Frame, ImageError, LocalInfo, Session, SessionConfig, StreamImage};
use sha2::{Digest, Sha256};

/// Decode frames off the front of `data` until it runs out or fails. Every frame decoded
/// re-encodes to exactly the bytes it was decoded from, and those decode to the same frame.
/// Returns how many frames were decoded.
pub fn check_frames(data: &[u8]) -> usize {
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    loop {
        let start = data.len() - buf.len();
        match Frame::decode(&mut buf) {
            Ok(Some(f)) => {
                let consumed = &data[start..data.len() - buf.len()];
                let again = f.to_bytes();
                assert_eq!(&again[..], consumed, "{f:?} re-encodes differently");
                assert_eq!(Frame::decode_exact(&again).as_ref(), Ok(&f));
                frames += 1;
            }
            Ok(None) => {
                assert_eq!(
                    data.len() - buf.len(),
                    start,
                    "an incomplete frame consumed bytes"
                );
                return frames;
            }
            Err(_) => return frames,
        }
    }
}

/// Length of an image's fixed prefix (magic, version, body length) and of its digest.
const PREFIX: usize = 14;
const DIGEST: usize = 32;

/// Make `data` pass an image's outer checks: magic, version, body length and digest, so that
/// what follows exercises the field decoders and the consistency checks.
pub fn seal_image(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(PREFIX + data.len() + DIGEST);
    b.extend_from_slice(&roam_proto::image::IMAGE_MAGIC);
    b.extend_from_slice(&roam_proto::image::IMAGE_VERSION.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    let digest = Sha256::digest(&b);
    b.extend_from_slice(&digest);
    b
}

/// Decode `data` as an image. An image that decodes re-encodes to exactly the same bytes (an
/// older version's image: to an image that decodes to the same value), and a session thawed
/// from it survives its first steps without panicking. Returns whether it decoded.
pub fn check_image(data: &[u8]) -> bool {
    let Ok(image) = StreamImage::from_bytes(data) else {
        return false;
    };
    let current = data.get(8..10) == Some(&roam_proto::image::IMAGE_VERSION.to_be_bytes()[..]);
    if current {
        assert_eq!(image.to_bytes(), data, "image re-encodes differently");
    } else {
        let again = StreamImage::from_bytes(&image.to_bytes()).expect("re-encoded image decodes");
        assert_eq!(again, image, "an older image re-encodes to another value");
    }
    let now = Instant::now();
    let local = LocalInfo {
        endpoint: EndpointId([0x11; 16]),
        contact: SocketAddr::from(([127, 0, 0, 9], 9)),
    };
    let mut s = Session::from_image(image, local, SessionConfig::default(), now);
    if let Some(t) = s.poll_timeout() {
        s.handle_timeout(t.max(now));
    }
    while s.poll_event().is_some() {}
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
    let _ = s.write(b"more");
    let _ = s.freeze(now);
    while s.poll_event().is_some() {}
    if let Some(img) = s.image() {
        match StreamImage::from_bytes(&img.to_bytes()) {
            Ok(again) => assert_eq!(again, img),
            // A forged image just below the bounds on offsets and counters can thaw, and then
            // grow past them: its next image is refused, with a typed error.
            Err(ImageError::Inconsistent(_)) => {}
            Err(e) => panic!("a thawed and refrozen image does not decode: {e}"),
        }
    }
    true
}
