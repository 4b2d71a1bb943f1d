//! `echo` and `chat`: an interactive request/response pair over one stream.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{at_most, num_arg};
use crate::agent::{send_all, Agent, AgentError, Context, Step};

/// Echoes every byte of every stream to its service back to the sender, one stream at a time.
#[derive(Debug, Serialize, Deserialize)]
pub struct Echo {
    service: String,
    /// Streams served to their end.
    served: u64,
    /// Bytes echoed in all.
    echoed: u64,
}

const CONN: &str = "conn";

impl Agent for Echo {
    const KIND: &'static str = "echo";
    const ABOUT: &'static str = "accept streams on SERVICE (default echo) and echo every byte";

    fn from_args(args: &[String]) -> Result<Self, AgentError> {
        at_most(args, 1, "echo [SERVICE]")?;
        Ok(Echo {
            service: args.first().cloned().unwrap_or_else(|| "echo".into()),
            served: 0,
            echoed: 0,
        })
    }

    fn services(&self) -> Vec<String> {
        vec![self.service.clone()]
    }

    async fn run(&mut self, cx: &mut Context) -> Result<Step, AgentError> {
        let mut signal = cx.signal();
        cx.listen(&self.service)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            cx.set_status(format!(
                "{} echoed in {} finished streams + current",
                self.echoed, self.served
            ));
            if !cx.has_stream(CONN) {
                tokio::select! {
                    _ = signal.requested() => return Ok(Step::Yield),
                    r = cx.accept(&self.service, CONN) => { r?; }
                }
                continue;
            }
            let s = cx.stream(CONN)?;
            let n = tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                r = s.read(&mut buf) => r?,
            };
            if n == 0 {
                cx.close_stream(CONN).await?;
                self.served += 1;
                continue;
            }
            // Not cancelled: the echo of what was read is part of the consistent state.
            send_all(s, &buf[..n]).await?;
            self.echoed += n as u64;
        }
    }
}

/// Sends numbered lines to an echo service and checks that each comes back unchanged.
#[derive(Debug, Serialize, Deserialize)]
pub struct Chat {
    to: String,
    lines: u64,
    interval_ms: u64,
    /// Lines whose echo came back right.
    verified: u64,
    /// The line sent and not yet echoed.
    pending: Option<String>,
    /// Bytes of the echo read so far.
    echo: Vec<u8>,
}

const PEER: &str = "peer";

impl Agent for Chat {
    const KIND: &'static str = "chat";
    const ABOUT: &'static str =
        "HOST:PORT/SERVICE [LINES=100] [INTERVAL_MS=20]: send lines to an echo, check each echo";

    fn from_args(args: &[String]) -> Result<Self, AgentError> {
        at_most(args, 3, "chat HOST:PORT/SERVICE [LINES] [INTERVAL_MS]")?;
        let to = args.first().ok_or_else(|| {
            AgentError::Args("usage: chat HOST:PORT/SERVICE [LINES] [INTERVAL_MS]".into())
        })?;
        to.parse::<crate::wire::ServiceAddr>()
            .map_err(|_| AgentError::BadAddress(to.clone()))?;
        Ok(Chat {
            to: to.clone(),
            lines: num_arg(args, 1, "LINES", Some(100))?,
            interval_ms: num_arg(args, 2, "INTERVAL_MS", Some(20))?,
            verified: 0,
            pending: None,
            echo: Vec::new(),
        })
    }

    async fn run(&mut self, cx: &mut Context) -> Result<Step, AgentError> {
        let mut signal = cx.signal();
        if !cx.has_stream(PEER) {
            if self.verified > 0 || self.pending.is_some() {
                return Err(AgentError::Failed("the chat stream was lost".into()));
            }
            cx.connect(PEER, &self.to).await?;
        }
        let mut buf = [0u8; 4096];
        while self.verified < self.lines {
            cx.set_status(format!(
                "{}/{} lines echoed intact",
                self.verified, self.lines
            ));
            let Some(line) = self.pending.clone() else {
                tokio::select! {
                    _ = signal.requested() => return Ok(Step::Yield),
                    _ = tokio::time::sleep(Duration::from_millis(self.interval_ms)) => {}
                }
                let line = format!(
                    "{:06} from {} on {}\n",
                    self.verified,
                    cx.agent_id(),
                    cx.host_addr()
                );
                // The pending line is recorded before it is written: after a migration it is
                // still expected back, and never written twice (the stream kept it).
                self.pending = Some(line.clone());
                send_all(cx.stream(PEER)?, line.as_bytes()).await?;
                continue;
            };
            let s = cx.stream(PEER)?;
            let n = tokio::select! {
                _ = signal.requested() => return Ok(Step::Yield),
                r = s.read(&mut buf) => r?,
            };
            if n == 0 {
                return Err(AgentError::Failed(format!(
                    "the echo closed the stream after {} lines",
                    self.verified
                )));
            }
            self.echo.extend_from_slice(&buf[..n]);
            if self.echo.len() >= line.len() {
                if self.echo.len() > line.len() || self.echo != line.as_bytes() {
                    return Err(AgentError::Failed(format!(
                        "line {} came back altered: {:?}",
                        self.verified,
                        String::from_utf8_lossy(&self.echo)
                    )));
                }
                self.echo.clear();
                self.pending = None;
                self.verified += 1;
            }
        }
        cx.set_status(format!(
            "{}/{} lines echoed intact",
            self.verified, self.lines
        ));
        let s = cx.stream(PEER)?;
        s.shutdown().await?;
        Ok(Step::Done)
    }
}
