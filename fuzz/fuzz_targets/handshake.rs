//! An association handshake with identities, pinning and pre-shared keys, its `Hello` and
//! `Welcome` mutated: never a panic, and a handshake that completes agrees on the key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    roam_fuzz::secure_checks::check_handshake(data);
});
