//! The embedded shape's accounting writer: a bounded channel drained in batches.

use tokio::sync::{mpsc, watch};

use super::{backoff, BATCH};
use crate::db::Db;
use crate::usage::{store, UsageRecord};

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
                        n = queue.recv_many(&mut batch, BATCH) => {
                crate::metrics::get().accounting_queue_depth.set((queue.len() + batch.len()) as i64);
                n == 0
            }
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            // Take whatever is still queued, then finish.
            while let Ok(record) = queue.try_recv() {
                batch.push(record);
            }
        }
        apply_with_retry(&db, &mut batch, stopping).await;
        if stopping {
            return;
        }
    }
}

async fn apply_with_retry(db: &Db, batch: &mut Vec<UsageRecord>, stopping: bool) {
    let mut attempt = 0;
    while !batch.is_empty() {
        let chunk = batch.len().min(BATCH);
        let oldest = batch[..chunk].iter().map(|r| r.created_at).min();
        match store::apply(db, &batch[..chunk]).await {
            Ok(applied) => {
                crate::metrics::applied(Ok(&applied), oldest);
                batch.drain(..chunk);
                attempt = 0;
            }
            Err(e) => {
                crate::metrics::applied(Err(()), None);
                tracing::warn!(error = %e, pending = batch.len(), "accounting: cannot apply usage; retrying");
                if stopping && attempt >= 5 {
                    tracing::error!(
                        lost = batch.len(),
                        "accounting: giving up on shutdown with the database down"
                    );
                    batch.clear();
                    return;
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
}
