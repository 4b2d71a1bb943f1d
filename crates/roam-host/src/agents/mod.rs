//! The example agents. Each keeps its progress in its serialized state, so a migration in the
//! middle of its work loses and repeats nothing; each checks what it receives and reports it in
//! its status line (`roam ps`), which the demo and the tests read.
//!
//! | kind        | arguments                                   | does                                                        |
//! |-------------|---------------------------------------------|-------------------------------------------------------------|
//! | `echo`      | `[SERVICE]` (default `echo`)                | accepts streams on the service and echoes every byte        |
//! | `chat`      | `HOST:PORT/SERVICE [LINES] [INTERVAL_MS]`   | sends numbered lines to an echo and checks each echo        |
//! | `bulk-recv` | `[SERVICE]` (default `bulk`)                | receives one bulk transfer and verifies every byte          |
//! | `bulk-send` | `HOST:PORT/SERVICE BYTES [SEED]`            | sends BYTES of a seeded pattern, resumable, awaits verdict  |
//! | `collector` | `[PORT]`                                    | counts telemetry readings per reporter, acks each           |
//! | `telemetry` | `HOST:PORT COUNT [INTERVAL_MS]`             | sends COUNT readings over UDP, counts acks                  |

mod bulk;
mod chat;
mod telemetry;

pub use bulk::{BulkRecv, BulkSend};
pub use chat::{Chat, Echo};
pub use telemetry::{Collector, Telemetry};

use crate::agent::{AgentError, Registry};

pub(crate) fn register_all(r: &mut Registry) {
    r.register::<Echo>()
        .register::<Chat>()
        .register::<BulkRecv>()
        .register::<BulkSend>()
        .register::<Collector>()
        .register::<Telemetry>();
}

/// Parse argument `i` (or `default` when absent) as a number.
fn num_arg<T: std::str::FromStr>(
    args: &[String],
    i: usize,
    name: &str,
    default: Option<T>,
) -> Result<T, AgentError> {
    match args.get(i) {
        Some(s) => parse_size(s)
            .and_then(|v| v.to_string().parse().ok())
            .ok_or_else(|| AgentError::Args(format!("{name}: {s:?} is not a number"))),
        None => default.ok_or_else(|| AgentError::Args(format!("missing {name}"))),
    }
}

/// Fail on more arguments than a kind takes.
fn at_most(args: &[String], n: usize, usage: &str) -> Result<(), AgentError> {
    if args.len() > n {
        return Err(AgentError::Args(format!(
            "too many arguments; usage: {usage}"
        )));
    }
    Ok(())
}

/// `123`, `64K`, `16M`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}
