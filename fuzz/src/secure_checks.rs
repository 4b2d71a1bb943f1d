//! The properties of the handshake and sealed-frame fuzz targets (PROTOCOL.md §3.1, §5.1),
//! shared with the stable smoke test (`crates/roam-proto/tests/fuzz_smoke.rs` includes this
//! file with `#[path]`).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use roam_proto::{
    Associating, ConnId, EndpointId, Entropy, Frame, Identity, LocalInfo, PeerPolicy, PreSharedKey,
    Security, Session, SessionConfig, SessionId, Suite,
};

fn local(n: u8) -> LocalInfo {
    LocalInfo {
        endpoint: EndpointId([n; 16]),
        contact: SocketAddr::from(([127, 0, 0, n], 7000)),
    }
}

fn ent(n: u8) -> Entropy {
    Entropy {
        secret: [n; 32],
        nonce: [n; 16],
    }
}

/// XOR `mask` into `bytes`, cyclically from the start (an empty or zero mask changes nothing).
fn xor(bytes: &mut [u8], mask: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    for (i, m) in mask.iter().enumerate() {
        let n = bytes.len();
        bytes[i % n] ^= m;
    }
}

/// The settings a selector byte picks for one side: identity, pinning of the other side's
/// identity, a pre-shared key, plaintext mode.
fn settings(sel: u8, me: u8, other: u8) -> Security {
    let mut s = Security::new();
    if sel & 1 != 0 {
        s = s.with_identity(Identity::from_secret_bytes([me; 32]));
    }
    if sel & 2 != 0 {
        let pinned = Identity::from_secret_bytes([other; 32]).public_key();
        s = s.with_policy(PeerPolicy::Pinned(vec![pinned]));
    } else if sel & 4 != 0 {
        s = s.with_policy(PeerPolicy::PreShared(PreSharedKey([0x42; 32])));
    }
    s.with_insecure_plaintext(sel & 8 != 0)
}

/// The AEAD suites a selector (two bits) picks: both orders of both, or one alone.
fn suites(sel: u8) -> Vec<Suite> {
    match sel & 3 {
        0 => vec![Suite::Aes256Gcm, Suite::ChaCha20Poly1305],
        1 => vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm],
        2 => vec![Suite::Aes256Gcm],
        _ => vec![Suite::ChaCha20Poly1305],
    }
}

/// An association handshake with identities: `data[0]` picks both sides' settings, `data[1]`
/// both sides' suite lists, the rest is XORed into the encoded `Hello` (first half) and
/// `Welcome` (second half). Never a panic; a handshake that completes leaves both sides with
/// the same key and the same suite — the one the unaltered offer and choice give (a downgrade
/// on the path never completes) —, a listener that accepts the dialer's confirmation, and a
/// dialer confirmed by the listener's answer to it (PROTOCOL.md §5.1 step 5). Returns whether
/// it completed.
pub fn check_handshake(data: &[u8]) -> bool {
    let now = Instant::now();
    let sel = data.first().copied().unwrap_or(0);
    let suite_sel = data.get(1).copied().unwrap_or(0);
    let rest = data.get(2..).unwrap_or(&[]);
    let (hmask, wmask) = rest.split_at(rest.len() / 2);
    let dsec = settings(sel & 0x0f, 1, 2).with_suites(suites(suite_sel));
    let lsec = settings(sel >> 4, 2, 1).with_suites(suites(suite_sel >> 2));
    // The dialer's first preference the listener also accepts.
    let expected = dsec
        .suites
        .iter()
        .copied()
        .find(|s| lsec.suites.contains(s));
    let (assoc, hello) = Associating::with_security(local(2), &ent(3), &dsec);
    let mut hb = hello.to_bytes().to_vec();
    xor(&mut hb[5..], hmask);
    let Ok(Frame::Hello(h)) = Frame::decode_exact(&hb) else {
        return false;
    };
    let Ok((mut l, welcome)) = Session::accept_hello_with(
        now,
        ConnId(1),
        &h,
        SessionId([9; 16]),
        local(4),
        &ent(5),
        SessionConfig::default(),
        &lsec,
    ) else {
        return false;
    };
    let mut wb = welcome.to_bytes().to_vec();
    xor(&mut wb[5..], wmask);
    let Ok(w) = Frame::decode_exact(&wb) else {
        return false;
    };
    let Ok(mut d) = assoc.handle(now, ConnId(1), w, SessionConfig::default()) else {
        return false;
    };
    assert_eq!(
        d.key_fingerprint(),
        l.key_fingerprint(),
        "completed with different keys"
    );
    let confirm = d.poll_transmit(now).expect("the confirmation");
    let f = Frame::decode_exact(&confirm.to_vec()).expect("a frame");
    l.handle_frame(now, ConnId(1), f)
        .expect("confirmation accepted");
    assert!(l.is_confirmed());
    // §5.1 step 5: the dialer is confirmed only by the listener's answer, which comes at once.
    assert!(!d.is_confirmed(), "confirmed before the listener answered");
    let mut answer = BytesMut::new();
    while let Some(t) = l.poll_transmit(now) {
        answer.extend_from_slice(&t.to_vec());
    }
    assert!(!answer.is_empty(), "the listener answers the confirmation");
    while let Some(f) = Frame::decode(&mut answer).expect("the listener's frames decode") {
        d.handle_frame(now, ConnId(1), f)
            .expect("the listener's answer accepted");
    }
    assert!(d.is_confirmed());
    assert_eq!(d.is_secure(), !dsec.insecure_plaintext);
    assert_eq!(Some(d.suite()), expected, "suite not the one negotiated");
    assert_eq!(d.suite(), l.suite());
    true
}

/// Sealed frames on an established pair: `data[0..2]` sizes a payload the dialer writes (and
/// its parity picks the suite: even AES-256-GCM, odd ChaCha20-Poly1305), the rest is XORed
/// into the wire bytes after the confirmation. Never a panic, and the listener never delivers
/// a byte that differs from what was written: it delivers a prefix or drops the connection.
/// Returns how many bytes it delivered.
pub fn check_sealed(data: &[u8]) -> usize {
    let now = Instant::now();
    let n = match data {
        [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])) % 200_000,
        _ => 1000,
    };
    let suite = if n % 2 == 0 {
        Suite::Aes256Gcm
    } else {
        Suite::ChaCha20Poly1305
    };
    let sec = Security::new().with_suites([suite]);
    let (assoc, hello) = Associating::with_security(local(2), &ent(3), &sec);
    let Frame::Hello(h) = hello else {
        unreachable!("Associating::with_security returns a Hello")
    };
    let (mut l, welcome) = Session::accept_hello_with(
        now,
        ConnId(1),
        &h,
        SessionId([9; 16]),
        local(4),
        &ent(5),
        SessionConfig::default(),
        &Security::new(),
    )
    .expect("a genuine hello");
    let mut d = assoc
        .handle(now, ConnId(1), welcome, SessionConfig::default())
        .expect("a genuine welcome");
    let confirm = d.poll_transmit(now).expect("the confirmation");
    l.handle_frame(
        now,
        ConnId(1),
        Frame::decode_exact(&confirm.to_vec()).unwrap(),
    )
    .expect("confirmation accepted");
    assert_eq!(l.suite(), suite);
    let payload: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
    let mut written = 0;
    while written < payload.len() {
        match d.write(&payload[written..]) {
            Ok(k) => written += k,
            Err(_) => break,
        }
    }
    let mut wire = Vec::new();
    while let Some(t) = d.poll_transmit(now) {
        wire.extend_from_slice(&t.to_vec());
    }
    xor(&mut wire, data.get(2..).unwrap_or(&[]));
    let mut buf = BytesMut::from(&wire[..]);
    while let Ok(Some(f)) = Frame::decode(&mut buf) {
        if l.handle_frame(now, ConnId(1), f).is_err() {
            break;
        }
    }
    let mut got = vec![0u8; written + 1];
    let mut delivered = 0;
    while let Ok(k) = l.read(&mut got[delivered..]) {
        if k == 0 {
            break;
        }
        delivered += k;
    }
    assert!(delivered <= written);
    assert_eq!(
        &got[..delivered],
        &payload[..delivered],
        "altered bytes delivered"
    );
    delivered
}
