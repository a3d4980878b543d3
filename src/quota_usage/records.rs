//! Model entries' figures, read from `usage_records` itself rather than `quota_usage`.
//!
//! Why: the accounting writer adds to a model entry's `quota_usage` rows only while the
//! entry is listed, so spend made while it was removed (`model_limits` cleared, then set
//! again) would be missing from its rows and the entry would admit past its limit. The
//! records hold every request whatever was listed, so a model entry's figure for a
//! period is the sum over the scope's records in that period whose model falls under
//! the entry by [`crate::names::longest_prefix`] over the *current* listing. Scopes
//! without a model keep reading `quota_usage`: those rows are always written.
//!
//! One query per call: a key's records over the index range `usage_records_by_key_time`
//! (key_id, created_at) from the earliest period start needed, grouped by model with one
//! conditional sum per period; a user's the same over a join with `client_keys` (every
//! key that now has that `user_id`). The grouping by listed entry is done here in Rust.

use std::collections::BTreeMap;

use sqlx::Row;

use super::Used;
use crate::clock::MS_PER_DAY;
use crate::db::{Db, StoreError};
use crate::money::MAX_TOTAL;
use crate::quota::{ModelLimits, Period, Scope, ScopeKind};

/// The figures of each model entry of `models` for each of `periods` (the ones holding
/// `today`, days since 1970-01-01), keyed like [`super::current`]'s rows: `(counter of
/// the model entry's scope, period)`. Entries without records are absent. No query when
/// `periods` or `models` is empty.
pub(super) async fn model_entries(
    db: &Db,
    kind: ScopeKind,
    id: &str,
    models: &ModelLimits,
    periods: &[Period],
    today: i64,
) -> Result<BTreeMap<(String, Period), Used>, StoreError> {
    let mut out = BTreeMap::new();
    if periods.is_empty() || models.is_empty() {
        return Ok(out);
    }
    // [start, end) in ms per period; a total has no bounds.
    let bounds: Vec<(Period, Option<(i64, i64)>)> = periods
        .iter()
        .map(|&p| {
            let start = p.start_day(today);
            let range = p.end_day(start).map(|end| {
                (
                    start.saturating_mul(MS_PER_DAY),
                    end.saturating_mul(MS_PER_DAY),
                )
            });
            (p, range)
        })
        .collect();
    let from = bounds
        .iter()
        .map(|(_, r)| r.map_or(i64::MIN, |(s, _)| s))
        .min()
        .unwrap_or(i64::MIN);

    // $1 = the key or user id, $2 = the range's start; then two per bounded period.
    // Every placeholder is used once (the SQLite driver binds them by position).
    let mut next = 3;
    let mut columns = Vec::new();
    for (i, (_, range)) in bounds.iter().enumerate() {
        let when = match range {
            Some(_) => {
                let w = format!("r.created_at >= ${} AND r.created_at < ${}", next, next + 1);
                next += 2;
                w
            }
            None => "1 = 1".to_string(),
        };
        // Postgres sums BIGINT as NUMERIC: cast back (a sum past BIGINT is an error,
        // not a wrap). Tokens as the ledger counts them: prompt + completion.
        for (name, value) in [
            ("q", "1"),
            ("t", "r.prompt_tokens + r.completion_tokens"),
            ("c", "r.cost_micros"),
        ] {
            columns.push(format!(
                "CAST(COALESCE(SUM(CASE WHEN {when} THEN {value} ELSE 0 END), 0) AS BIGINT) AS {name}{i}"
            ));
        }
    }
    let scope_filter = match kind {
        ScopeKind::Key => "FROM usage_records r WHERE r.key_id = $1",
        ScopeKind::User => {
            "FROM usage_records r JOIN client_keys k ON k.id = r.key_id WHERE k.user_id = $1"
        }
    };
    let sql = format!(
        "SELECT r.model AS model, {} {scope_filter} AND r.created_at >= $2 \
         AND r.model IS NOT NULL GROUP BY r.model",
        columns.join(", ")
    );
    let mut query = sqlx::query(&sql).bind(id).bind(from);
    for (_, range) in &bounds {
        if let Some((start, end)) = range {
            query = query.bind(*start).bind(*end);
        }
    }

    let counter = |entry: &str| {
        Scope {
            kind,
            id: id.to_string(),
            model: Some(entry.to_string()),
        }
        .counter_id()
    };
    let mut counters: BTreeMap<&str, String> = BTreeMap::new();
    for row in query.fetch_all(&db.sql).await? {
        let model: String = row.try_get("model")?;
        let Some((entry, _)) = crate::names::longest_prefix(models, &model) else {
            continue; // a model no entry lists
        };
        let counter = counters
            .entry(entry)
            .or_insert_with(|| counter(entry))
            .clone();
        for (i, (period, _)) in bounds.iter().enumerate() {
            let figure = Used {
                requests: row.try_get(format!("q{i}").as_str())?,
                tokens: row.try_get(format!("t{i}").as_str())?,
                cost_micros: row.try_get(format!("c{i}").as_str())?,
            };
            if figure == Used::default() {
                continue;
            }
            let sum = out.entry((counter.clone(), *period)).or_default();
            *sum = add(*sum, figure)?;
        }
    }
    Ok(out)
}

/// Two models under one entry: their sums, never past [`MAX_TOTAL`] (as the ledger's
/// rows), so a seed cannot wrap.
fn add(a: Used, b: Used) -> Result<Used, StoreError> {
    let sum = |x: i64, y: i64, what: &str| {
        x.checked_add(y)
            .filter(|s| (0..=MAX_TOTAL).contains(s))
            .ok_or_else(|| {
                StoreError::OutOfRange(format!("a model entry's {what} passes {MAX_TOTAL}"))
            })
    };
    Ok(Used {
        requests: sum(a.requests, b.requests, "requests")?,
        tokens: sum(a.tokens, b.tokens, "tokens")?,
        cost_micros: sum(a.cost_micros, b.cost_micros, "cost")?,
    })
}
