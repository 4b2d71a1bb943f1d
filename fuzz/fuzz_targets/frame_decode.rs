//! `Frame::decode` on arbitrary bytes, frame after frame: never a panic, and every frame it
//! accepts re-encodes to the exact bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    roam_fuzz::checks::check_frames(data);
});
