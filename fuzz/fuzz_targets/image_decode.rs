//! `StreamImage::from_bytes` on arbitrary bytes: never a panic, and an image it accepts
//! re-encodes exactly. An odd first byte seals the rest (valid magic, version, length and
//! digest) so the fuzzer reaches the field decoders behind the SHA-256 check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roam_fuzz::checks::{check_image, seal_image};

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => {
            check_image(&seal_image(rest));
        }
        _ => {
            check_image(data);
        }
    }
});
