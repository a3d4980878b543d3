//! The spend ledger through the accounting writer's batch apply, on SQLite and Postgres:
//! each period (UTC day, ISO week, month, total) counts in its own row, a threshold
//! alerts again in a new period but not on a repeated batch, and a row that would pass
//! 2^53 − 1 sets its record aside as a dead letter instead of wrapping.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{Backend, TestServer};
use keyward::quota::{Scope, ScopeKind};
use keyward::usage::{UsageRecord, UsageSource};
use reqwest::Method;
use serde_json::json;
use sqlx::Row;

fn counter(kind: ScopeKind, id: &str, model: Option<&str>) -> String {
    Scope {
        kind,
        id: id.to_string(),
        model: model.map(str::to_string),
    }
    .counter_id()
}

/// A usage record of key `key` at `day` (days since 1970-01-01) costing `micros`.
fn record(id: &str, key: &str, day: i64, micros: i64) -> UsageRecord {
    UsageRecord {
        id: id.to_string(),
        key_id: Some(key.to_string()),
        provider: Some("openai".into()),
        model: Some("gpt-4o".into()),
        api_format: None,
        provider_key_id: None,
        prompt_tokens: 3,
        completion_tokens: 2,
        cost_micros: micros,
        latency_ms: None,
        upstream_status: None,
        created_at: day * 86_400_000 + 3_600_000,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        source: UsageSource::Reported,
    }
}

/// `(period, start_day) -> (requests, tokens, cost)` of one counter.
async fn ledger(pool: &sqlx::AnyPool, counter: &str) -> BTreeMap<(String, i64), (i64, i64, i64)> {
    let rows = sqlx::query(
        "SELECT period, start_day, requests, tokens, cost_micros FROM quota_usage WHERE counter = $1",
    )
    .bind(counter)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.iter()
        .map(|r| {
            (
                (
                    r.try_get("period").unwrap(),
                    r.try_get("start_day").unwrap(),
                ),
                (
                    r.try_get("requests").unwrap(),
                    r.try_get("tokens").unwrap(),
                    r.try_get("cost_micros").unwrap(),
                ),
            )
        })
        .collect()
}

/// The writer's batch apply, directly: records of two days in two months count in their
/// own day and month rows (one week, one total), a threshold alerts again in a new
/// period and not on a repeat, and a row that would pass 2^53 − 1 sets its record aside
/// as a dead letter, changing nothing.
async fn each_period_counts_apart_alerts_again_and_never_wraps(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (key, _) = s.create_key(json!({"user_id": "solo"})).await;
    let key = key["id"].as_str().unwrap();
    let pool = sqlx::AnyPool::connect(&s.db.url).await.unwrap();
    sqlx::query("UPDATE client_keys SET spend_limits = $2 WHERE id = $1")
        .bind(key)
        .bind(r#"{"day": {"usd": 1, "alert_at_pct": [100]}, "month": {"usd": 5, "alert_at_pct": [100]}}"#)
        .execute(&pool)
        .await
        .unwrap();
    // 2026-10-31 (a Saturday) and 2026-11-01: two months, one ISO week.
    let (oct31, nov1) = (
        keyward::quota::days_from_civil(2026, 10, 31),
        keyward::quota::days_from_civil(2026, 11, 1),
    );
    let week = keyward::quota::Period::Week.start_day(oct31);
    let batch = [
        record("r1", key, oct31, 1_000_000),
        record("r2", key, nov1, 1_000_000),
        record("r3", key, nov1, 500_000),
    ];
    let applied = keyward::accounting::apply_batch(&s.state.db, &batch)
        .await
        .unwrap();
    assert_eq!(applied.inserted, 3);
    let again = keyward::accounting::apply_batch(&s.state.db, &batch)
        .await
        .unwrap();
    assert_eq!(again.duplicates, 3);

    let month_oct = keyward::quota::days_from_civil(2026, 10, 1);
    let want: BTreeMap<(String, i64), (i64, i64, i64)> = [
        (("day".to_string(), oct31), (1, 5, 1_000_000)),
        (("day".to_string(), nov1), (2, 10, 1_500_000)),
        (("week".to_string(), week), (3, 15, 2_500_000)),
        (("month".to_string(), month_oct), (1, 5, 1_000_000)),
        (("month".to_string(), nov1), (2, 10, 1_500_000)),
        (("total".to_string(), 0), (3, 15, 2_500_000)),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        ledger(&pool, &counter(ScopeKind::Key, key, None)).await,
        want
    );
    // The user has no limits (no `users` row) but a ledger all the same.
    assert_eq!(
        ledger(&pool, &counter(ScopeKind::User, "solo", None)).await,
        want
    );

    let list = s.admin(Method::GET, "/admin/alerts?limit=1000", None).await;
    assert_eq!(list.status, 200, "{}", list.body);
    let list = list.body["alerts"].as_array().unwrap().clone();
    let mut starts: Vec<(String, String)> = list
        .iter()
        .map(|a| {
            let p = &a["payload"];
            (
                p["period"].as_str().unwrap().into(),
                p["period_start"].as_str().unwrap().into(),
            )
        })
        .collect();
    starts.sort();
    assert_eq!(
        starts,
        [
            ("day".to_string(), "2026-10-31T00:00:00.000Z".to_string()),
            ("day".to_string(), "2026-11-01T00:00:00.000Z".to_string()),
        ]
    );

    // Limits that cannot be read (written by hand) alert nothing, and stop nothing.
    let (odd, _) = s.create_key(json!({})).await;
    let odd = odd["id"].as_str().unwrap();
    sqlx::query("UPDATE client_keys SET spend_limits = 'not json' WHERE id = $1")
        .bind(odd)
        .execute(&pool)
        .await
        .unwrap();
    let applied = keyward::accounting::apply_batch(&s.state.db, &[record("o1", odd, nov1, 9)])
        .await
        .unwrap();
    assert_eq!(applied.inserted, 1);
    let rows = ledger(&pool, &counter(ScopeKind::Key, odd, None)).await;
    assert_eq!(rows.get(&("total".to_string(), 0)), Some(&(1, 5, 9)));

    // The key's total row one micro-USD short of what a cost of 1 USD needs: refused.
    let total = counter(ScopeKind::Key, key, None);
    sqlx::query("UPDATE quota_usage SET cost_micros = $2 WHERE counter = $1 AND period = 'total'")
        .bind(&total)
        .bind((1_i64 << 53) - 1_000_000 + 1)
        .execute(&pool)
        .await
        .unwrap();
    let before = ledger(&pool, &total).await;
    let refused =
        keyward::accounting::apply_batch(&s.state.db, &[record("r4", key, nov1, 1_000_000)])
            .await
            .unwrap();
    assert_eq!((refused.inserted, refused.dead_lettered), (0, 1));
    assert_eq!(ledger(&pool, &total).await, before);
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM usage_records WHERE id = 'r4'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(n, 0);
    pool.close().await;
    s.stop().await;
}

/// Alerts follow the limit as it is when a record is applied: a threshold added below
/// what the period already spent alerts with the next record; a limit raised mid-period
/// alerts again at its own thresholds; a repeat of either alerts nothing more.
async fn changed_limits_alert_at_their_own_thresholds(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (key, _) = s.create_key(json!({})).await;
    let key = key["id"].as_str().unwrap();
    let pool = sqlx::AnyPool::connect(&s.db.url).await.unwrap();
    let limits = |json: &'static str| {
        let pool = pool.clone();
        let key = key.to_string();
        async move {
            sqlx::query("UPDATE client_keys SET spend_limits = $2 WHERE id = $1")
                .bind(key)
                .bind(json)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let day = keyward::quota::days_from_civil(2026, 11, 30);
    let apply = |id: &'static str, micros: i64| {
        let db = s.state.db.clone();
        let r = record(id, key, day, micros);
        async move { keyward::accounting::apply_batch(&db, &[r]).await.unwrap() }
    };
    let alerts = || async {
        let list = s.admin(Method::GET, "/admin/alerts?limit=1000", None).await;
        let mut seen: Vec<(String, i64)> = list.body["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let p = &a["payload"];
                let limit = (p["limit_usd"].as_f64().unwrap() * 1e6).round() as i64;
                (format!("{}%", p["threshold_pct"]), limit)
            })
            .collect();
        seen.sort();
        seen
    };

    // 0.6 USD spent without thresholds: nothing. Then 50% is added: the next record
    // (of 1 micro-USD) alerts it.
    limits(r#"{"month": {"usd": 1}}"#).await;
    apply("a1", 600_000).await;
    assert_eq!(alerts().await, []);
    limits(r#"{"month": {"usd": 1, "alert_at_pct": [50]}}"#).await;
    apply("a2", 1).await;
    assert_eq!(alerts().await, [("50%".to_string(), 1_000_000)]);
    apply("a3", 1).await;
    assert_eq!(
        alerts().await,
        [("50%".to_string(), 1_000_000)],
        "once per period and limit"
    );

    // Raised to 2 USD: its 50% (1 USD) alerts when the spend reaches it, once.
    limits(r#"{"month": {"usd": 2, "alert_at_pct": [50]}}"#).await;
    apply("a4", 300_000).await;
    assert_eq!(alerts().await.len(), 1, "0.9 USD is below 50% of 2 USD");
    apply("a5", 100_000).await;
    apply("a6", 100_000).await;
    assert_eq!(
        alerts().await,
        [
            ("50%".to_string(), 1_000_000),
            ("50%".to_string(), 2_000_000)
        ]
    );
    pool.close().await;
    s.stop().await;
}

on_both_backends!(
    each_period_counts_apart_alerts_again_and_never_wraps,
    changed_limits_alert_at_their_own_thresholds,
);
