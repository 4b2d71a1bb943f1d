//! Forged and replayed re-associations and freezes ("Beyond the patent: secure
//! re-association"): refused, counted, and no traffic redirected.

use std::net::SocketAddr;

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roam_proto::datagram::{dkind, Packet};
use sha2::{Digest, Sha256};

use crate::net::{addr, Net, MS};
use crate::{is_moved, star, Traffic, SETTLE};

const M: usize = 0;

/// The attacker's address: no socket is bound there.
fn eve() -> SocketAddr {
    addr(66, 6666)
}

/// The genuine `Reassoc` packets node `M` sent to node `to` while bound at `from`.
fn reassocs(net: &Net, from: SocketAddr, to: usize) -> Vec<Bytes> {
    let dest = net.nodes[to].sock.local_addr();
    net.captured(dkind::REASSOC, Some(M))
        .into_iter()
        .filter(|s| s.from == from && s.to == dest)
        .map(|s| s.bytes)
        .collect()
}

/// The peer's view of the mover, and that traffic to the mover's first address still reaches
/// the genuine socket (wherever it is now), from the first address.
fn assert_not_redirected(net: &mut Net, peer: usize, genuine: SocketAddr) {
    let row = net.sock(peer).peers()[0].clone();
    assert_eq!(row.addr, genuine, "translation unchanged");
    let mut t = Traffic::default();
    t.send(net, peer, M);
    t.send(net, M, peer);
    assert!(net.settle(SETTLE));
    // Traffic' sequence numbers restart at 0: look at the last datagram each side read.
    let last = |n: &Net, i: usize| n.nodes[i].got.last().cloned();
    let (from, _) = last(net, M).expect("the genuine socket got it");
    assert_eq!(from, net.nodes[peer].first_addr());
    let (from, _) = last(net, peer).expect("the peer got the answer");
    assert_eq!(from, net.nodes[M].first_addr());
    assert!(
        !net.log
            .iter()
            .any(|s| s.to == eve() && s.node.is_some() && s.kind() != dkind::PATH_CHALLENGE),
        "nothing but path challenges is ever sent to the attacker"
    );
}

// ---------------------------------------------------------------- MAC construction, replicated

fn th(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(key);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner: [u8; 32] = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize()
        .into();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// roam's MAC (PROTOCOL.md §5): HMAC-SHA256 over the label's transcript hash and the
/// length-prefixed parts.
fn roam_mac(key: &[u8; 32], label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut msg = th(&[label]).to_vec();
    for p in parts {
        msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
        msg.extend_from_slice(p);
    }
    hmac(key, &msg)
}

/// A `Reassoc` MAC'd under `key` exactly as the socket does (the peer takes the address it
/// comes from).
fn reassoc_under(key: &[u8; 32], assoc: u64, epoch: u64) -> Bytes {
    let nonce = [0x42; 16];
    let mut signed = Vec::new();
    signed.extend_from_slice(&assoc.to_be_bytes());
    signed.extend_from_slice(&epoch.to_be_bytes());
    signed.extend_from_slice(&nonce);
    let mac = roam_mac(key, b"roam/v1/dgram-reassoc", &[&signed]);
    let p = Packet::Reassoc {
        assoc,
        epoch,
        nonce,
        mac,
    };
    p.encode()
}

/// (association id, key) of every association in an encoded datagram image, read from its
/// body layout (PROTOCOL.md §10.4): id, epoch, origin, count, then per association id, peer
/// socket id, key, suite, known address, address, peer epoch, packet counter, replay window (18
/// words), confirmed flag and held datagrams.
fn image_keys(image: &[u8]) -> Vec<(u64, [u8; 32])> {
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn take(&mut self, n: usize) -> &[u8] {
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a
        }
        fn u32(&mut self) -> u32 {
            u32::from_be_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_be_bytes(self.take(8).try_into().unwrap())
        }
        fn addr(&mut self) {
            let n = if self.take(1)[0] == 4 { 4 } else { 16 };
            self.take(n + 2);
        }
    }
    let mut r = R(&image[14..image.len() - 32]);
    r.take(16 + 8);
    r.addr();
    let n = r.u32();
    let mut out = Vec::new();
    for _ in 0..n {
        let id = r.u64();
        r.take(16);
        let key: [u8; 32] = r.take(32).try_into().unwrap();
        r.take(1); // the suite
        r.addr();
        r.addr();
        r.u64();
        r.take(8 + 18 * 8 + 1);
        for _ in 0..r.u32() {
            let len = r.u32() as usize;
            r.take(len);
        }
        out.push((id, key));
    }
    out
}

// ------------------------------------------------------------------------------------- tests

#[test]
fn forged_reassoc_with_a_random_mac_is_refused() {
    let mut net = star(40, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(40);
    let genuine = net.nodes[M].first_addr();
    for p in 1..=2 {
        let assoc = net.assoc_id(M, p);
        for epoch in [0, 1, 2, u64::MAX] {
            let mut mac = [0u8; 32];
            rng.fill_bytes(&mut mac);
            let mut nonce = [0u8; 16];
            rng.fill_bytes(&mut nonce);
            let forged = Packet::Reassoc {
                assoc,
                epoch,
                nonce,
                mac,
            };
            let before = net.sock(p).stats().refused;
            net.inject(eve(), net.nodes[p].first_addr(), forged.encode());
            net.run_for(MS * 10);
            assert_eq!(net.sock(p).stats().refused, before + 1);
        }
        assert_eq!(net.sock(p).stats().reassoc_accepted, 0);
        assert_eq!(net.nodes[p].count_events(is_moved), 0);
        assert_not_redirected(&mut net, p, genuine);
    }
}

#[test]
fn reassoc_under_another_associations_key_is_refused_and_the_genuine_key_is_the_control() {
    let mut net = star(41, 2);
    // Only to read the keys out of the image (as a thief of an old image could); the socket
    // thaws in place and carries on.
    let image = net.freeze(M);
    let keys = image_keys(&image);
    assert_eq!(keys.len(), 2);
    net.thaw(M, &image, addr(72, 4000));
    assert!(net.settle(SETTLE));
    let genuine = addr(72, 4000);

    let a1 = net.assoc_id(M, 1);
    let (_, k1) = *keys.iter().find(|(id, _)| *id == a1).unwrap();
    let (_, k2) = *keys.iter().find(|(id, _)| *id != a1).unwrap();
    // Association 1's id, a fresh epoch, the attacker's address, MAC'd with association 2's key.
    let before = net.sock(1).stats().refused;
    net.inject(eve(), net.nodes[1].first_addr(), reassoc_under(&k2, a1, 9));
    net.run_for(10 * MS);
    assert_eq!(net.sock(1).stats().refused, before + 1);
    assert_eq!(net.sock(1).peers()[0].peer_epoch, 1);
    assert_not_redirected(&mut net, 1, genuine);

    // Control: the same packet under the right key is accepted (so the refusal above is the
    // key's doing, not a mistake in this test's MAC): the peer challenges the address it came
    // from. Even a thief holding the key does not redirect traffic to an address that cannot
    // answer the challenge; the peer holds (as for a `Freezing`, which the key also allows)
    // until the hold timeout, then sends to the genuine address again.
    let challenges = net.sock(1).stats().path_challenges_sent;
    net.inject(eve(), net.nodes[1].first_addr(), reassoc_under(&k1, a1, 9));
    net.run_for(10 * MS);
    assert_eq!(net.sock(1).stats().path_challenges_sent, challenges + 1);
    let row = &net.sock(1).peers()[0];
    assert_eq!((row.addr, row.peer_epoch), (genuine, 1), "not redirected");
    assert!(row.migrating, "holding for the unvalidated address");
    net.run_for(net.nodes[1].config.hold_timeout + 10 * MS);
    assert!(!net.sock(1).peers()[0].migrating);
    assert_not_redirected(&mut net, 1, genuine);
}

#[test]
fn replayed_reassoc_from_an_earlier_epoch_is_refused() {
    let mut net = star(42, 2);
    let (e1, e2) = (addr(73, 4000), addr(74, 4000));
    net.migrate(M, e1);
    assert!(net.settle(SETTLE));
    net.migrate(M, e2);
    assert!(net.settle(SETTLE));
    for p in 1..=2 {
        let old = reassocs(&net, e1, p);
        assert_eq!(old.len(), 1);
        let before = net.sock(p).stats().refused;
        // From a third address, and from the old address itself.
        net.inject(eve(), net.nodes[p].first_addr(), old[0].clone());
        net.inject(e1, net.nodes[p].first_addr(), old[0].clone());
        net.run_for(10 * MS);
        assert_eq!(net.sock(p).stats().refused, before + 2);
        assert_eq!(net.sock(p).peers()[0].peer_epoch, 2);
        assert_eq!(net.nodes[p].count_events(is_moved), 2);
        assert_not_redirected(&mut net, p, e2);
    }
}

#[test]
fn replayed_current_reassoc_from_another_address_is_refused_and_only_the_genuine_is_acked() {
    let mut net = star(43, 1);
    let e1 = addr(75, 4000);
    net.migrate(M, e1);
    assert!(net.settle(SETTLE));
    let cur = reassocs(&net, e1, 1);
    let acks = net.captured(dkind::REASSOC_ACK, Some(1)).len();
    // From the attacker's address: refused, nothing sent anywhere.
    let before = net.sock(1).stats().refused;
    net.inject(eve(), net.nodes[1].first_addr(), cur[0].clone());
    assert!(net.settle(SETTLE));
    assert_eq!(net.sock(1).stats().refused, before + 1);
    assert_eq!(net.captured(dkind::REASSOC_ACK, Some(1)).len(), acks);
    // From the genuine address (a resend, or a duplicate): acknowledged again, not a move.
    net.inject(e1, net.nodes[1].first_addr(), cur[0].clone());
    assert!(net.settle(SETTLE));
    let after = net.captured(dkind::REASSOC_ACK, Some(1));
    assert_eq!(after.len(), acks + 1);
    assert_eq!(after.last().unwrap().to, e1);
    assert_eq!(net.nodes[1].count_events(is_moved), 1);
    assert_not_redirected(&mut net, 1, e1);
}

/// Regression: a replay (or a late network duplicate) of the current epoch's `Reassoc` that
/// arrives after the mover announced its next freeze used to end the peer's hold: the peer
/// "re-associated" with the frozen address, sent it everything it held, and went on sending
/// there, so every datagram of the move was lost.
#[test]
fn replayed_current_reassoc_during_the_next_freeze_does_not_end_the_hold() {
    let mut net = star(44, 1);
    let e1 = addr(76, 4000);
    net.migrate(M, e1);
    assert!(net.settle(SETTLE));
    let cur = reassocs(&net, e1, 1);
    let image = net.freeze(M);
    assert!(net.sock(1).peers()[0].migrating);
    let mut t = Traffic::default();
    t.send(&mut net, 1, M);
    net.inject(eve(), net.nodes[1].first_addr(), cur[0].clone());
    net.run_for(10 * MS);
    assert!(net.sock(1).peers()[0].migrating, "still holding");
    t.send(&mut net, 1, M);
    net.run_for(10 * MS);
    let e2 = addr(77, 4000);
    net.thaw(M, &image, e2);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
    assert_eq!(net.sock(1).stats().held_and_sent, 2);
    assert_eq!(net.sock(1).peers()[0].addr, e2);
}

#[test]
fn forged_freezing_does_not_make_a_peer_hold() {
    let mut net = star(45, 1);
    let assoc = net.assoc_id(M, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(45);
    for epoch in [0, 1] {
        let mut mac = [0u8; 32];
        rng.fill_bytes(&mut mac);
        let p = Packet::Freezing { assoc, epoch, mac };
        let before = net.sock(1).stats().refused;
        // Spoofed from the genuine address, and from a third one.
        net.inject(
            net.nodes[M].first_addr(),
            net.nodes[1].first_addr(),
            p.encode(),
        );
        net.inject(eve(), net.nodes[1].first_addr(), p.encode());
        net.run_for(10 * MS);
        assert_eq!(net.sock(1).stats().refused, before + 2);
        assert!(!net.sock(1).peers()[0].migrating);
    }
    // The peer's datagrams go out at once, nothing held, no FreezingAck sent.
    let data = net.captured(dkind::DATA, Some(1)).len();
    let mut t = Traffic::default();
    t.send(&mut net, 1, M);
    assert_eq!(net.captured(dkind::DATA, Some(1)).len(), data + 1);
    assert!(net.captured(dkind::FREEZING_ACK, None).is_empty());
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
}

#[test]
fn replayed_freezing_from_an_earlier_epoch_does_not_make_a_peer_hold() {
    let mut net = star(46, 1);
    net.migrate(M, addr(78, 4000));
    assert!(net.settle(SETTLE));
    let old = net.captured(dkind::FREEZING, Some(M));
    assert_eq!(old.len(), 1);
    let before = net.sock(1).stats().refused;
    net.inject(eve(), net.nodes[1].first_addr(), old[0].bytes.clone());
    net.run_for(10 * MS);
    assert_eq!(net.sock(1).stats().refused, before + 1);
    assert!(!net.sock(1).peers()[0].migrating);
    let mut t = Traffic::default();
    t.send(&mut net, 1, M);
    assert!(net.settle(SETTLE));
    t.assert_exact(&net);
}
