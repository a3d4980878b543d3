//! The embedded shape's accounting writer: a bounded channel drained in batches.

use tokio::sync::{mpsc, watch};

use super::{apply_batch, backoff, BATCH};
use crate::db::Db;
use crate::usage::UsageRecord;

/// Room for this many finished requests before reports wait for the writer.
pub const CAPACITY: usize = 100_000;

pub fn channel() -> (mpsc::Sender<UsageRecord>, mpsc::Receiver<UsageRecord>) {
    mpsc::channel(CAPACITY)
}

/// Applies queued records until `stop` is set, then drains what is left and returns.
pub async fn run(mut queue: mpsc::Receiver<UsageRecord>, db: Db, mut stop: watch::Receiver<bool>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let stopping = tokio::select! {
            n = queue.recv_many(&mut batch, BATCH) => n == 0,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            // Take whatever is still queued, then finish.
            while let Ok(record) = queue.try_recv() {
                batch.push(record);
            }
        }
        apply_with_retry(&db, &mut batch, &queue, stopping).await;
        if stopping {
            return;
        }
    }
}

/// The queue's depth and lag: the batch in hand is the oldest part of it.
fn measure(batch: &[UsageRecord], queue: &mpsc::Receiver<UsageRecord>) {
    let oldest = batch.iter().map(|r| r.created_at).min();
    crate::metrics::accounting_queue((queue.len() + batch.len()) as i64, oldest);
}

async fn apply_with_retry(
    db: &Db,
    batch: &mut Vec<UsageRecord>,
    queue: &mpsc::Receiver<UsageRecord>,
    stopping: bool,
) {
    let mut attempt = 0;
    measure(batch, queue);
    while !batch.is_empty() {
        let chunk = batch.len().min(BATCH);
        // Records the database refuses are set aside inside `apply_batch`; an error here
        // means it could not answer at all.
        match apply_batch(db, &batch[..chunk]).await {
            Ok(applied) => {
                crate::metrics::applied(Ok(&applied));
                batch.drain(..chunk);
                attempt = 0;
            }
            Err(e) => {
                crate::metrics::applied(Err(()));
                tracing::warn!(error = %e, pending = batch.len(), "accounting: cannot apply usage; retrying");
                if stopping && attempt >= 5 {
                    tracing::error!(
                        lost = batch.len(),
                        "accounting: giving up on shutdown with the database down"
                    );
                    batch.clear();
                    return;
                }
                measure(batch, queue);
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
        measure(batch, queue);
    }
}
