//! Exactly-once accounting: finished requests travel from the counter store to the
//! database through a queue, and a writer in every replica applies them in batches.
//!
//! - Distributed shape ([`stream`]): the report script appends to a Redis stream in the
//!   same atomic step that settles the lease. Every replica reads it through one consumer
//!   group, applies a batch, then acknowledges and deletes it. Entries of a replica that
//!   died are claimed by the others after `KEYWARD_ACCOUNTING_CLAIM_IDLE_S`.
//! - Embedded shape ([`embedded`]): a bounded channel and a batched writer; on shutdown
//!   the writer drains the channel before it returns.
//!
//! Invariant: an entry is acknowledged only after its batch was committed, and applying
//! a batch is idempotent by lease id ([`crate::usage::store::apply`]), so a crash between
//! commit and acknowledgement, a retry, or two replicas claiming one entry all end in the
//! record counted once. With the database down, batches are retried with backoff and
//! nothing is acknowledged, so nothing is lost.

pub mod embedded;
pub mod report;
pub mod stream;

use std::time::Duration;

/// Largest batch applied in one transaction.
pub const BATCH: usize = 500;

/// Waits between failed attempts: 100 ms doubling up to 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)).min(5_000))
}
