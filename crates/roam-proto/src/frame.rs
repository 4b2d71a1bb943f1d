//! The wire format: every frame is `type: u8 | length: u32 | body` (PROTOCOL.md §3).
//!
//! [`Frame::decode`] takes complete frames off the front of a receive buffer; `Data` payloads are
//! split off without copying. [`Frame::encode`] writes a whole frame; the data path instead uses
//! [`data_header`] and sends the payload by reference (vectored write).
//!
//! After the handshake every frame of a session travels inside a [`Frame::Sealed`] (PROTOCOL.md
//! §3.1), unless both ends run the insecure plaintext mode; the session seals and opens them.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::secure::{PublicKey, Suite};

use crate::codec::{DecodeError, Reader, WriteExt};
use crate::types::{EndpointId, Epoch, Offset, SessionId};

/// First bytes of every `Hello` and `Reassoc` body: tells a roam peer from anything else.
pub const MAGIC: [u8; 4] = *b"ROAM";
/// The version datagram `Hello` packets carry (PROTOCOL.md §10.1): 2 added the suite offer and
/// choice; version 1 is refused as [`FrameError::UnsupportedVersion`].
pub const VERSION: u16 = 2;
/// The stream protocol version in `Hello` and `Reassoc` (2: sealed frames, identities and the
/// association confirmation, PROTOCOL.md §3.1, §5.1).
pub const STREAM_VERSION: u16 = 2;
/// Size of the frame header (type and length).
pub const HEADER_LEN: usize = 5;
/// Size of a `Data` frame's header including the frame header (offset, ack and limit).
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 24;
/// Largest frame body accepted. A length above this is refused before anything is buffered.
pub const MAX_FRAME_BODY: usize = (1 << 20) + 64;
/// Size of a MAC tag (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Size of a sealed frame's AEAD tag (both suites).
pub const TAG_LEN: usize = 16;
/// Smallest sealed frame body: an empty inner frame header and the tag.
pub const MIN_SEALED_BODY: usize = HEADER_LEN + TAG_LEN;

/// Bits of the `flags` byte of `Hello` and `Welcome` (PROTOCOL.md §5.1).
#[allow(missing_docs)]
pub mod flags {
    pub const INSECURE: u8 = 0x01;
    pub const IDENTITY: u8 = 0x02;
    pub const PSK: u8 = 0x04;
    /// `Hello`: a list of offered AEAD suites follows; `Welcome`: the chosen suite follows.
    pub const SUITES: u8 = 0x08;
    pub const ALL: u8 = INSECURE | IDENTITY | PSK | SUITES;
}

/// Most suite codes a `Hello` may offer.
pub const MAX_OFFERED_SUITES: usize = 16;

/// Frame type codes (PROTOCOL.md §3, table 1).
#[allow(missing_docs)]
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const REASSOC: u8 = 0x03;
    pub const ACCEPT: u8 = 0x04;
    pub const CONFIRM: u8 = 0x05;
    pub const REFUSE: u8 = 0x06;
    pub const MOVED: u8 = 0x07;
    pub const DATA: u8 = 0x10;
    pub const ACK: u8 = 0x11;
    pub const FIN: u8 = 0x12;
    pub const FREEZE: u8 = 0x13;
    pub const FREEZE_ACK: u8 = 0x14;
    pub const PING: u8 = 0x15;
    pub const SEALED: u8 = 0x20;
}

/// Why a byte sequence is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The type byte names no frame.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// The length field exceeds [`MAX_FRAME_BODY`].
    #[error("frame length {0} exceeds the maximum")]
    TooLong(u32),
    /// A handshake frame did not start with the roam magic: not a roam peer.
    #[error("not a roam peer (bad magic)")]
    BadMagic,
    /// The peer speaks a protocol version this crate does not.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// A field inside the body was malformed.
    #[error("malformed frame body: {0}")]
    Body(#[from] DecodeError),
}

/// Why a re-association (or association) was refused; sent in a `Refuse` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The listener has no session with that id.
    #[error("unknown session")]
    UnknownSession,
    /// The request named an epoch older than the session's: a stale image or a replay.
    #[error("stale epoch (the session has moved on; an image can be thawed once)")]
    StaleEpoch,
    /// The proof of key possession did not verify.
    #[error("bad proof of key possession")]
    BadProof,
    /// The listener is at its limit of pending handshakes or new sessions.
    #[error("busy")]
    Busy,
    /// The listener does not speak the requested version.
    #[error("unsupported version")]
    Version,
    /// The session has ended.
    #[error("session closed")]
    Closed,
    /// The request violated the protocol.
    #[error("protocol violation")]
    Protocol,
    /// The peer's identity is not acceptable (not pinned, or no pre-shared key).
    #[error("peer identity not accepted")]
    Unauthorized,
    /// One end runs the insecure plaintext mode and the other does not.
    #[error("security mode mismatch (insecure plaintext on one end only)")]
    SecurityMismatch,
}

impl RefuseReason {
    fn code(self) -> u8 {
        match self {
            RefuseReason::UnknownSession => 1,
            RefuseReason::StaleEpoch => 2,
            RefuseReason::BadProof => 3,
            RefuseReason::Busy => 4,
            RefuseReason::Version => 5,
            RefuseReason::Closed => 6,
            RefuseReason::Protocol => 7,
            RefuseReason::Unauthorized => 8,
            RefuseReason::SecurityMismatch => 9,
        }
    }

    fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => RefuseReason::UnknownSession,
            2 => RefuseReason::StaleEpoch,
            3 => RefuseReason::BadProof,
            4 => RefuseReason::Busy,
            5 => RefuseReason::Version,
            6 => RefuseReason::Closed,
            7 => RefuseReason::Protocol,
            8 => RefuseReason::Unauthorized,
            9 => RefuseReason::SecurityMismatch,
            _ => return Err(DecodeError::Invalid("refuse reason")),
        })
    }
}

/// Association request, dialer → listener (PROTOCOL.md §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The dialer's endpoint identity.
    pub endpoint: EndpointId,
    /// Where the dialer can be reached for re-association.
    pub contact: SocketAddr,
    /// The dialer's ephemeral X25519 public key.
    pub eph: [u8; 32],
    /// The dialer's nonce.
    pub nonce: [u8; 16],
    /// The dialer runs the insecure plaintext mode.
    pub insecure: bool,
    /// The dialer mixes a pre-shared key into the session key.
    pub psk: bool,
    /// The dialer's static public key, if it has an identity.
    pub identity: Option<PublicKey>,
    /// The AEAD suite codes the dialer offers, most preferred first (flag `0x08`; 1 to
    /// [`MAX_OFFERED_SUITES`] codes, unknown ones allowed). Empty: a dialer from before
    /// negotiation, which speaks ChaCha20-Poly1305 only (PROTOCOL.md §5.1).
    pub suites: Vec<u8>,
}

/// Association reply, listener → dialer, with key confirmation (PROTOCOL.md §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The new session's id.
    pub session: SessionId,
    /// The listener's endpoint identity.
    pub endpoint: EndpointId,
    /// Where the listener can be reached for re-association.
    pub contact: SocketAddr,
    /// The listener's ephemeral X25519 public key.
    pub eph: [u8; 32],
    /// The listener's nonce.
    pub nonce: [u8; 16],
    /// The listener runs the insecure plaintext mode.
    pub insecure: bool,
    /// The listener mixes a pre-shared key into the session key.
    pub psk: bool,
    /// The listener's static public key, if it has an identity.
    pub identity: Option<PublicKey>,
    /// The suite the listener chose from the dialer's offer (flag `0x08`); `None` answers a
    /// `Hello` without an offer and means ChaCha20-Poly1305.
    pub suite: Option<Suite>,
    /// HMAC under the new session key over the transcript.
    pub mac: [u8; MAC_LEN],
}

/// Re-association request from a moved or reconnecting session (PROTOCOL.md §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassoc {
    /// The session to re-join.
    pub session: SessionId,
    /// The epoch the sender holds keys for.
    pub epoch: Epoch,
    /// The sender's (possibly new) endpoint identity.
    pub endpoint: EndpointId,
    /// The sender's (possibly new) contact address.
    pub contact: SocketAddr,
    /// A fresh ephemeral X25519 public key for the key ratchet.
    pub eph: [u8; 32],
    /// A fresh nonce.
    pub nonce: [u8; 16],
    /// Bytes the sender has received: the listener replays from here.
    pub recv: Offset,
    /// HMAC under the epoch's key over all the fields above.
    pub mac: [u8; MAC_LEN],
}

/// Listener's answer to a valid `Reassoc` (PROTOCOL.md §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The listener's ephemeral X25519 public key for the ratchet.
    pub eph: [u8; 32],
    /// The listener's nonce.
    pub nonce: [u8; 16],
    /// Bytes the listener has received: the dialer replays from here.
    pub recv: Offset,
    /// HMAC under the ratcheted key over the transcript.
    pub mac: [u8; MAC_LEN],
}

/// Dialer's key confirmation that completes a re-association (PROTOCOL.md §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    /// HMAC under the ratcheted key over the transcript.
    pub mac: [u8; MAC_LEN],
}

/// Answer of an endpoint that no longer hosts a session but knows where it went
/// (PROTOCOL.md §5.4): dial `contact` instead. Unauthenticated, like `Refuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// The session the `Reassoc` named.
    pub session: SessionId,
    /// Where that session's endpoint can be reached now.
    pub contact: SocketAddr,
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Association request.
    Hello(Hello),
    /// Association reply.
    Welcome(Welcome),
    /// Re-association request.
    Reassoc(Reassoc),
    /// Re-association accepted (pending confirmation).
    Accept(Accept),
    /// Re-association confirmed.
    Confirm(Confirm),
    /// (Re-)association refused.
    Refuse(RefuseReason),
    /// The session moved away from this endpoint: re-associate at the given address instead.
    Moved(Moved),
    /// Stream bytes starting at `offset`, with a piggy-backed acknowledgement and window.
    Data {
        /// Offset of the first payload byte.
        offset: Offset,
        /// Cumulative acknowledgement of the reverse direction.
        ack: Offset,
        /// Flow-control limit for the reverse direction: send nothing at or beyond it.
        limit: Offset,
        /// The bytes.
        payload: Bytes,
    },
    /// Cumulative acknowledgement and window update (PROTOCOL.md §4).
    Ack {
        /// Next offset expected: every byte before it is held (one past a received end of stream).
        ack: Offset,
        /// Flow-control limit: the peer sends nothing at or beyond this offset.
        limit: Offset,
    },
    /// The sender's write half ends at `offset`.
    Fin {
        /// Total bytes the sender will ever send.
        offset: Offset,
    },
    /// Close message of a planned migration: the sender is freezing (claim 16).
    Freeze {
        /// Cumulative acknowledgement at the moment of freezing.
        ack: Offset,
    },
    /// Answer to `Freeze`: the sender will send nothing more on this connection.
    FreezeAck {
        /// Cumulative acknowledgement: everything the freezer sent before `Freeze`.
        ack: Offset,
    },
    /// Keep-alive.
    Ping,
    /// An encrypted frame (PROTOCOL.md §3.1): the ciphertext of a whole inner frame followed by
    /// its 16-byte tag. Only a session holding the connection's keys can open it.
    Sealed(BytesMut),
}

/// Header of a `Data` frame carrying `len` payload bytes; the payload follows on the wire.
pub fn data_header(
    offset: Offset,
    ack: Offset,
    limit: Offset,
    len: usize,
) -> [u8; DATA_HEADER_LEN] {
    let mut h = [0u8; DATA_HEADER_LEN];
    h[0] = kind::DATA;
    h[1..5].copy_from_slice(&((24 + len) as u32).to_be_bytes());
    h[5..13].copy_from_slice(&offset.0.to_be_bytes());
    h[13..21].copy_from_slice(&ack.0.to_be_bytes());
    h[21..29].copy_from_slice(&limit.0.to_be_bytes());
    h
}

impl Frame {
    /// Append this frame's encoding to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        if let Frame::Data {
            offset,
            ack,
            limit,
            payload,
        } = self
        {
            out.put_slice(&data_header(*offset, *ack, *limit, payload.len()));
            out.put_slice(payload);
            return;
        }
        let start = out.len();
        out.put_u8(self.kind());
        out.put_u32(0); // patched below
        self.encode_body(out);
        let body_len = (out.len() - start - HEADER_LEN) as u32;
        out[start + 1..start + 5].copy_from_slice(&body_len.to_be_bytes());
    }

    /// This frame encoded on its own.
    pub fn to_bytes(&self) -> BytesMut {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::Welcome(_) => kind::WELCOME,
            Frame::Reassoc(_) => kind::REASSOC,
            Frame::Accept(_) => kind::ACCEPT,
            Frame::Confirm(_) => kind::CONFIRM,
            Frame::Refuse(_) => kind::REFUSE,
            Frame::Moved(_) => kind::MOVED,
            Frame::Data { .. } => kind::DATA,
            Frame::Ack { .. } => kind::ACK,
            Frame::Fin { .. } => kind::FIN,
            Frame::Freeze { .. } => kind::FREEZE,
            Frame::FreezeAck { .. } => kind::FREEZE_ACK,
            Frame::Ping => kind::PING,
            Frame::Sealed(_) => kind::SEALED,
        }
    }

    fn encode_body(&self, out: &mut BytesMut) {
        match self {
            Frame::Hello(h) => h.encode_body(out),
            Frame::Welcome(w) => {
                w.encode_signed(out);
                out.put_slice(&w.mac);
            }
            Frame::Reassoc(r) => {
                r.encode_signed(out);
                out.put_slice(&r.mac);
            }
            Frame::Accept(a) => {
                a.encode_signed(out);
                out.put_slice(&a.mac);
            }
            Frame::Confirm(c) => out.put_slice(&c.mac),
            Frame::Refuse(r) => out.put_u8(r.code()),
            Frame::Moved(m) => {
                out.put_slice(&m.session.0);
                out.put_socket_addr(m.contact);
            }
            Frame::Data { .. } => unreachable!("Data is encoded by the caller above"),
            Frame::Ack { ack, limit } => {
                out.put_u64(ack.0);
                out.put_u64(limit.0);
            }
            Frame::Fin { offset } => out.put_u64(offset.0),
            Frame::Freeze { ack } => out.put_u64(ack.0),
            Frame::FreezeAck { ack } => out.put_u64(ack.0),
            Frame::Ping => {}
            Frame::Sealed(b) => out.put_slice(b),
        }
    }

    /// Take one complete frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and call
    /// again). On error the buffer's contents are unspecified; the connection must be dropped.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let ty = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if !is_known(ty) {
            return Err(FrameError::UnknownType(ty));
        }
        if len as usize > MAX_FRAME_BODY {
            return Err(FrameError::TooLong(len));
        }
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let body = buf.split_to(len as usize);
        if ty == kind::SEALED {
            if body.len() < MIN_SEALED_BODY {
                return Err(DecodeError::Truncated("sealed frame").into());
            }
            return Ok(Some(Frame::Sealed(body)));
        }
        if ty == kind::DATA {
            let mut r = Reader::new(&body);
            let offset = Offset(r.u64("data offset")?);
            let ack = Offset(r.u64("data ack")?);
            let limit = Offset(r.u64("data limit")?);
            let mut body = body;
            body.advance(24);
            return Ok(Some(Frame::Data {
                offset,
                ack,
                limit,
                payload: body.freeze(),
            }));
        }
        Self::decode_body(ty, &body).map(Some)
    }

    /// Decode a frame from exactly these bytes (header included).
    pub fn decode_exact(bytes: &[u8]) -> Result<Frame, FrameError> {
        let mut buf = BytesMut::from(bytes);
        match Frame::decode(&mut buf)? {
            Some(f) if buf.is_empty() => Ok(f),
            Some(_) => Err(DecodeError::Trailing(buf.len()).into()),
            None => Err(DecodeError::Truncated("frame").into()),
        }
    }

    fn decode_body(ty: u8, body: &[u8]) -> Result<Frame, FrameError> {
        let mut r = Reader::new(body);
        let frame = match ty {
            kind::HELLO => {
                check_magic(&mut r)?;
                let endpoint = EndpointId(r.array("endpoint id")?);
                let contact = r.socket_addr("contact")?;
                let eph = r.array("ephemeral key")?;
                let nonce = r.array("nonce")?;
                let f = get_flags(&mut r)?;
                let suites = if f.suites {
                    let n = usize::from(r.u8("suite count")?);
                    if n == 0 || n > MAX_OFFERED_SUITES {
                        return Err(DecodeError::Invalid("suite count").into());
                    }
                    r.bytes(n, "suites")?.to_vec()
                } else {
                    Vec::new()
                };
                Frame::Hello(Hello {
                    endpoint,
                    contact,
                    eph,
                    nonce,
                    insecure: f.insecure,
                    psk: f.psk,
                    identity: f.identity,
                    suites,
                })
            }
            kind::WELCOME => {
                let session = SessionId(r.array("session id")?);
                let endpoint = EndpointId(r.array("endpoint id")?);
                let contact = r.socket_addr("contact")?;
                let eph = r.array("ephemeral key")?;
                let nonce = r.array("nonce")?;
                let f = get_flags(&mut r)?;
                let suite = if f.suites {
                    let code = r.u8("suite")?;
                    Some(Suite::from_code(code).ok_or(DecodeError::Invalid("suite"))?)
                } else {
                    None
                };
                Frame::Welcome(Welcome {
                    session,
                    endpoint,
                    contact,
                    eph,
                    nonce,
                    insecure: f.insecure,
                    psk: f.psk,
                    identity: f.identity,
                    suite,
                    mac: r.array("mac")?,
                })
            }
            kind::REASSOC => {
                check_magic(&mut r)?;
                Frame::Reassoc(Reassoc {
                    session: SessionId(r.array("session id")?),
                    epoch: Epoch(r.u64("epoch")?),
                    endpoint: EndpointId(r.array("endpoint id")?),
                    contact: r.socket_addr("contact")?,
                    eph: r.array("ephemeral key")?,
                    nonce: r.array("nonce")?,
                    recv: Offset(r.u64("received offset")?),
                    mac: r.array("mac")?,
                })
            }
            kind::ACCEPT => Frame::Accept(Accept {
                eph: r.array("ephemeral key")?,
                nonce: r.array("nonce")?,
                recv: Offset(r.u64("received offset")?),
                mac: r.array("mac")?,
            }),
            kind::CONFIRM => Frame::Confirm(Confirm {
                mac: r.array("mac")?,
            }),
            kind::REFUSE => Frame::Refuse(RefuseReason::from_code(r.u8("reason")?)?),
            kind::MOVED => Frame::Moved(Moved {
                session: SessionId(r.array("session id")?),
                contact: r.socket_addr("contact")?,
            }),
            kind::ACK => Frame::Ack {
                ack: Offset(r.u64("ack")?),
                limit: Offset(r.u64("limit")?),
            },
            kind::FIN => Frame::Fin {
                offset: Offset(r.u64("fin offset")?),
            },
            kind::FREEZE => Frame::Freeze {
                ack: Offset(r.u64("ack")?),
            },
            kind::FREEZE_ACK => Frame::FreezeAck {
                ack: Offset(r.u64("ack")?),
            },
            kind::PING => Frame::Ping,
            other => return Err(FrameError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

fn is_known(ty: u8) -> bool {
    matches!(ty, 0x01..=0x07 | 0x10..=0x15 | 0x20)
}

/// The flags byte of `Hello` / `Welcome`, with the static key it announces.
struct Flags {
    insecure: bool,
    psk: bool,
    identity: Option<PublicKey>,
    /// A suite list (`Hello`) or the chosen suite (`Welcome`) follows the static key.
    suites: bool,
}

/// Read the flags byte of `Hello` / `Welcome` and the static key it announces.
fn get_flags(r: &mut Reader<'_>) -> Result<Flags, DecodeError> {
    let f = r.u8("flags")?;
    if f & !flags::ALL != 0 {
        return Err(DecodeError::Invalid("flags"));
    }
    let identity = if f & flags::IDENTITY != 0 {
        Some(PublicKey(r.array("static key")?))
    } else {
        None
    };
    Ok(Flags {
        insecure: f & flags::INSECURE != 0,
        psk: f & flags::PSK != 0,
        identity,
        suites: f & flags::SUITES != 0,
    })
}

fn put_flags(
    out: &mut impl BufMut,
    insecure: bool,
    psk: bool,
    identity: Option<&PublicKey>,
    suites: bool,
) {
    let mut f = 0;
    if insecure {
        f |= flags::INSECURE;
    }
    if psk {
        f |= flags::PSK;
    }
    if identity.is_some() {
        f |= flags::IDENTITY;
    }
    if suites {
        f |= flags::SUITES;
    }
    out.put_u8(f);
    if let Some(k) = identity {
        out.put_slice(&k.0);
    }
}

fn check_magic(r: &mut Reader<'_>) -> Result<(), FrameError> {
    let magic: [u8; 4] = r.array("magic").map_err(|_| FrameError::BadMagic)?;
    if magic != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let v = r.u16("version")?;
    if v != STREAM_VERSION {
        return Err(FrameError::UnsupportedVersion(v));
    }
    Ok(())
}

fn put_magic(out: &mut impl BufMut) {
    out.put_slice(&MAGIC);
    out.put_u16(STREAM_VERSION);
}

impl Hello {
    fn encode_body(&self, out: &mut impl BufMut) {
        put_magic(out);
        out.put_slice(&self.endpoint.0);
        out.put_socket_addr(self.contact);
        out.put_slice(&self.eph);
        out.put_slice(&self.nonce);
        // An offer longer than a decoder accepts is cut (the dialer's own Hello is encoded
        // once, so both ends hash the same bytes).
        let n = self.suites.len().min(MAX_OFFERED_SUITES);
        put_flags(out, self.insecure, self.psk, self.identity.as_ref(), n > 0);
        if n > 0 {
            out.put_u8(n as u8);
            out.put_slice(&self.suites[..n]);
        }
    }

    /// The bytes the transcript hash covers.
    pub fn transcript(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(96);
        self.encode_body(&mut v);
        v
    }
}

impl Welcome {
    /// Every field but the MAC, as encoded; what the MAC covers.
    pub fn encode_signed(&self, out: &mut impl BufMut) {
        out.put_slice(&self.session.0);
        out.put_slice(&self.endpoint.0);
        out.put_socket_addr(self.contact);
        out.put_slice(&self.eph);
        out.put_slice(&self.nonce);
        put_flags(
            out,
            self.insecure,
            self.psk,
            self.identity.as_ref(),
            self.suite.is_some(),
        );
        if let Some(suite) = self.suite {
            out.put_u8(suite.code());
        }
    }

    /// [`Self::encode_signed`] into a fresh vector.
    pub fn signed(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(160);
        self.encode_signed(&mut v);
        v
    }
}

impl Reassoc {
    /// Every field but the MAC, as encoded; what the MAC covers.
    pub fn encode_signed(&self, out: &mut impl BufMut) {
        put_magic(out);
        out.put_slice(&self.session.0);
        out.put_u64(self.epoch.0);
        out.put_slice(&self.endpoint.0);
        out.put_socket_addr(self.contact);
        out.put_slice(&self.eph);
        out.put_slice(&self.nonce);
        out.put_u64(self.recv.0);
    }

    /// [`Self::encode_signed`] into a fresh vector.
    pub fn signed(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(128);
        self.encode_signed(&mut v);
        v
    }
}

impl Accept {
    /// Every field but the MAC, as encoded; what the MAC covers.
    pub fn encode_signed(&self, out: &mut impl BufMut) {
        out.put_slice(&self.eph);
        out.put_slice(&self.nonce);
        out.put_u64(self.recv.0);
    }

    /// [`Self::encode_signed`] into a fresh vector.
    pub fn signed(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(56);
        self.encode_signed(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        let addr: SocketAddr = "127.0.0.2:4000".parse().unwrap();
        vec![
            Frame::Hello(Hello {
                endpoint: EndpointId([1; 16]),
                contact: addr,
                eph: [2; 32],
                nonce: [3; 16],
                insecure: false,
                psk: true,
                identity: Some(PublicKey([20; 32])),
                suites: vec![2, 1, 77],
            }),
            Frame::Hello(Hello {
                endpoint: EndpointId([1; 16]),
                contact: addr,
                eph: [2; 32],
                nonce: [3; 16],
                insecure: true,
                psk: false,
                identity: None,
                suites: Vec::new(),
            }),
            Frame::Welcome(Welcome {
                session: SessionId([4; 16]),
                endpoint: EndpointId([5; 16]),
                contact: "[::1]:9".parse().unwrap(),
                eph: [6; 32],
                nonce: [7; 16],
                insecure: false,
                psk: false,
                identity: Some(PublicKey([21; 32])),
                suite: Some(Suite::Aes256Gcm),
                mac: [8; 32],
            }),
            Frame::Welcome(Welcome {
                session: SessionId([4; 16]),
                endpoint: EndpointId([5; 16]),
                contact: "127.0.0.1:9".parse().unwrap(),
                eph: [6; 32],
                nonce: [7; 16],
                insecure: false,
                psk: true,
                identity: None,
                suite: None,
                mac: [8; 32],
            }),
            Frame::Reassoc(Reassoc {
                session: SessionId([9; 16]),
                epoch: Epoch(3),
                endpoint: EndpointId([10; 16]),
                contact: addr,
                eph: [11; 32],
                nonce: [12; 16],
                recv: Offset(1234),
                mac: [13; 32],
            }),
            Frame::Accept(Accept {
                eph: [14; 32],
                nonce: [15; 16],
                recv: Offset(99),
                mac: [16; 32],
            }),
            Frame::Confirm(Confirm { mac: [17; 32] }),
            Frame::Refuse(RefuseReason::StaleEpoch),
            Frame::Moved(Moved {
                session: SessionId([18; 16]),
                contact: "127.0.0.4:7001".parse().unwrap(),
            }),
            Frame::Moved(Moved {
                session: SessionId([19; 16]),
                contact: "[::1]:9".parse().unwrap(),
            }),
            Frame::Data {
                offset: Offset(77),
                ack: Offset(88),
                limit: Offset(99),
                payload: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                offset: Offset(0),
                ack: Offset(0),
                limit: Offset(0),
                payload: Bytes::new(),
            },
            Frame::Ack {
                ack: Offset(5),
                limit: Offset(6),
            },
            Frame::Fin { offset: Offset(6) },
            Frame::Freeze { ack: Offset(7) },
            Frame::FreezeAck { ack: Offset(8) },
            Frame::Ping,
            Frame::Sealed(BytesMut::from(&[7u8; 40][..])),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let bytes = f.to_bytes();
            assert_eq!(Frame::decode_exact(&bytes).unwrap(), f);
        }
    }

    #[test]
    fn frames_decode_one_at_a_time_from_a_stream_split_anywhere() {
        let mut all = BytesMut::new();
        for f in samples() {
            f.encode(&mut all);
        }
        for split in 0..all.len() {
            let mut buf = BytesMut::from(&all[..split]);
            let mut got = Vec::new();
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&all[split..]);
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                got.push(f);
            }
            assert_eq!(got, samples());
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn every_truncation_is_incomplete_or_an_error_never_a_panic() {
        for f in samples() {
            let bytes = f.to_bytes();
            for n in 0..bytes.len() {
                let mut b = BytesMut::from(&bytes[..n]);
                assert_eq!(Frame::decode(&mut b), Ok(None), "{f:?} cut at {n}");
            }
        }
    }

    #[test]
    fn hostile_headers_are_refused_before_buffering() {
        let mut b = BytesMut::from(&[kind::DATA, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(Frame::decode(&mut b), Err(FrameError::TooLong(u32::MAX)));
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(Frame::decode(&mut b), Err(FrameError::UnknownType(b'G')));
    }

    #[test]
    fn bad_magic_version_and_trailing_bytes_are_typed_errors() {
        let mut hello = Frame::Hello(Hello {
            endpoint: EndpointId([1; 16]),
            contact: "127.0.0.2:1".parse().unwrap(),
            eph: [0; 32],
            nonce: [0; 16],
            insecure: false,
            psk: false,
            identity: None,
            suites: Vec::new(),
        })
        .to_bytes();
        hello[HEADER_LEN] = b'X';
        assert_eq!(Frame::decode_exact(&hello), Err(FrameError::BadMagic));
        hello[HEADER_LEN] = b'R';
        hello[HEADER_LEN + 5] = 9;
        assert_eq!(
            Frame::decode_exact(&hello),
            Err(FrameError::UnsupportedVersion(9))
        );
        let mut ack = Frame::Ack {
            ack: Offset(1),
            limit: Offset(2),
        }
        .to_bytes();
        ack[4] += 1;
        ack.put_u8(0);
        assert_eq!(
            Frame::decode_exact(&ack),
            Err(FrameError::Body(DecodeError::Trailing(1)))
        );
        let short_sealed = [kind::SEALED, 0, 0, 0, 3, 1, 2, 3];
        assert!(matches!(
            Frame::decode_exact(&short_sealed),
            Err(FrameError::Body(DecodeError::Truncated(_)))
        ));
        let mut bad_flags = Frame::Hello(Hello {
            endpoint: EndpointId([1; 16]),
            contact: "127.0.0.2:1".parse().unwrap(),
            eph: [0; 32],
            nonce: [0; 16],
            insecure: false,
            psk: false,
            identity: None,
            suites: Vec::new(),
        })
        .to_bytes();
        let last = bad_flags.len() - 1;
        bad_flags[last] = 0x80;
        assert_eq!(
            Frame::decode_exact(&bad_flags),
            Err(FrameError::Body(DecodeError::Invalid("flags")))
        );
        // A suite offer must hold 1 to MAX_OFFERED_SUITES codes; a Welcome's suite must be
        // one this version knows.
        let mut empty_offer = bad_flags.clone();
        empty_offer[last] = flags::SUITES;
        empty_offer.put_u8(0);
        empty_offer[4] += 1;
        assert_eq!(
            Frame::decode_exact(&empty_offer),
            Err(FrameError::Body(DecodeError::Invalid("suite count")))
        );
        let mut welcome = Frame::Welcome(Welcome {
            session: SessionId([4; 16]),
            endpoint: EndpointId([5; 16]),
            contact: "127.0.0.1:9".parse().unwrap(),
            eph: [6; 32],
            nonce: [7; 16],
            insecure: false,
            psk: false,
            identity: None,
            suite: Some(Suite::ChaCha20Poly1305),
            mac: [8; 32],
        })
        .to_bytes();
        let at = welcome.len() - MAC_LEN - 1;
        assert_eq!(welcome[at], 1);
        welcome[at] = 9;
        assert_eq!(
            Frame::decode_exact(&welcome),
            Err(FrameError::Body(DecodeError::Invalid("suite")))
        );
        let short_data = [kind::DATA, 0, 0, 0, 3, 1, 2, 3];
        assert!(matches!(
            Frame::decode_exact(&short_data),
            Err(FrameError::Body(DecodeError::Truncated(_)))
        ));
    }
}
