//! Quotas on the data plane, on both shapes: a key's daily request limit, a
//! key × model requests-per-minute limit, a key's monthly spend limit, each refusing with
//! its code and the fields naming it, and all or nothing across a key's entries. The
//! key's quota columns are written straight into the database here (the admin API for
//! them is tested with it). Also the attacker review's late report: a report accepted
//! after its lease was purged still reaches the spend counter, and (the second review's
//! finding B) the model entries of its own admission even when it names no model.
#![allow(clippy::unwrap_used)]

mod common;

use common::{error_code, Answer, Cluster, Shape};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::AnyPool;

on_both_shapes!(
    a_keys_daily_request_limit_refuses_until_midnight,
    a_key_model_rpm_refuses_that_model_only,
    a_keys_monthly_spend_limit_refuses_with_budget_exceeded,
    a_quota_refusal_takes_nothing_from_the_others,
    a_report_after_its_lease_was_purged_still_counts_against_the_spend_limit,
    a_late_report_naming_no_model_counts_on_the_leases_model_entry,
);

/// A key without per-minute limits, then its quota columns set in the database (before
/// any admission, so no replica has it cached).
async fn key_with(c: &Cluster, columns: &[(&str, Value)]) -> String {
    let (key, secret) = c.servers[0]
        .create_key(json!({"rate_limit": null, "tpm_limit": null, "concurrent_limit": null}))
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&c.db.url).await.unwrap();
    for (column, value) in columns {
        let sql = format!("UPDATE client_keys SET {column} = $1 WHERE id = $2");
        let query = match value {
            Value::Number(n) => sqlx::query(&sql).bind(n.as_i64().unwrap()),
            other => sqlx::query(&sql).bind(other.to_string()),
        };
        let done = query.bind(&id).execute(&pool).await.unwrap();
        assert_eq!(done.rows_affected(), 1);
    }
    pool.close().await;
    secret
}

fn header(a: &Answer, name: &str) -> Option<String> {
    a.headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

fn error(a: &Answer) -> &Value {
    &a.body["error"]
}

async fn a_keys_daily_request_limit_refuses_until_midnight(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let secret = key_with(&c, &[("daily_request_limit", json!(3))]).await;
    let admit = json!({"key": secret, "model": "gpt-4o"});
    for i in 0..3 {
        let a = c.any(i).admit(admit.clone()).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            header(&a, "x-ratelimit-remaining-requests").as_deref(),
            Some((2 - i).to_string().as_str())
        );
        assert_eq!(
            header(&a, "ratelimit-policy").as_deref(),
            Some("\"requests\";q=3;w=86400")
        );
    }
    let a = c.any(3).admit(admit.clone()).await;
    assert_eq!((a.status, error_code(&a).as_str()), (429, "RATE_LIMITED"));
    let e = error(&a);
    assert_eq!(e["limit"], "requests");
    assert_eq!(e["scope"], "key");
    assert_eq!(e["period"], "day");
    assert!(e.get("model").is_none(), "{e}");
    let reset = e["reset_at"].as_str().unwrap();
    assert!(reset.ends_with("T00:00:00.000Z"), "{reset}");
    let retry = e["retry_after_ms"].as_i64().unwrap();
    assert!((1..=86_400_000).contains(&retry), "{retry}");
    assert!(header(&a, "retry-after").is_some());
    c.stop().await;
}

async fn a_key_model_rpm_refuses_that_model_only(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let models = json!({"gpt-4o": {"rate_limit": 2}});
    let secret = key_with(&c, &[("model_limits", models)]).await;
    // A dated model id counts under its listed prefix.
    let dated = json!({"key": secret, "model": "gpt-4o-2024-08-06"});
    for i in 0..2 {
        let a = c.any(i).admit(dated.clone()).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let a = c
        .any(2)
        .admit(json!({"key": secret, "model": "gpt-4o"}))
        .await;
    assert_eq!((a.status, error_code(&a).as_str()), (429, "RATE_LIMITED"));
    let e = error(&a);
    assert_eq!(
        (&e["limit"], &e["scope"], &e["model"], &e["period"]),
        (
            &json!("requests"),
            &json!("key"),
            &json!("gpt-4o"),
            &json!("minute")
        )
    );
    assert!(e["retry_after_ms"].as_i64().unwrap() > 50_000, "{e}");
    assert_eq!(
        header(&a, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    // Another model has no entry: it goes through.
    let a = c.any(0).admit(json!({"key": secret, "model": "o1"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(header(&a, "x-ratelimit-limit-requests").is_none());
    c.stop().await;
}

async fn a_keys_monthly_spend_limit_refuses_with_budget_exceeded(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let put = c.servers[0]
        .admin(
            Method::PUT,
            "/admin/prices/openai/gpt-4o",
            Some(json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    // 10,000 micro-USD a month; each request holds 2,000 (200 tokens at 10 USD/Mtok) and
    // costs 1,625 (50 prompt at 2.5, 150 completion at 10).
    let limits = json!({"month": {"usd": 0.01}});
    let secret = key_with(&c, &[("spend_limits", limits)]).await;
    let admit =
        json!({"key": secret, "provider": "openai", "model": "gpt-4o", "estimated_tokens": 200});
    let mut admitted = 0;
    let refusal = loop {
        let a = c.any(admitted).admit(admit.clone()).await;
        if a.status != 200 {
            break a;
        }
        admitted += 1;
        let lease = a.body["lease_id"].as_str().unwrap();
        let r = json!({"lease_id": lease, "prompt_tokens": 50, "completion_tokens": 150, "upstream_status": 200});
        let reported = c.any(admitted).data_post("/v1/report", r).await;
        assert_eq!(reported.body["recorded"], true, "{}", reported.body);
        assert!(admitted < 10, "the limit never refused");
    };
    // 5 × 1,625 = 8,125 spent: 8,125 + 2,000 would pass 10,000.
    assert_eq!(admitted, 5);
    assert_eq!(
        (refusal.status, error_code(&refusal).as_str()),
        (402, "BUDGET_EXCEEDED")
    );
    let e = error(&refusal);
    assert_eq!(
        (&e["limit"], &e["scope"], &e["period"]),
        (&json!("spend"), &json!("key"), &json!("month"))
    );
    assert!(
        e["reset_at"]
            .as_str()
            .unwrap()
            .contains("-01T00:00:00.000Z"),
        "{e}"
    );
    assert!(e["retry_after_ms"].as_i64().unwrap() > 0);
    // A hold larger than the whole limit could never pass: no retry.
    let big = c
        .any(0)
        .admit(json!({"key": secret, "provider": "openai", "model": "gpt-4o", "estimated_tokens": 2_000}))
        .await;
    assert_eq!(
        (big.status, error_code(&big).as_str()),
        (402, "BUDGET_EXCEEDED")
    );
    assert!(error(&big).get("retry_after_ms").is_none(), "{}", big.body);
    // A spend limit needs a price, as a balance does.
    let unpriced = c
        .any(0)
        .admit(json!({"key": secret, "provider": "openai", "model": "unpriced"}))
        .await;
    assert_eq!(
        (unpriced.status, error_code(&unpriced).as_str()),
        (403, "PRICE_UNKNOWN")
    );
    c.stop().await;
}

async fn a_quota_refusal_takes_nothing_from_the_others(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let models = json!({"gpt-4o": {"daily_token_limit": 300}});
    let secret = key_with(
        &c,
        &[("daily_request_limit", json!(3)), ("model_limits", models)],
    )
    .await;
    let gpt = json!({"key": secret, "model": "gpt-4o", "estimated_tokens": 200});
    let other = json!({"key": secret, "model": "o1", "estimated_tokens": 200});
    assert_eq!(c.any(0).admit(gpt.clone()).await.status, 200);
    // The model's day tokens refuse: the key's day requests take nothing from it.
    let a = c.any(1).admit(gpt.clone()).await;
    assert_eq!((a.status, error_code(&a).as_str()), (429, "RATE_LIMITED"));
    assert_eq!(
        (
            &error(&a)["limit"],
            &error(&a)["model"],
            &error(&a)["period"]
        ),
        (&json!("tokens"), &json!("gpt-4o"), &json!("day"))
    );
    // An estimate above the model's whole day could never pass: 413 before any counter.
    let a = c
        .any(2)
        .admit(json!({"key": secret, "model": "gpt-4o", "estimated_tokens": 301}))
        .await;
    assert_eq!(
        (a.status, error_code(&a).as_str()),
        (413, "TOKENS_EXCEED_LIMIT")
    );
    // Two more fit in the key's 3 a day: the refusals counted nothing.
    for i in 0..2 {
        let a = c.any(i).admit(other.clone()).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let a = c.any(2).admit(other.clone()).await;
    assert_eq!((a.status, error_code(&a).as_str()), (429, "RATE_LIMITED"));
    assert_eq!(
        (
            &error(&a)["limit"],
            &error(&a)["scope"],
            &error(&a)["period"]
        ),
        (&json!("requests"), &json!("key"), &json!("day"))
    );
    c.stop().await;
}

/// The attacker review's repro: a report accepted after its lease was purged (the key
/// admitted again after the lease expired) charged the database only, so admission kept
/// admitting past the spend limit. Reported to another replica than the admitting one.
async fn a_report_after_its_lease_was_purged_still_counts_against_the_spend_limit(shape: Shape) {
    let c = Cluster::start(shape, |raw| {
        raw.insert(keyward::config::LEASE_TTL_S, "1".into());
    })
    .await;
    let put = c.servers[0]
        .admin(
            Method::PUT,
            "/admin/prices/openai/gpt-4o",
            Some(json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    // 10,000 micro-USD a day; each request holds 1,000 (100 tokens at 10 USD/Mtok).
    let secret = key_with(&c, &[("spend_limits", json!({"day": {"usd": 0.01}}))]).await;
    let admit =
        json!({"key": secret, "provider": "openai", "model": "gpt-4o", "estimated_tokens": 100});
    let late = c.servers[0].admit(admit.clone()).await;
    assert_eq!(late.status, 200, "{}", late.body);
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    // The key admits again: its expired lease is purged, with its data and its hold.
    let next = c.servers[0].admit(admit.clone()).await;
    assert_eq!(next.status, 200, "{}", next.body);
    let r = json!({"lease_id": late.body["lease_id"], "cost_usd": 0.0095, "upstream_status": 200});
    let reported = c.any(1).data_post("/v1/report", r.clone()).await;
    assert_eq!(reported.body["recorded"], true, "{}", reported.body);
    let again = c.any(1).data_post("/v1/report", r).await;
    assert_eq!(again.body["duplicate"], true, "{}", again.body);
    // 9,500 spent: another hold of 1,000 would pass 10,000.
    let refused = c.servers[0].admit(admit.clone()).await;
    assert_eq!(
        (refused.status, error_code(&refused).as_str()),
        (402, "BUDGET_EXCEEDED"),
        "{}",
        refused.body
    );
    c.stop().await;
}

/// The second attacker review's finding B: a late report naming no model (of a lease
/// purged by its key's next admission) reached no model entry, so a per-model spend limit
/// never saw late reports. Now it settles with the purged lease's own data. Reported to
/// another replica than the admitting one; fails without the purged data (model entry 0).
async fn a_late_report_naming_no_model_counts_on_the_leases_model_entry(shape: Shape) {
    let c = Cluster::start(shape, |raw| {
        raw.insert(keyward::config::LEASE_TTL_S, "1".into());
    })
    .await;
    let put = c.servers[0]
        .admin(
            Method::PUT,
            "/admin/prices/openai/gpt-4o",
            Some(json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    // The key: 1 USD a day; its gpt-4o entry: 10,000 micro-USD a day. Each request holds
    // 1,000 (100 tokens at 10 USD/Mtok).
    let secret = key_with(
        &c,
        &[
            ("spend_limits", json!({"day": {"usd": 1}})),
            (
                "model_limits",
                json!({"gpt-4o": {"spend_limits": {"day": {"usd": 0.01}}}}),
            ),
        ],
    )
    .await;
    let admit =
        json!({"key": secret, "provider": "openai", "model": "gpt-4o", "estimated_tokens": 100});
    for _ in 0..3 {
        let late = c.servers[0].admit(admit.clone()).await;
        assert_eq!(late.status, 200, "{}", late.body);
        tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
        // The key admits again: the expired lease is purged (its slot and holds released).
        let next = c.servers[0].admit(admit.clone()).await;
        assert_eq!(next.status, 200, "{}", next.body);
        let r = json!({"lease_id": late.body["lease_id"], "cost_usd": 0.0035,
                       "upstream_status": 200});
        let reported = c.any(1).data_post("/v1/report", r).await;
        assert_eq!(reported.body["recorded"], true, "{}", reported.body);
    }
    // 10,500 spent on the gpt-4o entry: its day is used up (the key's 1 USD is not).
    let refused = c.servers[0].admit(admit.clone()).await;
    assert_eq!(
        (refused.status, error_code(&refused).as_str()),
        (402, "BUDGET_EXCEEDED"),
        "{}",
        refused.body
    );
    assert_eq!(error(&refused)["model"], "gpt-4o", "{}", refused.body);
    assert_eq!(error(&refused)["scope"], "key", "{}", refused.body);
    c.stop().await;
}
