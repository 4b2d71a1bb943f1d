//! Sealed frames (AES-256-GCM or ChaCha20-Poly1305) mutated on the wire: never a panic, and never a delivered
//! byte that differs from what was written.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    roam_fuzz::secure_checks::check_sealed(data);
});
