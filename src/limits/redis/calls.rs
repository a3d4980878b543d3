//! Each operation as its script call, built from the typed contracts in
//! `limits::scripts` (one round trip; two when the pool in Redis needs a sync).

use super::RedisCounters;
use crate::limits::scripts::admit::{
    push_quota_args, push_quota_keys, AdmitArgs, AdmitCode, AdmitKeys, AdmitReply,
};
use crate::limits::scripts::limit_arg;
use crate::limits::scripts::pool_state::{PoolStateArgs, PoolStateKeys};
use crate::limits::scripts::pool_sync::{PoolSyncArgs, PoolSyncKey, PoolSyncKeys, PoolSyncReply};
use crate::limits::scripts::renew::{RenewArgs, RenewKeys, RenewReply};
use crate::limits::scripts::report::{
    spend_entries, ReportArgs, ReportCode, ReportKeys, ReportProviderKeys,
};
use crate::limits::{
    AdmitRequest, CounterError, Decision, Denial, LeaseId, Pick, Report, Reported, SelectRequest,
    Verdict,
};
use crate::pool::cache::{Candidate, Roster};
use crate::pool::LiveState;

impl RedisCounters {
    /// Writes the caller's pool into Redis (`lua/pool_sync.lua`), unless Redis holds one
    /// stamped later ([`CounterError::PoolOutdated`]).
    async fn sync_pool(&self, candidates: &Roster) -> Result<(), CounterError> {
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
        pool: Option<&Roster>,
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

    pub(super) async fn admit_redis(&self, r: &AdmitRequest<'_>) -> Result<Decision, CounterError> {
        let id = &r.lease.key_id;
        let balance = r.balance.unwrap_or(crate::limits::BalanceSnapshot {
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
        push_quota_keys(&self.space, r.quotas, &mut call);
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
            guard_ttl_ms: self.guard_ttl_ms,
        }
        .push(&mut call);
        push_quota_args(r.quotas, &mut call);
        let AdmitReply {
            code,
            a,
            mut usage,
            picked,
            quota,
            quotas,
        } = self.invoke_admit("admit", &call, r.pool).await?;
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
        let verdict = match code {
            AdmitCode::Admitted => Verdict::Admitted { expires_at_ms: a },
            AdmitCode::Requests => denied(Denial::Requests, Some(a)),
            AdmitCode::Tokens => denied(Denial::Tokens, Some(a)),
            AdmitCode::Concurrency => denied(Denial::Concurrency, Some(a)),
            AdmitCode::BalanceExhausted => denied(Denial::BalanceExhausted, None),
            AdmitCode::BalanceCommitted => denied(Denial::BalanceCommitted, Some(a)),
            AdmitCode::PoolExhausted => denied(Denial::PoolExhausted, Some(a)),
            AdmitCode::Quota => {
                let (index, exhausted) = quota.ok_or_else(|| {
                    CounterError::Protocol("admit refused by a quota without naming it".into())
                })?;
                denied(Denial::Quota { index, exhausted }, (a > 0).then_some(a))
            }
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
            quotas,
        })
    }

    pub(super) async fn select_redis(&self, r: &SelectRequest<'_>) -> Result<Pick, CounterError> {
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
            guard_ttl_ms: self.guard_ttl_ms,
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

    pub(super) async fn report_redis(&self, r: &Report) -> Result<Reported, CounterError> {
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
        let spends = spend_entries(&self.space, &r.spend_now);
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
        for (_, args) in &spends {
            args.push(&mut call);
        }
        let reply: Vec<redis::Value> = self.lanes.invoke("report", &call).await?;
        Ok(ReportCode::parse(&reply)?.into())
    }

    pub(super) async fn renew_redis(
        &self,
        lease: &LeaseId,
        ttl_ms: i64,
    ) -> Result<Option<i64>, CounterError> {
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

    pub(super) async fn pool_state_redis(
        &self,
        ids: &[String],
    ) -> Result<Vec<LiveState>, CounterError> {
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
        crate::limits::scripts::pool_state::parse(&reply, ids.len())
    }
}

/// The pool version an admit call sends: "" when no provider key is wanted.
fn pool_version(pool: Option<&Roster>) -> &str {
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
