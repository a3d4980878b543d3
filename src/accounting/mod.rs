//! Exactly-once accounting: finished requests travel from the counter store to the
//! database through a queue, and a writer in every replica applies them in batches.
//!
//! - Distributed shape ([`stream`]): the report script appends to a Redis stream in the
//!   same atomic step that settles the lease. Every replica reads it through one consumer
//!   group, applies a batch, then acknowledges and deletes it. Entries of a replica that
//!   died are claimed by the others after `KEYWARD_ACCOUNTING_CLAIM_IDLE_S`. The streams
//!   of every shard layout ever started are listed in a [`registry`] and read until drained.
//! - Embedded shape ([`embedded`]): a bounded channel and a batched writer; on shutdown
//!   the writer drains the channel before it returns.
//!
//! Invariant: an entry is acknowledged only after its batch was committed, and applying
//! a batch is idempotent by lease id ([`crate::usage::store::apply`]), so a crash between
//! commit and acknowledgement, a retry, or two replicas claiming one entry all end in the
//! record counted once. With the database down, batches are retried with backoff and
//! nothing is acknowledged, so nothing is lost.
//!
//! One bad record never stops the queue ([`apply_batch`]): when the database refuses a
//! batch for the data itself ([`StoreError::refused_data`], not for being unreachable),
//! its records are applied one at a time, and each one refused is moved to the
//! dead-letter table ([`crate::usage::dead_letters`]). The batch is acknowledged only
//! after every record in it was applied or its dead letter committed.

pub mod codec;
pub mod embedded;
pub mod registry;
pub mod stream;

use std::time::Duration;

use crate::clock::now_ms;
use crate::db::{Db, StoreError};
use crate::usage::store::{self, Applied};
use crate::usage::{dead_letters, UsageRecord};

/// Largest batch applied in one transaction.
pub const BATCH: usize = 500;

/// Waits between failed attempts: 100 ms doubling up to 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)).min(5_000))
}

/// Applies a batch; the records the database refuses are set aside as dead letters (and
/// counted in `keyward_accounting_dead_letters_total`). `Err` only when the database could
/// not answer (nothing may be acknowledged then; the batch is retried whole, which is
/// idempotent). `Applied::dead_lettered` counts the records set aside.
pub async fn apply_batch(db: &Db, records: &[UsageRecord]) -> Result<Applied, StoreError> {
    let first = match store::apply(db, records).await {
        Err(e) if e.refused_data() => e,
        other => return other,
    };
    if let [record] = records {
        return dead_letter(db, record, &first).await;
    }
    // Some record in the batch is refused: find it (them) one record at a time.
    tracing::warn!(error = %first, entries = records.len(), "accounting: the database refused a batch; applying its records one at a time");
    let mut total = Applied::default();
    for record in records {
        let one = match store::apply(db, std::slice::from_ref(record)).await {
            Err(e) if e.refused_data() => dead_letter(db, record, &e).await?,
            other => other?,
        };
        total.inserted += one.inserted;
        total.duplicates += one.duplicates;
        total.dead_lettered += one.dead_lettered;
    }
    Ok(total)
}

async fn dead_letter(db: &Db, record: &UsageRecord, e: &StoreError) -> Result<Applied, StoreError> {
    let error = dead_letters::error_text(e);
    let new = dead_letters::put(db, record, &error, now_ms()).await?;
    if new {
        crate::metrics::get().accounting_dead_letters.inc();
    }
    static LOG: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
    if let Some(also) = LOG.ready() {
        tracing::error!(record = %record.id, key_id = record.key_id.as_deref().unwrap_or(""), error = %error,
            also_set_aside_unlogged = also,
            "accounting: the database refused a usage record; it is set aside as a dead letter (GET /admin/accounting/dead-letters)");
    }
    Ok(Applied {
        dead_lettered: 1,
        ..Applied::default()
    })
}
