//! Malformed packets of every type: truncations, trailing bytes, bit flips and random bytes are
//! refused and counted, never a panic.

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam_proto::datagram::{dkind, Packet, DATA_OVERHEAD};

use crate::net::{addr, Net, MS};
use crate::{star, Traffic, SETTLE};

const M: usize = 0;

/// One genuine packet of every type, captured from a real exchange with a migration.
fn samples() -> (Net, Vec<Bytes>) {
    let mut net = star(60, 1);
    net.migrate(M, addr(81, 4000));
    assert!(net.settle(SETTLE));
    let kinds = [
        dkind::HELLO,
        dkind::WELCOME,
        dkind::DATA,
        dkind::REASSOC,
        dkind::REASSOC_ACK,
        dkind::FREEZING,
        dkind::FREEZING_ACK,
    ];
    let v = kinds
        .iter()
        .map(|&k| {
            net.captured(k, None)
                .first()
                .unwrap_or_else(|| panic!("a packet of type {k:#x}"))
                .bytes
                .clone()
        })
        .collect();
    (net, v)
}

/// Deliver `bytes` to node `i` (from a stranger); returns how much `refused` grew.
fn feed(net: &mut Net, i: usize, bytes: Bytes) -> u64 {
    let before = net.sock(i).stats().refused;
    net.deliver_now(i, addr(99, 9), bytes);
    net.sock(i).stats().refused - before
}

#[test]
fn truncated_and_extended_packets_of_every_type_are_refused() {
    let (mut net, samples) = samples();
    for s in &samples {
        let data = s[0] == dkind::DATA;
        for n in 0..s.len() {
            let cut = s.slice(..n);
            if data && n >= DATA_OVERHEAD {
                // A shorter Data packet is a shorter datagram, not a malformed one.
                assert!(Packet::decode(cut).is_ok());
                continue;
            }
            assert!(
                Packet::decode(cut.clone()).is_err(),
                "{:#x} cut at {n}",
                s[0]
            );
            for i in [M, 1] {
                assert_eq!(feed(&mut net, i, cut.clone()), 1, "{:#x} cut at {n}", s[0]);
            }
        }
        if !data {
            let mut long = s.to_vec();
            long.push(0);
            let long = Bytes::from(long);
            assert!(Packet::decode(long.clone()).is_err(), "trailing byte");
            for i in [M, 1] {
                assert_eq!(feed(&mut net, i, long.clone()), 1);
            }
        }
    }
    // Unknown types.
    for ty in (0..=255u8).filter(|t| !(dkind::HELLO..=dkind::FREEZING_ACK).contains(t)) {
        assert_eq!(feed(&mut net, 1, Bytes::from(vec![ty; 40])), 1);
    }
    // Still fine afterwards.
    let mut t = Traffic::default();
    t.send(&mut net, 1, M);
    t.send(&mut net, M, 1);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
}

#[test]
fn bit_flipped_authenticated_packets_are_refused() {
    let (mut net, samples) = samples();
    for s in &samples {
        // Welcome, Reassoc, ReassocAck, Freezing, FreezingAck carry a MAC over every field.
        if [dkind::HELLO, dkind::DATA].contains(&s[0]) {
            continue;
        }
        for byte in 1..s.len() {
            let mut v = s.to_vec();
            v[byte] ^= 0x10;
            let v = Bytes::from(v);
            for i in [M, 1] {
                let moved = net.nodes[1].events.len();
                let grew = feed(&mut net, i, v.clone());
                // Refused (bad MAC, unknown association, bad address tag), or a Welcome nobody
                // waits for (ignored quietly).
                assert!(
                    grew == 1 || s[0] == dkind::WELCOME,
                    "{:#x} flipped at {byte}",
                    s[0]
                );
                assert_eq!(net.nodes[1].events.len(), moved);
            }
        }
    }
    let row = &net.sock(1).peers()[0];
    assert_eq!((row.addr, row.peer_epoch), (addr(81, 4000), 1));
    assert!(!row.migrating);
}

#[test]
fn random_bytes_never_panic_and_every_decode_error_is_counted() {
    let (mut net, samples) = samples();
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    for round in 0..4000 {
        let bytes = match round % 3 {
            // Random bytes behind a known type byte, of a plausible length.
            0 => {
                let mut v = vec![0u8; rng.gen_range(0..120)];
                rng.fill_bytes(&mut v);
                if let Some(b) = v.first_mut() {
                    *b = rng.gen_range(dkind::HELLO..=dkind::FREEZING_ACK);
                }
                v
            }
            // A genuine packet with random bytes overwritten.
            1 => {
                let mut v = samples[rng.gen_range(0..samples.len())].to_vec();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..v.len());
                    v[i] = rng.gen();
                }
                v
            }
            // Anything.
            _ => {
                let mut v = vec![0u8; rng.gen_range(0..300)];
                rng.fill_bytes(&mut v);
                v
            }
        };
        let bytes = Bytes::from(bytes);
        let bad = Packet::decode(bytes.clone()).is_err();
        for i in [M, 1] {
            let grew = feed(&mut net, i, bytes.clone());
            if bad {
                assert_eq!(grew, 1);
            }
        }
        if round % 500 == 0 {
            net.run_for(MS);
        }
    }
    // Random Hellos may have made associations with strangers; the genuine ones are intact.
    let m = net.nodes[M].first_addr();
    let row = net
        .sock(1)
        .peers()
        .into_iter()
        .find(|r| r.known_addr == m)
        .unwrap();
    assert_eq!(row.addr, addr(81, 4000));
    net.run_for(SETTLE);
    let mut t = Traffic::default();
    t.send(&mut net, 1, M);
    t.send(&mut net, M, 1);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
}
