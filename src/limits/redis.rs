//! The distributed counter store: one Lua script per operation, EVALSHA through a
//! deadpool-redis pool.
//!
//! Key layout (every key under one hash tag, the deployment prefix `{P}`, so every script
//! touches one Redis Cluster slot, and admit-with-select can later touch client and pool
//! keys atomically):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{P}:k:<key id>:rpm` / `:tpm` | hash | second → requests / tokens (61 buckets at most) |
//! | `{P}:k:<key id>:leases` | zset | lease token → expiry ms |
//! | `{P}:k:<key id>:ld` | hash | lease token → reservation data for the report |
//! | `{P}:k:<key id>:bal` | hash | live balance (no expiry: it is ahead of the database) |
//! | `{P}:done:<lease id>` | string | duplicate guard of a report |
//! | `{P}:usage` | stream | the accounting queue |
//! | `{P}:p:<provider>:def` | hash | the pool's version and each key's limits |
//! | `{P}:p:<provider>:order` | zset | key id → priority rank · 2^42 + last pick |
//! | `{P}:pk:<id>:rpm` / `:tpm` | hash | a provider key's windows |
//! | `{P}:pk:<id>:cd` / `:susp` | string | when its cooldown / suspension ends (ms) |
//! | `{P}:pk:<id>:cause` | hash | `cd` / `susp` → the report behind them (`status\|at\|source`); `lim` → what the rate-limit headers said last |
//!
//! Scripts are preloaded at start (`SCRIPT LOAD`); when Redis has lost them (restart,
//! `SCRIPT FLUSH`), `redis::Script` sees NOSCRIPT, loads, and retries once.
//!
//! Outages: a [`Breaker`] skips Redis for a moment after consecutive connection
//! failures, and `KEYWARD_ON_BACKEND_ERROR` decides what happens meanwhile: `deny`
//! answers 503; `allow` admits without counting; `local` decides with an in-process
//! twin ([`MemoryCounters`]), per replica and so only approximately. In `allow` and
//! `local`, reports go through the twin's queue straight to the database (applied once
//! by lease id, like any report); in `deny` they are refused and the caller retries.
//! The twin is swept periodically; its live balances are forgotten at the start of each
//! outage (and between outages), so an outage starts from the database's balances.
//!
//! Connections: deadpool-redis health-checks every checkout with a PING round trip, so
//! checking a connection out per decision would cost two round trips. Instead the hot
//! path runs on a few multiplexed connections ("lanes") taken from the pool once and
//! shared by every request: one round trip per decision, and concurrent scripts are
//! pipelined on the same socket. A lane that fails with a connection error is replaced
//! through the pool (which checks the new one).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::conn::{Conn, Pools, Target};

use super::breaker::Breaker;
use super::memory::MemoryCounters;
use super::scripts::admit::{AdmitArgs, AdmitCode, AdmitKeys, AdmitReply};
use super::scripts::pool_state::{PoolStateArgs, PoolStateKeys};
use super::scripts::pool_sync::{PoolSyncArgs, PoolSyncKey, PoolSyncKeys, PoolSyncReply};
use super::scripts::renew::{RenewArgs, RenewKeys, RenewReply};
use super::scripts::report::{ReportArgs, ReportCode, ReportKeys, ReportProviderKeys};
use super::scripts::{limit_arg, KeySpace, Scripts};
use super::{
    AdmitRequest, CounterError, Decision, Denial, LeaseId, Pick, Report, Reported, SelectRequest,
    TimeShift, Usage, Verdict,
};
use crate::clock::now_ms;
use crate::config::BackendErrorPolicy;
use crate::pool::cache::{Candidate, Pool};
use crate::pool::LiveState;
use crate::usage::{UsageRecord, UsageSource};

/// How many multiplexed connections carry the hot path.
const LANES: usize = 2;

/// Shared multiplexed connections, used round robin.
struct Lanes {
    pools: Pools,
    lanes: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
}

impl Lanes {
    /// A handle to one lane's connection (a cheap clone of a shared socket).
    async fn get(&self) -> Result<(usize, Conn), CounterError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        if let Some(conn) = self.lanes[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok((i, conn));
        }
        let conn = self.pools.take().await?;
        *self.lanes[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok((i, conn))
    }

    /// Forgets a lane whose connection broke; the next use takes a fresh one.
    fn broken(&self, i: usize, error: &redis::RedisError) {
        if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_unrecoverable_error()
            || error.is_timeout()
        {
            *self.lanes[i].lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Runs one script on a lane: exactly one round trip (plus a reload after NOSCRIPT).
    /// `name` labels its metrics.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        name: &str,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, CounterError> {
        let m = crate::metrics::get();
        let started = std::time::Instant::now();
        let result = match self.get().await {
            Ok((i, mut conn)) => call.invoke_async(&mut conn).await.map_err(|e| {
                self.broken(i, &e);
                CounterError::from(e)
            }),
            Err(e) => Err(e),
        };
        m.script_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            m.script_errors.with_label_values(&[name]).inc();
        }
        result
    }
}

pub struct RedisCounters {
    target: Target,
    lanes: Lanes,
    space: KeySpace,
    scripts: Scripts,
    guard_ttl_ms: i64,
    pub(crate) shift: TimeShift,
    breaker: Breaker,
    policy: BackendErrorPolicy,
    /// The in-process twin used while Redis fails (`allow` and `local`).
    fallback: Option<Arc<MemoryCounters>>,
    /// Set by the first degraded answer of an outage, cleared by Redis answering again.
    in_outage: AtomicBool,
}

/// An error that means "Redis cannot answer", as opposed to a bug.
fn is_outage(e: &CounterError) -> bool {
    match e {
        CounterError::Redis(e) => {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
        }
        CounterError::Pool(_) | CounterError::CircuitOpen => true,
        CounterError::Protocol(_)
        | CounterError::QueueClosed
        | CounterError::PoolOutdated { .. } => false,
    }
}

impl RedisCounters {
    /// Connects, preloads the scripts and makes sure the accounting stream's consumer
    /// group exists.
    pub async fn connect(url: &str, prefix: &str, guard_ttl_ms: i64) -> Result<Self, CounterError> {
        let target = Target::parse(url).ok_or_else(|| {
            CounterError::Protocol("not a redis:// or redis+cluster:// URL".into())
        })?;
        let counters = Self {
            lanes: Lanes {
                pools: Pools::new(&target, 8)?,
                lanes: (0..LANES).map(|_| Mutex::new(None)).collect(),
                next: AtomicUsize::new(0),
            },
            target,
            space: KeySpace::new(prefix),
            scripts: Scripts::default(),
            guard_ttl_ms,
            shift: TimeShift::default(),
            breaker: Breaker::default(),
            policy: BackendErrorPolicy::Deny,
            fallback: None,
            in_outage: AtomicBool::new(false),
        };
        counters.load_scripts().await?;
        Ok(counters)
    }

    /// What to do while Redis fails; `fallback` serves `allow` and `local`.
    pub fn with_failure_policy(
        mut self,
        policy: BackendErrorPolicy,
        fallback: Arc<MemoryCounters>,
    ) -> Self {
        self.policy = policy;
        self.fallback = Some(fallback);
        self
    }

    /// Runs a Redis call through the breaker.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, CounterError>>,
    ) -> Result<T, CounterError> {
        if !self.breaker.allows() {
            return Err(CounterError::CircuitOpen);
        }
        let result = call.await;
        match &result {
            Ok(_) => {
                self.breaker.success();
                // A load, not a store, on the hot path: the flag is written once per outage.
                if self.in_outage.load(Ordering::Relaxed) {
                    self.in_outage.store(false, Ordering::Relaxed);
                }
            }
            Err(e) if is_outage(e) => self.breaker.failure(),
            Err(_) => {}
        }
        result
    }

    /// The twin that answers while Redis fails, with its mode; `None` under `deny`.
    fn degraded(&self) -> Option<(&'static str, &MemoryCounters)> {
        let mode = match self.policy {
            BackendErrorPolicy::Deny => return None,
            BackendErrorPolicy::Allow => "allow",
            BackendErrorPolicy::Local => "local",
        };
        let fallback = self.fallback.as_deref()?;
        if !self.in_outage.swap(true, Ordering::Relaxed) {
            // A new outage: the twin's live balances are an earlier outage's, behind
            // whatever Redis and the database have seen since. Each key starts again from
            // its database snapshot.
            fallback.forget_balances();
        }
        crate::metrics::get()
            .degraded_answers
            .with_label_values(&[mode])
            .inc();
        Some((mode, fallback))
    }

    pub async fn admit(&self, r: &AdmitRequest<'_>) -> Result<Decision, CounterError> {
        let e = match self.guarded(self.admit_redis(r)).await {
            Err(e) if is_outage(&e) => e,
            other => return other,
        };
        match self.degraded() {
            None => Err(e),
            Some(("local", twin)) => Ok(Decision {
                degraded: Some("local"),
                ..twin.admit(r)
            }),
            Some((mode, _)) => {
                let now = now_ms();
                Ok(Decision {
                    verdict: Verdict::Admitted {
                        expires_at_ms: now + r.lease_ttl_ms,
                    },
                    usage: Usage {
                        now_ms: now,
                        ..Usage::default()
                    },
                    // Without counters the pool order is all there is: the first by priority.
                    picked: r.pool.filter(|c| !c.is_empty()).map(|_| 0),
                    degraded: Some(mode),
                })
            }
        }
    }

    pub async fn load_scripts(&self) -> Result<(), CounterError> {
        let mut conn = self.lanes.pools.take().await?;
        for script in self.scripts.all() {
            script.prepare_invoke().load_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Where Redis is (for dedicated connections: the stream consumer, pub/sub).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A shared connection (one of the hot path's lanes).
    pub async fn conn(&self) -> Result<Conn, CounterError> {
        Ok(self.lanes.get().await?.1)
    }

    /// The Redis key of a client key's `rpm`, `tpm`, `leases`, `ld` or `bal`.
    pub fn key(&self, key_id: &str, what: &str) -> String {
        self.space.client(key_id, what)
    }

    /// Writes the caller's pool into Redis (`lua/pool_sync.lua`), unless Redis holds one
    /// stamped later ([`CounterError::PoolOutdated`]).
    async fn sync_pool(&self, candidates: &Pool) -> Result<(), CounterError> {
        let Some(first) = candidates.first() else {
            return Ok(());
        };
        let mut call = self.scripts.pool_sync.prepare_invoke();
        PoolSyncKeys::new(&self.space, &first.provider).push(&mut call);
        PoolSyncArgs {
            version: candidates.version(),
            stamp: candidates.stamp(),
        }
        .push(&mut call);
        for key in PoolSyncKey::all(candidates) {
            key.push(&mut call);
        }
        match PoolSyncReply::parse(self.lanes.invoke("pool_sync", &call).await?)? {
            PoolSyncReply::InSync => Ok(()),
            PoolSyncReply::Newer(newer) => Err(CounterError::PoolOutdated { newer }),
        }
    }

    /// Runs an admit-script call. When Redis holds another version of the pool (an admin
    /// change, or its first use), syncs the pool and runs the call once more: the one
    /// case where a decision takes more than one round trip. When the pool in Redis is
    /// stamped later than the caller's, nothing is written: the caller's pool is
    /// outdated ([`CounterError::PoolOutdated`]), and it reloads it.
    async fn invoke_admit(
        &self,
        name: &str,
        call: &redis::ScriptInvocation<'_>,
        pool: Option<&Pool>,
    ) -> Result<AdmitReply, CounterError> {
        let reply = AdmitReply::parse(&self.lanes.invoke::<Vec<redis::Value>>(name, call).await?)?;
        let (AdmitCode::PoolVersion, Some(pool)) = (reply.code, pool) else {
            return Ok(reply);
        };
        if reply.a > pool.stamp() {
            return Err(CounterError::PoolOutdated { newer: reply.a });
        }
        self.sync_pool(pool).await?;
        let reply = AdmitReply::parse(&self.lanes.invoke::<Vec<redis::Value>>(name, call).await?)?;
        if reply.code == AdmitCode::PoolVersion {
            return Err(CounterError::Protocol(
                "the pool changed again during its sync".into(),
            ));
        }
        Ok(reply)
    }

    /// The accounting stream.
    pub fn stream_key(&self) -> String {
        self.space.usage()
    }

    async fn admit_redis(&self, r: &AdmitRequest<'_>) -> Result<Decision, CounterError> {
        let id = &r.lease.key_id;
        let balance = r.balance.unwrap_or(super::BalanceSnapshot {
            credited: 0,
            used: 0,
            version: 0,
        });
        let meta = format!(
            "{}|{}|{}",
            sanitize(r.provider),
            sanitize(r.model),
            sanitize(r.api_format)
        );
        let candidates: &[Candidate] = r.pool.map_or(&[], |p| p);
        let provider = candidates.first().map_or("", |c| c.provider.as_str());
        let clock = self.shift.script_clock();
        let mut call = self.scripts.admit.prepare_invoke();
        AdmitKeys::new(&self.space, id, provider).push(&mut call);
        AdmitArgs {
            rpm_limit: limit_arg(r.rpm),
            tpm_limit: limit_arg(r.tpm),
            concurrency_limit: limit_arg(r.concurrency),
            tokens: r.tokens,
            lease_token: &r.lease.token,
            lease_ttl_ms: r.lease_ttl_ms,
            lease_meta: meta,
            balance_tracked: r.balance.is_some(),
            // Bounded like the twin's live balance: the script's doubles stay exact.
            credited: crate::money::bounded(balance.credited.into()),
            used: crate::money::bounded(balance.used.into()),
            balance_version: balance.version,
            time_shift_ms: clock.shift_ms,
            client: true,
            pool_version: pool_version(r.pool),
            hold: r.hold_micros,
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        let AdmitReply {
            code,
            a,
            mut usage,
            picked,
        } = self.invoke_admit("admit", &call, r.pool).await?;
        usage.balance_remaining = usage.balance_remaining.filter(|_| r.balance.is_some());
        let denied = |reason, retry: Option<i64>| Verdict::Denied {
            reason,
            retry_after_ms: retry,
        };
        let verdict = match code {
            AdmitCode::Admitted => Verdict::Admitted { expires_at_ms: a },
            AdmitCode::Requests => denied(Denial::Requests, Some(a)),
            AdmitCode::Tokens => denied(Denial::Tokens, Some(a)),
            AdmitCode::Concurrency => denied(Denial::Concurrency, Some(a)),
            AdmitCode::BalanceExhausted => denied(Denial::BalanceExhausted, None),
            AdmitCode::BalanceCommitted => denied(Denial::BalanceCommitted, Some(a)),
            AdmitCode::PoolExhausted => denied(Denial::PoolExhausted, Some(a)),
            AdmitCode::PoolVersion => {
                return Err(CounterError::Protocol(
                    "admit asked for a pool sync without a pool".into(),
                ))
            }
        };
        Ok(Decision {
            verdict,
            usage,
            picked: candidates
                .iter()
                .position(|c| !picked.is_empty() && c.id == picked),
            degraded: None,
        })
    }

    pub async fn select(&self, r: &SelectRequest<'_>) -> Result<Pick, CounterError> {
        let e = match self.guarded(self.select_redis(r)).await {
            Err(e) if is_outage(&e) => e,
            other => return other,
        };
        match self.degraded() {
            None => Err(e),
            Some(("local", twin)) => Ok(twin.select(r)),
            Some(_) => Ok(Pick::Picked(0)),
        }
    }

    async fn select_redis(&self, r: &SelectRequest<'_>) -> Result<Pick, CounterError> {
        // The admit script with the client part switched off (its client keys untouched).
        let clock = self.shift.script_clock();
        let mut call = self.scripts.admit.prepare_invoke();
        AdmitKeys::new(&self.space, "-", r.provider).push(&mut call);
        AdmitArgs {
            rpm_limit: 0,
            tpm_limit: 0,
            concurrency_limit: 0,
            tokens: r.tokens,
            lease_token: "-",
            lease_ttl_ms: 1,
            lease_meta: "||".into(),
            balance_tracked: false,
            credited: 0,
            used: 0,
            balance_version: 0,
            time_shift_ms: clock.shift_ms,
            client: false,
            pool_version: pool_version(Some(r.candidates)),
            hold: 0,
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        let reply = self
            .invoke_admit("select", &call, Some(r.candidates))
            .await?;
        let picked = r.candidates.iter().position(|c| c.id == reply.picked);
        match (reply.code, picked) {
            (AdmitCode::Admitted, Some(i)) => Ok(Pick::Picked(i)),
            (AdmitCode::PoolExhausted, _) => Ok(Pick::Exhausted {
                retry_after_ms: reply.a,
            }),
            (code, _) => Err(CounterError::Protocol(format!(
                "select returned {code:?} (picked {:?})",
                reply.picked
            ))),
        }
    }

    pub async fn pool_state(&self, ids: &[String]) -> Result<Vec<LiveState>, CounterError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.pool_state.prepare_invoke();
        for id in ids {
            PoolStateKeys::new(&self.space, id).push(&mut call);
        }
        let clock = self.shift.script_clock();
        PoolStateArgs {
            time_shift_ms: clock.shift_ms,
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        let reply: Vec<redis::Value> = self.lanes.invoke("pool_state", &call).await?;
        super::scripts::pool_state::parse(&reply, ids.len())
    }

    /// Ends a provider key's cooldown and suspension now, here and in the outage twin
    /// (one DEL of keys under the deployment's hash tag, so one slot).
    pub async fn reset_provider_key(&self, provider: &str, id: &str) -> Result<(), CounterError> {
        if let Some(twin) = &self.fallback {
            twin.reset_provider_key(provider, id);
        }
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("DEL")
            .arg(self.space.provider_key(id, "cd"))
            .arg(self.space.provider_key(id, "susp"))
            .arg(self.space.provider_key(id, "cause"))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn report(&self, r: &Report) -> Result<Reported, CounterError> {
        let e = match self.guarded(self.report_redis(r)).await {
            Err(e) if is_outage(&e) => e,
            other => return other,
        };
        match self.degraded() {
            None => Err(e),
            // Straight to the database through the twin's queue (applied once by lease id).
            Some((_, twin)) => twin.report(r).await,
        }
    }

    async fn report_redis(&self, r: &Report) -> Result<Reported, CounterError> {
        let (token, key_id) = r
            .lease
            .as_ref()
            .map_or(("", ""), |l| (l.token.as_str(), l.key_id.as_str()));
        let (prompt, completion) = r.tokens.unwrap_or((0, 0));
        let text = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        let clock = self.shift.script_clock();
        let mut call = self.scripts.report.prepare_invoke();
        ReportKeys::new(&self.space, key_id, &r.id).push(&mut call);
        if let Some(pk) = &r.provider_key_id {
            ReportProviderKeys::new(&self.space, pk).push(&mut call);
        }
        ReportArgs {
            lease_token: token,
            record_id: &r.id,
            key_id,
            has_tokens: r.tokens.is_some(),
            prompt,
            completion,
            cost: r.cost_micros,
            guard_ttl_ms: self.guard_ttl_ms,
            model: r.model.as_deref().unwrap_or_default(),
            provider_key: r.provider_key_id.as_deref().unwrap_or_default(),
            latency_ms: text(r.latency_ms),
            status: text(r.upstream_status),
            time_shift_ms: clock.shift_ms,
            cooldown_ms: r.cooldown_ms,
            suspend_ms: r.suspend_ms,
            cause_source: crate::pool::bounded_source(&r.source),
            lease_expiry: r.lease_expires_at_ms,
            cached: r.token_classes.cached,
            cache_write: r.token_classes.cache_write,
            reasoning: r.token_classes.reasoning,
            usage_source: r.usage_source.as_str(),
            learned_cooldown_ms: r.learned_cooldown_ms(),
            learned_limits: r.learned.map(|l| l.encode()).unwrap_or_default(),
            learned_keep_ms: r.learned.map_or(0, |l| l.keep_ms()),
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        let reply: Vec<redis::Value> = self.lanes.invoke("report", &call).await?;
        Ok(ReportCode::parse(&reply)?.into())
    }

    pub async fn renew(&self, lease: &LeaseId, ttl_ms: i64) -> Result<Option<i64>, CounterError> {
        let e = match self.guarded(self.renew_redis(lease, ttl_ms)).await {
            Err(e) if is_outage(&e) => e,
            other => return other,
        };
        match self.degraded() {
            None => Err(e),
            Some(("local", twin)) => Ok(twin.renew(lease, ttl_ms)),
            Some(_) => Ok(Some(now_ms() + ttl_ms)),
        }
    }

    async fn renew_redis(&self, lease: &LeaseId, ttl_ms: i64) -> Result<Option<i64>, CounterError> {
        let clock = self.shift.script_clock();
        let mut call = self.scripts.renew.prepare_invoke();
        RenewKeys::new(&self.space, &lease.key_id).push(&mut call);
        RenewArgs {
            lease_token: &lease.token,
            lease_ttl_ms: ttl_ms,
            time_shift_ms: clock.shift_ms,
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        Ok(RenewReply::parse(self.lanes.invoke("renew", &call).await?)?.expiry())
    }

    /// Sweeps the outage twin (see [`MemoryCounters::sweep`]). Between outages its live
    /// balances are dropped too: they are stale, and they would keep every key that ever
    /// had one in memory.
    pub fn sweep_fallback(&self) {
        if let Some(twin) = &self.fallback {
            if !self.in_outage.load(Ordering::Relaxed) {
                twin.forget_balances();
            }
            twin.sweep();
        }
    }

    /// Redis answers and holds every script.
    pub async fn ready(&self) -> Result<(), CounterError> {
        let mut conn = self.conn().await?;
        let mut exists = redis::cmd("SCRIPT");
        exists.arg("EXISTS");
        for script in self.scripts.all() {
            exists.arg(script.get_hash());
        }
        let loaded: Vec<bool> = exists.query_async(&mut conn).await?;
        if loaded.iter().all(|l| *l) {
            Ok(())
        } else {
            drop(conn);
            self.load_scripts().await
        }
    }
}

/// The pool version an admit call sends: "" when no provider key is wanted.
fn pool_version(pool: Option<&Pool>) -> &str {
    pool.filter(|p| !p.is_empty()).map_or("", |p| p.version())
}

/// The lease meta is `|`-separated inside the script: keep separators out of its fields.
fn sanitize(field: &str) -> std::borrow::Cow<'_, str> {
    if field.contains('|') {
        field.replace('|', "/").into()
    } else {
        field.into()
    }
}

/// Turns one accounting-stream entry back into a usage record; `None` for an entry that
/// is not one (it becomes a dead letter).
///
/// The token classes (`cr` cached, `cw` cache write, `rs` reasoning) and `src` came with
/// a later release: an entry without them (an older release's) has none of the classes
/// and was reported; one with an unreadable value is not a usage record.
pub fn record_from_entry(
    fields: &std::collections::HashMap<String, redis::Value>,
) -> Option<UsageRecord> {
    let text = |name: &str| -> Option<String> {
        fields
            .get(name)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
    };
    let opt = |name: &str| text(name).filter(|s| !s.is_empty());
    let int = |name: &str| opt(name).and_then(|s| s.parse::<i64>().ok());
    let class = |name: &str| match fields.get(name) {
        None => Some(0),
        Some(_) => text(name)?.parse::<i64>().ok().filter(|n| *n >= 0),
    };
    let source = match fields.get("src") {
        None => UsageSource::Reported,
        Some(_) => UsageSource::parse(&text("src")?)?,
    };
    Some(UsageRecord {
        id: opt("id")?,
        key_id: opt("key"),
        provider: opt("provider"),
        model: opt("model"),
        api_format: opt("fmt"),
        provider_key_id: opt("pk"),
        prompt_tokens: int("pt").unwrap_or(0),
        completion_tokens: int("ct").unwrap_or(0),
        cost_micros: int("cost").unwrap_or(0),
        latency_ms: int("lat"),
        upstream_status: int("st"),
        created_at: int("ts")?,
        cached_tokens: class("cr")?,
        cache_write_tokens: class("cw")?,
        reasoning_tokens: class("rs")?,
        source,
    })
}
