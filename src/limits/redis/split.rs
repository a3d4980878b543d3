//! An admission with selection on two slots: the client's part (`lua/admit.lua` or
//! `lua/admit_window.lua`, on the tenant's shard) and the pool's (`lua/pick.lua`, on the
//! pool's tag) run at once, so the decision stays one round trip of latency while the
//! two usually live on two masters.
//!
//! Each part is atomic on its own; together they are not. When one side takes and the
//! other refuses (or fails), the side that took is given back by a compensating call
//! run in a spawned task (the refusal is answered at once): `lua/unpick.lua` for a pick,
//! report.lua's cancel mode for a client admission, each once per lease. So nothing is
//! ever over-admitted, and a refusal may hold the other side's unit only until its
//! compensation lands (normally one round trip later). If the compensation is lost
//! (Redis fails meanwhile, the process dies), what it kept is bounded: a client's slot
//! and holds until the lease's expiry, its request and tokens (and a pick's) until
//! their second leaves the window (at most 61 s).

use std::sync::Arc;

use super::lanes::Lanes;
use super::RedisCounters;
use crate::limits::scripts::admit::{AdmitCode, AdmitReply};
use crate::limits::scripts::pick::{PickArgs, PickCode, PickKeys, PickReply};
use crate::limits::scripts::report::{light_arg, request_entries, ReportArgs, ReportKeys};
use crate::limits::scripts::unpick::{self, UnpickArgs, UnpickKeys};
use crate::limits::scripts::{ScriptClock, Scripts};
use crate::limits::{
    effective_limit, AdmitRequest, CounterError, Decision, Denial, QuotaKind, Verdict,
};
use crate::pool::cache::Roster;

/// What one side took and must give back.
enum GiveBack {
    /// A pick: `lua/unpick.lua`.
    Pick { keys: UnpickKeys, reply: PickReply },
    /// A client admission: report.lua in cancel mode.
    Client {
        keys: ReportKeys,
        record_id: String,
        token: String,
        key_id: String,
        expiry: i64,
        requests: bool,
        /// The admission's rm and rd entries: (base name, kind).
        quotas: Vec<(String, &'static str)>,
        /// A light admission's data (report.lua's ARGV `light`), else "".
        light: String,
    },
}

impl RedisCounters {
    /// Runs `lua/pick.lua` for `pool`. When Redis holds another version of the pool (an
    /// admin change, or its first use), syncs it and picks once more: the one case where
    /// a pick takes more than one round trip. When the pool in Redis is stamped later than
    /// the caller's, nothing is written: the caller's pool is outdated
    /// ([`CounterError::PoolOutdated`]), and it reloads it.
    pub(super) async fn pick(&self, pool: &Roster, tokens: i64) -> Result<PickReply, CounterError> {
        let reply = self.pick_once(pool, tokens).await?;
        if reply.code != PickCode::PoolVersion {
            return Ok(reply);
        }
        self.resync(pool, reply.a).await?;
        let reply = self.pick_once(pool, tokens).await?;
        if reply.code == PickCode::PoolVersion {
            return Err(CounterError::Protocol(
                "the pool changed again during its sync".into(),
            ));
        }
        Ok(reply)
    }

    /// Writes the caller's pool when Redis holds another version stamped `held`.
    async fn resync(&self, pool: &Roster, held: i64) -> Result<(), CounterError> {
        if held > pool.stamp() {
            return Err(CounterError::PoolOutdated { newer: held });
        }
        self.sync_pool(pool).await
    }

    async fn pick_once(&self, pool: &Roster, tokens: i64) -> Result<PickReply, CounterError> {
        let provider = pool.first().map_or("", |c| c.provider.as_str());
        let clock = self.shift.script_clock();
        let mut call = self.scripts.pick.prepare_invoke();
        PickKeys::new(&self.space, provider).push(&mut call);
        PickArgs {
            tokens,
            pool_version: pool.version(),
            time_shift_ms: clock.shift_ms,
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        PickReply::parse(
            &self
                .lanes
                .invoke::<Vec<redis::Value>>("pick", &call)
                .await?,
        )
    }

    /// The client's `call` (built by `admit_redis`) and the pick, at once; then the
    /// decision, giving back what one side took when the other refused or failed.
    pub(super) async fn admit_with_pick(
        &self,
        r: &AdmitRequest<'_>,
        shard: u16,
        pool: &Roster,
        call: &crate::limits::scripts::call::Call<'_>,
    ) -> Result<Decision, CounterError> {
        let (client, pick) = tokio::join!(self.invoke_client(call), self.pick_once(pool, r.tokens));
        let provider = pool.first().map_or("", |c| c.provider.as_str());
        let took_pick = |p: &PickReply| p.code == PickCode::Picked;
        let (client, mut pick) = match (client, pick) {
            (Ok(c), Ok(p)) => (c, p),
            (Err(e), Ok(p)) => {
                if took_pick(&p) {
                    self.give_back(self.unpick_of(provider, r, p));
                }
                return Err(e);
            }
            (Ok(c), Err(e)) => {
                if c.code == AdmitCode::Admitted {
                    self.give_back(self.cancel_of(r, shard, &c));
                }
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
        };
        let admitted = client.code == AdmitCode::Admitted;
        if pick.code == PickCode::PoolVersion {
            // Rare (an admin change, or the pool's first use): the client's units stay
            // taken while the pool is synced and picked from again.
            let again = async {
                self.resync(pool, pick.a).await?;
                let p = self.pick_once(pool, r.tokens).await?;
                match p.code {
                    PickCode::PoolVersion => Err(CounterError::Protocol(
                        "the pool changed again during its sync".into(),
                    )),
                    _ => Ok(p),
                }
            };
            match again.await {
                Ok(p) => pick = p,
                Err(e) => {
                    if admitted {
                        self.give_back(self.cancel_of(r, shard, &client));
                    }
                    return Err(e);
                }
            }
        }
        match (admitted, took_pick(&pick)) {
            (true, true) => {
                let Some(i) = pool.iter().position(|c| c.id == pick.picked) else {
                    // Not a candidate of the caller's version: cannot happen after the
                    // version check; give both back rather than serve an unknown key.
                    self.give_back(self.cancel_of(r, shard, &client));
                    self.give_back(self.unpick_of(provider, r, pick));
                    return Err(CounterError::Protocol("pick named no candidate".into()));
                };
                let mut decision = super::calls::client_decision(r, client)?;
                decision.picked = Some(i);
                decision.taken = Some(pick.taken);
                Ok(decision)
            }
            (false, true) => {
                self.give_back(self.unpick_of(provider, r, pick));
                super::calls::client_decision(r, client)
            }
            (true, false) => {
                self.give_back(self.cancel_of(r, shard, &client));
                let mut decision = super::calls::client_decision(r, client)?;
                before_take(r, &mut decision);
                decision.light = None;
                decision.verdict = Verdict::Denied {
                    reason: Denial::PoolExhausted,
                    retry_after_ms: Some(pick.a),
                };
                Ok(decision)
            }
            (false, false) => super::calls::client_decision(r, client),
        }
    }

    fn unpick_of(&self, provider: &str, r: &AdmitRequest<'_>, reply: PickReply) -> GiveBack {
        GiveBack::Pick {
            keys: UnpickKeys::new(&self.space, provider, &reply.picked, &r.lease.token),
            reply,
        }
    }

    fn cancel_of(&self, r: &AdmitRequest<'_>, shard: u16, client: &AdmitReply) -> GiveBack {
        let record_id = r.lease.to_string();
        GiveBack::Client {
            keys: ReportKeys::new(&self.space, shard, &r.lease.key_id, &record_id),
            record_id,
            token: r.lease.token.clone(),
            key_id: r.lease.key_id.clone(),
            expiry: client.a,
            requests: effective_limit(r.rpm).is_some(),
            quotas: request_entries(&self.space, shard, r.quotas)
                .into_iter()
                .map(|(k, a)| (k.quota, a.kind))
                .collect(),
            light: light_arg(
                super::calls::light_of(r, client.code, client.a, client.usage.now_ms).as_ref(),
            ),
        }
    }

    /// Gives `what` back in a spawned task (the caller answers at once); counted in
    /// `keyward_compensations_total` and in [`Self::settled`].
    fn give_back(&self, what: GiveBack) {
        let lanes = self.lanes.clone();
        let scripts = self.scripts.clone();
        let clock = self.shift.script_clock();
        let guard_ttl_ms = self.guard_ttl_ms;
        let pending = self.pending.clone();
        pending.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            let side = match &what {
                GiveBack::Pick { .. } => "pick",
                GiveBack::Client { .. } => "client",
            };
            let outcome = match run(&lanes, &scripts, clock, guard_ttl_ms, &what).await {
                Ok(true) => "returned",
                Ok(false) => "duplicate",
                Err(e) => {
                    tracing::warn!(error = %e, side, "could not give back what one side of an admission took; it is held until the lease expires or its window passes");
                    "failed"
                }
            };
            crate::metrics::get()
                .compensations
                .with_label_values(&[side, outcome])
                .inc();
            pending.send_modify(|n| *n -= 1);
        });
    }

    /// Waits until every compensation this store started has run (tests: a step after a
    /// refusal sees its units given back).
    pub async fn settled(&self) {
        let mut watch = self.pending.subscribe();
        let _ = watch.wait_for(|n| *n == 0).await;
    }
}

/// Runs one compensation: `true` when it gave something back, `false` for a repeat.
async fn run(
    lanes: &Arc<Lanes>,
    scripts: &Arc<Scripts>,
    clock: ScriptClock,
    guard_ttl_ms: i64,
    what: &GiveBack,
) -> Result<bool, CounterError> {
    match what {
        GiveBack::Pick { keys, reply } => {
            let mut call = scripts.unpick.prepare_invoke();
            keys.push(&mut call);
            UnpickArgs {
                picked: &reply.picked,
                second: reply.taken.second,
                requests: reply.requests,
                tokens: reply.taken.tokens,
                previous: &reply.previous,
                score: &reply.score,
                time_shift_ms: clock.shift_ms,
                now_ms: clock.pinned_ms,
            }
            .push(&mut call);
            unpick::parse(&lanes.invoke::<Vec<redis::Value>>("unpick", &call).await?)
        }
        GiveBack::Client {
            keys,
            record_id,
            token,
            key_id,
            expiry,
            requests,
            quotas,
            light,
        } => {
            let mut call = scripts.report.prepare_invoke();
            keys.push(&mut call);
            for (base, _) in quotas {
                call.key(base);
            }
            ReportArgs {
                lease_token: token,
                record_id,
                key_id,
                has_tokens: true,
                prompt: 0,
                completion: 0,
                cost: 0,
                guard_ttl_ms,
                model: "",
                provider_key: "",
                latency_ms: String::new(),
                status: String::new(),
                time_shift_ms: clock.shift_ms,
                lease_expiry: *expiry,
                cached: 0,
                cache_write: 0,
                reasoning: 0,
                usage_source: "reported",
                now_ms: clock.pinned_ms,
                cancel: true,
                requests: *requests,
                light: light.clone(),
            }
            .push(&mut call);
            for (_, kind) in quotas {
                call.arg(*kind);
            }
            let reply = lanes.invoke::<Vec<redis::Value>>("cancel", &call).await?;
            Ok(crate::limits::scripts::report::ReportCode::parse(&reply)?
                == crate::limits::scripts::report::ReportCode::Recorded)
        }
    }
}

/// The figures of an admitted client decision as they were before its take, for an
/// answer that refuses it after all (the pool was exhausted): what the one-step decision
/// (and the in-process twin) answers then (its windows' resets as
/// [`crate::limits::pool_refusal_resets`] gives them).
fn before_take(r: &AdmitRequest<'_>, d: &mut Decision) {
    let u = &mut d.usage;
    if effective_limit(r.rpm).is_some() {
        u.requests_used -= 1;
    }
    if effective_limit(r.tpm).is_some() && r.tokens > 0 {
        u.tokens_used -= r.tokens;
    }
    // (A light admission without a concurrency limit took no slot: in_flight is 0.)
    if d.light.is_none() || effective_limit(r.concurrency).is_some() {
        u.in_flight -= 1;
    }
    for (entry, q) in r.quotas.iter().zip(d.quotas.iter_mut()) {
        match entry.kind {
            QuotaKind::RequestsPerMinute => q.used -= 1,
            QuotaKind::TokensPerMinute => q.used -= r.tokens,
            QuotaKind::RequestsPerDay => q.used -= 1,
            QuotaKind::TokensPerDay => q.used -= r.tokens,
            QuotaKind::Spend(_) => q.used -= r.hold_micros,
        }
    }
    crate::limits::pool_refusal_resets(r, d);
}
