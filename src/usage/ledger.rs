//! The spend ledger: what each quota scope used per UTC period, kept in `quota_usage` by
//! the accounting writer, and the spend alerts it raises.
//!
//! [`apply`] runs inside [`super::store::apply_in`]'s transaction, for the records that
//! transaction newly inserted only, so the ledger moves exactly once per record, like
//! the key's totals. For each record it adds requests, tokens and cost to the rows of
//! its scopes ([`crate::quota::Scope`]): the key; the key's model entry (the longest
//! listed prefix of the record's model in `client_keys.model_limits`); the key's user
//! (`client_keys.user_id`, whether or not a `users` row exists yet, so that limits set
//! later start from the truth); and the user's model entry (`users.model_limits`). Each
//! scope has one row per period holding the record's `created_at` (day, ISO week, month)
//! and one total row (`start_day` 0).
//!
//! Invariants:
//! - One upsert per row a batch touches, in a fixed order (counter, period, start day),
//!   so two replicas' transactions lock shared rows in the same order (no deadlock); the
//!   upserts of a batch go in a few multi-row statements (`store::chunked`), which take
//!   their rows in that order; so do the batch's key and user reads.
//! - A row never passes [`MAX_TOTAL`]: a batch that would take one past it is refused
//!   ([`StoreError::OutOfRange`]), which the accounting writer turns into dead letters.
//! - Each alert threshold of a spend limit alerts at most once per period and limit: the
//!   alert's id is derived from (counter, period, start day, limit, percent) and
//!   inserted with `ON CONFLICT DO NOTHING`. It is raised by the first batch after which
//!   the row's cost (returned by the upsert under its row lock) has reached the
//!   threshold, so a limit lowered, or a threshold added, below what was already spent
//!   alerts with the next record, and a raised limit alerts again at its own thresholds.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use sqlx::Row;

use super::store::{chunked, is_sqlite, values};
use super::UsageRecord;
use crate::clock::{to_rfc3339, MS_PER_DAY};
use crate::db::StoreError;
use crate::money::{Usd, MAX_TOTAL};
use crate::quota::{self, LimitSet, ModelLimits, Period, Scope, ScopeKind, SpendLimit};

type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// What a key's row says about its scopes.
#[derive(Default)]
struct KeyLimits {
    user_id: Option<String>,
    spend: quota::SpendLimits,
    models: ModelLimits,
}

/// A user's limits, when a `users` row exists.
struct UserRow {
    limits: LimitSet,
    models: ModelLimits,
}

/// One `quota_usage` row's share of a batch, and what an alert about it says.
struct RowDelta {
    requests: i64,
    tokens: i64,
    cost: i64,
    kind: ScopeKind,
    model: Option<String>,
    user_id: Option<String>,
    /// The key of the latest record that moved the row (for a user row, the key whose
    /// usage took it over a threshold, as near as a batch can say).
    key_id: String,
    latest: i64,
    limit: Option<SpendLimit>,
}

/// The webhook body of a spend alert (`docs/api.md`, "Webhooks").
#[derive(Serialize)]
struct Payload<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    key_id: &'a str,
    user_id: Option<&'a str>,
    scope: ScopeKind,
    model: Option<&'a str>,
    period: Period,
    period_start: String,
    reset_at: Option<String>,
    limit_usd: Usd,
    spend_usd: Usd,
    threshold_pct: u16,
    created_at: String,
}

/// A limits column read for the ledger. Unreadable JSON (written by hand, or by a
/// release that wrote another shape) counts as no limits: the ledger still counts, no
/// alert is made, and the batch goes on (an error here would stop every key's
/// accounting behind one row, as it is not a refusal of the record itself).
fn json<T: serde::de::DeserializeOwned + Default>(text: Option<String>, what: &str) -> T {
    text.map_or_else(T::default, |t| {
        serde_json::from_str(&t).unwrap_or_else(|e| {
            tracing::warn!(column = what, error = %e, "spend ledger: a limits column is not valid JSON; no alerts from it");
            T::default()
        })
    })
}

/// The limits of these keys, in one statement per chunk ([`chunked`]); a key deleted
/// meanwhile is missing (its own rows still count; its user is unknown).
async fn key_limits<'a>(
    tx: &mut Tx,
    ids: &[&'a str],
) -> Result<HashMap<&'a str, KeyLimits>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    let sqlite = is_sqlite(tx);
    for chunk in chunked(ids) {
        let sql = format!(
            "SELECT id, user_id, spend_limits, model_limits FROM client_keys WHERE id IN {}",
            values(1, chunk.len(), sqlite)
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut **tx).await? {
            let id: String = row.try_get("id")?;
            let Some(id) = chunk.iter().find(|k| **k == id) else {
                continue;
            };
            let limits = KeyLimits {
                user_id: row.try_get("user_id")?,
                spend: json(row.try_get("spend_limits")?, "client_keys.spend_limits"),
                models: json(row.try_get("model_limits")?, "client_keys.model_limits"),
            };
            out.insert(*id, limits);
        }
    }
    Ok(out)
}

/// The rows of these users, in one statement per chunk ([`chunked`]); a user without a
/// row is `None`.
async fn user_rows(
    tx: &mut Tx,
    ids: &[String],
) -> Result<HashMap<String, Option<UserRow>>, StoreError> {
    let mut out: HashMap<String, Option<UserRow>> =
        ids.iter().map(|id| (id.clone(), None)).collect();
    let sqlite = is_sqlite(tx);
    for chunk in chunked(ids) {
        let sql = format!(
            "SELECT user_id, limits, model_limits FROM users WHERE user_id IN {}",
            values(1, chunk.len(), sqlite)
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str());
        }
        for row in query.fetch_all(&mut **tx).await? {
            let id: String = row.try_get("user_id")?;
            let found = UserRow {
                limits: json(Some(row.try_get("limits")?), "users.limits"),
                models: json(row.try_get("model_limits")?, "users.model_limits"),
            };
            out.insert(id, Some(found));
        }
    }
    Ok(out)
}

/// The model entry `model` falls under in `models` (its longest listed prefix), and
/// that entry's spend limits.
fn listed<'a>(
    models: &'a ModelLimits,
    model: Option<&str>,
) -> Option<(String, &'a quota::SpendLimits)> {
    let (entry, set) = crate::names::longest_prefix(models, model?)?;
    Some((entry.to_string(), &set.spend_limits))
}

/// Adds `records` (all newly inserted in this transaction) to the ledger, and queues the
/// alerts their spend crosses. `now` stamps the rows and the alerts.
pub(super) async fn apply(
    tx: &mut Tx,
    records: &[&UsageRecord],
    now: i64,
) -> Result<(), StoreError> {
    // The batch's keys and users in one statement each (a key deleted meanwhile counts
    // its own rows only: no limits, no user).
    let mut ids: Vec<&str> = records.iter().filter_map(|r| r.key_id.as_deref()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut keys = key_limits(tx, &ids).await?;
    for id in ids {
        keys.entry(id).or_default();
    }
    let mut user_ids: Vec<String> = keys.values().filter_map(|k| k.user_id.clone()).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let users = user_rows(tx, &user_ids).await?;

    let mut rows: BTreeMap<(String, Period, i64), RowDelta> = BTreeMap::new();
    let none = quota::SpendLimits::default();
    for r in records {
        let Some(key_id) = r.key_id.as_deref() else {
            continue;
        };
        let Some(key) = keys.get(key_id) else {
            continue;
        };
        let model = r.model.as_deref();
        let mut scopes: Vec<(Scope, &quota::SpendLimits)> = Vec::with_capacity(4);
        let key_scope = |model: Option<String>| Scope {
            kind: ScopeKind::Key,
            id: key_id.to_string(),
            model,
        };
        scopes.push((key_scope(None), &key.spend));
        if let Some((entry, spend)) = listed(&key.models, model) {
            scopes.push((key_scope(Some(entry)), spend));
        }
        if let Some(user_id) = &key.user_id {
            let user_scope = |model: Option<String>| Scope {
                kind: ScopeKind::User,
                id: user_id.clone(),
                model,
            };
            match users.get(user_id).and_then(Option::as_ref) {
                Some(user) => {
                    scopes.push((user_scope(None), &user.limits.spend_limits));
                    if let Some((entry, spend)) = listed(&user.models, model) {
                        scopes.push((user_scope(Some(entry)), spend));
                    }
                }
                None => scopes.push((user_scope(None), &none)),
            }
        }
        let day = r.created_at.div_euclid(MS_PER_DAY);
        let tokens = r.total_tokens();
        for (scope, spend) in scopes {
            let counter = scope.counter_id();
            for period in Period::ALL {
                let d = rows
                    .entry((counter.clone(), period, period.start_day(day)))
                    .or_insert_with(|| RowDelta {
                        requests: 0,
                        tokens: 0,
                        cost: 0,
                        kind: scope.kind,
                        model: scope.model.clone(),
                        user_id: key.user_id.clone(),
                        key_id: key_id.to_string(),
                        latest: r.created_at,
                        limit: spend.get(period).cloned(),
                    });
                let sum = |a: i64, b: i64| a.checked_add(b).filter(|s| (0..=MAX_TOTAL).contains(s));
                let out = |what: &str| {
                    StoreError::OutOfRange(format!(
                        "usage record {}: the {what} of a quota period would pass {MAX_TOTAL}",
                        r.id
                    ))
                };
                d.requests = sum(d.requests, 1).ok_or_else(|| out("requests"))?;
                d.tokens = sum(d.tokens, tokens).ok_or_else(|| out("tokens"))?;
                d.cost = sum(d.cost, r.cost_micros).ok_or_else(|| out("cost"))?;
                if r.created_at >= d.latest {
                    d.latest = r.created_at;
                    d.key_id = key_id.to_string();
                }
            }
        }
    }

    let mut afters = HashMap::with_capacity(rows.len());
    let all: Vec<_> = rows.iter().collect();
    for chunk in chunked(&all) {
        upsert(tx, chunk, now, &mut afters).await?;
    }
    for ((counter, period, start_day), d) in &rows {
        let Some(limit) = &d.limit else {
            continue;
        };
        let key = (counter.as_str(), period.as_str(), *start_day);
        let after = afters
            .get(&key)
            .copied()
            .ok_or_else(|| beyond(counter, *period, *start_day))?;
        for pct in &limit.alert_at_pct {
            if !quota::reached(limit.usd.micros(), *pct, after) {
                continue;
            }
            let id = alert_id(counter, *period, *start_day, limit.usd.micros(), *pct);
            let payload = Payload {
                id: &id,
                kind: "spend.threshold",
                key_id: &d.key_id,
                user_id: d.user_id.as_deref(),
                scope: d.kind,
                model: d.model.as_deref(),
                period: *period,
                period_start: to_rfc3339(start_day * MS_PER_DAY),
                reset_at: period
                    .end_day(*start_day)
                    .map(|e| to_rfc3339(e * MS_PER_DAY)),
                limit_usd: limit.usd,
                spend_usd: Usd(after),
                threshold_pct: *pct,
                created_at: to_rfc3339(now),
            };
            let body = serde_json::to_string(&payload)
                .map_err(|e| StoreError::Corrupt(format!("alert payload: {e}")))?;
            crate::alerts::store::queue(tx, &id, &body, now).await?;
        }
    }
    Ok(())
}

/// Adds these rows' shares in one statement (in the rows' order, so every transaction
/// locks shared rows in the same order) and puts each row's cost after into `afters`,
/// keyed by (counter, period, start day); refuses (never wraps) past [`MAX_TOTAL`].
async fn upsert<'a>(
    tx: &mut Tx,
    rows: &[(&'a (String, Period, i64), &RowDelta)],
    now: i64,
    afters: &mut HashMap<(&'a str, &'static str, i64), i64>,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO quota_usage (counter, period, start_day, requests, tokens, cost_micros, updated_at) \
         VALUES {} ON CONFLICT (counter, period, start_day) DO UPDATE SET \
         requests = quota_usage.requests + excluded.requests, \
         tokens = quota_usage.tokens + excluded.tokens, \
         cost_micros = quota_usage.cost_micros + excluded.cost_micros, \
         updated_at = excluded.updated_at \
         WHERE quota_usage.requests <= {MAX_TOTAL} - excluded.requests \
         AND quota_usage.tokens <= {MAX_TOTAL} - excluded.tokens \
         AND quota_usage.cost_micros <= {MAX_TOTAL} - excluded.cost_micros \
         RETURNING counter, period, start_day, cost_micros",
        values(rows.len(), 7, is_sqlite(tx))
    );
    let mut query = sqlx::query(&sql);
    for ((counter, period, start_day), d) in rows {
        query = query
            .bind(counter.as_str())
            .bind(period.as_str())
            .bind(*start_day)
            .bind(d.requests)
            .bind(d.tokens)
            .bind(d.cost)
            .bind(now);
    }
    let mut returned: HashMap<(String, String, i64), i64> = HashMap::with_capacity(rows.len());
    for row in query.fetch_all(&mut **tx).await? {
        returned.insert(
            (
                row.try_get("counter")?,
                row.try_get("period")?,
                row.try_get("start_day")?,
            ),
            row.try_get("cost_micros")?,
        );
    }
    for ((counter, period, start_day), _) in rows {
        let key = (counter.clone(), period.as_str().to_string(), *start_day);
        match returned.get(&key) {
            Some(after) => {
                afters.insert((counter.as_str(), period.as_str(), *start_day), *after);
            }
            // The guard refused it: a total would pass the maximum.
            None => return Err(beyond(counter, *period, *start_day)),
        }
    }
    Ok(())
}

/// A ledger row's refusal: a total would pass [`MAX_TOTAL`].
fn beyond(counter: &str, period: Period, start_day: i64) -> StoreError {
    StoreError::OutOfRange(format!(
        "quota counter {counter} ({}, day {start_day}): its totals would pass {MAX_TOTAL}",
        period.as_str()
    ))
}

/// The alert's id: hex SHA-256 of `counter|period|start_day|limit|pct`, the same on
/// every replica, so a threshold alerts once per period and limit whoever applies the
/// record.
pub fn alert_id(
    counter: &str,
    period: Period,
    start_day: i64,
    limit_micros: i64,
    pct: u16,
) -> String {
    use sha2::{Digest, Sha256};
    let text = format!(
        "{counter}|{}|{start_day}|{limit_micros}|{pct}",
        period.as_str()
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_ids_differ_by_each_part() {
        let base = alert_id("c", Period::Month, 20_400, 5, 80);
        assert_eq!(base.len(), 64);
        for other in [
            alert_id("d", Period::Month, 20_400, 5, 80),
            alert_id("c", Period::Week, 20_400, 5, 80),
            alert_id("c", Period::Month, 20_401, 5, 80),
            alert_id("c", Period::Month, 20_400, 6, 80),
            alert_id("c", Period::Month, 20_400, 5, 100),
        ] {
            assert_ne!(base, other);
        }
    }
}
