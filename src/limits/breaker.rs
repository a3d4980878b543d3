//! A circuit breaker for the counter store, so a Redis outage does not add its timeout
//! to every request.
//!
//! Closed: calls go to Redis. After [`THRESHOLD`] consecutive connection-level failures
//! it opens for [`OPEN_MS`]: calls fail at once (and the failure policy answers). Once
//! the window has passed, calls go to Redis again; one success closes the breaker,
//! another run of failures opens it again. So recovery needs no restart.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use crate::clock::now_ms;

/// Consecutive failures that open the breaker.
pub const THRESHOLD: u32 = 3;
/// How long it stays open before Redis is tried again.
pub const OPEN_MS: i64 = 1_000;

#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicI64,
}

impl Breaker {
    /// Whether a call may go to Redis now.
    pub fn allows(&self) -> bool {
        now_ms() >= self.open_until_ms.load(Ordering::Acquire)
    }

    pub fn is_open(&self) -> bool {
        !self.allows()
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
            crate::metrics::get().redis_circuit_open.set(0);
            tracing::info!("redis answers again: circuit closed");
        }
    }

    pub fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::AcqRel) + 1 >= THRESHOLD {
            self.failures.store(0, Ordering::Release);
            self.open_until_ms
                .store(now_ms() + OPEN_MS, Ordering::Release);
            crate::metrics::get().redis_circuit_open.set(1);
            tracing::warn!(open_ms = OPEN_MS, "redis is failing: circuit open");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_success() {
        let b = Breaker::default();
        assert!(b.allows());
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert!(b.allows(), "a success in between resets the count");
        b.failure();
        assert!(b.is_open());
        b.success();
        assert!(b.allows());
    }
}
