//! The counters' clock: the process's (the twin) or the Redis server's (the scripts),
//! which tests move or pin.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::scripts;

/// A test hook: the counters' clock, which tests move forward without sleeping
/// ([`TimeShift::advance`]) or pin to an instant ([`TimeShift::pin`]), so the in-process
/// twin and the scripts can be run at the very same `now`. Never moved outside tests:
/// then the twin reads this process's clock and the scripts the Redis server's `TIME`.
#[derive(Debug, Clone, Default)]
pub struct TimeShift(Arc<Clock>);

#[derive(Debug, Default)]
struct Clock {
    shift_ms: AtomicI64,
    /// 0 = not pinned.
    pinned_ms: AtomicI64,
}

impl TimeShift {
    /// Milliseconds added to the clock.
    pub fn get(&self) -> i64 {
        self.0.shift_ms.load(Ordering::Relaxed)
    }

    pub fn advance(&self, ms: i64) {
        self.0.shift_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Stops the clock at `at_ms` (Unix ms, > 0), plus whatever [`TimeShift::advance`]
    /// adds from then on.
    pub fn pin(&self, at_ms: i64) {
        self.0.pinned_ms.store(at_ms, Ordering::Relaxed);
    }

    /// What the scripts are sent.
    pub fn script_clock(&self) -> scripts::ScriptClock {
        scripts::ScriptClock {
            shift_ms: self.get(),
            pinned_ms: self.0.pinned_ms.load(Ordering::Relaxed),
        }
    }

    /// Now on this clock, read in process (the twin's).
    pub fn now_ms(&self) -> i64 {
        let clock = self.script_clock();
        let base = match clock.pinned_ms {
            0 => crate::clock::now_ms(),
            pinned => pinned,
        };
        base + clock.shift_ms
    }
}
