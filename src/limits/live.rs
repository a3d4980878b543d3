//! Live figures of quota counters, for the admin quota views: what the counter
//! store holds now for a scope's limits, read without changing anything.
//!
//! A read names each counter as admission does ([`LiveCounter::Quota`]: a scope's counter
//! id and a [`QuotaKind`], with the seed admission would pass), or a client key's
//! own minute window ([`LiveCounter::KeyWindow`], which admission checks as `rpm`/`tpm`,
//! not as a quota entry). Redis answers with `lua/quota_read.lua`, the twin from its
//! state; both skip what a decision would drop first (a second that left a window, a
//! hold whose lease expired) without dropping it, so a read never moves a counter.

use super::{CounterError, Counters, QuotaKind, Tenant};

/// One counter to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveCounter {
    /// A client key's own requests (`tokens` = false) or tokens per minute window.
    KeyWindow { key_id: String, tokens: bool },
    /// A quota entry's counter: the scope's counter id
    /// ([`crate::quota::Scope::counter_id`]) and what it counts. `seed` (day counts and spend) is
    /// what a missing counter reads as when its start day is the current period's (as
    /// [`super::QuotaEntry::seed`]).
    Quota {
        counter: String,
        kind: QuotaKind,
        seed: Option<(i64, i64)>,
    },
}

/// One counter as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveFigure {
    /// Requests or tokens in the window or the UTC day; a spend period's `spent`
    /// (micro-USD).
    pub used: i64,
    /// Spend only: the holds of leases not yet reported nor expired (micro-USD).
    pub held: i64,
    /// Until the window's oldest counted second leaves it (0 when empty), or until the
    /// period ends (0 for a total).
    pub reset_ms: i64,
}

/// A read: the store's clock when it read, and one figure per counter asked, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LiveFigures {
    pub now_ms: i64,
    pub figures: Vec<LiveFigure>,
}

impl Counters {
    /// The live figures of `counters`, all of one tenant (a key's and its user's, or a
    /// user's: one shard), changing nothing. In the Redis shape an outage is an error
    /// (the caller shows no live figures; the outage twin's are not Redis's).
    pub async fn read_quotas(
        &self,
        tenant: Tenant<'_>,
        counters: &[LiveCounter],
    ) -> Result<LiveFigures, CounterError> {
        match self {
            Counters::Memory(m) => Ok(m.read_quotas(counters)),
            Counters::Redis(r) => r.read_quotas(tenant, counters).await,
        }
    }
}
