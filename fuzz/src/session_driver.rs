//! A deterministic in-memory driver for two associated [`Session`]s, steered by a sequence of
//! operations: write, read, deliver bytes, kill the link, freeze, thaw, tamper with an image in
//! transit, and feed arbitrary bytes to one side (on its live connection or on an attacker's).
//!
//! It performs no I/O and uses a virtual clock. It checks that nothing panics, that nothing an
//! attacker sends on a connection of its own changes a session's epoch or link, and — unless an
//! operation legitimately tampered with the stream — that every byte read is the byte the peer
//! wrote at that offset and that, after a final drain, everything written was delivered.
//!
//! This file is shared: the cargo-fuzz target `session_ops` (`fuzz/fuzz_targets/session_ops.rs`)
//! decodes operations from raw bytes with [`decode_ops`], and the stable smoke test
//! `crates/roam-proto/tests/fuzz_smoke.rs` includes it with `#[path]` and generates operations
//! with proptest.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use roam_proto::{
    Associating, ConnId, EndpointId, Entropy, Event, Frame, LocalInfo, ReadError, Session,
    SessionConfig, SessionId, StreamImage, WriteError,
};
use sha2::{Digest, Sha256};

/// One step of a scenario. `side` is taken modulo 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The application on `side` writes `len` pattern bytes.
    Write { side: u8, len: u16 },
    /// The application on `side` reads up to `max` bytes.
    Read { side: u8, max: u16 },
    /// Up to `max` bytes in flight toward `side` arrive there.
    Deliver { side: u8, max: u16 },
    /// Both sides transmit what they have, run due timers and handle their events.
    Pump,
    /// The virtual clock advances.
    Advance { ms: u16 },
    /// The transport connection dies (both ends see it lost).
    KillLink,
    /// `side` starts a planned migration.
    Freeze { side: u8 },
    /// A frozen `side` is thawed on a new host.
    Thaw { side: u8 },
    /// Someone rewrites byte `pos` of `side`'s image in transit and recomputes its digest.
    TamperImage { side: u8, pos: u16, val: u8 },
    /// `side` ends its write half.
    Shutdown { side: u8 },
    /// Arbitrary bytes arrive at `side`: on its live connection (`on_link`), or on a
    /// connection an attacker opened to its endpoint.
    FeedRaw {
        side: u8,
        on_link: bool,
        bytes: Vec<u8>,
    },
    /// An attacker replays the last genuine `Reassoc` to `side`, then sends a made-up
    /// `Confirm` whose MAC is all `mac` bytes.
    Replay { side: u8, mac: u8 },
}

const OPS: u8 = 12;
/// Most operations taken from one input.
pub const MAX_OPS: usize = 256;

/// Decode operations from raw bytes (any bytes decode; the fuzzer's input format).
pub fn decode_ops(data: &[u8]) -> Vec<Op> {
    let mut r = data;
    let mut ops = Vec::new();
    fn byte(r: &mut &[u8]) -> u8 {
        match r.split_first() {
            Some((b, rest)) => {
                *r = rest;
                *b
            }
            None => 0,
        }
    }
    fn word(r: &mut &[u8]) -> u16 {
        u16::from_be_bytes([byte(r), byte(r)])
    }
    while !r.is_empty() && ops.len() < MAX_OPS {
        let op = match byte(&mut r) % OPS {
            0 => Op::Write {
                side: byte(&mut r),
                len: word(&mut r),
            },
            1 => Op::Read {
                side: byte(&mut r),
                max: word(&mut r),
            },
            2 => Op::Deliver {
                side: byte(&mut r),
                max: word(&mut r),
            },
            3 => Op::Pump,
            4 => Op::Advance { ms: word(&mut r) },
            5 => Op::KillLink,
            6 => Op::Freeze { side: byte(&mut r) },
            7 => Op::Thaw { side: byte(&mut r) },
            8 => Op::TamperImage {
                side: byte(&mut r),
                pos: word(&mut r),
                val: byte(&mut r),
            },
            9 => Op::Shutdown { side: byte(&mut r) },
            10 => {
                let side = byte(&mut r);
                let n = byte(&mut r);
                let n = usize::from(n >> 1).min(r.len());
                let (bytes, rest) = r.split_at(n);
                r = rest;
                Op::FeedRaw {
                    side: side & 0x7f,
                    on_link: side & 0x80 != 0,
                    bytes: bytes.to_vec(),
                }
            }
            _ => Op::Replay {
                side: byte(&mut r),
                mac: byte(&mut r),
            },
        };
        ops.push(op);
    }
    ops
}

/// Encode operations so that [`decode_ops`] gives them back (for seed corpora).
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut v = Vec::new();
    for op in ops {
        match op {
            Op::Write { side, len } => {
                v.extend([0, *side]);
                v.extend(len.to_be_bytes());
            }
            Op::Read { side, max } => {
                v.extend([1, *side]);
                v.extend(max.to_be_bytes());
            }
            Op::Deliver { side, max } => {
                v.extend([2, *side]);
                v.extend(max.to_be_bytes());
            }
            Op::Pump => v.push(3),
            Op::Advance { ms } => {
                v.push(4);
                v.extend(ms.to_be_bytes());
            }
            Op::KillLink => v.push(5),
            Op::Freeze { side } => v.extend([6, *side]),
            Op::Thaw { side } => v.extend([7, *side]),
            Op::TamperImage { side, pos, val } => {
                v.extend([8, *side]);
                v.extend(pos.to_be_bytes());
                v.push(*val);
            }
            Op::Shutdown { side } => v.extend([9, *side]),
            Op::FeedRaw {
                side,
                on_link,
                bytes,
            } => {
                let bytes = &bytes[..bytes.len().min(127)];
                let side = (side & 0x7f) | if *on_link { 0x80 } else { 0 };
                v.extend([10, side, (bytes.len() as u8) << 1]);
                v.extend_from_slice(bytes);
            }
            Op::Replay { side, mac } => v.extend([11, *side, *mac]),
        }
    }
    v
}

/// Byte `off` of what `side` writes: a position-dependent pattern, so any misplaced,
/// duplicated or invented byte is caught.
pub fn pattern(side: usize, off: u64) -> u8 {
    let x = off
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((side as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    (x >> 56) as u8 ^ (off as u8)
}

/// One transport connection between the two sides.
struct Wire {
    /// The connection's id at each side.
    id: [ConnId; 2],
    /// Bytes in flight toward each side.
    toward: [BytesMut; 2],
    /// Bytes each side received but has not decoded yet.
    rbuf: [BytesMut; 2],
    /// Whether each side's socket is still open.
    open: [bool; 2],
}

#[derive(Default)]
struct Side {
    session: Option<Session>,
    /// The encoded image while the side is frozen (in transit).
    image: Option<Vec<u8>>,
    /// Bytes the application wrote (accepted by `write`).
    written: u64,
    /// Bytes the application read.
    read: u64,
    /// Ever failed (timed out or refused).
    failed: bool,
    /// Number of the host the side lives on (grows at each thaw).
    host: u8,
}

/// The two sides, the connection between them and a virtual clock.
pub struct Harness {
    sides: [Side; 2],
    wire: Option<Wire>,
    start: Instant,
    elapsed: Duration,
    next_conn: u64,
    entropy_ctr: u64,
    /// An operation changed the streams' content on purpose (an injected frame was accepted,
    /// an image was rewritten): only absence of panics is checked from then on.
    tainted: bool,
    /// The last genuine `Reassoc` sent, for replays.
    captured: Option<Frame>,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// Two sessions associated in memory over one connection.
    pub fn new() -> Harness {
        let start = Instant::now();
        let mut h = Harness {
            sides: [Side::default(), Side::default()],
            wire: None,
            start,
            elapsed: Duration::ZERO,
            next_conn: 1,
            entropy_ctr: 0,
            tainted: false,
            captured: None,
        };
        let (dialing, hello) = Associating::new(h.local(0), &h.entropy());
        let Frame::Hello(hello) = hello else {
            unreachable!("Associating::new returns a Hello")
        };
        let conn = h.conn();
        let (listener, welcome) = Session::accept_hello(
            start,
            conn,
            &hello,
            SessionId([0x5e; 16]),
            h.local(1),
            &h.entropy(),
            SessionConfig::default(),
        )
        .expect("a fresh key is never weak");
        let dialer = dialing
            .handle(start, conn, welcome, SessionConfig::default())
            .expect("genuine welcome verifies");
        h.sides[0].session = Some(dialer);
        h.sides[1].session = Some(listener);
        h.sides[1].host = 1;
        h.wire = Some(Wire::new(conn));
        h.events();
        h
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        ConnId(self.next_conn)
    }

    fn entropy(&mut self) -> Entropy {
        self.entropy_ctr += 1;
        let mut secret = [0u8; 32];
        for (i, b) in secret.iter_mut().enumerate() {
            *b = pattern(7, self.entropy_ctr * 64 + i as u64);
        }
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.entropy_ctr.to_be_bytes());
        Entropy { secret, nonce }
    }

    fn local(&self, side: usize) -> LocalInfo {
        let host = self.sides[side].host;
        LocalInfo {
            endpoint: EndpointId([host; 16]),
            contact: SocketAddr::from(([127, 0, side as u8 + 2, host], 7000)),
        }
    }

    /// Apply every operation, then drain and check delivery.
    pub fn run(ops: &[Op]) {
        let mut h = Harness::new();
        for op in ops.iter().take(MAX_OPS) {
            h.apply(op);
        }
        h.finish();
    }

    /// Apply one operation.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { side, len } => self.write(usize::from(side % 2), usize::from(len)),
            Op::Read { side, max } => {
                self.read(usize::from(side % 2), usize::from(max));
            }
            Op::Deliver { side, max } => self.deliver(usize::from(side % 2), usize::from(max)),
            Op::Pump => self.pump(),
            Op::Advance { ms } => {
                self.elapsed += Duration::from_millis(u64::from(ms));
                self.pump();
            }
            Op::KillLink => self.kill_link(),
            Op::Freeze { side } => {
                let now = self.now();
                if let Some(s) = self.sides[usize::from(side % 2)].session.as_mut() {
                    let _ = s.freeze(now);
                }
            }
            Op::Thaw { side } => self.thaw(usize::from(side % 2)),
            Op::TamperImage { side, pos, val } => {
                self.tamper(usize::from(side % 2), usize::from(pos), val)
            }
            Op::Shutdown { side } => {
                if let Some(s) = self.sides[usize::from(side % 2)].session.as_mut() {
                    s.shutdown_write();
                }
            }
            Op::FeedRaw {
                side,
                on_link,
                ref bytes,
            } => self.feed_raw(usize::from(side % 2), on_link, bytes),
            Op::Replay { side, mac } => self.replay(usize::from(side % 2), mac),
        }
        self.events();
    }

    fn write(&mut self, side: usize, len: usize) {
        let Some(s) = self.sides[side].session.as_mut() else {
            return;
        };
        let from = self.sides[side].written;
        let data: Vec<u8> = (0..len as u64).map(|i| pattern(side, from + i)).collect();
        match s.write(&data) {
            Ok(n) => {
                assert!(n <= len, "wrote more than offered");
                self.sides[side].written += n as u64;
            }
            Err(WriteError::Blocked | WriteError::Finished | WriteError::Frozen) => {}
            Err(WriteError::Failed(_)) => self.sides[side].failed = true,
            Err(e) => panic!("unexpected write error {e:?}"),
        }
    }

    /// Read up to `max` bytes on `side`; returns how many were read.
    fn read(&mut self, side: usize, max: usize) -> usize {
        let Some(s) = self.sides[side].session.as_mut() else {
            return 0;
        };
        let mut buf = vec![0u8; max.max(1)];
        match s.read(&mut buf) {
            Ok(n) => {
                let from = self.sides[side].read;
                if !self.tainted {
                    for (i, b) in buf[..n].iter().enumerate() {
                        let off = from + i as u64;
                        assert_eq!(*b, pattern(1 - side, off), "side {side} read offset {off}");
                    }
                    assert!(
                        from + n as u64 <= self.sides[1 - side].written,
                        "side {side} read bytes never written"
                    );
                }
                self.sides[side].read += n as u64;
                n
            }
            Err(ReadError::Blocked | ReadError::Frozen) => 0,
            Err(ReadError::Failed(_)) => {
                self.sides[side].failed = true;
                0
            }
            Err(e) => panic!("unexpected read error {e:?}"),
        }
    }

    /// Close `side`'s end of the current wire (its socket is gone; what it had not read is lost).
    fn close_end(&mut self, side: usize) {
        let Some(w) = self.wire.as_mut() else { return };
        w.open[side] = false;
        w.toward[side].clear();
        w.rbuf[side].clear();
        if !w.open[1 - side] {
            self.wire = None;
        }
    }

    /// `side`'s connection `id` failed under it: close it and tell the session.
    fn lose(&mut self, side: usize, id: ConnId) {
        if self.wire.as_ref().is_some_and(|w| w.id[side] == id) {
            self.close_end(side);
        }
        let now = self.now();
        if let Some(s) = self.sides[side].session.as_mut() {
            s.handle_connection_lost(now, id);
        }
    }

    fn deliver(&mut self, side: usize, max: usize) {
        let now = self.now();
        let Some(w) = self.wire.as_mut() else { return };
        if !w.open[side] {
            return;
        }
        let id = w.id[side];
        let n = max.min(w.toward[side].len());
        let chunk = w.toward[side].split_to(n);
        w.rbuf[side].extend_from_slice(&chunk);
        let peer_gone = !w.open[1 - side] && w.toward[side].is_empty();
        loop {
            // Handling a frame may have closed or replaced the connection.
            let Some(w) = self
                .wire
                .as_mut()
                .filter(|w| w.id[side] == id && w.open[side])
            else {
                return;
            };
            match Frame::decode(&mut w.rbuf[side]) {
                Ok(Some(f)) => {
                    let Some(s) = self.sides[side].session.as_mut() else {
                        return self.close_end(side);
                    };
                    if s.handle_frame(now, id, f).is_err() {
                        return self.lose(side, id);
                    }
                    self.events();
                }
                Ok(None) => break,
                Err(_) => return self.lose(side, id),
            }
        }
        if peer_gone {
            // End of stream from a peer that closed: the connection is over.
            self.lose(side, id);
        }
    }

    fn pump(&mut self) {
        for _ in 0..8 {
            for side in 0..2 {
                self.transmit(side);
                self.timers(side);
            }
            if !self.events() {
                break;
            }
        }
    }

    fn transmit(&mut self, side: usize) {
        let now = self.now();
        let Some(s) = self.sides[side].session.as_mut() else {
            return;
        };
        let Some(link) = s.link() else { return };
        let Some(w) = self
            .wire
            .as_mut()
            .filter(|w| w.id[side] == link && w.open[side])
        else {
            // The session believes in a connection that is gone.
            s.handle_connection_lost(now, link);
            return;
        };
        let mut frames = 0;
        while let Some(t) = s.poll_transmit(now) {
            frames += 1;
            assert!(frames < 100_000, "poll_transmit never ends");
            if w.open[1 - side] {
                w.toward[1 - side].extend_from_slice(&t.to_vec());
            }
        }
        if !w.open[1 - side] {
            // Writing to a connection the peer closed fails.
            self.lose(side, link);
        }
    }

    fn timers(&mut self, side: usize) {
        let now = self.now();
        let Some(s) = self.sides[side].session.as_mut() else {
            return;
        };
        for _ in 0..16 {
            match s.poll_timeout() {
                Some(t) if t <= now => s.handle_timeout(now),
                _ => break,
            }
        }
    }

    /// Handle every pending event on both sides; true if there were any.
    fn events(&mut self) -> bool {
        let mut any = false;
        for _ in 0..64 {
            let mut progressed = false;
            for side in 0..2 {
                let Some(ev) = self.sides[side]
                    .session
                    .as_mut()
                    .and_then(|s| s.poll_event())
                else {
                    continue;
                };
                progressed = true;
                self.on_event(side, ev);
            }
            if !progressed {
                break;
            }
            any = true;
        }
        any
    }

    fn on_event(&mut self, side: usize, ev: Event) {
        match ev {
            Event::Dial(_) => self.dial(side),
            Event::CloseConnection(id) if self.wire.as_ref().is_some_and(|w| w.id[side] == id) => {
                self.close_end(side);
            }
            Event::Frozen => {
                let s = self.sides[side].session.take().expect("event came from it");
                let image = s.image().expect("frozen session has an image");
                let bytes = image.to_bytes();
                self.close_end(side);
                match StreamImage::from_bytes(&bytes) {
                    Ok(again) => assert_eq!(again, image),
                    // Only a tampered image can bring offsets or counters near their bounds;
                    // the session then ends here.
                    Err(roam_proto::ImageError::Inconsistent(_)) if self.tainted => {
                        self.sides[side].failed = true;
                        return;
                    }
                    Err(e) => panic!("a session's own image does not decode: {e}"),
                }
                self.sides[side].image = Some(bytes);
            }
            Event::Failed(_) => self.sides[side].failed = true,
            _ => {}
        }
    }

    /// `side` asked to dial its peer: run the re-association handshake in memory.
    fn dial(&mut self, side: usize) {
        let now = self.now();
        let c = self.conn();
        let (e1, e2) = (self.entropy(), self.entropy());
        let [a, b] = &mut self.sides;
        let (dialer, listener) = if side == 0 { (a, b) } else { (b, a) };
        let Some(d) = dialer.session.as_mut() else {
            return;
        };
        let Some(l) = listener.session.as_mut() else {
            // Nobody listens there (the peer is in transit): connection refused.
            d.handle_dial_failed(now);
            return;
        };
        let req = d.start_reassoc(now, c, &e1);
        let Ok(Frame::Reassoc(req)) = Frame::decode_exact(&req.to_bytes()) else {
            panic!("start_reassoc must produce a decodable Reassoc");
        };
        self.captured = Some(Frame::Reassoc(req.clone()));
        let accept = match l.handle_reassoc(now, c, &req, &e2) {
            Ok(a) => a,
            Err(r) => {
                assert!(d.handle_accept(now, c, Frame::Refuse(r)).is_err());
                return;
            }
        };
        let confirm = match d.handle_accept(now, c, accept) {
            Ok(c) => c,
            Err(_) => {
                l.handle_connection_lost(now, c);
                return;
            }
        };
        match l.handle_confirm(now, c, confirm) {
            Ok(()) => self.wire = Some(Wire::new(c)),
            Err(_) => d.handle_connection_lost(now, c),
        }
    }

    fn kill_link(&mut self) {
        let now = self.now();
        if let Some(w) = self.wire.take() {
            for side in 0..2 {
                if let Some(s) = self.sides[side].session.as_mut() {
                    if w.open[side] {
                        s.handle_connection_lost(now, w.id[side]);
                    }
                }
            }
        }
    }

    fn thaw(&mut self, side: usize) {
        let Some(bytes) = self.sides[side].image.take() else {
            return;
        };
        let image = StreamImage::from_bytes(&bytes).expect("images in transit decode");
        self.sides[side].host = self.sides[side].host.wrapping_add(2);
        let local = self.local(side);
        let now = self.now();
        self.sides[side].session = Some(Session::from_image(
            image,
            local,
            SessionConfig::default(),
            now,
        ));
    }

    fn tamper(&mut self, side: usize, pos: usize, val: u8) {
        let Some(bytes) = self.sides[side].image.as_ref() else {
            return;
        };
        let mut b = bytes.clone();
        let n = b.len() - 32;
        let pos = pos % n;
        if b[pos] == val {
            return;
        }
        b[pos] = val;
        let digest = Sha256::digest(&b[..n]);
        b[n..].copy_from_slice(&digest);
        // A tampered image is either refused with a typed error or used as it is now.
        if StreamImage::from_bytes(&b).is_ok() {
            self.sides[side].image = Some(b);
            self.tainted = true;
        }
    }

    /// What an attacker's own connection to `side`'s endpoint can do: frames there reach the
    /// handshake paths or are ignored; they never change the session's epoch or link.
    fn attacker_conn(&mut self, side: usize, frames: Vec<Frame>) {
        let now = self.now();
        let c = self.conn();
        let entropy = self.entropy();
        let Some(s) = self.sides[side].session.as_mut() else {
            return;
        };
        let (epoch, link) = (s.epoch(), s.link());
        let mut frames = frames.into_iter();
        match frames.next() {
            Some(Frame::Reassoc(req)) => {
                if s.handle_reassoc(now, c, &req, &entropy).is_ok() {
                    let confirm = frames.next().unwrap_or(Frame::Ping);
                    assert!(
                        s.handle_confirm(now, c, confirm).is_err(),
                        "an attacker completed a re-association"
                    );
                }
                s.handle_connection_lost(now, c);
            }
            Some(Frame::Hello(hello)) => {
                // An endpoint answers a Hello with a new session; ours is untouched.
                let _ = Session::accept_hello(
                    now,
                    c,
                    &hello,
                    SessionId([0xa7; 16]),
                    LocalInfo {
                        endpoint: EndpointId([0xa7; 16]),
                        contact: SocketAddr::from(([127, 0, 0, 1], 1)),
                    },
                    &entropy,
                    SessionConfig::default(),
                );
            }
            Some(f) => {
                // Frames on a connection that is not the session's current one are ignored.
                assert!(s.handle_frame(now, c, f).is_ok());
            }
            None => {}
        }
        assert_eq!(s.epoch(), epoch, "attacker changed the epoch");
        assert_eq!(s.link(), link, "attacker changed the link");
    }

    fn feed_raw(&mut self, side: usize, on_link: bool, bytes: &[u8]) {
        let mut buf = BytesMut::from(bytes);
        if !on_link {
            let mut frames = Vec::new();
            while let Ok(Some(f)) = Frame::decode(&mut buf) {
                frames.push(f);
            }
            return self.attacker_conn(side, frames);
        }
        let now = self.now();
        let Some(w) = self.wire.as_ref().filter(|w| w.open[side]) else {
            return;
        };
        let id = w.id[side];
        loop {
            let Some(s) = self.sides[side].session.as_mut() else {
                return;
            };
            match Frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    // Data-path frames are not authenticated (like TCP segments): one injected
                    // on the connection may acknowledge or end the stream at will, and is acted
                    // on before any later check rejects it. Handshake frames there are refused
                    // without effect, and a ping changes nothing.
                    self.tainted |= matches!(
                        f,
                        Frame::Data { .. }
                            | Frame::Ack { .. }
                            | Frame::Fin { .. }
                            | Frame::Freeze { .. }
                            | Frame::FreezeAck { .. }
                    );
                    if s.handle_frame(now, id, f).is_err() {
                        return self.lose(side, id);
                    }
                    self.events();
                }
                // A partial frame would desynchronize the byte stream: the peer's next frame
                // is then garbage, and the connection is dropped.
                Ok(None) if !buf.is_empty() => return self.lose(side, id),
                Ok(None) => return,
                Err(_) => return self.lose(side, id),
            }
        }
    }

    fn replay(&mut self, side: usize, mac: u8) {
        let Some(req) = self.captured.clone() else {
            return;
        };
        let confirm = Frame::Confirm(roam_proto::frame::Confirm { mac: [mac; 32] });
        self.attacker_conn(side, vec![req, confirm]);
    }

    /// Thaw what is frozen, run until both directions are delivered (or a side failed), and
    /// check that everything written arrived.
    pub fn finish(&mut self) {
        // Virtual time steps of 20 ms: 80 s, past the session timeout, so a run ends either
        // delivered or failed. Tampered runs need not converge; they get less time.
        let rounds = if self.tainted { 400 } else { 4000 };
        for _ in 0..rounds {
            for side in 0..2 {
                // A freeze may finish during the drain, too.
                self.thaw(side);
            }
            self.pump();
            for side in 0..2 {
                self.deliver(side, usize::MAX);
                while self.read(side, 64 * 1024) > 0 {}
            }
            self.pump();
            if self.sides.iter().any(|s| s.failed) {
                return;
            }
            let done = (0..2).all(|i| {
                self.sides[i].read == self.sides[1 - i].written
                    && self.sides[i]
                        .session
                        .as_ref()
                        .is_some_and(|s| s.unacked() == 0)
            });
            if done {
                return;
            }
            self.elapsed += Duration::from_millis(20);
        }
        if self.tainted {
            return;
        }
        panic!(
            "not delivered after the final drain: read {}/{} and {}/{}",
            self.sides[0].read, self.sides[1].written, self.sides[1].read, self.sides[0].written
        );
    }
}

impl Wire {
    fn new(id: ConnId) -> Wire {
        Wire {
            id: [id, id],
            toward: [BytesMut::new(), BytesMut::new()],
            rbuf: [BytesMut::new(), BytesMut::new()],
            open: [true, true],
        }
    }
}
