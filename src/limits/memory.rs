//! The embedded counter store: the same decisions as the Lua scripts, in process.
//!
//! One [`DashMap`] entry per client key; a decision holds that entry's shard lock for its
//! whole check-then-take, which is what makes it atomic. Finished requests go to the
//! embedded accounting writer through a bounded channel (a full channel makes reports
//! wait rather than drop anything).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dashmap::DashMap;
use tokio::sync::mpsc;

use super::window::Window;
use super::{
    effective_limit, AdmitRequest, CounterError, Decision, Denial, LeaseId, Pick, Report, Reported,
    SelectRequest, TimeShift, Usage, Verdict,
};
use crate::money::bounded;
use crate::pool::cache::Pool as CandidatePool;
use crate::pool::learned::Learned;
use crate::pool::{Cause, LiveState};
use crate::usage::UsageRecord;

#[derive(Debug)]
struct Lease {
    expires_at: i64,
    bucket: i64,
    reserved: i64,
    provider: String,
    model: String,
    api_format: String,
    /// The provider key picked with it, and the tokens reserved on that key.
    provider_key: Option<(String, i64)>,
    /// Micro-USD it holds on the key's tracked balance.
    hold: i64,
}

/// One provider key's live state.
#[derive(Debug, Default)]
struct ProviderKeyState {
    requests: Window,
    tokens: Window,
    cooldown_until: i64,
    suspended_until: i64,
    /// The reports behind them (shown while they last).
    cooldown_cause: Option<Cause>,
    suspension_cause: Option<Cause>,
    /// What the rate-limit headers said last, and until when it is shown.
    learned: Option<(Learned, i64)>,
    last_pick: Option<i64>,
}

/// One provider's keys' live state. A pick holds the provider's map-entry lock
/// throughout.
#[derive(Debug, Default)]
struct ProviderKeyStates {
    keys: HashMap<String, ProviderKeyState>,
    /// The version of the candidates `order` was built for (see `pool::cache::Pool`).
    version: String,
    /// The twin of the Redis `:order` zset: (priority, last pick, rank of the id, candidate
    /// index), so a pick walks from the front instead of sorting the pool. A key never
    /// picked sorts before every pick time and by its index (as `lua/pool_sync.lua`
    /// scores it); keys picked in the same millisecond sort by id, as the zset sorts
    /// members of equal score.
    order: BTreeSet<(i64, i64, usize, usize)>,
    /// Each candidate's rank in id order, by candidate index.
    id_rank: Vec<usize>,
}

impl ProviderKeyStates {
    /// Picks like `lua/admit.lua`: priority, then least recently picked (never first),
    /// skipping keys cooling down, suspended or without room. Takes nothing.
    fn pick(&mut self, candidates: &CandidatePool, tokens: i64, now: i64) -> Pick {
        if self.version != candidates.version() {
            // The pool changed (or this is its first pick): rebuild the order, keeping
            // the pick history of the keys that stay, as `lua/pool_sync.lua` does.
            self.version = candidates.version().to_string();
            let mut by_id: Vec<usize> = (0..candidates.len()).collect();
            by_id.sort_unstable_by(|a, b| candidates[*a].id.cmp(&candidates[*b].id));
            self.id_rank = vec![0; candidates.len()];
            for (rank, i) in by_id.into_iter().enumerate() {
                self.id_rank[i] = rank;
            }
            let keys = &self.keys;
            self.order = candidates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let last = keys.get(&c.id).and_then(|k| k.last_pick);
                    self.slot(candidates, i, last)
                })
                .collect();
        }
        let b = now.div_euclid(1000);
        let mut earliest: Option<i64> = None;
        let mut unseen = ProviderKeyState::default();
        for &(_, _, _, i) in &self.order {
            let c = &candidates[i];
            // A key never picked nor reported has empty windows (nothing is stored for it).
            let key = self.keys.get_mut(&c.id).unwrap_or(&mut unseen);
            key.requests.prune(b);
            key.tokens.prune(b);
            let mut wait = (key.cooldown_until - now)
                .max(key.suspended_until - now)
                .max(0);
            if let Some(rpm) = effective_limit(c.max_rpm) {
                if key.requests.sum() + 1 > rpm {
                    wait = wait.max(key.requests.wait_ms(now, 1, rpm));
                }
            }
            if let Some(tpm) = effective_limit(c.max_tpm) {
                if tokens > tpm {
                    wait = wait.max(61_000);
                } else if key.tokens.sum() + tokens > tpm {
                    wait = wait.max(key.tokens.wait_ms(now, tokens, tpm));
                }
            }
            if wait == 0 {
                return Pick::Picked(i);
            }
            earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
        }
        Pick::Exhausted {
            retry_after_ms: earliest.unwrap_or(61_000),
        }
    }

    /// Candidate `i`'s place in `order`, picked last at `last`.
    fn slot(
        &self,
        candidates: &CandidatePool,
        i: usize,
        last: Option<i64>,
    ) -> (i64, i64, usize, usize) {
        // Never picked: below any time, in index order.
        let last = last.unwrap_or(i as i64 - candidates.len() as i64);
        (candidates[i].priority, last, self.id_rank[i], i)
    }

    /// Takes the picked key's request and tokens; returns the tokens reserved on it.
    fn take(&mut self, candidates: &CandidatePool, i: usize, tokens: i64, now: i64) -> i64 {
        let (c, b) = (&candidates[i], now.div_euclid(1000));
        let last = self.keys.get(&c.id).and_then(|k| k.last_pick);
        let (old, new) = (
            self.slot(candidates, i, last),
            self.slot(candidates, i, Some(now)),
        );
        self.order.remove(&old);
        self.order.insert(new);
        let key = self.keys.entry(c.id.clone()).or_default();
        key.last_pick = Some(now);
        if effective_limit(c.max_rpm).is_some() {
            key.requests.add(b, 1);
        }
        let reserved = if effective_limit(c.max_tpm).is_some() {
            tokens
        } else {
            0
        };
        if reserved > 0 {
            key.tokens.add(b, reserved);
        }
        reserved
    }
}

#[derive(Debug, Clone, Copy)]
struct Balance {
    remaining: i64,
    credited: i64,
    version: i64,
    /// The holds of the leases in flight.
    held: i64,
}

#[derive(Debug, Default)]
struct KeyState {
    requests: Window,
    tokens: Window,
    /// A B-tree, not a hash map: it grows a node at a time, where a hash map would
    /// rehash every lease at once while the key's shard is locked (a 15–20 ms stall for
    /// every admission of the key at 60,000 leases, measured by the open-loop bench).
    leases: BTreeMap<String, Lease>,
    /// The leases ordered by expiry (the twin of the Redis zset), so expiring them costs
    /// O(expired · log n), not a scan of every lease.
    by_expiry: BTreeSet<(i64, String)>,
    /// When Redis would let the lease set and its data expire: a second after the
    /// latest expiry any lease of the key has had (admit.lua and renew.lua extend them to
    /// that). Until then an expired lease keeps its data for its report, as in Redis.
    leases_lapse_at: i64,
    balance: Option<Balance>,
}

impl KeyState {
    /// Expired leases free their slot and their hold (as admit.lua's purge).
    fn expire_leases(&mut self, now: i64) {
        while self.by_expiry.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, token)) = self.by_expiry.pop_first() {
                if let Some(lease) = self.leases.remove(&token) {
                    self.release(lease.hold);
                }
            }
        }
    }

    fn release(&mut self, hold: i64) {
        if let Some(balance) = self.balance.as_mut() {
            balance.held = (balance.held - hold).max(0);
        }
    }

    fn earliest_expiry_ms(&self, now: i64) -> i64 {
        self.by_expiry
            .first()
            .map_or(1000, |(at, _)| (at - now).max(1))
    }

    fn add_lease(&mut self, token: String, lease: Lease) {
        self.leases_lapse_at = self.leases_lapse_at.max(lease.expires_at + 1000);
        self.by_expiry.insert((lease.expires_at, token.clone()));
        self.leases.insert(token, lease);
    }

    fn remove_lease(&mut self, token: &str) -> Option<Lease> {
        let lease = self.leases.remove(token)?;
        self.by_expiry
            .remove(&(lease.expires_at, token.to_string()));
        Some(lease)
    }

    fn is_idle(&self) -> bool {
        self.requests.is_empty()
            && self.tokens.is_empty()
            && self.leases.is_empty()
            && self.balance.is_none()
    }
}

pub struct MemoryCounters {
    keys: DashMap<String, KeyState>,
    /// Provider → its keys' live state.
    providers: DashMap<String, ProviderKeyStates>,
    /// Provider key id → provider, for reports (which name only the key).
    key_provider: DashMap<String, String>,
    /// Lease id → when its duplicate guard lapses.
    reported: DashMap<String, i64>,
    guard_ttl_ms: i64,
    queue: mpsc::Sender<UsageRecord>,
    pub(crate) shift: TimeShift,
}

impl MemoryCounters {
    pub fn new(guard_ttl_ms: i64, queue: mpsc::Sender<UsageRecord>) -> Self {
        Self {
            keys: DashMap::new(),
            providers: DashMap::new(),
            key_provider: DashMap::new(),
            reported: DashMap::new(),
            guard_ttl_ms,
            queue,
            shift: TimeShift::default(),
        }
    }

    fn now(&self) -> i64 {
        self.shift.now_ms()
    }

    pub fn admit(&self, r: &AdmitRequest<'_>) -> Decision {
        let now = self.now();
        let b = now.div_euclid(1000);
        let mut state = self.keys.entry(r.lease.key_id.clone()).or_default();
        state.expire_leases(now);
        state.requests.prune(b);
        state.tokens.prune(b);
        if let Some(snapshot) = r.balance {
            // Checked like `lua/admit.lua`: the live balance stays within ±MAX_TOTAL.
            let balance = state.balance.get_or_insert(Balance {
                remaining: bounded(i128::from(snapshot.credited) - i128::from(snapshot.used)),
                credited: snapshot.credited,
                version: snapshot.version,
                held: 0,
            });
            if balance.version < snapshot.version {
                balance.remaining = bounded(
                    i128::from(balance.remaining) + i128::from(snapshot.credited)
                        - i128::from(balance.credited),
                );
                balance.credited = snapshot.credited;
                balance.version = snapshot.version;
            }
        }
        let in_flight = state.leases.len() as i64;
        if let Some(balance) = state.balance.as_mut().filter(|_| in_flight == 0) {
            // Nothing in flight holds nothing (as admit.lua).
            balance.held = 0;
        }
        let tracked = r.balance.and(state.balance);
        let (rpm, tpm) = (r.rpm.unwrap_or(0), r.tpm.unwrap_or(0));

        let deny = |state: &KeyState, reason, retry: Option<i64>| Decision {
            verdict: Verdict::Denied {
                reason,
                retry_after_ms: retry,
            },
            usage: usage(state, now, tracked.map(|b| b.remaining)),
            picked: None,
            degraded: None,
        };
        if tracked.is_some_and(|b| b.remaining <= 0) {
            return deny(&state, Denial::BalanceExhausted, None);
        }
        if rpm > 0 && state.requests.sum() + 1 > rpm {
            return deny(
                &state,
                Denial::Requests,
                Some(state.requests.wait_ms(now, 1, rpm)),
            );
        }
        if tpm > 0 && state.tokens.sum() + r.tokens > tpm {
            return deny(
                &state,
                Denial::Tokens,
                Some(state.tokens.wait_ms(now, r.tokens, tpm)),
            );
        }
        if effective_limit(r.concurrency).is_some_and(|c| in_flight >= c) {
            return deny(
                &state,
                Denial::Concurrency,
                Some(state.earliest_expiry_ms(now)),
            );
        }
        if let Some(b) = tracked {
            // As admit.lua: the balance less what is held must cover this hold.
            if i128::from(b.remaining) - i128::from(b.held) < i128::from(r.hold_micros) {
                if b.held > 0 {
                    return deny(
                        &state,
                        Denial::BalanceCommitted,
                        Some(state.earliest_expiry_ms(now)),
                    );
                }
                return deny(&state, Denial::BalanceExhausted, None);
            }
        }

        // The client may go ahead; now the provider key, if one is wanted. The provider's
        // lock is taken while the client's is held (always in this order).
        let mut picked = None;
        if let Some(candidates) = r.pool.filter(|c| !c.is_empty()) {
            let provider = candidates[0].provider.clone();
            let mut keys = self.providers.entry(provider.clone()).or_default();
            match keys.pick(candidates, r.tokens, now) {
                Pick::Exhausted { retry_after_ms } => {
                    return deny(&state, Denial::PoolExhausted, Some(retry_after_ms));
                }
                Pick::Picked(i) => {
                    let reserved = keys.take(candidates, i, r.tokens, now);
                    self.key_provider.insert(candidates[i].id.clone(), provider);
                    picked = Some((i, candidates[i].id.clone(), reserved));
                }
            }
        }

        if rpm > 0 {
            state.requests.add(b, 1);
        }
        let reserved = if tpm > 0 { r.tokens } else { 0 };
        if reserved > 0 {
            state.tokens.add(b, reserved);
        }
        let expires_at = now + r.lease_ttl_ms;
        let hold = if tracked.is_some() { r.hold_micros } else { 0 };
        if let Some(balance) = state.balance.as_mut().filter(|_| tracked.is_some()) {
            balance.held = balance.held.saturating_add(hold);
        }
        state.add_lease(
            r.lease.token.clone(),
            Lease {
                expires_at,
                bucket: b,
                reserved,
                provider: r.provider.to_string(),
                model: r.model.to_string(),
                api_format: r.api_format.to_string(),
                provider_key: picked
                    .as_ref()
                    .map(|(_, id, reserved)| (id.clone(), *reserved)),
                hold,
            },
        );
        Decision {
            verdict: Verdict::Admitted {
                expires_at_ms: expires_at,
            },
            usage: usage(&state, now, tracked.map(|b| b.remaining)),
            picked: picked.map(|(i, _, _)| i),
            degraded: None,
        }
    }

    pub fn select(&self, r: &SelectRequest<'_>) -> Pick {
        let now = self.now();
        let mut keys = self.providers.entry(r.provider.to_string()).or_default();
        let pick = keys.pick(r.candidates, r.tokens, now);
        if let Pick::Picked(i) = pick {
            keys.take(r.candidates, i, r.tokens, now);
            self.key_provider
                .insert(r.candidates[i].id.clone(), r.provider.to_string());
        }
        pick
    }

    pub fn pool_state(&self, provider: &str, ids: &[String]) -> Vec<LiveState> {
        let now = self.now();
        let b = now.div_euclid(1000);
        // A lookup, not an entry: listing a provider must not create state for it.
        let Some(mut keys) = self.providers.get_mut(provider) else {
            return vec![LiveState::default(); ids.len()];
        };
        ids.iter()
            .map(|id| match keys.keys.get_mut(id) {
                None => LiveState::default(),
                Some(key) => {
                    key.requests.prune(b);
                    key.tokens.prune(b);
                    let cooling = key.cooldown_until > now;
                    let suspended = key.suspended_until > now;
                    LiveState {
                        requests_last_60s: key.requests.sum(),
                        tokens_last_60s: key.tokens.sum(),
                        cooldown_remaining_ms: (key.cooldown_until - now).max(0),
                        suspended_remaining_ms: (key.suspended_until - now).max(0),
                        cooldown_cause: key.cooldown_cause.clone().filter(|_| cooling),
                        suspension_cause: key.suspension_cause.clone().filter(|_| suspended),
                        learned: key
                            .learned
                            .filter(|(_, until)| *until > now)
                            .map(|(l, _)| l),
                    }
                }
            })
            .collect()
    }

    /// Ends a provider key's cooldown and suspension now (`POST
    /// /admin/provider-keys/{id}/reset`). Its windows and pick time stay.
    pub fn reset_provider_key(&self, provider: &str, id: &str) {
        if let Some(mut keys) = self.providers.get_mut(provider) {
            if let Some(key) = keys.keys.get_mut(id) {
                key.cooldown_until = 0;
                key.suspended_until = 0;
                key.cooldown_cause = None;
                key.suspension_cause = None;
                key.learned = None;
            }
        }
    }

    /// Cools down, suspends, or settles the tokens of a provider key after a report.
    fn provider_key_report(&self, r: &Report, settle: Option<(i64, i64)>, now: i64) {
        let Some(id) = &r.provider_key_id else { return };
        let known = || self.key_provider.get(id).map(|p| p.clone());
        let Some(provider) = r.provider.clone().or_else(known) else {
            return;
        };
        let mut keys = self.providers.entry(provider).or_default();
        let key = keys.keys.entry(id.clone()).or_default();
        if r.cooldown_ms > 0 {
            key.cooldown_until = now + r.cooldown_ms;
            key.cooldown_cause = Some(Cause::new(r.upstream_status, now, &r.source));
        }
        if r.suspend_ms > 0 {
            key.suspended_until = now + r.suspend_ms;
            key.suspension_cause = Some(Cause::new(r.upstream_status, now, &r.source));
        }
        let learned_cd = r.learned_cooldown_ms();
        if learned_cd > 0 && now + learned_cd > key.cooldown_until {
            key.cooldown_until = now + learned_cd;
            key.cooldown_cause = Some(Cause::new(r.upstream_status, now, &r.source).learned());
        }
        if let Some(limits) = r.learned {
            key.learned = Some((Learned { limits, at_ms: now }, now + limits.keep_ms()));
        }
        if let (Some((bucket, reserved)), Some((prompt, completion))) = (settle, r.tokens) {
            key.tokens.prune(now.div_euclid(1000));
            key.tokens.settle(bucket, prompt + completion - reserved);
        }
    }

    pub async fn report(&self, r: &Report) -> Result<Reported, CounterError> {
        let now = self.now();
        let (mut provider, mut model, mut api_format) = (None, r.model.clone(), None);
        let mut pool_settle = None;
        if let Some(lease) = &r.lease {
            // As report.lua: the lease's latest expiry (renewals move it past the signed
            // one) bounds when it may be reported, and its guard outlives that bound.
            let live_expiry = self
                .keys
                .get(&lease.key_id)
                .and_then(|s| s.leases.get(&lease.token).map(|l| l.expires_at))
                .unwrap_or(0);
            let expiry = live_expiry.max(r.lease_expires_at_ms);
            {
                let mut guard = self.reported.entry(r.id.clone()).or_insert(i64::MIN);
                if *guard > now {
                    return Ok(Reported::Duplicate);
                }
                if r.lease_expires_at_ms > 0 && now > expiry.saturating_add(self.guard_ttl_ms) {
                    return Ok(Reported::TooLate);
                }
                *guard = now.max(expiry).saturating_add(self.guard_ttl_ms);
            }
            if let Some(mut state) = self.keys.get_mut(&lease.key_id) {
                if let Some(held) = state.remove_lease(&lease.token) {
                    if let Some((prompt, completion)) = r.tokens {
                        state.tokens.prune(now.div_euclid(1000));
                        state
                            .tokens
                            .settle(held.bucket, prompt + completion - held.reserved);
                    }
                    if let Some((pk, reserved)) = &held.provider_key {
                        if r.provider_key_id.as_deref() == Some(pk.as_str()) {
                            pool_settle = Some((held.bucket, *reserved));
                        }
                    }
                    provider = Some(held.provider).filter(|p| !p.is_empty());
                    api_format = Some(held.api_format).filter(|f| !f.is_empty());
                    model = model.or(Some(held.model).filter(|m| !m.is_empty()));
                    state.release(held.hold);
                }
                if let Some(balance) = state.balance.as_mut() {
                    balance.remaining =
                        bounded(i128::from(balance.remaining) - i128::from(r.cost_micros));
                }
            }
        }
        self.provider_key_report(r, pool_settle, now);
        let (prompt, completion) = r.tokens.unwrap_or((0, 0));
        let record = UsageRecord {
            id: r.id.clone(),
            key_id: r.lease.as_ref().map(|l| l.key_id.clone()),
            provider,
            model,
            api_format,
            provider_key_id: r.provider_key_id.clone(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_micros: r.cost_micros,
            latency_ms: r.latency_ms,
            upstream_status: r.upstream_status,
            created_at: now,
            cached_tokens: r.token_classes.cached,
            cache_write_tokens: r.token_classes.cache_write,
            reasoning_tokens: r.token_classes.reasoning,
            source: r.usage_source,
        };
        self.queue(record).await?;
        Ok(Reported::Recorded)
    }

    pub async fn queue(&self, record: UsageRecord) -> Result<(), CounterError> {
        self.queue
            .send(record)
            .await
            .map_err(|_| CounterError::QueueClosed)
    }

    pub fn renew(&self, lease: &LeaseId, ttl_ms: i64) -> Option<i64> {
        let now = self.now();
        let mut state = self.keys.get_mut(&lease.key_id)?;
        // As renew.lua: an expired lease is not renewed, and is left (with its data, for
        // its report) for the next admission to purge.
        if state.leases.get(&lease.token)?.expires_at <= now {
            return None;
        }
        let mut held = state.remove_lease(&lease.token)?;
        held.expires_at = now + ttl_ms;
        state.add_lease(lease.token.clone(), held);
        Some(now + ttl_ms)
    }

    /// Forgets every live balance; each key's next admission starts again from its
    /// database snapshot. For the Redis shape's outage twin only: in the embedded shape
    /// the live balance is ahead of the database.
    pub fn forget_balances(&self) {
        for mut state in self.keys.iter_mut() {
            state.balance = None;
        }
    }

    /// How many client keys have state here (for tests and diagnostics).
    pub fn held_keys(&self) -> usize {
        self.keys.len()
    }

    /// Drops idle keys and lapsed duplicate guards; run periodically.
    pub fn sweep(&self) {
        let now = self.now();
        let b = now.div_euclid(1000);
        self.keys.retain(|_, state| {
            // Expired leases go with the next admission (as admit.lua purges them), or
            // here once Redis would have expired the whole set.
            if state.leases_lapse_at <= now {
                state.expire_leases(now);
            }
            state.requests.prune(b);
            state.tokens.prune(b);
            !state.is_idle()
        });
        self.reported.retain(|_, lapses| *lapses > now);
        for mut keys in self.providers.iter_mut() {
            keys.keys.retain(|_, key| {
                key.requests.prune(b);
                key.tokens.prune(b);
                if key.cooldown_until <= now {
                    key.cooldown_cause = None;
                }
                if key.suspended_until <= now {
                    key.suspension_cause = None;
                }
                if key.learned.is_some_and(|(_, until)| until <= now) {
                    key.learned = None;
                }
                // Keep the pick time (least-recently-used order must survive quiet
                // periods), and a cooldown or suspension until it ends: a key reported
                // revoked but never picked here has nothing else to keep it by.
                key.last_pick.is_some()
                    || !key.requests.is_empty()
                    || !key.tokens.is_empty()
                    || key.cooldown_until > now
                    || key.suspended_until > now
                    || key.learned.is_some()
            });
        }
    }
}

fn usage(state: &KeyState, now: i64, balance: Option<i64>) -> Usage {
    Usage {
        now_ms: now,
        requests_used: state.requests.sum(),
        tokens_used: state.tokens.sum(),
        requests_reset_ms: state.requests.reset_ms(now),
        tokens_reset_ms: state.tokens.reset_ms(now),
        in_flight: state.leases.len() as i64,
        balance_remaining: balance,
    }
}
