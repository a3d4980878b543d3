//! The quota entries of one request, built in process from its key record and
//! its user's limits, and the static refusals they allow before the counter store.
//!
//! Scopes, in this order (the order of the entries, so of the refusal that wins when
//! several would refuse): the key itself (its day counts and spend limits; its
//! per-minute limits stay the key's own windows), the key × its model entry, the user,
//! the user × its model entry. A model entry is the listed name that
//! [`crate::names::longest_prefix`] finds for the request's model; a request without a
//! model has none. Day count and spend entries are seeded from the records' settled
//! figures (the counter store raises a counter of the current period to its seed).

use crate::client_keys::ClientKey;
use crate::limits::{effective_limit, QuotaEntry, QuotaKind, QuotaUse};
use crate::quota::{LimitSet, ModelLimits, Period, Scope, ScopeKind, Settled, UserLimits};

/// Where an entry comes from, and what the answer shows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaStatus {
    pub scope: ScopeKind,
    /// The listed model entry, for a per-model limit.
    pub model: Option<String>,
    pub kind: QuotaKind,
    pub limit: i64,
    /// As the decision saw it (zero before one).
    pub used: QuotaUse,
}

/// A request's entries for the counter store and, index for index, their statuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    pub entries: Vec<QuotaEntry>,
    pub statuses: Vec<QuotaStatus>,
}

impl Quotas {
    /// Whether a spend limit applies (then the request needs a price).
    pub fn has_spend(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.kind, QuotaKind::Spend(_)))
    }

    /// The statuses with the decision's usage filled in.
    pub fn with_uses(mut self, uses: &[QuotaUse]) -> Vec<QuotaStatus> {
        for (status, used) in self.statuses.iter_mut().zip(uses) {
            status.used = *used;
        }
        self.statuses
    }

    fn add(&mut self, scope: Scope, set: &LimitSet, settled: &Settled, with_minute: bool) {
        // Named (a SHA-256) only when the scope has a limit: most keys have none, and
        // this runs on every admission.
        let mut counter: Option<String> = None;
        let mut push = |kind: QuotaKind, limit: Option<i64>, seed: Option<(i64, i64)>| {
            if let Some(limit) = effective_limit(limit) {
                self.entries.push(QuotaEntry {
                    counter: counter.get_or_insert_with(|| scope.counter_id()).clone(),
                    kind,
                    limit,
                    seed,
                });
                self.statuses.push(QuotaStatus {
                    scope: scope.kind,
                    model: scope.model.clone(),
                    kind,
                    limit,
                    used: QuotaUse::default(),
                });
            }
        };
        if with_minute {
            push(QuotaKind::RequestsPerMinute, set.rate_limit, None);
            push(QuotaKind::TokensPerMinute, set.tpm_limit, None);
        }
        let seed = |period| settled.get(scope.model.as_deref(), period);
        let day = seed(Period::Day);
        push(
            QuotaKind::RequestsPerDay,
            set.daily_request_limit,
            day.map(|s| (s.start_day, s.requests)),
        );
        push(
            QuotaKind::TokensPerDay,
            set.daily_token_limit,
            day.map(|s| (s.start_day, s.tokens)),
        );
        for (period, spend) in set.spend_limits.iter() {
            let seed = seed(period).map(|s| (s.start_day, s.cost_micros));
            push(QuotaKind::Spend(period), Some(spend.usd.micros()), seed);
        }
    }

    fn add_model(
        &mut self,
        kind: ScopeKind,
        id: &str,
        models: &ModelLimits,
        model: Option<&str>,
        settled: &Settled,
    ) {
        let Some((listed, set)) = model.and_then(|m| crate::names::longest_prefix(models, m))
        else {
            return;
        };
        let scope = Scope {
            kind,
            id: id.to_string(),
            model: Some(listed.to_string()),
        };
        self.add(scope, set, settled, true);
    }
}

/// Every quota entry of a request by `key` for `model`. `user` is the key's user's
/// limits (the `users` row of `key.user_id`), when it has one.
pub fn build(key: &ClientKey, user: Option<&UserLimits>, model: Option<&str>) -> Quotas {
    let mut quotas = Quotas::default();
    // The key's per-minute limits are its own windows (admit.lua KEYS 1-2).
    let own = key.own_quotas();
    let key_scope = Scope {
        kind: ScopeKind::Key,
        id: key.id.clone(),
        model: None,
    };
    quotas.add(key_scope, &own, &key.settled, false);
    quotas.add_model(
        ScopeKind::Key,
        &key.id,
        &key.model_limits,
        model,
        &key.settled,
    );
    if let Some(user) = user {
        let scope = Scope {
            kind: ScopeKind::User,
            id: user.user_id.clone(),
            model: None,
        };
        quotas.add(scope, &user.limits, &user.settled, true);
        quotas.add_model(
            ScopeKind::User,
            &user.user_id,
            &user.model_limits,
            model,
            &user.settled,
        );
    }
    quotas
}

/// The spend entries a report of a request by `key` for `model` is counted under now
/// (its lease's own list left with its data when the lease was purged: a late report
/// then adds its cost to these, see `lua/report.lua`). Limits and seeds are not used.
pub fn spend_now(
    key: &ClientKey,
    user: Option<&UserLimits>,
    model: Option<&str>,
) -> Vec<QuotaEntry> {
    build(key, user, model)
        .entries
        .into_iter()
        .filter(|e| matches!(e.kind, QuotaKind::Spend(_)))
        .collect()
}

/// What could never pass, refused before the counter store: an estimate above a
/// per-minute or per-day token limit, or a hold above a spend limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaticRefusal {
    Tokens(QuotaStatus),
    Spend(QuotaStatus),
}

pub fn static_refusal(quotas: &Quotas, estimate: i64, hold: i64) -> Option<StaticRefusal> {
    quotas.statuses.iter().find_map(|s| match s.kind {
        QuotaKind::TokensPerMinute | QuotaKind::TokensPerDay if estimate > s.limit => {
            Some(StaticRefusal::Tokens(s.clone()))
        }
        QuotaKind::Spend(_) if hold > s.limit => Some(StaticRefusal::Spend(s.clone())),
        _ => None,
    })
}

/// "the key's", "the user's", "the key's … for model `m`": who a refusal names.
pub fn describe(status: &QuotaStatus) -> String {
    let who = match status.scope {
        ScopeKind::Key => "the key's",
        ScopeKind::User => "the user's",
    };
    let what = match status.kind {
        QuotaKind::RequestsPerMinute => "requests-per-minute limit".to_string(),
        QuotaKind::TokensPerMinute => "tokens-per-minute limit".to_string(),
        QuotaKind::RequestsPerDay => "daily request limit".to_string(),
        QuotaKind::TokensPerDay => "daily token limit".to_string(),
        QuotaKind::Spend(p) => format!("{} spend limit", p.as_str()),
    };
    match &status.model {
        Some(model) => format!("{who} {what} for model `{model}`"),
        None => format!("{who} {what}"),
    }
}

#[cfg(test)]
mod tests;
