//! What happens while Redis fails: a [`Breaker`](crate::limits::breaker::Breaker) skips
//! Redis for a moment after consecutive connection failures, and
//! `KEYWARD_ON_BACKEND_ERROR` decides the answer meanwhile ([`RedisCounters::or_degraded`],
//! the one place every operation's fallback goes through).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::RedisCounters;
use crate::limits::memory::MemoryCounters;
use crate::limits::BackendErrorPolicy;
use crate::limits::CounterError;

/// How an answer is given without Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Degraded {
    /// Admit without counting.
    Allow,
    /// Decide with the in-process twin, per replica.
    Local,
}

impl Degraded {
    /// The mode's name, as `KEYWARD_ON_BACKEND_ERROR` spells it.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Degraded::Allow => "allow",
            Degraded::Local => "local",
        }
    }
}

/// An error that means "Redis cannot answer", as opposed to a bug. On a cluster that
/// includes a node's "the cluster is down / this slot has no master" answers and the
/// client finding no connection for a slot (its master dead).
fn is_outage(e: &CounterError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e {
        CounterError::Redis(e) => {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || matches!(
                    e.kind(),
                    ErrorKind::ClusterConnectionNotFound
                        | ErrorKind::Server(
                            ServerErrorKind::ClusterDown
                                | ServerErrorKind::TryAgain
                                | ServerErrorKind::MasterDown
                                | ServerErrorKind::BusyLoading
                        )
                )
        }
        CounterError::Pool(_) | CounterError::CircuitOpen => true,
        CounterError::Protocol(_)
        | CounterError::QueueClosed
        | CounterError::PoolOutdated { .. }
        | CounterError::Layout(_) => false,
    }
}

impl RedisCounters {
    /// Runs a Redis call through the breaker.
    pub(super) async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, CounterError>>,
    ) -> Result<T, CounterError> {
        if !self.breaker.allows() {
            return Err(CounterError::CircuitOpen);
        }
        let result = call.await;
        match &result {
            Ok(_) => self.answered(),
            Err(e) if is_outage(e) => self.breaker.failure(),
            Err(_) => {}
        }
        result
    }

    /// Redis answered: the circuit closes and any outage is over. Also run by the
    /// readiness check, so that a replica `/readyz` calls ready again admits through
    /// Redis at once, not after the rest of the breaker's second.
    pub(super) fn answered(&self) {
        self.breaker.success();
        // A load, not a store, on the hot path: the flag is written once per outage.
        if self.in_outage.load(Ordering::Relaxed) {
            self.in_outage.store(false, Ordering::Relaxed);
        }
    }

    /// The twin that answers while Redis fails, with its mode; `None` under `deny`.
    fn degraded(&self) -> Option<(Degraded, Arc<MemoryCounters>)> {
        let mode = match self.policy {
            BackendErrorPolicy::Deny => return None,
            BackendErrorPolicy::Allow => Degraded::Allow,
            BackendErrorPolicy::Local => Degraded::Local,
        };
        let fallback = self.fallback.clone()?;
        if !self.in_outage.swap(true, Ordering::Relaxed) {
            // A new outage: the twin's live balances are an earlier outage's, behind
            // whatever Redis and the database have seen since. Each key starts again from
            // its database snapshot.
            fallback.forget_balances();
        }
        crate::metrics::get()
            .degraded_answers
            .with_label_values(&[mode.as_str()])
            .inc();
        Some((mode, fallback))
    }

    /// Runs `call` on Redis (through the breaker); when Redis cannot answer, answers with
    /// `fallback` under `allow` and `local`, or fails under `deny`. A failure that is not
    /// an outage (a bug, a refused input) is returned as it is.
    pub(super) async fn or_degraded<T, F, G>(
        &self,
        call: impl Future<Output = Result<T, CounterError>>,
        fallback: F,
    ) -> Result<T, CounterError>
    where
        F: FnOnce(Degraded, Arc<MemoryCounters>) -> G,
        G: Future<Output = Result<T, CounterError>>,
    {
        let e = match self.guarded(call).await {
            Err(e) if is_outage(&e) => e,
            other => return other,
        };
        match self.degraded() {
            None => Err(e),
            Some((mode, twin)) => fallback(mode, twin).await,
        }
    }
}
