//! Spend alerts: queued in the database by the accounting writer
//! ([`crate::usage::ledger`]), delivered to `KEYWARD_WEBHOOK_URL` by a worker in every
//! replica ([`run`]).
//!
//! Invariants:
//! - **At least once, never two at a time.** An alert stays until a receiver answers
//!   2xx. A replica claims it first ([`store::claim`]: one short transaction that moves
//!   its `next_attempt_at` past the delivery's timeout, `FOR UPDATE SKIP LOCKED` on
//!   Postgres), so two replicas never send one alert at once; a replica that dies
//!   mid-delivery leaves it to be claimed again after [`CLAIM`]. A receiver may still
//!   see an alert twice (a 2xx lost on the way back): it deduplicates by
//!   `x-keyward-alert-id`, which is the same on every attempt.
//! - **Retries** after a failure (no answer, or not 2xx) wait 1 s doubling per attempt
//!   up to 10 min, plus up to half as much again at random (so many alerts that failed
//!   together do not retry together), capped at 10 min: forever, until delivered.
//! - **No secret** in `last_error`, the logs or the metrics: errors name the status or
//!   the kind of failure, never the URL (which may hold a token) or the signing secret.
//! - Without a URL nothing is sent: alerts queue (listed by `GET /admin/alerts`, counted
//!   by `keyward_alerts_pending`) and go out once a replica starts with one.

pub mod send;
pub mod store;

use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::db::{Db, StoreError};
use send::Endpoint;

/// Where and how alerts are sent (from `KEYWARD_WEBHOOK_URL` / `KEYWARD_WEBHOOK_SECRET`).
#[derive(Clone, Debug)]
pub struct Webhook {
    pub endpoint: Endpoint,
    secret: Vec<u8>,
}

impl Webhook {
    pub fn new(url: &str, secret: &str) -> Result<Webhook, String> {
        Ok(Webhook {
            endpoint: Endpoint::new(url)?,
            secret: secret.as_bytes().to_vec(),
        })
    }
}

/// How often a replica looks for due alerts (and refreshes the pending gauge).
pub const POLL: Duration = Duration::from_secs(1);
/// How long a claim keeps other replicas off an alert: longer than a delivery can take.
pub const CLAIM: Duration = Duration::from_secs(60);
/// Alerts claimed (and sent concurrently) at a time.
const BATCH: i64 = 16;
const FIRST_RETRY_MS: i64 = 1_000;
const LAST_RETRY_MS: i64 = 600_000;

/// The wait after `attempts` failed attempts (1 or more): 1 s · 2^(attempts − 1), plus
/// up to half of it at random, at most 10 min.
pub fn retry_after_ms(attempts: i64, jitter: f64) -> i64 {
    let base = FIRST_RETRY_MS
        .saturating_mul(1_i64 << (attempts - 1).clamp(0, 20))
        .min(LAST_RETRY_MS);
    let extra = (base as f64 * 0.5 * jitter.clamp(0.0, 1.0)) as i64;
    (base + extra).min(LAST_RETRY_MS)
}

/// The delivery loop of one replica, until `stop`. With no webhook it only keeps the
/// pending gauge.
pub async fn run(db: Db, webhook: Option<Webhook>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A database that fails fails every second: one line a minute says so.
    let mut logged: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let round = async {
            if let Some(hook) = &webhook {
                deliver_due(&db, hook).await?;
            }
            let pending = store::pending(&db).await?;
            crate::metrics::get().alerts_pending.set(pending);
            Ok::<(), StoreError>(())
        };
        // A shutdown does not wait for a slow receiver: what was claimed and not settled
        // is claimed again after CLAIM, by this replica or another.
        let result = tokio::select! {
            result = round => result,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(error) = result {
            let due = match logged {
                None => true,
                Some(at) => at.elapsed() >= Duration::from_secs(60),
            };
            if due {
                logged = Some(std::time::Instant::now());
                tracing::warn!(%error, "alerts: the database could not be read or written; retrying every second");
            }
        }
    }
}

/// Claims the due alerts and sends them, concurrently; the first database error.
async fn deliver_due(db: &Db, hook: &Webhook) -> Result<(), StoreError> {
    let now = now_ms();
    let claimed = store::claim(db, now, now + CLAIM.as_millis() as i64, BATCH).await?;
    let sends = claimed.into_iter().map(|alert| deliver(db, hook, alert));
    futures_util::future::join_all(sends)
        .await
        .into_iter()
        .collect()
}

async fn deliver(db: &Db, hook: &Webhook, alert: store::Claimed) -> Result<(), StoreError> {
    let sent = hook
        .endpoint
        .post(&hook.secret, &alert.id, &alert.payload, now_ms() / 1000)
        .await;
    let metrics = crate::metrics::get();
    match sent {
        Ok(status) if (200..300).contains(&status) => {
            metrics
                .alert_deliveries
                .with_label_values(&["delivered"])
                .inc();
            store::delivered(db, &alert.id, now_ms()).await
        }
        failure => {
            metrics
                .alert_deliveries
                .with_label_values(&["failed"])
                .inc();
            let error = match failure {
                Ok(status) => format!("the receiver answered HTTP {status}"),
                Err(why) => why,
            };
            let attempts = alert.attempts + 1;
            let wait = retry_after_ms(attempts, rand::thread_rng().gen::<f64>());
            tracing::warn!(alert = %alert.id, attempts, %error, retry_in_ms = wait, "alerts: a webhook delivery failed");
            store::failed(db, &alert.id, &error, now_ms() + wait).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_one_second_to_ten_minutes() {
        assert_eq!(retry_after_ms(1, 0.0), 1_000);
        assert_eq!(retry_after_ms(1, 1.0), 1_500);
        assert_eq!(retry_after_ms(2, 0.0), 2_000);
        assert_eq!(retry_after_ms(10, 0.0), 512_000);
        assert_eq!(retry_after_ms(10, 1.0), 600_000);
        assert_eq!(retry_after_ms(11, 0.0), 600_000);
        assert_eq!(retry_after_ms(i64::MAX, 1.0), 600_000);
        assert_eq!(retry_after_ms(0, 0.5), 1_250);
    }
}
