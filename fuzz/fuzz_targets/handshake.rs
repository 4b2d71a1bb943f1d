//! An association handshake with identities, pinning, pre-shared keys and suite preferences,
//! its `Hello` and `Welcome` mutated: never a panic, and a handshake that completes agrees on
//! the key and on the suite the unaltered negotiation gives (no downgrade), the listener
//! accepts the dialer's `Confirm` and the dialer is confirmed by the listener's answer
//! (PROTOCOL.md §5.1 step 5).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    roam_fuzz::secure_checks::check_handshake(data);
});
