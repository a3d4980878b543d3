//! The embedded shape's accounting writer: a bounded channel drained in batches.
//!
//! The channel lives in process, so a report answered `recorded` is only as durable as
//! the writer's next commit. Two rules keep that honest:
//! - while the writer's last attempt failed ([`WriterHealth`]), reports are refused
//!   (503) before they change anything, instead of being acknowledged into a queue that
//!   cannot be written (and `/readyz` says so);
//! - shutdown never waits on a database that refuses writes: after the stop signal the
//!   writer retries for at most [`SHUTDOWN_RETRY`], then logs what it could not apply.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{apply_batch, backoff, BATCH};
use crate::db::Db;
use crate::usage::UsageRecord;

/// How long the writer keeps retrying after the stop signal before it gives up.
pub const SHUTDOWN_RETRY: Duration = Duration::from_secs(4);

/// Whether the embedded writer can currently write: false after a failed batch, true
/// again after a committed one.
#[derive(Debug, Clone, Default)]
pub struct WriterHealth(Arc<AtomicBool>);

/// The embedded writer cannot write to the database right now.
#[derive(Debug, thiserror::Error)]
#[error("the accounting writer cannot write to the database")]
pub struct WriterFailing;

impl WriterHealth {
    pub fn failing(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err` while the writer's last attempt failed: a report queued now would be
    /// acknowledged without a way to store it.
    pub fn check(&self) -> Result<(), WriterFailing> {
        if self.failing() {
            Err(WriterFailing)
        } else {
            Ok(())
        }
    }

    fn set_failing(&self, failing: bool) {
        self.0.store(failing, Ordering::Relaxed);
    }
}

/// Room for this many finished requests before reports wait for the writer.
pub const CAPACITY: usize = 100_000;

pub fn channel() -> (mpsc::Sender<UsageRecord>, mpsc::Receiver<UsageRecord>) {
    mpsc::channel(CAPACITY)
}

/// Applies queued records until `stop` is set, then drains what is left and returns.
pub async fn run(
    mut queue: mpsc::Receiver<UsageRecord>,
    db: Db,
    mut stop: watch::Receiver<bool>,
    health: WriterHealth,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let stopping = tokio::select! {
            n = queue.recv_many(&mut batch, BATCH) => {
                measure(&batch, &queue);
                n == 0
            }
            _ = stop.wait_for(|s| *s) => true,
        };
        if !stopping {
            apply_with_retry(&db, &mut batch, &queue, &mut stop, &health).await;
            if !*stop.borrow() {
                continue;
            }
        }
        // Take whatever is still queued, then finish within the shutdown bound.
        queue.close();
        while let Ok(record) = queue.try_recv() {
            batch.push(record);
        }
        apply_before(&db, &mut batch, Instant::now() + SHUTDOWN_RETRY, &health).await;
        return;
    }
}

/// The queue's depth and lag: the batch in hand is the oldest part of it.
fn measure(batch: &[UsageRecord], queue: &mpsc::Receiver<UsageRecord>) {
    let oldest = batch.iter().map(|r| r.created_at).min();
    crate::metrics::accounting_queue((queue.len() + batch.len()) as i64, oldest);
}

/// Applies `batch`, retrying with backoff while the database fails. Returns early, with
/// the rest still in `batch`, once `stop` is set (also in the middle of the retries).
/// Depth and lag are measured after every attempt, so a stalled writer shows.
async fn apply_with_retry(
    db: &Db,
    batch: &mut Vec<UsageRecord>,
    queue: &mpsc::Receiver<UsageRecord>,
    stop: &mut watch::Receiver<bool>,
    health: &WriterHealth,
) {
    let mut attempt = 0;
    while !batch.is_empty() && !*stop.borrow() {
        let applied = apply_chunk(db, batch, health).await;
        measure(batch, queue);
        if applied {
            attempt = 0;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        attempt += 1;
    }
}

/// Applies `batch` until `deadline`; what is left then is logged as not applied.
async fn apply_before(
    db: &Db,
    batch: &mut Vec<UsageRecord>,
    deadline: Instant,
    health: &WriterHealth,
) {
    let mut attempt = 0;
    while !batch.is_empty() {
        let tried = tokio::time::timeout_at(deadline, apply_chunk(db, batch, health)).await;
        match tried {
            Ok(true) => attempt = 0,
            Ok(false) if Instant::now() + backoff(attempt) < deadline => {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            _ => {
                let ids: Vec<&str> = batch.iter().take(20).map(|r| r.id.as_str()).collect();
                tracing::error!(
                    not_applied = batch.len(),
                    first_ids = ?ids,
                    "accounting: stopping with usage the database would not take; these reports are not applied"
                );
                batch.clear();
                return;
            }
        }
    }
}

/// One attempt at the oldest chunk of `batch`; true when it was committed. Records the
/// database refuses are set aside inside `apply_batch`; an error here means it could
/// not answer at all.
async fn apply_chunk(db: &Db, batch: &mut Vec<UsageRecord>, health: &WriterHealth) -> bool {
    let chunk = batch.len().min(BATCH);
    match apply_batch(db, &batch[..chunk]).await {
        Ok(applied) => {
            crate::metrics::applied(applied.inserted, applied.duplicates);
            batch.drain(..chunk);
            health.set_failing(false);
            true
        }
        Err(e) => {
            crate::metrics::apply_failed();
            health.set_failing(true);
            tracing::warn!(error = %e, pending = batch.len(), "accounting: cannot apply usage; retrying");
            false
        }
    }
}
