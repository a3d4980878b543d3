//! The database's side of quotas, read: what each scope used in the current periods,
//! from the `quota_usage` table that the accounting writer maintains (module
//! `usage::store`, which owns every write to it).
//!
//! A model entry's figures come from `usage_records` instead ([`records`]): the writer
//! adds to its rows only while it is listed, so they can miss spend made while it was
//! not (finding D). Scopes without a model read `quota_usage`, which is always written.
//!
//! Two readers, each one query on `quota_usage` plus one on `usage_records` when a model
//! entry sets a day count or spend limit:
//! - [`settled`]: the requests, tokens and spend of a key or user (and of its listed
//!   models) in every period it has a day count or spend limit for, filled into
//!   [`Settled`] when the key or user cache loads a record, so admission can raise a day
//!   or spend counter the counter store lost (or that drifted below the database) to it
//!   without a database query of its own.
//! - [`view`]: the admin API's quota view (`GET /admin/keys/{id}/quota`,
//!   `GET /admin/users/{user_id}/quota`): every limit of every scope with the database's
//!   figure for the current period and when that period ends.
//!
//! Periods are the UTC calendar of [`crate::quota::Period`], taken at the replica's
//! clock; a row of an earlier period is never read as the current one's.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use crate::clock::{to_rfc3339, MS_PER_DAY};
use crate::db::{Db, StoreError};
use crate::money::Usd;
use crate::quota::{LimitSet, ModelLimits, Period, Scope, ScopeKind, Seed, Settled};

mod records;

/// One scope's figures for one period, as applied to the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub requests: i64,
    pub tokens: i64,
    pub cost_micros: i64,
}

/// The rows of `counters` for the periods that hold `today` (days since 1970-01-01):
/// `(counter, period)` → figures. One query; absent rows are absent.
pub async fn current(
    db: &Db,
    counters: &[String],
    today: i64,
) -> Result<BTreeMap<(String, Period), Used>, StoreError> {
    let mut out = BTreeMap::new();
    if counters.is_empty() {
        return Ok(out);
    }
    let starts: Vec<i64> = Period::ALL.iter().map(|p| p.start_day(today)).collect();
    // Counters are at most 1 + MAX_MODELS per scope, so the IN list stays small.
    let marks: Vec<String> = (0..counters.len()).map(|i| format!("${}", i + 5)).collect();
    let sql = format!(
        "SELECT counter, period, start_day, requests, tokens, cost_micros FROM quota_usage \
         WHERE start_day IN ($1, $2, $3, $4) AND counter IN ({})",
        marks.join(", ")
    );
    let mut query = sqlx::query(&sql);
    for start in &starts {
        query = query.bind(*start);
    }
    for counter in counters {
        query = query.bind(counter.as_str());
    }
    for row in query.fetch_all(&db.sql).await? {
        let period: String = row.try_get("period")?;
        let Some(period) = Period::ALL.into_iter().find(|p| p.as_str() == period) else {
            continue; // a period of a newer release: not one of ours
        };
        // The IN list matched some period's start; keep only this period's own.
        if row.try_get::<i64, _>("start_day")? != period.start_day(today) {
            continue;
        }
        out.insert(
            (row.try_get("counter")?, period),
            Used {
                requests: row.try_get("requests")?,
                tokens: row.try_get("tokens")?,
                cost_micros: row.try_get("cost_micros")?,
            },
        );
    }
    Ok(out)
}

/// The periods a limit set has a day count or spend limit for (what its seeds cover).
fn seeded_periods(set: &LimitSet) -> Vec<Period> {
    let mut periods: Vec<Period> = set.spend_limits.iter().map(|(p, _)| p).collect();
    let counts = set.daily_request_limit.is_some() || set.daily_token_limit.is_some();
    if counts && !periods.contains(&Period::Day) {
        periods.push(Period::Day);
    }
    periods
}

/// The scope of `kind`/`id` and one scope per model entry, with the periods each seeds.
fn seeded_scopes(
    kind: ScopeKind,
    id: &str,
    own: &LimitSet,
    models: &ModelLimits,
) -> Vec<(Scope, Vec<Period>)> {
    let scope = |model: Option<&String>| Scope {
        kind,
        id: id.to_string(),
        model: model.cloned(),
    };
    std::iter::once((scope(None), seeded_periods(own)))
        .chain(
            models
                .iter()
                .map(|(m, set)| (scope(Some(m)), seeded_periods(set))),
        )
        .filter(|(_, periods)| !periods.is_empty())
        .collect()
}

/// The database's figures of a key or user for the current periods: its own scope's
/// from `quota_usage` (only when `own` seeds a period), its model entries' from
/// `usage_records` (only for the periods some entry seeds), so [`settled`] and [`view`]
/// read the same source.
async fn rows_of(
    db: &Db,
    kind: ScopeKind,
    id: &str,
    own: &LimitSet,
    models: &ModelLimits,
    today: i64,
) -> Result<BTreeMap<(String, Period), Used>, StoreError> {
    let mut rows = if seeded_periods(own).is_empty() {
        BTreeMap::new()
    } else {
        let counter = Scope {
            kind,
            id: id.to_string(),
            model: None,
        }
        .counter_id();
        current(db, &[counter], today).await?
    };
    let mut periods: Vec<Period> = Vec::new();
    for set in models.values() {
        for p in seeded_periods(set) {
            if !periods.contains(&p) {
                periods.push(p);
            }
        }
    }
    rows.extend(records::model_entries(db, kind, id, models, &periods, today).await?);
    Ok(rows)
}

/// The seeds of a key or user at `now_ms`: for every day count limit and spend limit it
/// (or one of its model entries) sets, the current period's start day and what the
/// database holds for it (zeros without a row). `own` is its own limit set (its minute
/// limits are not read). No query when it sets none of these.
pub async fn settled(
    db: &Db,
    kind: ScopeKind,
    id: &str,
    own: &LimitSet,
    models: &ModelLimits,
    now_ms: i64,
) -> Result<Settled, StoreError> {
    let scopes = seeded_scopes(kind, id, own, models);
    if scopes.is_empty() {
        return Ok(Settled::default());
    }
    let today = now_ms.div_euclid(MS_PER_DAY);
    let counters: Vec<String> = scopes.iter().map(|(s, _)| s.counter_id()).collect();
    let rows = rows_of(db, kind, id, own, models, today).await?;
    let mut settled = Settled::default();
    for ((scope, periods), counter) in scopes.iter().zip(&counters) {
        for period in periods {
            let used = rows
                .get(&(counter.clone(), *period))
                .copied()
                .unwrap_or_default();
            let seed = Seed {
                start_day: period.start_day(today),
                requests: used.requests,
                tokens: used.tokens,
                cost_micros: used.cost_micros,
            };
            settled.0.insert((scope.model.clone(), *period), seed);
        }
    }
    Ok(settled)
}

/// One limit of one scope in the quota view.
#[derive(Debug, Clone, Serialize)]
pub struct LimitView {
    /// `requests`, `tokens` or `spend`.
    pub kind: &'static str,
    /// `minute` (a sliding window), `day`, `week`, `month` or `total`.
    pub period: &'static str,
    /// A count, or USD for spend.
    pub limit: serde_json::Value,
    /// Spend alert thresholds, in percent (spend only; empty otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alert_at_pct: Vec<u16>,
    /// The database's figure for the current period (a count, or USD for spend), as
    /// applied by the accounting writer; `null` for per-minute windows, which only the
    /// counter store holds.
    pub settled: serde_json::Value,
    /// The current period's first instant; `null` for minute windows and totals.
    pub period_start: Option<String>,
    /// When the current period ends; `null` for minute windows and totals.
    pub reset_at: Option<String>,
    /// The counter store's figures now (`quota_live::fill`): `used`, `held` (spend),
    /// `remaining`, `reset_at`; `null` when the store cannot answer.
    pub live: Option<serde_json::Value>,
    /// The limit in its unit (requests, tokens or micro-USD), for `live`.
    #[serde(skip)]
    pub limit_units: i64,
    /// Spend: the current period's start day and the database's micro-USD for it, what
    /// admission would seed a counter with (day counts and spend).
    #[serde(skip)]
    pub seed: Option<(i64, i64)>,
}

/// One scope of the quota view: the key or user itself, or one of its model entries.
#[derive(Debug, Clone, Serialize)]
pub struct ScopeView {
    pub scope: ScopeKind,
    pub id: String,
    /// The listed model entry (a name or prefix), `null` for the whole key or user.
    pub model: Option<String>,
    /// The scope's counter id (`quota::Scope::counter_id`, the `counter` of
    /// `quota_usage` rows and of the counter store's quota keys).
    pub counter: String,
    pub limits: Vec<LimitView>,
}

fn count_view(kind: &'static str, period: Period, limit: i64, used: Option<Used>) -> LimitView {
    let figure = used.unwrap_or_default();
    let settled = if kind == "requests" {
        figure.requests
    } else {
        figure.tokens
    };
    LimitView {
        kind,
        period: period.as_str(),
        limit: limit.into(),
        alert_at_pct: Vec::new(),
        settled: settled.into(),
        period_start: None,
        reset_at: None,
        live: None,
        limit_units: limit,
        seed: None,
    }
}

fn limit_views(
    set: &LimitSet,
    rows: &BTreeMap<(String, Period), Used>,
    counter: &str,
    today: i64,
) -> Vec<LimitView> {
    let used = |p: Period| rows.get(&(counter.to_string(), p)).copied();
    let bounds = |p: Period| {
        let start = p.start_day(today);
        match p {
            Period::Total => (None, None),
            _ => (
                Some(to_rfc3339(start * MS_PER_DAY)),
                p.end_day(start).map(|d| to_rfc3339(d * MS_PER_DAY)),
            ),
        }
    };
    let mut out = Vec::new();
    for (kind, value) in [("requests", set.rate_limit), ("tokens", set.tpm_limit)] {
        if let Some(limit) = value {
            out.push(LimitView {
                kind,
                period: "minute",
                limit: limit.into(),
                alert_at_pct: Vec::new(),
                settled: serde_json::Value::Null,
                period_start: None,
                reset_at: None,
                live: None,
                limit_units: limit,
                seed: None,
            });
        }
    }
    for (kind, value) in [
        ("requests", set.daily_request_limit),
        ("tokens", set.daily_token_limit),
    ] {
        if let Some(limit) = value {
            let (start, reset) = bounds(Period::Day);
            let view = count_view(kind, Period::Day, limit, used(Period::Day));
            // As admission seeds a day counter: it never reads below the database.
            let seed = view.settled.as_i64().map(|n| (today, n));
            out.push(LimitView {
                period_start: start,
                reset_at: reset,
                seed,
                ..view
            });
        }
    }
    for (period, spend) in set.spend_limits.iter() {
        let (start, reset) = bounds(period);
        let micros = used(period).map_or(0, |u| u.cost_micros);
        out.push(LimitView {
            kind: "spend",
            period: period.as_str(),
            limit: serde_json::json!(spend.usd),
            alert_at_pct: spend.alert_at_pct.clone(),
            settled: serde_json::json!(Usd(micros)),
            period_start: start,
            reset_at: reset,
            live: None,
            limit_units: spend.usd.micros(),
            seed: Some((period.start_day(today), micros)),
        });
    }
    out
}

/// The quota view of a key or user: `own` is its own limit set (for a key, its
/// `rate_limit`/`tpm_limit` and quotas), `models` its model entries. At most two queries (as [`settled`]).
pub async fn view(
    db: &Db,
    kind: ScopeKind,
    id: &str,
    own: &LimitSet,
    models: &ModelLimits,
    now_ms: i64,
) -> Result<Vec<ScopeView>, StoreError> {
    let today = now_ms.div_euclid(MS_PER_DAY);
    let scopes: Vec<(Scope, &LimitSet)> = std::iter::once((None, own))
        .chain(models.iter().map(|(m, set)| (Some(m.clone()), set)))
        .map(|(model, set)| {
            let scope = Scope {
                kind,
                id: id.to_string(),
                model,
            };
            (scope, set)
        })
        .collect();
    let counters: Vec<String> = scopes.iter().map(|(s, _)| s.counter_id()).collect();
    let rows = rows_of(db, kind, id, own, models, today).await?;
    Ok(scopes
        .into_iter()
        .zip(counters)
        .map(|((scope, set), counter)| ScopeView {
            limits: limit_views(set, &rows, &counter, today),
            scope: scope.kind,
            id: scope.id,
            model: scope.model,
            counter,
        })
        .collect())
}
