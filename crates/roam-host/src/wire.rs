//! What host daemons say to each other (docs/PROTOCOL.md §11): the service preamble every
//! stream to a host starts with, and the authenticated, encrypted daemon channel that carries a
//! migration transaction.

use std::net::SocketAddr;
use std::str::FromStr;

use roam::Stream;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every stream opened to a host daemon's address starts with this, then one length byte and
/// the service name (PROTOCOL.md §11.1).
pub(crate) const PREAMBLE_MAGIC: [u8; 4] = *b"RMSV";
/// The service of the daemon channel.
pub(crate) const HOST_SERVICE: &str = "roam.host";
/// Prefix of agents' services.
pub(crate) const AGENT_PREFIX: &str = "agent/";
/// The host's one-byte answer to a preamble: an agent took the stream.
pub(crate) const SERVICE_OK: u8 = 0;
/// … no agent listens on that service here.
pub(crate) const SERVICE_UNKNOWN: u8 = 1;

/// Largest agent state plus socket images one migration carries (1 GiB).
pub(crate) const MAX_TRANSFER: usize = 1 << 30;
/// The Noise protocol of the daemon channel: no static keys, a pre-shared deployment key mixed
/// in at the start, so only daemons of the same deployment complete the handshake.
const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message, and the plaintext bytes one carries.
const NOISE_MAX: usize = 65535;
const NOISE_CHUNK: usize = NOISE_MAX - 16;

pub(crate) fn agent_service(name: &str) -> String {
    format!("{AGENT_PREFIX}{name}")
}

/// `HOST:PORT/SERVICE`: a service of a host daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceAddr {
    pub(crate) host: SocketAddr,
    pub(crate) service: String,
}

impl FromStr for ServiceAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (host, service) = s.split_once('/').ok_or(())?;
        if service.is_empty() || service.len() > 200 || service.contains('/') {
            return Err(());
        }
        Ok(ServiceAddr {
            host: host.parse().map_err(|_| ())?,
            service: service.to_owned(),
        })
    }
}

pub(crate) async fn write_preamble(stream: &mut Stream, service: &str) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(5 + service.len());
    b.extend_from_slice(&PREAMBLE_MAGIC);
    b.push(u8::try_from(service.len()).map_err(|_| invalid("service name too long"))?);
    b.extend_from_slice(service.as_bytes());
    stream.write_all(&b).await?;
    stream.flush().await
}

pub(crate) async fn read_preamble(stream: &mut Stream) -> std::io::Result<String> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    if head[..4] != PREAMBLE_MAGIC {
        return Err(invalid("not a roam host preamble"));
    }
    let mut name = vec![0u8; usize::from(head[4])];
    stream.read_exact(&mut name).await?;
    String::from_utf8(name).map_err(|_| invalid("service name is not UTF-8"))
}

fn invalid(msg: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// One socket of a migrating agent, frozen.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum SocketImage {
    /// A stream: its name in the agent's context and its `StreamImage` bytes.
    Stream {
        name: String,
        #[serde(with = "serde_bytes")]
        image: Vec<u8>,
    },
    /// A datagram socket: name, the port it asked for, its `DatagramImage` bytes.
    Datagram {
        name: String,
        port: Option<u16>,
        #[serde(with = "serde_bytes")]
        image: Vec<u8>,
    },
    /// A stream that arrived for one of the agent's services but was not accepted yet.
    Pending {
        service: String,
        #[serde(with = "serde_bytes")]
        image: Vec<u8>,
    },
}

/// Everything a destination needs to run the agent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Transfer {
    pub(crate) agent: String,
    pub(crate) kind: String,
    pub(crate) args: Vec<String>,
    /// The agent's serialized state (JSON).
    #[serde(with = "serde_bytes")]
    pub(crate) state: Vec<u8>,
    pub(crate) services: Vec<String>,
    pub(crate) sockets: Vec<SocketImage>,
    pub(crate) status: String,
    pub(crate) migrations: u32,
    pub(crate) started_unix_ms: u64,
    /// Hosts the agent ran on, oldest first.
    pub(crate) hosts: Vec<SocketAddr>,
}

/// Messages of the daemon channel (PROTOCOL.md §11.3).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Source → destination: will you take this agent?
    Offer {
        txn: u64,
        agent: String,
        kind: String,
        /// The source daemon's address (for `Query` if the channel breaks).
        from: SocketAddr,
    },
    /// Destination → source: send it.
    Ready,
    /// Either way: no (and why). The transaction is over; the source resumes the agent.
    Refuse { reason: String },
    /// Source → destination: the agent, frozen.
    Transfer(Box<Transfer>),
    /// Destination → source: everything decoded and reserved; nothing is running yet.
    Prepared,
    /// Source → destination: the decision is made; run it.
    Commit { txn: u64 },
    /// Destination → source: the agent runs here; its streams' new contact address.
    Started { thaw_us: u64, contact: SocketAddr },
    /// Destination → source: every stream re-associated with its peer (or gave up waiting).
    Resumed { resume_us: u64, all_connected: bool },
    /// A daemon asks the other what became of a transaction whose channel broke.
    Query { txn: u64 },
    /// Answer to `Query`.
    Outcome { txn: u64, outcome: TxnOutcome },
}

/// What a daemon knows of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TxnOutcome {
    /// Source: decided to commit. Destination: started the agent.
    Committed,
    /// Source: aborted and resumed the agent (or never froze it).
    Aborted,
    /// Destination: prepared, waiting for the decision.
    Prepared,
    /// Never heard of it (or forgot it).
    Unknown,
}

/// Why the daemon channel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The stream failed or closed.
    #[error("daemon channel: {0}")]
    Io(#[from] std::io::Error),
    /// The Noise handshake or a message's authentication failed: the other daemon has another
    /// deployment key, or someone tampered with the traffic.
    #[error("the other daemon is not of this deployment (authentication failed)")]
    Auth,
    /// A message did not decode.
    #[error("malformed message on the daemon channel: {0}")]
    Malformed(String),
    /// A message larger than the limit was announced.
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// The daemon channel: a roam stream (so it survives connection loss itself) carrying
/// Noise-encrypted messages, each authenticated by the deployment key.
pub(crate) struct Channel {
    pub(crate) stream: Stream,
    noise: snow::TransportState,
    buf: Vec<u8>,
    /// Crash-safety test hook: abort the process once part of a message has arrived.
    pub(crate) crash_after_first_chunk: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

async fn write_frame(stream: &mut Stream, data: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(data.len()).map_err(|_| invalid("noise message too large"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(data).await
}

async fn read_frame(stream: &mut Stream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    stream.read_exact(buf).await?;
    Ok(())
}

impl Channel {
    /// Initiator side: the preamble is already written.
    pub(crate) async fn initiate(
        mut stream: Stream,
        key: &[u8; 32],
    ) -> Result<Channel, ChannelError> {
        let mut hs = snow::Builder::new(NOISE_PATTERN.parse().map_err(|_| ChannelError::Auth)?)
            .psk(0, key)
            .map_err(|_| ChannelError::Auth)?
            .build_initiator()
            .map_err(|_| ChannelError::Auth)?;
        let mut out = vec![0u8; NOISE_MAX];
        let n = hs
            .write_message(&[], &mut out)
            .map_err(|_| ChannelError::Auth)?;
        write_frame(&mut stream, &out[..n]).await?;
        stream.flush().await?;
        let mut buf = Vec::new();
        read_frame(&mut stream, &mut buf).await?;
        if buf.is_empty() {
            // The responder's "your handshake did not authenticate" (see `respond`).
            return Err(ChannelError::Auth);
        }
        hs.read_message(&buf, &mut out)
            .map_err(|_| ChannelError::Auth)?;
        let noise = hs.into_transport_mode().map_err(|_| ChannelError::Auth)?;
        Ok(Channel {
            stream,
            noise,
            buf,
            crash_after_first_chunk: false,
        })
    }

    /// Responder side: the preamble was read.
    pub(crate) async fn respond(
        mut stream: Stream,
        key: &[u8; 32],
    ) -> Result<Channel, ChannelError> {
        let mut hs = snow::Builder::new(NOISE_PATTERN.parse().map_err(|_| ChannelError::Auth)?)
            .psk(0, key)
            .map_err(|_| ChannelError::Auth)?
            .build_responder()
            .map_err(|_| ChannelError::Auth)?;
        let mut buf = Vec::new();
        read_frame(&mut stream, &mut buf).await?;
        let mut out = vec![0u8; NOISE_MAX];
        if hs.read_message(&buf, &mut out).is_err() {
            // Tell the initiator, in clear, that it is not of this deployment: an empty frame
            // (never a valid Noise message). Forging it gains an attacker nothing a reset
            // would not.
            let _ = write_frame(&mut stream, &[]).await;
            let _ = stream.flush().await;
            return Err(ChannelError::Auth);
        }
        let n = hs
            .write_message(&[], &mut out)
            .map_err(|_| ChannelError::Auth)?;
        write_frame(&mut stream, &out[..n]).await?;
        stream.flush().await?;
        let noise = hs.into_transport_mode().map_err(|_| ChannelError::Auth)?;
        Ok(Channel {
            stream,
            noise,
            buf,
            crash_after_first_chunk: false,
        })
    }

    /// Send one message: a 4-byte length, then the postcard encoding, in Noise messages.
    pub(crate) async fn send(&mut self, msg: &Msg) -> Result<(), ChannelError> {
        let body = postcard::to_stdvec(msg).map_err(|e| ChannelError::Malformed(e.to_string()))?;
        if body.len() > MAX_TRANSFER {
            return Err(ChannelError::TooLarge(body.len()));
        }
        let mut plain = Vec::with_capacity(4 + body.len());
        plain.extend_from_slice(&(body.len() as u32).to_be_bytes());
        plain.extend_from_slice(&body);
        let mut out = vec![0u8; NOISE_MAX];
        for chunk in plain.chunks(NOISE_CHUNK) {
            let n = self
                .noise
                .write_message(chunk, &mut out)
                .map_err(|_| ChannelError::Auth)?;
            write_frame(&mut self.stream, &out[..n]).await?;
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Receive one message. Cancel-safety: not cancel-safe (a partly read message is lost);
    /// the host never cancels a receive and then reuses the channel.
    pub(crate) async fn recv(&mut self) -> Result<Msg, ChannelError> {
        let mut plain = Vec::new();
        let mut out = vec![0u8; NOISE_MAX];
        let mut want: Option<usize> = None;
        loop {
            read_frame(&mut self.stream, &mut self.buf).await?;
            let n = self
                .noise
                .read_message(&self.buf, &mut out)
                .map_err(|_| ChannelError::Auth)?;
            plain.extend_from_slice(&out[..n]);
            if want.is_none() && plain.len() >= 4 {
                let len = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
                if len > MAX_TRANSFER {
                    return Err(ChannelError::TooLarge(len));
                }
                want = Some(len);
                plain.reserve(len);
            }
            if let Some(len) = want {
                if self.crash_after_first_chunk && plain.len() < 4 + len {
                    eprintln!("crash point dest-mid-transfer reached: aborting");
                    std::process::abort();
                }
                if plain.len() >= 4 + len {
                    if plain.len() > 4 + len {
                        return Err(ChannelError::Malformed("trailing bytes".into()));
                    }
                    return postcard::from_bytes(&plain[4..])
                        .map_err(|e| ChannelError::Malformed(e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses_parse() {
        let a: ServiceAddr = "127.0.0.2:7000/echo".parse().unwrap();
        assert_eq!(a.host, "127.0.0.2:7000".parse().unwrap());
        assert_eq!(a.service, "echo");
        for bad in [
            "127.0.0.2:7000",
            "127.0.0.2:7000/",
            "x/echo",
            "127.0.0.2:7000/a/b",
        ] {
            assert!(bad.parse::<ServiceAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_round_trip_through_postcard() {
        let m = Msg::Transfer(Box::new(Transfer {
            agent: "a1".into(),
            kind: "echo".into(),
            args: vec![],
            state: b"{}".to_vec(),
            services: vec!["echo".into()],
            sockets: vec![SocketImage::Stream {
                name: "s".into(),
                image: vec![1, 2, 3],
            }],
            status: String::new(),
            migrations: 2,
            started_unix_ms: 5,
            hosts: vec!["127.0.0.2:7000".parse().unwrap()],
        }));
        let b = postcard::to_stdvec(&m).unwrap();
        let back: Msg = postcard::from_bytes(&b).unwrap();
        assert!(matches!(back, Msg::Transfer(t) if t.migrations == 2 && t.sockets.len() == 1));
        // Garbage is an error, not a panic.
        assert!(postcard::from_bytes::<Msg>(&[0xff, 0xff, 0xff]).is_err());
    }
}
