//! The distributed counter store: one Lua script per operation, EVALSHA through a
//! deadpool-redis pool.
//!
//! Key layout (`scripts::KeySpace`): a tenant's keys (a key's user, else the key) under
//! its shard's hash tag `{S}` = `{P:<i>.<j>}`, a provider's pool under `{Q}` =
//! `{P:p:<provider>}`, the deployment's own under `{P}`. Every script touches one tag, so
//! one Redis Cluster slot; an admission with a pick runs two scripts at once (`split`),
//! and so does a report naming a provider key (`calls`).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{S}:k:<key id>:rpm` | hash | both windows: second → requests, `t<second>` → tokens (61 buckets each at most) |
//! | `{S}:k:<key id>:leases` | zset | lease token → expiry ms (a light admission's lease under a concurrency limit, else once renewed) |
//! | `{S}:k:<key id>:ld` / `:lx` | hash | lease token → reservation data for the report (`lx`: of purged leases; none for a light lease, whose signed id carries it) |
//! | `{S}:k:<key id>:bal` | hash | live balance (no expiry: it is ahead of the database) |
//! | `{S}:done:<lease id>` | string | duplicate guard of a report (or of a cancel) |
//! | `{S}:usage` | stream | the shard's accounting queue |
//! | `{S}:q:<counter>:rm` / `:tm` | hash | a quota scope's per-minute windows |
//! | `{S}:q:<counter>:rd:<day>` / `:td:<day>` | string | its requests / tokens of a UTC day (expire a day after it) |
//! | `{S}:q:<counter>:s<d\|w\|m\|t>:<start day>` | hash | `spent`, `held` micro-USD of a spend period (a total never expires) |
//! | `{S}:q:<counter>:s<d\|w\|m\|t>:<start day>:hx` | zset | that period's holds in flight: `<lease token>:<hold>` → the lease's expiry ms (`held` is their sum; expires with the hash) |
//! | `{Q}:def` | hash | the pool's version and each key's limits |
//! | `{Q}:order` | zset | key id → priority rank · 2^42 + last pick |
//! | `{Q}:pk:<id>:rpm` / `:tpm` | hash | a provider key's windows |
//! | `{Q}:pk:<id>:cd` / `:susp` | string | when its cooldown / suspension ends (ms) |
//! | `{Q}:pk:<id>:cause` | hash | `cd` / `susp` → the report behind them (`status\|at\|source`); `lim` → what the rate-limit headers said last |
//! | `{Q}:unpick:<lease token>` | string | a given-back pick's guard (2 minutes) |
//! | `{Q}:prep:<lease token>` | string | a lease's report's provider-key part ran (`lua/pool_report.lua`; until the duplicate-guard time after the lease's signed expiry) |
//! | `{P}:layout` | string | `shards=S`, re-asserted (SET NX) every few seconds; another count refuses a start, or makes a running replica not ready |
//! | `{P}:usage` | stream | the one-tag layout's queue of the release before (drained) |
//! | `{P}:streams` | set | every shard layout's stream names, added at start-up; a drained one of another layout is removed |
//!
//! Scripts are preloaded at start (`SCRIPT LOAD`); when Redis has lost them (restart,
//! `SCRIPT FLUSH`), `redis::Script` sees NOSCRIPT, loads, and retries once.
//!
//! Outages (`policy`): a breaker skips Redis for a moment after consecutive connection
//! failures, and `KEYWARD_ON_BACKEND_ERROR` decides what happens meanwhile: `deny`
//! answers 503; `allow` admits without counting; `local` decides with an in-process
//! twin ([`MemoryCounters`]), per replica and so only approximately. In `allow` and
//! `local`, reports go through the twin's queue straight to the database (applied once
//! by lease id, like any report); in `deny` they are refused and the caller retries.
//! The twin is swept periodically; its live balances are forgotten at the start of each
//! outage (and between outages), so an outage starts from the database's balances.
//!
//! Connections (`lanes`): deadpool-redis health-checks every checkout with a PING round
//! trip, so checking a connection out per decision would cost two round trips. Instead
//! the hot path runs on a few multiplexed connections ("lanes") taken from the pool once and
//! shared by every request: one round trip per decision, and concurrent scripts are
//! pipelined on the same socket. A lane that fails with a connection error is replaced
//! through the pool (which checks the new one).

mod calls;
mod lanes;
mod policy;
mod quota_read;
mod split;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lanes::{Lanes, LANES};
use policy::Degraded;

use super::breaker::Breaker;
use super::conn::{Conn, Connector, Target};
use super::memory::MemoryCounters;
use super::scripts::{KeySpace, Scripts, DEFAULT_SHARDS};
use super::{
    AdmitRequest, CounterError, Decision, LeaseId, Pick, Report, Reported, SelectRequest, Tenant,
    TimeShift, Usage, Verdict,
};
use crate::clock::now_ms;
use crate::limits::BackendErrorPolicy;
use crate::pool::LiveState;

/// How often a running replica re-asserts its shard count in Redis.
const LAYOUT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

pub struct RedisCounters {
    target: Target,
    lanes: Arc<Lanes>,
    space: KeySpace,
    scripts: Arc<Scripts>,
    /// Compensations (`split`) still running.
    pending: Arc<tokio::sync::watch::Sender<usize>>,
    guard_ttl_ms: i64,
    pub(crate) shift: TimeShift,
    breaker: Breaker,
    policy: BackendErrorPolicy,
    /// The in-process twin used while Redis fails (`allow` and `local`).
    fallback: Option<Arc<MemoryCounters>>,
    /// Set by the first degraded answer of an outage, cleared by Redis answering again.
    in_outage: AtomicBool,
    /// Redis holds another shard count than this replica's (see [`Self::check_layout`]).
    layout_mismatch: AtomicBool,
}

impl RedisCounters {
    /// The scripts' clock (tests move it; see [`TimeShift`]).
    pub fn time_shift(&self) -> &TimeShift {
        &self.shift
    }

    /// Connects, preloads the scripts and makes sure the accounting stream's consumer
    /// group exists.
    pub async fn connect(url: &str, prefix: &str, guard_ttl_ms: i64) -> Result<Self, CounterError> {
        let target = Target::parse(url).ok_or_else(|| {
            CounterError::Protocol("not a redis:// or redis+cluster:// URL".into())
        })?;
        Self::connect_to(target, prefix, guard_ttl_ms).await
    }

    /// Connects and preloads the scripts; `target` carries the TLS roots.
    pub async fn connect_to(
        target: Target,
        prefix: &str,
        guard_ttl_ms: i64,
    ) -> Result<Self, CounterError> {
        crate::tls::install_provider();
        let counters = Self {
            lanes: Arc::new(Lanes {
                connector: Connector::new(&target, 8)?,
                lanes: (0..LANES).map(|_| Mutex::new(None)).collect(),
                next: AtomicUsize::new(0),
            }),
            target,
            space: KeySpace::new(prefix, DEFAULT_SHARDS),
            scripts: Arc::new(Scripts::default()),
            pending: Arc::new(tokio::sync::watch::channel(0).0),
            guard_ttl_ms,
            shift: TimeShift::default(),
            breaker: Breaker::default(),
            policy: BackendErrorPolicy::Deny,
            fallback: None,
            in_outage: AtomicBool::new(false),
            layout_mismatch: AtomicBool::new(false),
        };
        counters.load_scripts().await?;
        Ok(counters)
    }

    /// Spreads the tenants over `shards` hash tags (`KEYWARD_REDIS_SHARDS`; the default
    /// is [`DEFAULT_SHARDS`]).
    pub fn with_shards(mut self, shards: u16) -> Self {
        self.space = KeySpace::new(self.space.prefix(), shards);
        self
    }

    /// Records the shard count in Redis (`{prefix}:layout` = `shards=S`, SET NX) and
    /// refuses (an error naming `KEYWARD_REDIS_SHARDS`) when Redis holds another: replicas
    /// with different counts would count one tenant in two places. Run at start-up and
    /// then every few seconds (the key goes with Redis's data; `app` re-asserts it).
    pub async fn check_layout(&self) -> Result<(), CounterError> {
        let want = format!("shards={}", self.space.shard_count());
        let wanted = &want;
        let held: Option<String> = self
            .on_lane(|mut conn| async move {
                let _: Option<String> = redis::cmd("SET")
                    .arg(self.space.layout())
                    .arg(wanted)
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?;
                Ok(redis::cmd("GET")
                    .arg(self.space.layout())
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        let mismatch = held.as_ref().is_some_and(|held| *held != want);
        self.layout_mismatch.store(mismatch, Ordering::Relaxed);
        match held {
            Some(held) if held != want => Err(CounterError::Layout(format!(
                "KEYWARD_REDIS_SHARDS is {} but Redis holds counters laid out with {held} under {} (set the same value on every replica; to change the count, see \"Spreading over a Redis Cluster\" in docs/operations.md: stop every replica, then delete that key)",
                self.space.shard_count(),
                self.space.layout()
            ))),
            _ => Ok(()),
        }
    }

    /// Re-asserts `{prefix}:layout` every [`LAYOUT_EVERY`] (a job `app` runs): the key goes
    /// with Redis's data, and a replica started after that with another
    /// `KEYWARD_REDIS_SHARDS` would otherwise start fine and count each tenant in a second
    /// place. On a mismatch, an error line each time and `/readyz` not ready
    /// (`check_layout` sets the flag), until it matches again.
    pub async fn guard_layout(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(LAYOUT_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.check_layout().await {
                Ok(()) => {}
                Err(CounterError::Layout(why)) => {
                    tracing::error!("{why}; this replica reports not ready until it matches");
                }
                // Redis unreachable: the readiness check and the counters say so.
                Err(e) => tracing::debug!(error = %e, "checking the shard layout failed"),
            }
        }
    }

    /// The last [`check_layout`](Self::check_layout) found another shard count in Redis
    /// (`/readyz` answers not ready until it matches again).
    pub fn layout_mismatch(&self) -> bool {
        self.layout_mismatch.load(Ordering::Relaxed)
    }

    /// The shard a tenant's counters live on.
    pub fn shard_of(&self, tenant: Tenant<'_>) -> u16 {
        self.space.shard_of(tenant)
    }

    /// The names of this deployment's keys.
    pub fn space(&self) -> &KeySpace {
        &self.space
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

    pub async fn admit(&self, r: &AdmitRequest<'_>) -> Result<Decision, CounterError> {
        self.or_degraded(self.admit_redis(r), |mode, twin| async move {
            Ok(match mode {
                Degraded::Local => {
                    let decision = twin.admit(r);
                    Decision {
                        degraded: Some(mode.as_str()),
                        // The twin's pick took nothing in Redis: its report settles
                        // nothing there.
                        taken: None,
                        // Nor did its tokens: its report may reach Redis once it is
                        // back, and must not take them out of Redis's window (the twin
                        // then keeps the reservation, not the real count, until its
                        // second leaves).
                        light: decision
                            .light
                            .map(|light| crate::limits::LightLease { kt: None, ..light }),
                        ..decision
                    }
                }
                Degraded::Allow => {
                    let now = now_ms();
                    Decision {
                        verdict: Verdict::Admitted {
                            expires_at_ms: now + r.lease_ttl_ms,
                        },
                        usage: Usage {
                            now_ms: now,
                            ..Usage::default()
                        },
                        // Without counters the pool order is all there is: the first by
                        // priority.
                        picked: r.pool.filter(|c| !c.is_empty()).map(|_| 0),
                        taken: None,
                        degraded: Some(mode.as_str()),
                        quotas: vec![super::QuotaUse::default(); r.quotas.len()],
                        light: None,
                    }
                }
            })
        })
        .await
    }

    pub async fn load_scripts(&self) -> Result<(), CounterError> {
        let mut conn = self.lanes.connector.take().await?;
        for script in self.scripts.all() {
            script.prepare_invoke().load_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Where Redis is (for dedicated connections: the stream consumer, pub/sub).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A shared connection (one of the hot path's lanes), for start-up and tests: a
    /// failure on it is not seen by its lane, so anything that runs again and again
    /// goes through [`on_lane`](Self::on_lane).
    pub async fn conn(&self) -> Result<Conn, CounterError> {
        Ok(self.lanes.get().await?.1)
    }

    /// Runs `f` on one of the hot path's lanes, for the commands that are not the hot
    /// path's scripts (the readiness check, the layout guard, a publish). A lane's socket
    /// dies with a Redis restart and stays dead until something says so: a connection
    /// that broke is forgotten and `f` runs again on the next lane, opened fresh if need
    /// be, so a socket that died before Redis came back never reads as Redis being down.
    /// `f` must be safe to run twice (these commands are).
    pub async fn on_lane<T, F, Fut>(&self, f: F) -> Result<T, CounterError>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, CounterError>>,
    {
        let mut tries = LANES + 1;
        loop {
            let (i, conn) = self.lanes.get().await?;
            let result = f(conn.clone()).await;
            tries -= 1;
            match &result {
                Err(CounterError::Redis(e)) if self.lanes.broken(i, &conn, e) && tries > 0 => {}
                _ => return result,
            }
        }
    }

    /// The Redis key of a client key's `rpm`, `tpm`, `leases`, `ld` or `bal`, for a key
    /// without a user (its own shard).
    pub fn key(&self, key_id: &str, what: &str) -> String {
        let shard = self.space.shard_of(Tenant::Key(key_id));
        self.space.client(shard, key_id, what)
    }

    /// The accounting stream a report of a key without a user goes to (its shard's).
    pub fn stream_key_for(&self, key_id: &str) -> String {
        self.space.usage(self.space.shard_of(Tenant::Key(key_id)))
    }

    /// The accounting streams: every shard's, then the one-tag layout's (read until it
    /// is drained).
    pub fn stream_keys(&self) -> Vec<String> {
        self.space.usage_streams()
    }

    /// The registry of every layout's shard streams (`accounting::registry`):
    /// `{prefix}:streams`, a set under the prefix's own tag.
    pub fn stream_registry(&self) -> String {
        format!("{}:streams", self.space.legacy_tag())
    }

    pub async fn select(&self, r: &SelectRequest<'_>) -> Result<Pick, CounterError> {
        self.or_degraded(self.select_redis(r), |mode, twin| async move {
            Ok(match mode {
                Degraded::Local => twin.select(r),
                Degraded::Allow => Pick::Picked(0),
            })
        })
        .await
    }

    /// The live state of provider keys (no fallback: the admin API reports the error).
    pub async fn pool_state(
        &self,
        provider: &str,
        ids: &[String],
    ) -> Result<Vec<LiveState>, CounterError> {
        self.pool_state_redis(provider, ids).await
    }

    /// Ends a provider key's cooldown and suspension now, here and in the outage twin
    /// (one DEL of keys under the pool's hash tag, so one slot).
    pub async fn reset_provider_key(&self, provider: &str, id: &str) -> Result<(), CounterError> {
        if let Some(twin) = &self.fallback {
            twin.reset_provider_key(provider, id);
        }
        self.on_lane(|mut conn| async move {
            let _: i64 = redis::cmd("DEL")
                .arg(self.space.provider_key(provider, id, "cd"))
                .arg(self.space.provider_key(provider, id, "susp"))
                .arg(self.space.provider_key(provider, id, "cause"))
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    pub async fn report(&self, r: &Report) -> Result<Reported, CounterError> {
        // Either way, straight to the database through the twin's queue (applied once by
        // lease id).
        self.or_degraded(self.report_redis(r), |_, twin| async move {
            twin.report(r).await
        })
        .await
    }

    pub async fn renew(&self, lease: &LeaseId, ttl_ms: i64) -> Result<Option<i64>, CounterError> {
        self.or_degraded(self.renew_redis(lease, ttl_ms), |mode, twin| async move {
            Ok(match mode {
                Degraded::Local => twin.renew(lease, ttl_ms),
                Degraded::Allow => Some(now_ms() + ttl_ms),
            })
        })
        .await
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

    /// Redis answers and holds every script; on a cluster, every master answers.
    pub async fn ready(&self) -> Result<(), CounterError> {
        let mut exists = redis::cmd("SCRIPT");
        exists.arg("EXISTS");
        for script in self.scripts.all() {
            exists.arg(script.get_hash());
        }
        let exists = &exists;
        let loaded: Vec<bool> = self
            .on_lane(|mut conn| async move {
                let loaded = exists.query_async(&mut conn).await?;
                self.target.masters_answer(&mut conn).await?;
                Ok(loaded)
            })
            .await?;
        if !loaded.iter().all(|l| *l) {
            self.load_scripts().await?;
        }
        self.answered();
        Ok(())
    }
}
