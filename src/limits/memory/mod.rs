//! The embedded counter store: the same decisions as the Lua scripts, in process.
//!
//! One [`DashMap`] entry per client key; a decision holds that entry's shard lock for its
//! whole check-then-take, which is what makes it atomic. Finished requests go to the
//! embedded accounting writer through a bounded channel (a full channel makes reports
//! wait rather than drop anything).
//!
//! Client keys' state is in `key_state`, provider keys' in `provider_keys`, quota
//! counters in `quota`; the listings and the sweep in `housekeeping`. This file holds
//! every decision (admit, select, report, renew): each mirrors one script, and reads best
//! beside the others it must agree with.
//!
//! (About 500 lines: the decision is one function that mirrors `lua/admit.lua` step by
//! step, and report and renewal mirror theirs with their light-lease paths; splitting
//! them would hide the correspondence.)

mod housekeeping;
mod key_state;
mod provider_keys;
mod quota;

use dashmap::DashMap;
use tokio::sync::mpsc;

use key_state::{token, Balance, KeyState, Lease};
use provider_keys::ProviderKeyStates;
use quota::QuotaCounters;

use super::{
    effective_limit, AdmitRequest, CounterError, Decision, Denial, LeaseId, LightLease, Pick,
    PickTaken, Report, Reported, SelectRequest, TimeShift, Usage, Verdict,
};
use crate::money::bounded;
use crate::pool::learned::Learned;
use crate::pool::Cause;
use crate::usage::UsageRecord;

pub struct MemoryCounters {
    keys: DashMap<String, KeyState>,
    /// Provider → its keys' live state.
    providers: DashMap<String, ProviderKeyStates>,
    /// Provider key id → provider, for reports (which name only the key).
    key_provider: DashMap<String, String>,
    /// Every quota counter (shared by keys: a user's), behind one lock.
    quotas: QuotaCounters,
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
            quotas: QuotaCounters::default(),
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
        // A key seen before needs no copy of its id (`entry` takes an owned one).
        let mut state = match self.keys.get_mut(r.lease.key_id.as_str()) {
            Some(state) => state,
            None => self.keys.entry(r.lease.key_id.clone()).or_default(),
        };
        // A light admission (no lease record) neither purges nor counts the key's
        // leases without a concurrency limit, as admit.lua and admit_window.lua. With one
        // it takes a slot: admit.lua (quota entries) purges every expired lease,
        // admit_window.lua only those without a record (the others wait for admit.lua's
        // purge or their report, counted nowhere meanwhile).
        let light = r.light_meta();
        let slot = light.is_none() || effective_limit(r.concurrency).is_some();
        let released = if light.is_none() || (slot && !r.quotas.is_empty()) {
            state.expire_leases(now, Some(self.guard_ttl_ms))
        } else {
            if slot {
                state.expire_light_leases(now);
            }
            Vec::new()
        };
        // The quota counters, locked after the key (always in this order), only when the
        // request has entries or an expired lease releases a spend hold.
        let mut quotas = (!released.is_empty() || !r.quotas.is_empty()).then(|| self.quotas.lock());
        let mut reads = Vec::new();
        if let Some(q) = quotas.as_mut() {
            q.release(&released);
            reads = q.read(r.quotas, now);
        }
        let quota_uses = quotas
            .as_ref()
            .map_or_else(Vec::new, |q| q.uses(&reads, now));
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
        let in_flight = if slot { state.live_leases(now) } else { 0 };
        if let Some(balance) = state
            .balance
            .as_mut()
            .filter(|_| in_flight == 0 && r.balance.is_some())
        {
            // Nothing in flight holds nothing (as admit.lua, which reads the balance only
            // while it is tracked).
            balance.held = 0;
        }
        let tracked = r.balance.and(state.balance);
        let (rpm, tpm) = (r.rpm.unwrap_or(0), r.tpm.unwrap_or(0));

        let deny = |state: &KeyState, reason, retry: Option<i64>| Decision {
            verdict: Verdict::Denied {
                reason,
                retry_after_ms: retry,
            },
            usage: usage(
                state,
                now,
                (rpm > 0, tpm > 0),
                tracked.map(|b| b.remaining),
                in_flight,
            ),
            picked: None,
            taken: None,
            degraded: None,
            quotas: quota_uses.clone(),
            light: None,
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
        let refusal = quotas
            .as_ref()
            .and_then(|q| q.refusal(&reads, r.tokens, r.hold_micros, now));
        if let Some((index, exhausted, retry)) = refusal {
            let reason = Denial::Quota { index, exhausted };
            return deny(&state, reason, (retry > 0).then_some(retry));
        }

        // The client may go ahead; now the provider key, if one is wanted. The provider's
        // lock is taken while the client's is held (always in this order).
        let mut picked = None;
        if let Some(candidates) = r.pool.filter(|c| !c.is_empty()) {
            let provider = candidates[0].provider.clone();
            let mut keys = self.providers.entry(provider.clone()).or_default();
            match keys.pick(candidates, r.tokens, now) {
                Pick::Exhausted { retry_after_ms } => {
                    let mut d = deny(&state, Denial::PoolExhausted, Some(retry_after_ms));
                    super::pool_refusal_resets(r, &mut d);
                    return d;
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
        let reserved = (tpm > 0).then_some(r.tokens);
        if let Some(tokens) = reserved.filter(|t| *t > 0) {
            state.tokens.add(b, tokens);
        }
        let expires_at = now + r.lease_ttl_ms;
        let corrections = quotas
            .as_mut()
            .map_or_else(Vec::new, |q| q.take(&mut reads, r, now, expires_at));
        let quota_uses = quotas
            .as_ref()
            .map_or_else(Vec::new, |q| q.uses(&reads, now));
        drop(quotas);
        let hold = if tracked.is_some() { r.hold_micros } else { 0 };
        if let Some(balance) = state.balance.as_mut().filter(|_| tracked.is_some()) {
            balance.held = balance.held.saturating_add(hold);
        }
        if let Some(meta) = light {
            // No lease record: its signed lease carries what its report settles; under a
            // concurrency limit its slot is in the key's leases.
            let light = LightLease {
                second: b,
                kt: (tpm > 0).then_some(r.tokens),
                meta,
                expires_at_ms: expires_at,
            };
            let mut in_flight = in_flight;
            if slot {
                state.add_lease(token(&r.lease.token), Box::new(Lease::light(&light)));
                in_flight += 1;
            }
            return Decision {
                verdict: Verdict::Admitted {
                    expires_at_ms: expires_at,
                },
                usage: usage(&state, now, (rpm > 0, tpm > 0), None, in_flight),
                taken: picked.as_ref().map(|(_, _, reserved)| PickTaken {
                    second: b,
                    tokens: *reserved,
                }),
                picked: picked.map(|(i, _, _)| i),
                degraded: None,
                quotas: quota_uses,
                light: Some(light),
            };
        }
        state.add_lease(
            token(&r.lease.token),
            Box::new(Lease {
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
                quotas: corrections,
                light: false,
            }),
        );
        Decision {
            verdict: Verdict::Admitted {
                expires_at_ms: expires_at,
            },
            usage: usage(
                &state,
                now,
                (rpm > 0, tpm > 0),
                tracked.map(|b| b.remaining),
                in_flight + 1,
            ),
            taken: picked.as_ref().map(|(_, _, reserved)| PickTaken {
                second: b,
                tokens: *reserved,
            }),
            picked: picked.map(|(i, _, _)| i),
            degraded: None,
            quotas: quota_uses,
            light: None,
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
        // As pool_report.lua: the pick's tokens are settled from what the signed lease
        // says it took, whether or not the lease's data is still here (a late report
        // after a purge and a sweep settles them too).
        let mut pool_settle = r
            .lease
            .as_ref()
            .and_then(|l| l.taken)
            .filter(|_| r.provider_key_id.is_some())
            .map(|t| (t.second, t.tokens));
        if r.lease.is_none() && r.id.starts_with(super::NAMED_REPORT) {
            // As report.lua: a named report without a lease is guarded by its name.
            let mut guard = self.reported.entry(r.id.clone()).or_insert(i64::MIN);
            if *guard > now {
                return Ok(Reported::Duplicate);
            }
            *guard = now.saturating_add(self.guard_ttl_ms);
        }
        if let Some(lease) = &r.lease {
            // As report.lua: the lease's latest expiry (renewals move it past the signed
            // one) bounds when it may be reported, and its guard outlives that bound.
            let live_expiry = self
                .keys
                .get(&lease.key_id)
                .and_then(|s| s.leases.get(&token(&lease.token)).map(|l| l.expires_at))
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
            let mut found = false;
            if let Some(light) = &lease.light {
                // As report.lua: a light lease's data is its signed lease's (never lost).
                found = true;
                let mut names = light
                    .meta
                    .split('|')
                    .map(|n| Some(n.to_string()).filter(|n| !n.is_empty()));
                provider = names.next().flatten();
                let named = names.next().flatten();
                api_format = names.next().flatten();
                // As report.lua: the admitted model is recorded (the report's only
                // when the admission named none).
                model = named.or(model);
            }
            if let Some(mut state) = self.keys.get_mut(&lease.key_id) {
                // Its data is live, or (purged after its expiry by an admission, its slot
                // and holds released then) kept in `purged`, as report.lua reads ld, then lx.
                let live = state.remove_lease(token(&lease.token));
                let purged = live.is_none();
                if let Some(light) = &lease.light {
                    // Recorded by a renewal, it left the lease set above.
                    if let (Some(kt), Some((prompt, completion))) = (light.kt, r.tokens) {
                        state.tokens.prune(now.div_euclid(1000));
                        state.tokens.settle(light.second, prompt + completion - kt);
                    }
                } else if let Some(held) =
                    live.or_else(|| state.take_purged(token(&lease.token), now))
                {
                    found = true;
                    if let (Some((prompt, completion)), Some(reserved)) = (r.tokens, held.reserved)
                    {
                        state.tokens.prune(now.div_euclid(1000));
                        state
                            .tokens
                            .settle(held.bucket, prompt + completion - reserved);
                    }
                    // A lease of the release before carries no pick: its data says.
                    if let (None, Some((pk, reserved))) = (lease.taken, &held.provider_key) {
                        if r.provider_key_id.as_deref() == Some(pk.as_str()) {
                            pool_settle = Some((held.bucket, *reserved));
                        }
                    }
                    provider = Some(held.provider).filter(|p| !p.is_empty());
                    api_format = Some(held.api_format).filter(|f| !f.is_empty());
                    model = Some(held.model).filter(|m| !m.is_empty()).or(model);
                    if !purged {
                        state.release(held.hold);
                    }
                    if !held.quotas.is_empty() {
                        self.quotas.lock().report(
                            &lease.token,
                            &held.quotas,
                            held.bucket,
                            r.tokens,
                            r.cost_micros,
                            now,
                        );
                    }
                }
                if let Some(balance) = state.balance.as_mut() {
                    balance.remaining =
                        bounded(i128::from(balance.remaining) - i128::from(r.cost_micros));
                }
            }
            if !found && !r.spend_now.is_empty() {
                // Its data is lost (Redis lost it): report.lua's late spend of now.
                self.quotas.lock().late(&r.spend_now, r.cost_micros, now);
            }
        }
        // As pool_report.lua, which runs beside report.lua and so cannot see a renewal:
        // later than the guard ttl after the signed expiry, the provider key's part is
        // dropped (only a renewed lease is still recorded then).
        let pool_late = r.lease_expires_at_ms > 0
            && now > r.lease_expires_at_ms.saturating_add(self.guard_ttl_ms);
        if !pool_late {
            self.provider_key_report(r, pool_settle, now);
        }
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
        if let Some(light) = &lease.light {
            return self.renew_light(lease, light, now, ttl_ms);
        }
        let mut state = self.keys.get_mut(&lease.key_id)?;
        // As renew.lua: an expired lease is not renewed, and is left (with its data, for
        // its report) for the next admission to purge.
        if state.leases.get(&token(&lease.token))?.expires_at <= now {
            return None;
        }
        let mut held = state.remove_lease(token(&lease.token))?;
        held.expires_at = now + ttl_ms;
        if !held.quotas.is_empty() {
            // Its spend holds expire with it (renew.lua); the quota lock after the key's.
            self.quotas
                .lock()
                .renew(&lease.token, &held.quotas, held.expires_at);
        }
        state.add_lease(token(&lease.token), held);
        Some(now + ttl_ms)
    }

    /// As renew.lua for a light lease: live until the later of its signed expiry and a
    /// renewal's, unless reported; renewed, it joins the key's leases.
    fn renew_light(
        &self,
        lease: &LeaseId,
        light: &LightLease,
        now: i64,
        ttl_ms: i64,
    ) -> Option<i64> {
        let expiry = now + ttl_ms;
        let id = lease.to_string();
        if self.reported.get(&id).is_some_and(|lapses| *lapses > now) {
            return None;
        }
        let mut state = self.keys.entry(lease.key_id.clone()).or_default();
        let t = token(&lease.token);
        let recorded = state.leases.get(&t).map_or(0, |l| l.expires_at);
        if recorded.max(light.expires_at_ms) <= now {
            return None;
        }
        let mut held = state
            .remove_lease(t)
            .unwrap_or_else(|| Box::new(Lease::light(light)));
        held.expires_at = expiry;
        state.add_lease(t, held);
        Some(expiry)
    }
}

/// The usage a decision reports. A window is read only under a limit (as admit.lua,
/// which does not read one otherwise): a key whose limit was removed shows none.
fn usage(
    state: &KeyState,
    now: i64,
    limited: (bool, bool),
    balance: Option<i64>,
    in_flight: i64,
) -> Usage {
    let (rpm, tpm) = limited;
    Usage {
        now_ms: now,
        requests_used: if rpm { state.requests.sum() } else { 0 },
        tokens_used: if tpm { state.tokens.sum() } else { 0 },
        requests_reset_ms: if rpm { state.requests.reset_ms(now) } else { 0 },
        tokens_reset_ms: if tpm { state.tokens.reset_ms(now) } else { 0 },
        in_flight,
        balance_remaining: balance,
    }
}
