//! The live side of the admin quota views (`GET /admin/keys/{id}/quota`,
//! `GET /admin/users/{user_id}/quota`): fills each limit's `live` from the counter store
//! ([`crate::limits::Counters::read_quotas`], one read for the whole view) beside the
//! database's `settled` figure that [`crate::quota_usage::view`] gives.
//!
//! The two differ while requests are in flight or not yet applied by the accounting
//! writer: `live` counts a request at admission (its hold as `held` until its report),
//! `settled` once its usage record is in the database. Per-minute windows have only
//! `live`. When the store cannot answer (Redis down), `live` stays `null` and the view
//! still answers with the database's figures.
//!
//! Here, not in `quota_usage`, because it joins the counter store (`limits`) and the
//! database's view, and `limits` sits above the record modules that `quota_usage` serves.

use serde_json::{json, Value};

use crate::clock::to_rfc3339;
use crate::limits::{Counters, LiveCounter, LiveFigure, QuotaKind, Tenant};
use crate::money::Usd;
use crate::quota::{Period, ScopeKind};
use crate::quota_usage::{LimitView, ScopeView};

/// What a limit of the view reads in the counter store. `key_id`: the key of a key's
/// view, whose own per-minute limits are its own windows (not quota entries).
fn counter_of(scope: &ScopeView, limit: &LimitView, key_id: Option<&str>) -> Option<LiveCounter> {
    let kind = match (limit.kind, limit.period) {
        ("requests" | "tokens", "minute") => {
            let tokens = limit.kind == "tokens";
            if let (ScopeKind::Key, None, Some(key_id)) = (scope.scope, &scope.model, key_id) {
                return Some(LiveCounter::KeyWindow {
                    key_id: key_id.to_string(),
                    tokens,
                });
            }
            if tokens {
                QuotaKind::TokensPerMinute
            } else {
                QuotaKind::RequestsPerMinute
            }
        }
        ("requests", "day") => QuotaKind::RequestsPerDay,
        ("tokens", "day") => QuotaKind::TokensPerDay,
        ("spend", period) => {
            QuotaKind::Spend(Period::ALL.into_iter().find(|p| p.as_str() == period)?)
        }
        _ => return None,
    };
    Some(LiveCounter::Quota {
        counter: scope.counter.clone(),
        kind,
        seed: limit.seed,
    })
}

/// A limit's `live` object: counts as integers, spend in USD with what is held.
fn live_json(limit: &LimitView, figure: LiveFigure, now_ms: i64) -> Value {
    let reset_at =
        (figure.reset_ms > 0).then(|| to_rfc3339(now_ms.saturating_add(figure.reset_ms)));
    let taken = figure.used.saturating_add(figure.held);
    let remaining = limit.limit_units.saturating_sub(taken).max(0);
    if limit.kind == "spend" {
        json!({
            "used": Usd(figure.used),
            "held": Usd(figure.held),
            "remaining": Usd(remaining),
            "reset_at": reset_at,
        })
    } else {
        json!({"used": figure.used, "remaining": remaining, "reset_at": reset_at})
    }
}

/// Fills `live` for every limit of `scopes` (all `tenant`'s) with one read of the
/// counter store; leaves it `null` (and logs why) when the store cannot answer.
pub async fn fill(
    counters: &Counters,
    tenant: Tenant<'_>,
    key_id: Option<&str>,
    scopes: &mut [ScopeView],
) {
    let mut wanted = Vec::new();
    let mut at = Vec::new();
    for (s, scope) in scopes.iter().enumerate() {
        for (l, limit) in scope.limits.iter().enumerate() {
            if let Some(counter) = counter_of(scope, limit, key_id) {
                wanted.push(counter);
                at.push((s, l));
            }
        }
    }
    if wanted.is_empty() {
        return;
    }
    let read = match counters.read_quotas(tenant, &wanted).await {
        Ok(read) => read,
        Err(e) => {
            // The view still answers with the database's figures.
            tracing::warn!(error = %e, "quota view without live figures: the counter store did not answer");
            return;
        }
    };
    for ((s, l), figure) in at.into_iter().zip(read.figures) {
        let limit = &mut scopes[s].limits[l];
        limit.live = Some(live_json(limit, figure, read.now_ms));
    }
}
