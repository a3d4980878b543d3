//! Logging: `tracing` to stdout, as text or one JSON object per line
//! (`KEYWARD_LOG_FORMAT`), filtered by `RUST_LOG` (default `info`, PostgreSQL's notices
//! at `warn`); colours only when stdout is a terminal.
//!
//! Invariant: no code logs a secret. Records carry ids and prefixes, never key values,
//! tokens, database URLs or request bodies.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The filter without `RUST_LOG`: INFO, but not PostgreSQL's notices, which sqlx logs at
/// INFO (every start after the first said `relation "_sqlx_migrations" already exists`).
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colours only for a terminal: a file or a log collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// At most one log line a second from one call site: whatever a caller can repeat
/// (calls refused for lack of proof, records the database refuses) must not be able to
/// flood the log. Metrics still count every event.
pub struct Throttle {
    last_second: AtomicI64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Self {
            last_second: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event may be logged (`n` events were skipped since the last
    /// line), `None` when it is the second one within the same second.
    pub fn ready(&self) -> Option<u64> {
        let second = crate::clock::now_ms() / 1000;
        let last = self.last_second.load(Ordering::Relaxed);
        if second != last
            && self
                .last_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_a_count_of_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        // A new second (forced here): logged again, with the two skipped.
        t.last_second.store(0, Ordering::Relaxed);
        assert_eq!(t.ready(), Some(2));
    }
}
