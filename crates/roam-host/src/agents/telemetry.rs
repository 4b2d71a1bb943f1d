//! `telemetry` and `collector`: readings over a migrateable datagram socket, each acknowledged,
//! counted exactly at both ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{at_most, num_arg};
use crate::agent::{Agent, AgentError, Context, Step};

const UDP: &str = "udp";
const READING: usize = 16;

/// A set of sequence numbers, as a bitmap (serializable).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Seen {
    bits: Vec<u64>,
    count: u64,
    duplicates: u64,
}

impl Seen {
    /// Record `seq`; false if it was already there.
    fn insert(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            self.duplicates += 1;
            return false;
        }
        self.bits[w] |= 1 << b;
        self.count += 1;
        true
    }
}

/// Sends `count` readings to a collector over UDP, one per interval, and counts the acks.
#[derive(Debug, Serialize, Deserialize)]
pub struct Telemetry {
    to: SocketAddr,
    count: u64,
    interval_ms: u64,
    next: u64,
    acked: Seen,
}

/// Readings a `telemetry` agent waits for acks after its last one, at most.
const ACK_WAIT: Duration = Duration::from_secs(3);

impl Agent for Telemetry {
    const KIND: &'static str = "telemetry";
    const ABOUT: &'static str =
        "HOST:PORT COUNT [INTERVAL_MS=5]: send COUNT readings over UDP to a collector, count acks";

    fn from_args(args: &[String]) -> Result<Self, AgentError> {
        at_most(args, 3, "telemetry HOST:PORT COUNT [INTERVAL_MS]")?;
        let to = args.first().ok_or_else(|| {
            AgentError::Args("usage: telemetry HOST:PORT COUNT [INTERVAL_MS]".into())
        })?;
        Ok(Telemetry {
            to: to.parse().map_err(|_| AgentError::BadAddress(to.clone()))?,
            count: num_arg(args, 1, "COUNT", None)?,
            interval_ms: num_arg(args, 2, "INTERVAL_MS", Some(5))?,
            next: 0,
            acked: Seen::default(),
        })
    }

    async fn run(&mut self, cx: &mut Context) -> Result<Step, AgentError> {
        let mut signal = cx.signal();
        if !cx.has_datagram(UDP) {
            cx.bind(UDP, None).await?;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(self.interval_ms.max(1)));
        let mut buf = [0u8; 64];
        let mut deadline: Option<tokio::time::Instant> = None;
        while self.acked.count < self.count {
            cx.set_status(format!(
                "sent {}/{} readings, {} acked",
                self.next, self.count, self.acked.count
            ));
            if self.next >= self.count && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + ACK_WAIT);
            }
            let sock = cx.datagram(UDP)?;
            tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                _ = tick.tick(), if self.next < self.count => {
                    let mut r = [0u8; READING];
                    r[..8].copy_from_slice(&self.next.to_be_bytes());
                    r[8..].copy_from_slice(&(self.next.wrapping_mul(37) % 1000).to_be_bytes());
                    sock.send_to(&r, self.to).await?;
                    self.next += 1;
                }
                r = sock.recv_from(&mut buf) => {
                    let (n, _) = r?;
                    if n == 8 {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                        if seq < self.next {
                            self.acked.insert(seq);
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    break;
                }
            }
        }
        let status = format!(
            "sent {}/{} readings, {} acked, {} duplicate acks",
            self.next, self.count, self.acked.count, self.acked.duplicates
        );
        cx.set_status(status.clone());
        if self.acked.count == self.count {
            Ok(Step::Done)
        } else {
            Err(AgentError::Failed(format!("acks missing: {status}")))
        }
    }
}

/// Receives readings on a UDP port, acks each, and counts distinct and duplicate readings per
/// reporter (under the address the reporter first had: roam translates later ones).
#[derive(Debug, Serialize, Deserialize)]
pub struct Collector {
    port: u16,
    reporters: BTreeMap<String, Seen>,
}

impl Agent for Collector {
    const KIND: &'static str = "collector";
    const ABOUT: &'static str = "[PORT=0]: receive telemetry readings on PORT, ack and count them";

    fn from_args(args: &[String]) -> Result<Self, AgentError> {
        at_most(args, 1, "collector [PORT]")?;
        Ok(Collector {
            port: num_arg(args, 0, "PORT", Some(0))?,
            reporters: BTreeMap::new(),
        })
    }

    async fn run(&mut self, cx: &mut Context) -> Result<Step, AgentError> {
        let mut signal = cx.signal();
        if !cx.has_datagram(UDP) {
            let port = (self.port != 0).then_some(self.port);
            let addr = cx.bind(UDP, port).await?.local_addr();
            self.port = addr.port();
        }
        let mut buf = [0u8; 64];
        loop {
            let (n, d): (u64, u64) = self
                .reporters
                .values()
                .fold((0, 0), |(n, d), s| (n + s.count, d + s.duplicates));
            cx.set_status(format!(
                "{n} readings from {} reporters, {d} duplicates",
                self.reporters.len()
            ));
            let sock = cx.datagram(UDP)?;
            let (len, from) = tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                r = sock.recv_from(&mut buf) => r?,
            };
            if len != READING {
                continue;
            }
            let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
            self.reporters
                .entry(from.to_string())
                .or_default()
                .insert(seq);
            sock.send_to(&seq.to_be_bytes(), from).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn seen_counts_distinct_and_duplicates() {
        let mut s = Seen::default();
        assert!(s.insert(0));
        assert!(s.insert(130));
        assert!(!s.insert(130));
        assert_eq!((s.count, s.duplicates), (2, 1));
    }
}
