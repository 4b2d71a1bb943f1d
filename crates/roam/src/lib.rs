//! roam: connections that survive moving.
//!
//! A [`Stream`] reads and writes like a TCP stream, but it can be frozen on one host
//! ([`Stream::freeze`]) into a [`StreamImage`], carried as bytes to another host, and thawed
//! there ([`Endpoint::thaw`]); the peer keeps using its end throughout, and every byte arrives
//! exactly once, in order, in both directions. A connection that dies on its own (reset, killed,
//! unreachable for a while) is re-established and replayed from what the peer acknowledged.
//!
//! A [`Datagram`] is the same for UDP: a socket with any number of peers that can be frozen
//! ([`Datagram::freeze`] → [`DatagramImage`]) and thawed at another address
//! ([`Datagram::thaw`]); every peer is told the new address, and its application keeps using the
//! old one.
//!
//! This crate is the tokio driver; the protocol itself lives in the sans-IO crate
//! [`roam_proto`] and is specified in `docs/PROTOCOL.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! let a = roam::Endpoint::bind("127.0.0.2:0".parse()?).await?;
//! let b = roam::Endpoint::bind("127.0.0.3:0".parse()?).await?;
//! let mut s = a.connect(b.local_addr()).await?;
//! let mut t = b.accept().await?;
//! s.write_all(b"before").await?;
//! let image = s.freeze().await?;                       // planned migration
//! let bytes = image.to_bytes();                        // ship these to the new host
//! let c = roam::Endpoint::bind("127.0.0.4:0".parse()?).await?;
//! let mut s = c.thaw(roam::StreamImage::from_bytes(&bytes)?).await?;
//! s.write_all(b" and after").await?;
//! let mut buf = [0u8; 16];
//! t.read_exact(&mut buf).await?;                       // t never noticed
//! assert_eq!(&buf, b"before and after");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod datagram;
mod driver;
mod endpoint;
pub mod error;
mod monitor;
mod stream;

pub use datagram::Datagram;
pub use endpoint::{Endpoint, EndpointConfig, EndpointStats, SealImage};
pub use error::{AcceptError, BindError, ConnectError, ThawError};
pub use monitor::{DatagramMonitor, StreamMonitor, StreamStatus};
pub use roam_proto::{
    DatagramConfig, DatagramError, DatagramEvent, DatagramImage, DatagramStats, EndpointId, Epoch,
    FreezeError, Identity, ImageError, PeerEntry, PeerInfo, PeerPolicy, PreSharedKey, PublicKey,
    RefuseReason, SessionConfig, SessionError, SessionId, SocketId, Stats, StreamImage, Suite,
};
pub use stream::{ReadHalf, Stream, WriteHalf};

/// The sans-IO protocol core, re-exported for drivers and tests.
pub use roam_proto as proto;
