//! Two in-memory sessions driven by an arbitrary sequence of operations (writes, reads,
//! partial deliveries, link kills, freezes, thaws, tampered images, injected bytes, replays):
//! never a panic, and byte-exact delivery wherever the operations allow it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roam_fuzz::session_driver::{decode_ops, Harness};

fuzz_target!(|data: &[u8]| {
    Harness::run(&decode_ops(data));
});
