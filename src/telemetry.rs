//! Logging: `tracing` to stdout, as text or one JSON object per line
//! (`KEYWARD_LOG_FORMAT`), filtered by `RUST_LOG` (default `info`).
//!
//! Invariant: no code logs a secret. Records carry ids and prefixes, never key values,
//! tokens, database URLs or request bodies.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
