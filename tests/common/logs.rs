//! The log lines of a test binary: a global `tracing` subscriber that keeps every line it
//! writes, for tests that search them (a secret that must not appear, an error that
//! must). A binary installs it once; a test binary that uses it holds only tests that
//! read one capture.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Every line written so far, as bytes.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// The lines so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The binary's capture, installed at its first call with `filter` (an `EnvFilter`
/// directive such as `"trace"` or `"keyward=info"`); later calls return it as it is.
pub fn captured_logs(filter: &str) -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(captured.clone())
            .with_ansi(false)
            .init();
        captured
    })
}
