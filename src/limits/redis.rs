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
use redis::Script;

use super::breaker::Breaker;
use super::memory::MemoryCounters;
use super::{
    AdmitRequest, CounterError, Decision, Denial, LeaseId, Pick, Report, Reported, SelectRequest,
    TimeShift, Usage, Verdict,
};
use crate::clock::now_ms;
use crate::config::BackendErrorPolicy;
use crate::pool::cache::{Candidate, Pool};
use crate::pool::learned::Learned;
use crate::pool::{Cause, LiveState};
use crate::usage::{UsageRecord, UsageSource};

/// The Lua sources, compiled into the binary.
pub mod source {
    pub const ADMIT: &str = include_str!("../../lua/admit.lua");
    pub const REPORT: &str = include_str!("../../lua/report.lua");
    pub const RENEW: &str = include_str!("../../lua/renew.lua");
    pub const POOL_STATE: &str = include_str!("../../lua/pool_state.lua");
    pub const POOL_SYNC: &str = include_str!("../../lua/pool_sync.lua");
}

/// Every script keyward runs, loaded once.
pub struct Scripts {
    pub admit: Script,
    pub report: Script,
    pub renew: Script,
    pub pool_state: Script,
    pub pool_sync: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            admit: Script::new(source::ADMIT),
            report: Script::new(source::REPORT),
            renew: Script::new(source::RENEW),
            pool_state: Script::new(source::POOL_STATE),
            pool_sync: Script::new(source::POOL_SYNC),
        }
    }

    fn all(&self) -> [&Script; 5] {
        [
            &self.admit,
            &self.report,
            &self.renew,
            &self.pool_state,
            &self.pool_sync,
        ]
    }
}

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
    tag: String,
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
    /// [`RedisCounters::connect_to`] a URL, trusting the system roots for `rediss://`.
    pub async fn connect(url: &str, prefix: &str, guard_ttl_ms: i64) -> Result<Self, CounterError> {
        let target = Target::parse(url).ok_or_else(|| {
            CounterError::Protocol("not a redis:// or redis+cluster:// URL".into())
        })?;
        Self::connect_to(target, prefix, guard_ttl_ms).await
    }

    /// Connects and preloads the scripts.
    pub async fn connect_to(
        target: Target,
        prefix: &str,
        guard_ttl_ms: i64,
    ) -> Result<Self, CounterError> {
        crate::tls::install_provider();
        let counters = Self {
            lanes: Lanes {
                pools: Pools::new(&target, 8)?,
                lanes: (0..LANES).map(|_| Mutex::new(None)).collect(),
                next: AtomicUsize::new(0),
            },
            target,
            tag: format!("{{{prefix}}}"),
            scripts: Scripts::new(),
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
        format!("{}:k:{key_id}:{what}", self.tag)
    }

    fn pk(&self, id: &str, what: &str) -> String {
        format!("{}:pk:{id}:{what}", self.tag)
    }

    /// A pool's definition hash and pick-order sorted set.
    fn pool_keys(&self, provider: &str) -> [String; 2] {
        [
            format!("{}:p:{provider}:def", self.tag),
            format!("{}:p:{provider}:order", self.tag),
        ]
    }

    /// Adds the pool part of an admit call: KEYS 6-7 and ARGV 13-14 (see `lua/admit.lua`);
    /// the hold (ARGV 15) follows.
    fn pool_args(
        &self,
        call: &mut redis::ScriptInvocation<'_>,
        client: bool,
        provider: &str,
        pool: Option<&Pool>,
    ) {
        let [def, order] = self.pool_keys(provider);
        call.key(def).key(order);
        let version = pool.filter(|p| !p.is_empty()).map_or("", |p| p.version());
        call.arg(i64::from(client)).arg(version);
    }

    /// Writes the caller's pool into Redis (`lua/pool_sync.lua`), unless Redis holds one
    /// stamped later ([`CounterError::PoolOutdated`]).
    async fn sync_pool(&self, candidates: &Pool) -> Result<(), CounterError> {
        let Some(first) = candidates.first() else {
            return Ok(());
        };
        let mut priorities: Vec<i64> = candidates.iter().map(|c| c.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let [def, order] = self.pool_keys(&first.provider);
        let mut call = self.scripts.pool_sync.prepare_invoke();
        call.key(def)
            .key(order)
            .arg(candidates.version())
            .arg(candidates.stamp());
        for (index, c) in candidates.iter().enumerate() {
            let rank = priorities.binary_search(&c.priority).unwrap_or_default();
            call.arg(&c.id)
                .arg(c.max_rpm.unwrap_or(0))
                .arg(c.max_tpm.unwrap_or(0))
                .arg(rank)
                .arg(index);
        }
        match self.lanes.invoke::<i64>("pool_sync", &call).await? {
            0 => Ok(()),
            newer => Err(CounterError::PoolOutdated { newer }),
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
        let reply = AdmitReply::parse(self.lanes.invoke(name, call).await?)?;
        let (7, Some(pool)) = (reply.code, pool) else {
            return Ok(reply);
        };
        if reply.a > pool.stamp() {
            return Err(CounterError::PoolOutdated { newer: reply.a });
        }
        self.sync_pool(pool).await?;
        let reply = AdmitReply::parse(self.lanes.invoke(name, call).await?)?;
        if reply.code == 7 {
            return Err(CounterError::Protocol(
                "the pool changed again during its sync".into(),
            ));
        }
        Ok(reply)
    }

    /// The accounting stream.
    pub fn stream_key(&self) -> String {
        format!("{}:usage", self.tag)
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
        let mut call = self.scripts.admit.prepare_invoke();
        call.key(self.key(id, "rpm"))
            .key(self.key(id, "tpm"))
            .key(self.key(id, "leases"))
            .key(self.key(id, "ld"))
            .key(self.key(id, "bal"))
            .arg(r.rpm.unwrap_or(0))
            .arg(r.tpm.unwrap_or(0))
            .arg(r.concurrency.unwrap_or(0))
            .arg(r.tokens)
            .arg(&r.lease.token)
            .arg(r.lease_ttl_ms)
            .arg(meta)
            .arg(i64::from(r.balance.is_some()))
            // Bounded like the twin's live balance: the script's doubles stay exact.
            .arg(crate::money::bounded(balance.credited.into()))
            .arg(crate::money::bounded(balance.used.into()))
            .arg(balance.version)
            .arg(self.shift.get());
        let candidates: &[Candidate] = r.pool.map_or(&[], |p| p);
        let provider = candidates.first().map_or("", |c| c.provider.as_str());
        self.pool_args(&mut call, true, provider, r.pool);
        call.arg(r.hold_micros);
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
            0 => Verdict::Admitted { expires_at_ms: a },
            1 => denied(Denial::Requests, Some(a)),
            2 => denied(Denial::Tokens, Some(a)),
            3 => denied(Denial::Concurrency, Some(a)),
            4 => denied(Denial::BalanceExhausted, None),
            5 => denied(Denial::BalanceCommitted, Some(a)),
            6 => denied(Denial::PoolExhausted, Some(a)),
            other => {
                return Err(CounterError::Protocol(format!(
                    "admit returned code {other}"
                )))
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
        let mut call = self.scripts.admit.prepare_invoke();
        for what in ["rpm", "tpm", "leases", "ld", "bal"] {
            call.key(self.key("-", what));
        }
        call.arg(0)
            .arg(0)
            .arg(0)
            .arg(r.tokens)
            .arg("-")
            .arg(1)
            .arg("||");
        call.arg(0).arg(0).arg(0).arg(0).arg(self.shift.get());
        self.pool_args(&mut call, false, r.provider, Some(r.candidates));
        call.arg(0);
        let reply = self
            .invoke_admit("select", &call, Some(r.candidates))
            .await?;
        let picked = r.candidates.iter().position(|c| c.id == reply.picked);
        match (reply.code, picked) {
            (0, Some(i)) => Ok(Pick::Picked(i)),
            (6, _) => Ok(Pick::Exhausted {
                retry_after_ms: reply.a,
            }),
            _ => Err(CounterError::Protocol(format!(
                "select returned code {}",
                reply.code
            ))),
        }
    }

    pub async fn pool_state(&self, ids: &[String]) -> Result<Vec<LiveState>, CounterError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.pool_state.prepare_invoke();
        for id in ids {
            for what in ["rpm", "tpm", "cd", "susp", "cause"] {
                call.key(self.pk(id, what));
            }
        }
        call.arg(self.shift.get());
        let reply: Vec<redis::Value> = self.lanes.invoke("pool_state", &call).await?;
        let bad = || CounterError::Protocol("pool_state returned an unexpected answer".into());
        if reply.len() != ids.len() * 7 {
            return Err(bad());
        }
        let int = |v: &redis::Value| redis::from_redis_value_ref::<i64>(v).map_err(|_| bad());
        let cause = |v: &redis::Value| {
            redis::from_redis_value_ref::<String>(v)
                .ok()
                .and_then(|text| Cause::decode(&text))
        };
        let learned = |v: &redis::Value| {
            redis::from_redis_value_ref::<String>(v)
                .ok()
                .and_then(|text| Learned::decode(&text))
        };
        reply
            .chunks(7)
            .map(|c| {
                Ok(LiveState {
                    requests_last_60s: int(&c[0])?,
                    tokens_last_60s: int(&c[1])?,
                    cooldown_remaining_ms: int(&c[2])?,
                    suspended_remaining_ms: int(&c[3])?,
                    cooldown_cause: cause(&c[4]),
                    suspension_cause: cause(&c[5]),
                    learned: learned(&c[6]),
                })
            })
            .collect()
    }

    /// Ends a provider key's cooldown and suspension now, here and in the outage twin
    /// (one DEL of keys under the deployment's hash tag, so one slot).
    pub async fn reset_provider_key(&self, provider: &str, id: &str) -> Result<(), CounterError> {
        if let Some(twin) = &self.fallback {
            twin.reset_provider_key(provider, id);
        }
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("DEL")
            .arg(self.pk(id, "cd"))
            .arg(self.pk(id, "susp"))
            .arg(self.pk(id, "cause"))
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
        let mut call = self.scripts.report.prepare_invoke();
        call.key(self.key(key_id, "tpm"))
            .key(self.key(key_id, "leases"))
            .key(self.key(key_id, "ld"))
            .key(self.key(key_id, "bal"))
            .key(format!("{}:done:{}", self.tag, r.id))
            .key(self.stream_key());
        if let Some(pk) = &r.provider_key_id {
            call.key(self.pk(pk, "tpm"))
                .key(self.pk(pk, "cd"))
                .key(self.pk(pk, "susp"))
                .key(self.pk(pk, "cause"));
        }
        call.arg(token)
            .arg(&r.id)
            .arg(key_id)
            .arg(i64::from(r.tokens.is_some()))
            .arg(prompt)
            .arg(completion)
            .arg(r.cost_micros)
            .arg(self.guard_ttl_ms)
            .arg(r.model.as_deref().unwrap_or_default())
            .arg(r.provider_key_id.as_deref().unwrap_or_default())
            .arg(text(r.latency_ms))
            .arg(text(r.upstream_status))
            .arg(self.shift.get())
            .arg(r.cooldown_ms)
            .arg(r.suspend_ms)
            .arg(crate::pool::bounded_source(&r.source))
            .arg(r.lease_expires_at_ms)
            .arg(r.token_classes.cached)
            .arg(r.token_classes.cache_write)
            .arg(r.token_classes.reasoning)
            .arg(r.usage_source.as_str())
            .arg(r.learned_cooldown_ms())
            .arg(r.learned.map(|l| l.encode()).unwrap_or_default())
            .arg(r.learned.map_or(0, |l| l.keep_ms()));
        let reply: Vec<i64> = self.lanes.invoke("report", &call).await?;
        match reply.first() {
            Some(1) => Ok(Reported::Recorded),
            Some(0) => Ok(Reported::Duplicate),
            Some(2) => Ok(Reported::TooLate),
            _ => Err(CounterError::Protocol(
                "report returned an unknown answer".into(),
            )),
        }
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
        let mut call = self.scripts.renew.prepare_invoke();
        call.key(self.key(&lease.key_id, "leases"))
            .key(self.key(&lease.key_id, "ld"))
            .arg(&lease.token)
            .arg(ttl_ms)
            .arg(self.shift.get());
        let expiry: i64 = self.lanes.invoke("renew", &call).await?;
        Ok((expiry > 0).then_some(expiry))
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

/// What `lua/admit.lua` answers.
struct AdmitReply {
    code: i64,
    a: i64,
    /// With `balance_remaining` always set (-1 when the balance is not tracked).
    usage: Usage,
    /// The picked provider key's id, or empty.
    picked: String,
}

impl AdmitReply {
    fn parse(reply: Vec<redis::Value>) -> Result<AdmitReply, CounterError> {
        let bad = || CounterError::Protocol(format!("admit returned {} values", reply.len()));
        let int = |i: usize| -> Result<i64, CounterError> {
            redis::from_redis_value_ref::<i64>(reply.get(i).ok_or_else(bad)?).map_err(|_| bad())
        };
        Ok(AdmitReply {
            code: int(0)?,
            a: int(1)?,
            usage: Usage {
                now_ms: int(2)?,
                requests_used: int(3)?,
                tokens_used: int(4)?,
                requests_reset_ms: int(5)?,
                tokens_reset_ms: int(6)?,
                in_flight: int(7)?,
                balance_remaining: Some(int(8)?),
            },
            picked: reply
                .get(9)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_default(),
        })
    }
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
