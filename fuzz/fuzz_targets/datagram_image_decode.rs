//! `DatagramImage::from_bytes` on arbitrary bytes: never a panic, an image it accepts
//! re-encodes exactly, and a socket thawed from it (`DatagramSocket::from_image`) re-associates,
//! sends, times out and freezes again without panicking. An odd first byte seals the rest
//! (valid magic, version, length and digest) so the fuzzer reaches the field decoders behind
//! the SHA-256 check.
#![no_main]

#[path = "../src/datagram_checks.rs"]
mod datagram_checks;

use datagram_checks::{check_datagram_image, seal_datagram_image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => {
            check_datagram_image(&seal_datagram_image(rest));
        }
        _ => {
            check_datagram_image(data);
        }
    }
});
