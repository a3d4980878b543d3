//! The counter store: sliding windows, concurrency leases and live balances, with two
//! implementations of one behaviour.
//!
//! - [`redis::RedisCounters`]: the distributed shape. Each operation is one Lua script
//!   (`lua/*.lua`) run with EVALSHA: one round trip, atomic, timed by the Redis server.
//! - [`memory::MemoryCounters`]: the embedded shape, an in-process twin of the scripts.
//!
//! The scripts' positional contracts are typed once, in [`scripts`]. The twin is held
//! equal to the scripts by `tests/twin_equals_redis.rs` (random sequences run on both at
//! one pinned clock, every answer compared); a limit below 1 is no limit in both
//! ([`effective_limit`]).
//!
//! Architecture invariants (both implementations; `tests/counters.rs` runs one suite on
//! both):
//! - **Exact windows.** An admission at second `b` counts buckets `b-60..=b`; for every
//!   60-second interval the admitted amount never exceeds the limit. Under-admission is
//!   bounded by one second of extra look-back. At most 61 buckets per window.
//! - **All or nothing.** A denied admission changes no counter, slot or balance. (In
//!   Redis, with a pick, the client and the pool are two atomic steps on two slots: a
//!   refusal by one side holds the other side's unit only until its compensation lands,
//!   see `redis::split`; nothing is ever over-admitted.)
//! - **Leases.** Every admission holds a lease until report, or until it expires. The
//!   store records it (counted for concurrency, holding its balance and spend holds)
//!   unless nothing needs that: a "light" admission ([`AdmitRequest::light_meta`]) writes
//!   no lease record, its signed lease carries what its report settles
//!   ([`LightLease`]), and it is reported, cancelled and renewed exactly once all the
//!   same (its report's duplicate guard). Under a concurrency limit it still takes a
//!   slot (counted, freed by its report or expiry, as any lease's); without one, a
//!   renewal gives it one.
//! - **Reports once.** A lease id is settled at most once (within the duplicate-guard
//!   time); the durable record of it is queued in the same step.
//! - **Balance holds.** Each in-flight request of a balance-tracked key holds its
//!   estimated cost (its hold); a request is admitted only while the remaining balance
//!   minus the holds in flight covers its own hold, and its report replaces the hold by
//!   the real cost. So the balance goes below zero only by what the requests in flight
//!   cost beyond their holds (one request alone: its actual − hold).
//! - **Quotas** ([`quota`]): every entry of a request is checked before anything is
//!   taken (all or nothing with the key's own limits and the pool). A spend counter
//!   admits while `spent + held + hold <= limit` (and `spent < limit`); its report
//!   replaces the hold by the cost. The counter lists each hold with its lease's expiry,
//!   and drops the expired ones before each decision that reads it, so `held` is the
//!   sum of the holds of live leases not yet reported, even when a lease's key never
//!   admits again; each hold leaves once. Spend passes a limit only by what requests in
//!   flight cost beyond their holds.
//!
//! [`live`] reads the quota counters and a key's windows for the admin quota views
//! (`Counters::read_quotas`), changing nothing.
//!
//! (Near 600 lines: the store's whole vocabulary (requests, decisions, reports, light
//! leases) is declared here once, for both implementations.)

pub mod breaker;
pub mod clock;
pub mod conn;
pub mod live;
pub mod memory;
pub mod quota;
pub mod redis;
pub mod scripts;
pub mod window;

use std::sync::Arc;

use crate::pool::cache::Roster;
use crate::pool::learned::LearnedLimits;
use crate::pool::LiveState;
pub use clock::TimeShift;
pub use live::{LiveCounter, LiveFigure, LiveFigures};
pub use quota::{QuotaEntry, QuotaKind, QuotaUse};

/// A lease id as clients see it: `<key id>.<32 hex>`. The key id part lets a report find
/// its key's counters even after the lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseId {
    pub key_id: String,
    pub token: String,
    /// The tenant shard its admission used (the Redis shape; see
    /// [`scripts::KeySpace`]), carried by the signed lease so its report, renewal or
    /// release goes there even if the key's user changed since. `None`: a lease of the
    /// release before, or one the embedded store issued: its key's current shard. Not
    /// part of its identity (`Display`).
    pub shard: Option<u16>,
    /// What its admission's pick took (from [`Decision::taken`], carried by the signed
    /// lease), for its report to settle in Redis; not part of its identity.
    pub taken: Option<PickTaken>,
    /// The provider whose pool the pick took from (carried with `taken`): its report
    /// finds the pool's tag without a lookup. `None` for a lease without a pick, or one
    /// of the release before.
    pub pool: Option<String>,
    /// Set when its admission wrote no lease record ([`LightLease`]): what its report
    /// and renewal need, carried by the signed lease; not part of its identity.
    pub light: Option<LightLease>,
}

/// What the report of an admission that wrote no lease record needs (a "light" lease:
/// see [`AdmitRequest::light_meta`]), carried by its signed lease instead of a record in
/// the store: the second whose buckets took it, the client tokens reserved in that
/// second of the key's token window (`None`: the key had no TPM limit, nothing to
/// settle), `provider|model|api_format` as the store records them ([`lease_meta`]), and
/// the admission's expiry (the signed one: a renewal puts the lease in the lease set
/// with its new expiry, see `lua/renew.lua`; under a concurrency limit it is there from
/// its admission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LightLease {
    pub second: i64,
    pub kt: Option<i64>,
    pub meta: String,
    pub expires_at_ms: i64,
}

/// The longest `provider|model|api_format` a light lease carries (bytes): longer names
/// keep their record in the store, so a lease id stays short.
pub const LIGHT_META_MAX: usize = 96;

/// `provider|model|api_format` as the stores record it for a report: `|` inside a name
/// becomes `/` (the fields are `|`-separated in the scripts).
pub fn lease_meta(provider: &str, model: &str, api_format: &str) -> String {
    let mut meta = String::with_capacity(provider.len() + model.len() + api_format.len() + 2);
    for (i, part) in [provider, model, api_format].iter().enumerate() {
        if i > 0 {
            meta.push('|');
        }
        if part.contains('|') {
            meta.push_str(&part.replace('|', "/"));
        } else {
            meta.push_str(part);
        }
    }
    meta
}

/// Where an admission's pick took its provider key's units: the second whose bucket took
/// them and the tokens reserved there (0 when the key has no TPM limit). In Redis the
/// pick is its own step on the pool's slot (`lua/pick.lua`), so the lease carries this
/// to its report (`lua/pool_report.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PickTaken {
    pub second: i64,
    pub tokens: i64,
}

impl LeaseId {
    pub fn new(key_id: &str) -> LeaseId {
        // 128 bits from the thread-local CSPRNG: no system call per admission.
        LeaseId {
            key_id: key_id.to_string(),
            // Big-endian bytes in hex: what `format!("{:032x}")` spells, without the
            // formatting machinery.
            token: crate::crypto::hex_string(&rand::random::<u128>().to_be_bytes()),
            shard: None,
            taken: None,
            light: None,
            pool: None,
        }
    }

    /// The same lease on `shard`.
    pub fn on_shard(self, shard: Option<u16>) -> LeaseId {
        LeaseId { shard, ..self }
    }

    /// Parses `<uuid>.<32 lowercase hex>`; `None` for anything else.
    pub fn parse(text: &str) -> Option<LeaseId> {
        let (key, token) = text.split_once('.')?;
        let key = uuid::Uuid::try_parse(key).ok()?;
        let valid_token = token.len() == 32
            && token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid_token.then(|| LeaseId {
            key_id: key.hyphenated().to_string(),
            token: token.to_string(),
            shard: None,
            taken: None,
            light: None,
            pool: None,
        })
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.key_id, self.token)
    }
}

/// Whose counters a request uses (and so which Redis shard holds them): its key's user
/// when the key has one, else the key itself. Every key of a user shares the user's
/// quota counters, so they share its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tenant<'a> {
    User(&'a str),
    Key(&'a str),
}

impl<'a> Tenant<'a> {
    /// A key's tenant: its user's, else its own.
    pub fn of(key_id: &'a str, user_id: Option<&'a str>) -> Tenant<'a> {
        user_id.map_or(Tenant::Key(key_id), Tenant::User)
    }
}

/// What admissions do while Redis cannot answer (`KEYWARD_ON_BACKEND_ERROR`): the
/// counter store's own policy, which `config` parses into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorPolicy {
    /// Refuse (503): nothing is admitted that could not be counted.
    Deny,
    /// Admit without counting.
    Allow,
    /// Count in this replica's in-process twin.
    Local,
}

/// What was known about a balance-tracked key when it was loaded from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceSnapshot {
    /// Credited micro-USD.
    pub credited: i64,
    /// Spent micro-USD, as applied to the database.
    pub used: i64,
    /// Bumped by every admin balance change, so the counters apply each change once.
    pub version: i64,
}

/// One admission to decide.
#[derive(Debug, Clone)]
pub struct AdmitRequest<'a> {
    pub lease: &'a LeaseId,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub concurrency: Option<i64>,
    /// Tokens to reserve in the TPM window (ignored without a TPM limit).
    pub tokens: i64,
    pub lease_ttl_ms: i64,
    pub provider: &'a str,
    pub model: &'a str,
    pub api_format: &'a str,
    pub balance: Option<BalanceSnapshot>,
    /// Micro-USD this request holds on a tracked balance until its report (0 when its
    /// model has no price).
    pub hold_micros: i64,
    /// Pick a provider key in the same step (admit with `"select": true`).
    pub pool: Option<&'a Roster>,
    /// The request's quota entries (its key's, its user's, and their model entries'),
    /// checked and counted in the same step; `(counter, kind)` distinct.
    pub quotas: &'a [QuotaEntry],
}

impl AdmitRequest<'_> {
    /// `Some(meta)` ([`lease_meta`]) when this admission needs no lease record in the
    /// store: its key has no tracked balance (no hold to release), none of its quota
    /// entries is one its report corrects (tokens per minute or day, spend), and its
    /// names fit [`LIGHT_META_MAX`]. Its report then needs only what [`LightLease`]
    /// holds, which its signed lease carries. A concurrency limit still counts its lease:
    /// a slot in the key's lease set, with nothing else (released by its report, or by
    /// its expiry). Both stores decide by this.
    pub fn light_meta(&self) -> Option<String> {
        let plain = self.balance.is_none()
            && self.quotas.iter().all(|q| {
                matches!(
                    q.kind,
                    QuotaKind::RequestsPerMinute | QuotaKind::RequestsPerDay
                )
            });
        let fits =
            self.provider.len() + self.model.len() + self.api_format.len() + 2 <= LIGHT_META_MAX;
        (plain && fits).then(|| lease_meta(self.provider, self.model, self.api_format))
    }
}

/// A provider key pick without a client key (`POST /v1/select`).
#[derive(Debug, Clone)]
pub struct SelectRequest<'a> {
    pub provider: &'a str,
    /// The provider's active keys, in priority order.
    pub candidates: &'a Roster,
    pub tokens: i64,
}

/// The outcome of a pick: the chosen candidate's index, or how long until one frees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Picked(usize),
    Exhausted { retry_after_ms: i64 },
}

/// Why an admission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Requests,
    Tokens,
    Concurrency,
    /// The remaining balance is zero or less.
    BalanceExhausted,
    /// The remaining balance is held by requests in flight.
    BalanceCommitted,
    /// Every provider key is cooling down, suspended or at its limits.
    PoolExhausted,
    /// The quota entry at `index` refuses. `exhausted` = false only for a spend limit
    /// whose room is held by requests in flight (it frees when they report or expire).
    Quota {
        index: usize,
        exhausted: bool,
    },
}

/// The windows and slots as the decision saw them (after it, when admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub now_ms: i64,
    pub requests_used: i64,
    pub tokens_used: i64,
    /// Until the oldest counted request (token) leaves the window; 0 when empty.
    pub requests_reset_ms: i64,
    pub tokens_reset_ms: i64,
    /// Leases in flight; 0 for a light admission ([`AdmitRequest::light_meta`]) of a key
    /// without a concurrency limit (nothing counts them, and the API shows none).
    pub in_flight: i64,
    /// Live remaining balance in micro-USD, for balance-tracked keys.
    pub balance_remaining: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Admitted {
        expires_at_ms: i64,
    },
    Denied {
        reason: Denial,
        retry_after_ms: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub usage: Usage,
    /// The candidate picked, when a pool was asked.
    pub picked: Option<usize>,
    /// What the pick took, with `picked` (both stores say; Redis needs it back in the
    /// report: [`LeaseId::taken`]).
    pub taken: Option<PickTaken>,
    /// Decided without Redis, by this `KEYWARD_ON_BACKEND_ERROR` mode.
    pub degraded: Option<&'static str>,
    /// One per quota entry of the request, in its order.
    pub quotas: Vec<QuotaUse>,
    /// Admitted without a lease record ([`AdmitRequest::light_meta`]): what the signed
    /// lease must carry for its report ([`LeaseId::light`]).
    pub light: Option<LightLease>,
}

/// The parts of a request's tokens that are priced or shown apart; each is counted
/// within the prompt or completion tokens too, as the OpenAI API counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenClasses {
    pub cached: i64,
    pub cache_write: i64,
    pub reasoning: i64,
}

/// A pool refusal's answer (the client's side took nothing, or gave it back): a
/// per-minute window that counts nothing shows no reset, whether or not a second of it
/// holds a zero (a report settled it to 0). The Redis shape answers from the figures
/// before its take and cannot tell the two apart; both stores answer this way.
pub fn pool_refusal_resets(r: &AdmitRequest<'_>, d: &mut Decision) {
    let u = &mut d.usage;
    if u.requests_used == 0 {
        u.requests_reset_ms = 0;
    }
    if u.tokens_used == 0 {
        u.tokens_reset_ms = 0;
    }
    for (entry, q) in r.quotas.iter().zip(d.quotas.iter_mut()) {
        let window = matches!(
            entry.kind,
            QuotaKind::RequestsPerMinute | QuotaKind::TokensPerMinute
        );
        if window && q.used == 0 {
            q.reset_ms = 0;
        }
    }
}

/// The prefix of a report's id that its caller named (`report_id`, without a lease): the
/// stores guard such a report against repeats as they guard a lease's, for the
/// duplicate-guard time (`lua/report.lua`); the database keeps one record per id after
/// that. A report without a lease and without a name gets a fresh id, and no guard.
pub const NAMED_REPORT: &str = "report:";

/// One finished request to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The lease to settle; `None` for a report that only records (and may cool down
    /// a provider key).
    pub lease: Option<LeaseId>,
    /// The usage record's id: the lease id; without a lease, [`NAMED_REPORT`] and the
    /// caller's name for it, or a fresh id.
    pub id: String,
    /// The expiry signed into the lease id (0 without a lease). A report is accepted
    /// until the duplicate-guard time after the lease's expiry (this one, or a later one
    /// after renewals) and no later, because only until then can a repeat be told apart.
    pub lease_expires_at_ms: i64,
    /// `(prompt, completion)` when the caller knows them; otherwise the reservation stays.
    pub tokens: Option<(i64, i64)>,
    /// Cached input, cache-write and reasoning tokens (each within prompt or completion).
    pub token_classes: TokenClasses,
    pub cost_micros: i64,
    /// Where the tokens and the cost came from.
    pub usage_source: crate::usage::UsageSource,
    pub model: Option<String>,
    pub provider_key_id: Option<String>,
    /// That key's provider, looked up by the caller whenever it names a key: the pool's
    /// keys are under its provider's hash tag in Redis (without it the provider key's
    /// part of the report is skipped there), and the in-process twin needs it for a key
    /// it has not picked since it started.
    pub provider: Option<String>,
    pub latency_ms: Option<i64>,
    pub upstream_status: Option<i64>,
    /// Cool the provider key down this long (after an upstream 429); 0 = no.
    pub cooldown_ms: i64,
    /// Suspend the provider key this long (after an upstream 401/403); 0 = no.
    pub suspend_ms: i64,
    /// Who made the report, kept as the cause of a cooldown or suspension: `lease <id>`
    /// for a report authorized by its lease, `data-token` for one without a lease.
    pub source: String,
    /// What the upstream's rate-limit headers said about the provider key (resets
    /// already capped like a cooldown): kept for the listing, and a used-up limit cools
    /// the key down ([`Report::learned_cooldown_ms`]).
    pub learned: Option<LearnedLimits>,
    /// The spend entries the request counts under now (admission's
    /// `quotas::spend_now`; limits and seeds unused). Used only when the lease's data is
    /// gone (lost: a purged lease's data is kept until its guard lapses, and a late
    /// report settles with that, model entries included): its cost is then added to `spent` of
    /// each of these counters' current period that exists, once (the duplicate guard).
    pub spend_now: Vec<QuotaEntry>,
}

impl Report {
    /// How long the provider key rests because its headers said a limit is used up: 0
    /// when an error status already cools it down or suspends it (an upstream 429 keeps
    /// its own cooldown). Such a cooldown only lengthens one the key already has.
    pub fn learned_cooldown_ms(&self) -> i64 {
        let stopped = self.cooldown_ms > 0
            || self.suspend_ms > 0
            || matches!(self.upstream_status, Some(401 | 403 | 429));
        match (&self.learned, stopped) {
            (Some(learned), false) => learned.cooldown_ms(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    Recorded,
    Duplicate,
    /// Past the duplicate-guard time after the lease's expiry: nothing changed.
    TooLate,
}

/// A pool's error as an operator reads it: the connection's own error, without the
/// pool's wording around it.
fn pool_error(e: &deadpool_redis::PoolError) -> String {
    match e {
        deadpool_redis::PoolError::Backend(e) => format!("redis: {e}"),
        deadpool_redis::PoolError::Timeout(_) => "redis: timed out waiting for a connection".into(),
        other => format!("redis: {other}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("{}", pool_error(.0))]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("unexpected answer from a script: {0}")]
    Protocol(String),
    #[error("the accounting queue is closed")]
    QueueClosed,
    #[error("redis is failing; calls are skipped for a moment")]
    CircuitOpen,
    /// Redis holds a provider pool stamped `newer`, later than the caller's: the caller
    /// reloads its pool from the database and asks again (see `pool::cache::Roster`).
    #[error("redis holds a newer version of the provider pool")]
    PoolOutdated { newer: i64 },
    /// Redis holds counters laid out for another shard count.
    #[error("{0}")]
    Layout(String),
}

/// The limit a store enforces: a limit below 1 is no limit (`lua/admit.lua` reads 0 as
/// none, and input validation refuses anything below 1, so only `None` means it on the
/// way in). Both stores read every limit through this.
pub fn effective_limit(limit: Option<i64>) -> Option<i64> {
    limit.filter(|n| *n > 0)
}

/// The counter store of this process: one of the two shapes.
#[derive(Clone)]
pub enum Counters {
    Memory(Arc<memory::MemoryCounters>),
    Redis(Arc<redis::RedisCounters>),
}

impl Counters {
    /// The shard a tenant's counters live on (`None` in the embedded shape, which has
    /// none): what an admission's lease carries.
    pub fn shard_of(&self, tenant: Tenant<'_>) -> Option<u16> {
        match self {
            Counters::Memory(_) => None,
            Counters::Redis(r) => Some(r.shard_of(tenant)),
        }
    }

    pub async fn admit(&self, request: &AdmitRequest<'_>) -> Result<Decision, CounterError> {
        match self {
            Counters::Memory(m) => Ok(m.admit(request)),
            // Boxed: the Redis call's future is most of an admission's, and unboxed it
            // made every future around it as large, copied whole at each move.
            Counters::Redis(r) => Box::pin(r.admit(request)).await,
        }
    }

    pub async fn report(&self, report: &Report) -> Result<Reported, CounterError> {
        match self {
            Counters::Memory(m) => m.report(report).await,
            Counters::Redis(r) => r.report(report).await,
        }
    }

    pub async fn select(&self, request: &SelectRequest<'_>) -> Result<Pick, CounterError> {
        match self {
            Counters::Memory(m) => Ok(m.select(request)),
            Counters::Redis(r) => r.select(request).await,
        }
    }

    /// The live state of a provider's keys, for the admin API.
    pub async fn pool_state(
        &self,
        provider: &str,
        ids: &[String],
    ) -> Result<Vec<LiveState>, CounterError> {
        match self {
            Counters::Memory(m) => Ok(m.pool_state(provider, ids)),
            Counters::Redis(r) => r.pool_state(provider, ids).await,
        }
    }

    /// Ends a provider key's cooldown and suspension now.
    pub async fn reset_provider_key(&self, provider: &str, id: &str) -> Result<(), CounterError> {
        match self {
            Counters::Memory(m) => {
                m.reset_provider_key(provider, id);
                Ok(())
            }
            Counters::Redis(r) => r.reset_provider_key(provider, id).await,
        }
    }

    /// The new expiry, or `None` when the lease is unknown or expired.
    pub async fn renew(&self, lease: &LeaseId, ttl_ms: i64) -> Result<Option<i64>, CounterError> {
        match self {
            Counters::Memory(m) => Ok(m.renew(lease, ttl_ms)),
            Counters::Redis(r) => r.renew(lease, ttl_ms).await,
        }
    }

    /// Waits until what one side of a refused admission took has been given back (the
    /// Redis shape runs that in the background; the twin decides in one step).
    pub async fn settled(&self) {
        if let Counters::Redis(r) = self {
            r.settled().await;
        }
    }

    /// Whether the store can answer (Redis reachable, scripts loaded).
    pub async fn ready(&self) -> Result<(), CounterError> {
        match self {
            Counters::Memory(_) => Ok(()),
            Counters::Redis(r) => r.ready().await,
        }
    }

    /// Drops lapsed state from the in-process twin (the embedded store, or the Redis
    /// shape's outage twin); run periodically. Redis expires its own keys.
    pub fn sweep(&self) {
        match self {
            Counters::Memory(m) => m.sweep(),
            Counters::Redis(r) => r.sweep_fallback(),
        }
    }

    pub fn time_shift(&self) -> &TimeShift {
        match self {
            Counters::Memory(m) => &m.shift,
            Counters::Redis(r) => r.time_shift(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_tokens_are_32_lowercase_hex_digits() {
        for n in [0, 0xabc, u128::MAX / 3] {
            assert_eq!(hex::encode(u128::to_be_bytes(n)), format!("{n:032x}"));
        }
    }

    #[test]
    fn lease_ids_round_trip_and_reject_garbage() {
        let lease = LeaseId::new("6f1c2f7e-3a55-4c2e-9a55-2f0d5c1e9b10");
        assert_eq!(LeaseId::parse(&lease.to_string()), Some(lease.clone()));
        for bad in [
            "",
            "x.y",
            "6f1c2f7e-3a55-4c2e-9a55-2f0d5c1e9b10",
            "6f1c2f7e-3a55-4c2e-9a55-2f0d5c1e9b10.",
            "6f1c2f7e-3a55-4c2e-9a55-2f0d5c1e9b10.ABCDEF0123456789abcdef0123456789",
            "6f1c2f7e-3a55-4c2e-9a55-2f0d5c1e9b10.0123|",
            "not-a-uuid.0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(LeaseId::parse(bad), None, "{bad}");
        }
    }
}
