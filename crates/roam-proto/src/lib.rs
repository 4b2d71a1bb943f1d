//! The roam protocol core: migrateable stream sessions as a pure state machine.
//!
//! This crate performs no I/O: no sockets, no clock, no randomness of its own. Time
//! (`Instant`), received frames and random bytes ([`Entropy`]) are passed in; frames to send and
//! events are polled out. The `roam` crate drives it with tokio; tests drive it with a
//! simulated network and a virtual clock. The protocol it implements is specified in
//! `docs/PROTOCOL.md`; section numbers in comments refer to that document.
//!
//! - [`frame`]: the wire format.
//! - [`session`]: one session (the patent's roam socket module): association, data with byte
//!   sequence numbers and acknowledgements, freeze, re-association; and [`ForwardTable`], an
//!   endpoint's pointers to where its sessions went.
//! - [`image`]: the versioned, integrity-checked migration image, and sealed images.
//! - [`secure`]: identities, peer policies (trust-on-first-use, pinning, pre-shared key) and
//!   the insecure plaintext mode. Every frame after the handshake is sealed with
//!   the negotiated AEAD [`Suite`] (AES-256-GCM or ChaCha20-Poly1305, PROTOCOL.md §3.1).
//! - [`datagram`]: migrateable datagram sockets (association tables, re-association, address
//!   translation).
//!
//! ```
//! use std::time::Instant;
//! use roam_proto::{Associating, ConnId, Entropy, EndpointId, Frame, LocalInfo, Session, SessionConfig, SessionId};
//!
//! let now = Instant::now();
//! let a = LocalInfo { endpoint: EndpointId([1; 16]), contact: "127.0.0.2:7000".parse().unwrap() };
//! let b = LocalInfo { endpoint: EndpointId([2; 16]), contact: "127.0.0.3:7000".parse().unwrap() };
//! let (dialing, hello) = Associating::new(a, &Entropy { secret: [7; 32], nonce: [8; 16] });
//! let Frame::Hello(hello) = hello else { unreachable!() };
//! let (mut listener, welcome) = Session::accept_hello(
//!     now, ConnId(1), &hello, SessionId([9; 16]), b,
//!     &Entropy { secret: [5; 32], nonce: [6; 16] }, SessionConfig::default(),
//! ).unwrap();
//! let mut dialer = dialing.handle(now, ConnId(1), welcome, SessionConfig::default()).unwrap();
//! dialer.write(b"hello").unwrap();
//! // The dialer's key confirmation, then a sealed Data frame (PROTOCOL.md §5.1, §3.1).
//! while let Some(t) = dialer.poll_transmit(now) {
//!     let frame = Frame::decode_exact(&t.to_vec()).unwrap();
//!     listener.handle_frame(now, ConnId(1), frame).unwrap();
//! }
//! let mut buf = [0; 5];
//! assert_eq!(listener.read(&mut buf), Ok(5));
//! assert_eq!(&buf, b"hello");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod aead;
pub mod codec;
mod crypto;
pub mod datagram;
pub mod frame;
pub mod image;
pub mod secure;
pub mod session;
mod types;

pub use crypto::SessionKey;
pub use datagram::{
    DatagramConfig, DatagramError, DatagramEvent, DatagramImage, DatagramSocket, DatagramStats,
    PeerEntry,
};
pub use frame::{Frame, FrameError, RefuseReason};
pub use image::{ImageError, StreamImage};
pub use secure::{Identity, PeerPolicy, PreSharedKey, PublicKey, Security, Suite};
pub use session::{
    Associating, Event, ForwardTable, FreezeError, HandshakeError, LocalInfo, Opened, PeerInfo,
    ProtocolViolation, ReadError, Session, SessionConfig, SessionError, Stats, Transmit,
    WriteError, MAX_REDIRECTS,
};
pub use types::{ConnId, EndpointId, Entropy, Epoch, Offset, SessionId, SocketId};
