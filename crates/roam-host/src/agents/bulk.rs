//! `bulk-send` and `bulk-recv`: one large transfer whose progress survives migrations, checked
//! byte for byte against a seeded pattern both ends can regenerate at any offset.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{at_most, num_arg};
use crate::agent::{send_all, Agent, AgentError, Context, Step};

/// Bytes of the pattern seeded `seed` from `offset` on, into `buf` (seekable: ChaCha20's
/// keystream position is set directly).
pub fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_word_pos(u128::from(offset / 4));
    let skip = (offset % 4) as usize;
    if skip == 0 {
        rng.fill_bytes(buf);
        return;
    }
    let mut head = [0u8; 4];
    rng.fill_bytes(&mut head);
    let take = (4 - skip).min(buf.len());
    buf[..take].copy_from_slice(&head[skip..skip + take]);
    if buf.len() > take {
        rng.fill_bytes(&mut buf[take..]);
    }
}

const DATA: &str = "data";
const CHUNK: usize = 64 * 1024;
const HEADER: usize = 16;

/// Sends `total` bytes of the pattern to a `bulk-recv` service; its progress (`sent`) is part
/// of its state, so a migration mid-transfer continues where it was.
#[derive(Debug, Serialize, Deserialize)]
pub struct BulkSend {
    to: String,
    total: u64,
    seed: u64,
    /// Pattern bytes written to the stream (the stream carries them across migrations).
    sent: u64,
    /// The receiver's verdict line, as read so far.
    verdict: Vec<u8>,
}

impl Agent for BulkSend {
    const KIND: &'static str = "bulk-send";
    const ABOUT: &'static str =
        "HOST:PORT/SERVICE BYTES [SEED=1]: send BYTES (K/M/G) to a bulk-recv, await its verdict";

    fn from_args(args: &[String]) -> Result<Self, AgentError> {
        at_most(args, 3, "bulk-send HOST:PORT/SERVICE BYTES [SEED]")?;
        let to = args.first().ok_or_else(|| {
            AgentError::Args("usage: bulk-send HOST:PORT/SERVICE BYTES [SEED]".into())
        })?;
        to.parse::<crate::wire::ServiceAddr>()
            .map_err(|_| AgentError::BadAddress(to.clone()))?;
        Ok(BulkSend {
            to: to.clone(),
            total: num_arg(args, 1, "BYTES", None)?,
            seed: num_arg(args, 2, "SEED", Some(1))?,
            sent: 0,
            verdict: Vec::new(),
        })
    }

    async fn run(&mut self, cx: &mut Context) -> Result<Step, AgentError> {
        let mut signal = cx.signal();
        if !cx.has_stream(DATA) {
            if self.sent > 0 {
                return Err(AgentError::Failed("the data stream was lost".into()));
            }
            cx.connect(DATA, &self.to).await?;
            let mut header = [0u8; HEADER];
            header[..8].copy_from_slice(&self.seed.to_be_bytes());
            header[8..].copy_from_slice(&self.total.to_be_bytes());
            send_all(cx.stream(DATA)?, &header).await?;
        }
        let mut buf = vec![0u8; CHUNK];
        while self.sent < self.total {
            cx.set_status(format!("sent {}/{} bytes", self.sent, self.total));
            let n = (self.total - self.sent).min(CHUNK as u64) as usize;
            pattern(self.seed, self.sent, &mut buf[..n]);
            let s = cx.stream(DATA)?;
            // `write` is cancel-safe: either some bytes were taken (and counted) or none.
            let w = tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                w = s.write(&buf[..n]) => w?,
            };
            self.sent += w as u64;
        }
        let s = cx.stream(DATA)?;
        s.shutdown().await?;
        cx.set_status(format!(
            "sent {}/{} bytes, awaiting verdict",
            self.sent, self.total
        ));
        let mut b = [0u8; 256];
        while !self.verdict.ends_with(b"\n") {
            let s = cx.stream(DATA)?;
            let n = tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                r = s.read(&mut b) => r?,
            };
            if n == 0 || self.verdict.len() > 1024 {
                return Err(AgentError::Failed("the receiver sent no verdict".into()));
            }
            self.verdict.extend_from_slice(&b[..n]);
        }
        let verdict = String::from_utf8_lossy(&self.verdict).trim().to_owned();
        if verdict.starts_with("OK ") {
            cx.set_status(format!(
                "sent {} bytes, receiver verified: {verdict}",
                self.total
            ));
            Ok(Step::Done)
        } else {
            Err(AgentError::Failed(format!("receiver reports: {verdict}")))
        }
    }
}

/// Receives one `bulk-send` transfer on its service and checks every byte against the
/// pattern; answers `OK <bytes>` or `BAD <offset>`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BulkRecv {
    service: String,
    header: Vec<u8>,
    received: u64,
    /// First offset that differed from the pattern.
    bad_at: Option<u64>,
}

impl BulkRecv {
    fn seed_total(&self) -> Option<(u64, u64)> {
        let h: [u8; HEADER] = self.header.as_slice().try_into().ok()?;
        let seed = u64::from_be_bytes(h[..8].try_into().ok()?);
        let total = u64::from_be_bytes(h[8..].try_into().ok()?);
        Some((seed, total))
    }
}

impl Agent for BulkRecv {
    const KIND: &'static str = "bulk-recv";
    const ABOUT: &'static str = "[SERVICE=bulk]: receive one bulk-send transfer, verify every byte";

    fn from_args(args: &[String]) -> Result<Self, AgentError> {
        at_most(args, 1, "bulk-recv [SERVICE]")?;
        Ok(BulkRecv {
            service: args.first().cloned().unwrap_or_else(|| "bulk".into()),
            header: Vec::new(),
            received: 0,
            bad_at: None,
        })
    }

    fn services(&self) -> Vec<String> {
        vec![self.service.clone()]
    }

    async fn run(&mut self, cx: &mut Context) -> Result<Step, AgentError> {
        let mut signal = cx.signal();
        if !cx.has_stream(DATA) {
            if !self.header.is_empty() {
                return Err(AgentError::Failed("the data stream was lost".into()));
            }
            cx.listen(&self.service)?;
            cx.set_status("waiting for a sender");
            tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                r = cx.accept(&self.service, DATA) => { r?; }
            }
        }
        let mut buf = vec![0u8; CHUNK];
        let mut expect = vec![0u8; CHUNK];
        loop {
            let status = match self.seed_total() {
                Some((_, total)) => format!("received {}/{} bytes", self.received, total),
                None => "receiving".into(),
            };
            cx.set_status(status);
            let want = if self.header.len() < HEADER {
                HEADER - self.header.len()
            } else {
                CHUNK
            };
            let s = cx.stream(DATA)?;
            let n = tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                r = s.read(&mut buf[..want]) => r?,
            };
            if n == 0 {
                break;
            }
            if self.header.len() < HEADER {
                self.header.extend_from_slice(&buf[..n]);
                continue;
            }
            let (seed, _) = self
                .seed_total()
                .ok_or_else(|| AgentError::Failed("bad header".into()))?;
            pattern(seed, self.received, &mut expect[..n]);
            if self.bad_at.is_none() {
                if let Some(i) = buf[..n].iter().zip(&expect[..n]).position(|(a, b)| a != b) {
                    self.bad_at = Some(self.received + i as u64);
                }
            }
            self.received += n as u64;
        }
        let total = self.seed_total().map(|(_, t)| t);
        let verdict = match (self.bad_at, total) {
            (None, Some(t)) if t == self.received => format!("OK {}\n", self.received),
            (Some(at), _) => format!("BAD differs at offset {at}\n"),
            (None, t) => format!("BAD got {} of {:?} bytes\n", self.received, t),
        };
        let s = cx.stream(DATA)?;
        send_all(s, verdict.as_bytes()).await?;
        s.shutdown().await?;
        cx.set_status(format!(
            "received {} bytes: {}",
            self.received,
            verdict.trim()
        ));
        if verdict.starts_with("OK") {
            Ok(Step::Done)
        } else {
            Err(AgentError::Failed(verdict.trim().to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn pattern_is_seekable_at_any_offset() {
        let mut whole = vec![0u8; 1000];
        pattern(7, 0, &mut whole);
        for off in [0usize, 1, 2, 3, 4, 5, 63, 64, 65, 511] {
            let mut part = vec![0u8; 300];
            pattern(7, off as u64, &mut part);
            assert_eq!(part[..], whole[off..off + 300], "offset {off}");
        }
        let mut other = vec![0u8; 1000];
        pattern(8, 0, &mut other);
        assert_ne!(whole, other);
    }
}
