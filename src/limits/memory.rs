//! The embedded counter store: the same decisions as the Lua scripts, in process.
//!
//! One [`DashMap`] entry per client key; a decision holds that entry's shard lock for its
//! whole check-then-take, which is what makes it atomic. Finished requests go to the
//! embedded accounting writer through a bounded channel (a full channel makes reports
//! wait rather than drop anything).

use std::collections::{BTreeSet, HashMap};

use dashmap::DashMap;
use tokio::sync::mpsc;

use super::window::Window;
use super::{
    AdmitRequest, CounterError, Decision, Denial, LeaseId, Report, Reported, TimeShift, Usage,
    Verdict,
};
use crate::clock::now_ms;
use crate::usage::UsageRecord;

#[derive(Debug)]
struct Lease {
    expires_at: i64,
    bucket: i64,
    reserved: i64,
    provider: String,
    model: String,
    api_format: String,
}

#[derive(Debug, Clone, Copy)]
struct Balance {
    remaining: i64,
    credited: i64,
    version: i64,
    highest_cost: Option<i64>,
}

#[derive(Debug, Default)]
struct KeyState {
    requests: Window,
    tokens: Window,
    leases: HashMap<String, Lease>,
    /// The leases ordered by expiry (the twin of the Redis zset), so expiring them costs
    /// O(expired · log n), not a scan of every lease.
    by_expiry: BTreeSet<(i64, String)>,
    balance: Option<Balance>,
}

impl KeyState {
    fn expire_leases(&mut self, now: i64) {
        while self.by_expiry.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, token)) = self.by_expiry.pop_first() {
                self.leases.remove(&token);
            }
        }
    }

    fn earliest_expiry_ms(&self, now: i64) -> i64 {
        self.by_expiry
            .first()
            .map_or(1000, |(at, _)| (at - now).max(1))
    }

    fn add_lease(&mut self, token: String, lease: Lease) {
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
            reported: DashMap::new(),
            guard_ttl_ms,
            queue,
            shift: TimeShift::default(),
        }
    }

    fn now(&self) -> i64 {
        now_ms() + self.shift.get()
    }

    pub fn admit(&self, r: &AdmitRequest<'_>) -> Decision {
        let now = self.now();
        let b = now.div_euclid(1000);
        let mut state = self.keys.entry(r.lease.key_id.clone()).or_default();
        state.expire_leases(now);
        state.requests.prune(b);
        state.tokens.prune(b);
        if let Some(snapshot) = r.balance {
            let balance = state.balance.get_or_insert(Balance {
                remaining: snapshot.credited - snapshot.used,
                credited: snapshot.credited,
                version: snapshot.version,
                highest_cost: None,
            });
            if balance.version < snapshot.version {
                balance.remaining += snapshot.credited - balance.credited;
                balance.credited = snapshot.credited;
                balance.version = snapshot.version;
            }
        }
        let tracked = r.balance.and(state.balance);
        let in_flight = state.leases.len() as i64;
        let (rpm, tpm) = (r.rpm.unwrap_or(0), r.tpm.unwrap_or(0));

        let deny = |state: &KeyState, reason, retry: Option<i64>| Decision {
            verdict: Verdict::Denied {
                reason,
                retry_after_ms: retry,
            },
            usage: usage(state, now, tracked.map(|b| b.remaining)),
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
        if r.concurrency.is_some_and(|c| in_flight >= c) {
            return deny(
                &state,
                Denial::Concurrency,
                Some(state.earliest_expiry_ms(now)),
            );
        }
        if let Some(b) = tracked {
            let committed = match b.highest_cost {
                None => in_flight > 0,
                Some(cost) => in_flight > 0 && b.remaining - in_flight * cost <= 0,
            };
            if committed {
                return deny(
                    &state,
                    Denial::BalanceCommitted,
                    Some(state.earliest_expiry_ms(now)),
                );
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
        state.add_lease(
            r.lease.token.clone(),
            Lease {
                expires_at,
                bucket: b,
                reserved,
                provider: r.provider.to_string(),
                model: r.model.to_string(),
                api_format: r.api_format.to_string(),
            },
        );
        Decision {
            verdict: Verdict::Admitted {
                expires_at_ms: expires_at,
            },
            usage: usage(&state, now, tracked.map(|b| b.remaining)),
        }
    }

    pub async fn report(&self, r: &Report) -> Result<Reported, CounterError> {
        let now = self.now();
        let lease_id = r.lease.to_string();
        {
            let mut guard = self.reported.entry(lease_id.clone()).or_insert(i64::MIN);
            if *guard > now {
                return Ok(Reported::Duplicate);
            }
            *guard = now + self.guard_ttl_ms;
        }
        let (mut provider, mut model, mut api_format) = (None, r.model.clone(), None);
        if let Some(mut state) = self.keys.get_mut(&r.lease.key_id) {
            if let Some(lease) = state.remove_lease(&r.lease.token) {
                if let Some((prompt, completion)) = r.tokens {
                    let b = now.div_euclid(1000);
                    state.tokens.prune(b);
                    state
                        .tokens
                        .settle(lease.bucket, prompt + completion - lease.reserved);
                }
                provider = Some(lease.provider).filter(|p| !p.is_empty());
                api_format = Some(lease.api_format).filter(|f| !f.is_empty());
                model = model.or(Some(lease.model).filter(|m| !m.is_empty()));
            }
            if let Some(balance) = state.balance.as_mut() {
                balance.remaining -= r.cost_micros;
                balance.highest_cost = Some(
                    balance
                        .highest_cost
                        .map_or(r.cost_micros, |h| h.max(r.cost_micros)),
                );
            }
        }
        let (prompt, completion) = r.tokens.unwrap_or((0, 0));
        let record = UsageRecord {
            id: lease_id,
            key_id: Some(r.lease.key_id.clone()),
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
        state.expire_leases(now);
        let mut held = state.remove_lease(&lease.token)?;
        held.expires_at = now + ttl_ms;
        state.add_lease(lease.token.clone(), held);
        Some(now + ttl_ms)
    }

    /// Drops idle keys and lapsed duplicate guards; run periodically.
    pub fn sweep(&self) {
        let now = self.now();
        let b = now.div_euclid(1000);
        self.keys.retain(|_, state| {
            state.expire_leases(now);
            state.requests.prune(b);
            state.tokens.prune(b);
            !state.is_idle()
        });
        self.reported.retain(|_, lapses| *lapses > now);
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
