//! Bounds-checked primitive encoding shared by frames and images (PROTOCOL.md §3).
//!
//! Every integer is big-endian. A [`Reader`] never reads past its slice and never allocates
//! from a length it has not checked against the bytes actually present.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BufMut;

/// Why a field could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside the named field.
    #[error("truncated while reading {0}")]
    Truncated(&'static str),
    /// A field held a value the format does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Bytes were left over after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// A cursor over a byte slice whose reads fail instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Take `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Take a fixed-size array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// Take one byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// Take a big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Take a big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// Take a big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Take a u32 length prefix and that many bytes.
    pub fn var_bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.bytes(n, what)
    }

    /// Take a socket address: tag 4 or 6, the IP, then the port.
    pub fn socket_addr(&mut self, what: &'static str) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8(what)? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(what)?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>(what)?)),
            _ => return Err(DecodeError::Invalid(what)),
        };
        Ok(SocketAddr::new(ip, self.u16(what)?))
    }

    /// Take an optional u64 (flag byte 0 or 1, then the value).
    pub fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.u64(what)?)),
            _ => Err(DecodeError::Invalid(what)),
        }
    }

    /// Take a boolean byte.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid(what)),
        }
    }

    /// Fail unless every byte was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
}

/// Encoding counterparts of [`Reader`]'s methods.
pub trait WriteExt: BufMut {
    /// Put a socket address as [`Reader::socket_addr`] reads it.
    fn put_socket_addr(&mut self, addr: SocketAddr) {
        match addr.ip() {
            IpAddr::V4(ip) => {
                self.put_u8(4);
                self.put_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.put_u8(6);
                self.put_slice(&ip.octets());
            }
        }
        self.put_u16(addr.port());
    }

    /// Put an optional u64 as [`Reader::opt_u64`] reads it.
    fn put_opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.put_u8(0),
            Some(v) => {
                self.put_u8(1);
                self.put_u64(v);
            }
        }
    }

    /// Put a u32 length prefix and the bytes.
    fn put_var_bytes(&mut self, b: &[u8]) {
        // Lengths are bounded by the callers (frames ≤ MAX_FRAME_BODY, images < 4 GiB checked
        // at freeze), so the cast cannot truncate.
        self.put_u32(b.len() as u32);
        self.put_slice(b);
    }
}

impl<B: BufMut + ?Sized> WriteExt for B {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addr_round_trip() {
        for a in ["127.0.0.2:7000", "[::1]:65535", "0.0.0.0:0"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut v = Vec::new();
            v.put_socket_addr(a);
            let mut r = Reader::new(&v);
            assert_eq!(r.socket_addr("a").unwrap(), a);
            r.finish().unwrap();
        }
    }

    #[test]
    fn truncation_and_bad_tags_are_errors() {
        assert_eq!(
            Reader::new(&[4, 127, 0]).socket_addr("a"),
            Err(DecodeError::Truncated("a"))
        );
        assert_eq!(
            Reader::new(&[9, 0, 0, 0, 0, 0, 0]).socket_addr("a"),
            Err(DecodeError::Invalid("a"))
        );
        assert_eq!(
            Reader::new(&[0, 0, 0, 9, 1]).var_bytes("v"),
            Err(DecodeError::Truncated("v"))
        );
        assert_eq!(Reader::new(&[1]).finish(), Err(DecodeError::Trailing(1)));
    }
}
