//! `Packet::decode` (datagram sockets) on arbitrary bytes: never a panic, every packet it
//! accepts re-encodes to the exact bytes it came from, and a socket handed the bytes counts
//! what does not decode as refused.
#![no_main]

#[path = "../src/datagram_checks.rs"]
mod datagram_checks;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    datagram_checks::check_packet(data);
});
