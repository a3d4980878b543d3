//! Each operation as its script call, built from the typed contracts in
//! `limits::scripts` (one round trip; two when the pool in Redis needs a sync). An
//! admission with selection is two scripts at once, on two slots: `split`; so is a
//! report naming a provider key (`report_redis`).

use super::RedisCounters;
use crate::limits::scripts::admit::{
    push_quota_args, push_quota_keys, AdmitArgs, AdmitCode, AdmitKeys, AdmitReply,
};
use crate::limits::scripts::admit_window::{AdmitWindowArgs, AdmitWindowKeys};
use crate::limits::scripts::call::Call;
use crate::limits::scripts::limit_arg;
use crate::limits::scripts::pick::PickCode;
use crate::limits::scripts::pool_report::{self, PoolReportArgs, PoolReportCode, PoolReportKeys};
use crate::limits::scripts::pool_state::{PoolStateArgs, PoolStateKeys};
use crate::limits::scripts::pool_sync::{PoolSyncArgs, PoolSyncKey, PoolSyncKeys, PoolSyncReply};
use crate::limits::scripts::renew::{RenewArgs, RenewKeys, RenewReply};
use crate::limits::scripts::report::{
    light_arg, spend_entries, ReportArgs, ReportCode, ReportKeys,
};
use crate::limits::{
    AdmitRequest, CounterError, Decision, Denial, LeaseId, LightLease, Pick, Report, Reported,
    SelectRequest, Verdict,
};
use crate::pool::cache::Roster;
use crate::pool::LiveState;

impl RedisCounters {
    /// Writes the caller's pool into Redis (`lua/pool_sync.lua`), unless Redis holds one
    /// stamped later ([`CounterError::PoolOutdated`]).
    pub(super) async fn sync_pool(&self, candidates: &Roster) -> Result<(), CounterError> {
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

    pub(super) async fn admit_redis(&self, r: &AdmitRequest<'_>) -> Result<Decision, CounterError> {
        let shard = self.space.shard_of_lease(r.lease);
        let clock = self.shift.script_clock();
        // Light (no lease record, see `AdmitRequest::light_meta`) or not: both stores
        // decide alike. A light key without quota entries (the common key: windows and a
        // concurrency limit) takes `lua/admit_window.lua`: eight arguments, no quota,
        // balance or lease record code.
        let light = r.light_meta();
        let mut call;
        if light.is_some() && r.quotas.is_empty() {
            call = Call::new(&self.scripts.admit_window);
            AdmitWindowKeys::new(&self.space, shard, &r.lease.key_id).push(&mut call);
            AdmitWindowArgs {
                rpm_limit: limit_arg(r.rpm),
                tpm_limit: limit_arg(r.tpm),
                tokens: r.tokens,
                lease_ttl_ms: r.lease_ttl_ms,
                time_shift_ms: clock.shift_ms,
                now_ms: clock.pinned_ms,
                concurrency_limit: limit_arg(r.concurrency),
                lease_token: &r.lease.token,
            }
            .push(&mut call);
        } else {
            let light_arg = light.is_some();
            let balance = r.balance.unwrap_or(crate::limits::BalanceSnapshot {
                credited: 0,
                used: 0,
                version: 0,
            });
            let meta = light
                .unwrap_or_else(|| crate::limits::lease_meta(r.provider, r.model, r.api_format));
            // The client's part only (no pool version): every key on the tenant's shard.
            // The pool's part, when one is wanted, is `lua/pick.lua` on the pool's tag
            // (`split`).
            call = Call::new(&self.scripts.admit);
            AdmitKeys::new(&self.space, shard, &r.lease.key_id).push(&mut call);
            push_quota_keys(&self.space, shard, r.quotas, &mut call);
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
                hold: r.hold_micros,
                now_ms: clock.pinned_ms,
                guard_ttl_ms: self.guard_ttl_ms,
                light: light_arg,
            }
            .push(&mut call);
            push_quota_args(r.quotas, &mut call);
        }
        match r.pool.filter(|p| !p.is_empty()) {
            // Boxed, as the lane's connect below: the two calls at once are a large
            // future, and inline they made every admission's future as large (14 KB,
            // copied whole at each move, with selection or not).
            Some(pool) => Box::pin(self.admit_with_pick(r, shard, pool, &call)).await,
            None => {
                let reply = self.invoke_client(&call).await?;
                client_decision(r, reply)
            }
        }
    }

    /// Runs the client's admit call (`lua/admit.lua` or `lua/admit_window.lua`, each
    /// measured under its own name) and checks its answer.
    pub(super) async fn invoke_client(&self, call: &Call<'_>) -> Result<AdmitReply, CounterError> {
        let name = if std::ptr::eq(call.script(), &self.scripts.admit_window) {
            "admit_window"
        } else {
            "admit"
        };
        let reply = self.lanes.call::<Vec<redis::Value>>(name, call).await?;
        AdmitReply::parse(&reply)
    }

    pub(super) async fn select_redis(&self, r: &SelectRequest<'_>) -> Result<Pick, CounterError> {
        // The pool's part alone.
        let reply = self.pick(r.candidates, r.tokens).await?;
        let picked = r.candidates.iter().position(|c| c.id == reply.picked);
        match (reply.code, picked) {
            (PickCode::Picked, Some(i)) => Ok(Pick::Picked(i)),
            (PickCode::PoolExhausted, _) => Ok(Pick::Exhausted {
                retry_after_ms: reply.a,
            }),
            (code, _) => Err(CounterError::Protocol(format!(
                "pick returned {code:?} (picked {:?})",
                reply.picked
            ))),
        }
    }

    /// A report: the client's part (`lua/report.lua`, on the lease's tenant shard) and,
    /// when it names a provider key, that key's part (`lua/pool_report.lua`, on the
    /// pool's tag) at once, so one round trip of latency. The pool's part keeps its own
    /// once-per-lease guard and refuses what report.lua refuses as too late, so it needs
    /// not wait for the client's answer (the orders are in the script's contract).
    pub(super) async fn report_redis(&self, r: &Report) -> Result<Reported, CounterError> {
        let (token, key_id) = r
            .lease
            .as_ref()
            .map_or(("", ""), |l| (l.token.as_str(), l.key_id.as_str()));
        // A report without a lease records only: any shard takes it, spread by its id.
        let shard = r.lease.as_ref().map_or_else(
            || self.space.shard_of(crate::limits::Tenant::Key(&r.id)),
            |l| self.space.shard_of_lease(l),
        );
        let (prompt, completion) = r.tokens.unwrap_or((0, 0));
        let text = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        let clock = self.shift.script_clock();
        let mut call = Call::new(&self.scripts.report);
        ReportKeys::new(&self.space, shard, key_id, &r.id).push(&mut call);
        let spends = spend_entries(&self.space, shard, &r.spend_now);
        for (key, _) in &spends {
            key.push(&mut call);
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
            lease_expiry: r.lease_expires_at_ms,
            cached: r.token_classes.cached,
            cache_write: r.token_classes.cache_write,
            reasoning: r.token_classes.reasoning,
            usage_source: r.usage_source.as_str(),
            now_ms: clock.pinned_ms,
            cancel: false,
            requests: false,
            light: light_arg(r.lease.as_ref().and_then(|l| l.light.as_ref())),
        }
        .push(&mut call);
        for (_, args) in &spends {
            args.push(&mut call);
        }
        let client = async {
            let reply: Vec<redis::Value> = self.lanes.call("report", &call).await?;
            Ok::<_, CounterError>(ReportCode::parse(&reply)?.into())
        };
        let reported = match self.pool_report_call(r) {
            // Without a lease the pool's part has no guard of its own: it follows a
            // recorded report only (a named report's repeat must cool nothing down again).
            Some(pool) if r.lease.is_none() => {
                let reported = client.await?;
                if reported == Reported::Recorded {
                    let pooled = self.lanes.call("pool_report", &pool).await;
                    if let Err(e) =
                        pooled.and_then(|reply: Vec<redis::Value>| pool_report::parse(&reply))
                    {
                        let pk = r.provider_key_id.as_deref().unwrap_or_default();
                        tracing::warn!(error = %e, provider_key = %pk, "a report's provider key part failed: a cooldown it asked for is lost");
                    }
                }
                Ok(reported)
            }
            Some(pool) => {
                let (reported, pooled) =
                    tokio::join!(client, self.lanes.call("pool_report", &pool));
                let pk = r.provider_key_id.as_deref().unwrap_or_default();
                match pooled.and_then(|reply: Vec<redis::Value>| pool_report::parse(&reply)) {
                    Ok(PoolReportCode::Settled | PoolReportCode::Duplicate) => {}
                    Ok(PoolReportCode::TooLate) => {
                        if matches!(reported, Ok(Reported::Recorded)) {
                            tracing::info!(provider_key = %pk, "report of a lease renewed past the duplicate guard after its signed expiry: recorded, but its provider key's part is dropped");
                        }
                    }
                    // Not answered: the client's part decides the answer (a failure there
                    // is retried by the caller, and then this part runs once more, once).
                    Err(e) => {
                        tracing::warn!(error = %e, provider_key = %pk, "a report's provider key part failed: its reserved tokens pass with the window, and a cooldown it asked for is lost");
                    }
                }
                reported
            }
            None => client.await,
        }?;
        Ok(reported)
    }

    /// A report's provider-key part (`lua/pool_report.lua`, on the pool's tag), when it
    /// has one: it settles the pick's tokens, cools the key down or suspends it, keeps
    /// its learned limits. `None` when there is nothing to do there, or the key's
    /// provider is unknown (its pool's tag with it).
    fn pool_report_call(&self, r: &Report) -> Option<Call<'_>> {
        let (Some(pk), Some(provider)) = (&r.provider_key_id, &r.provider) else {
            return None;
        };
        let taken = r.lease.as_ref().and_then(|l| l.taken);
        let learned_cooldown_ms = r.learned_cooldown_ms();
        let nothing = taken.is_none()
            && r.cooldown_ms == 0
            && r.suspend_ms == 0
            && learned_cooldown_ms == 0
            && r.learned.is_none();
        // A lease's report runs even with nothing to do, to set the guard: a repeat of it
        // saying more (a 429 this time) must change nothing either.
        if nothing && r.lease.is_none() {
            return None;
        }
        let (prompt, completion) = r.tokens.unwrap_or((0, 0));
        let clock = self.shift.script_clock();
        let mut call = Call::new(&self.scripts.pool_report);
        let lease_token = r.lease.as_ref().map_or("", |l| l.token.as_str());
        PoolReportKeys::new(&self.space, provider, pk, lease_token).push(&mut call);
        PoolReportArgs {
            second: taken.map_or(-1, |t| t.second),
            reserved: taken.map_or(0, |t| t.tokens),
            has_tokens: r.tokens.is_some(),
            used: prompt.saturating_add(completion),
            status: r.upstream_status.map(|n| n.to_string()).unwrap_or_default(),
            cooldown_ms: r.cooldown_ms,
            suspend_ms: r.suspend_ms,
            cause_source: crate::pool::bounded_source(&r.source),
            learned_cooldown_ms,
            learned_keep_ms: r.learned.map_or(0, |l| l.keep_ms()),
            learned_limits: r.learned.map(|l| l.encode()).unwrap_or_default(),
            time_shift_ms: clock.shift_ms,
            now_ms: clock.pinned_ms,
            guarded: !lease_token.is_empty(),
            guard_ttl_ms: self.guard_ttl_ms,
            lease_expiry: r.lease_expires_at_ms,
        }
        .push(&mut call);
        Some(call)
    }

    pub(super) async fn renew_redis(
        &self,
        lease: &LeaseId,
        ttl_ms: i64,
    ) -> Result<Option<i64>, CounterError> {
        let clock = self.shift.script_clock();
        let mut call = self.scripts.renew.prepare_invoke();
        RenewKeys::new(&self.space, self.space.shard_of_lease(lease), lease).push(&mut call);
        RenewArgs {
            lease_token: &lease.token,
            lease_ttl_ms: ttl_ms,
            time_shift_ms: clock.shift_ms,
            now_ms: clock.pinned_ms,
            light_expiry: lease.light.as_ref().map_or(0, |l| l.expires_at_ms.max(1)),
        }
        .push(&mut call);
        Ok(RenewReply::parse(self.lanes.invoke("renew", &call).await?)?.expiry())
    }

    pub(super) async fn pool_state_redis(
        &self,
        provider: &str,
        ids: &[String],
    ) -> Result<Vec<LiveState>, CounterError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.pool_state.prepare_invoke();
        for id in ids {
            PoolStateKeys::new(&self.space, provider, id).push(&mut call);
        }
        let clock = self.shift.script_clock();
        PoolStateArgs {
            time_shift_ms: clock.shift_ms,
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        let reply: Vec<redis::Value> = self.lanes.invoke("pool_state", &call).await?;
        crate::limits::scripts::pool_state::parse(&reply, ids.len())
    }
}

/// What a light admission's lease carries for its report (`None` when it is not light
/// or was refused): the second of the script's clock, and the tokens its 't' window took
/// (it takes them, 0 too, only under a TPM limit).
pub(super) fn light_of(
    r: &AdmitRequest<'_>,
    code: AdmitCode,
    expiry: i64,
    now_ms: i64,
) -> Option<LightLease> {
    if code != AdmitCode::Admitted {
        return None;
    }
    r.light_meta().map(|meta| LightLease {
        second: now_ms.div_euclid(1000),
        kt: crate::limits::effective_limit(r.tpm).map(|_| r.tokens),
        meta,
        expires_at_ms: expiry,
    })
}

/// The decision of the client's part alone (admitted without a pick, or refused).
pub(super) fn client_decision(
    r: &AdmitRequest<'_>,
    reply: AdmitReply,
) -> Result<Decision, CounterError> {
    let AdmitReply {
        code,
        a,
        mut usage,
        quota,
        quotas,
        ..
    } = reply;
    if quotas.len() != r.quotas.len() {
        return Err(CounterError::Protocol(format!(
            "admit answered {} quota entries for {}",
            quotas.len(),
            r.quotas.len()
        )));
    }
    usage.balance_remaining = usage.balance_remaining.filter(|_| r.balance.is_some());
    let denied = |reason, retry: Option<i64>| Verdict::Denied {
        reason,
        retry_after_ms: retry,
    };
    let light = light_of(r, code, a, usage.now_ms);
    let verdict = match code {
        AdmitCode::Admitted => Verdict::Admitted { expires_at_ms: a },
        AdmitCode::Requests => denied(Denial::Requests, Some(a)),
        AdmitCode::Tokens => denied(Denial::Tokens, Some(a)),
        AdmitCode::Concurrency => denied(Denial::Concurrency, Some(a)),
        AdmitCode::BalanceExhausted => denied(Denial::BalanceExhausted, None),
        AdmitCode::BalanceCommitted => denied(Denial::BalanceCommitted, Some(a)),
        AdmitCode::Quota => {
            let (index, exhausted) = quota.ok_or_else(|| {
                CounterError::Protocol("admit refused by a quota without naming it".into())
            })?;
            denied(Denial::Quota { index, exhausted }, (a > 0).then_some(a))
        }
    };
    Ok(Decision {
        verdict,
        usage,
        picked: None,
        taken: None,
        degraded: None,
        quotas,
        light,
    })
}
