//! The periodic expiry pass: disables or deletes client keys past `expires_at`.
//!
//! Admission refuses an expired key at once from its `expires_at`; this job only tidies
//! records (and deletes those marked for deletion). Every replica runs it; the SQL is
//! idempotent, so overlapping passes are harmless.

use std::time::Duration;

use tokio::sync::watch;

use crate::client_keys::ClientKeys;

pub async fn run(
    keys: ClientKeys,
    every: Duration,
    auto_delete: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match keys.expire(auto_delete).await {
            Ok(done) if !(done.deleted.is_empty() && done.disabled.is_empty()) => tracing::info!(
                deleted = done.deleted.len(),
                disabled = done.disabled.len(),
                "expiry pass"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiry pass failed; retrying next interval"),
        }
    }
}
