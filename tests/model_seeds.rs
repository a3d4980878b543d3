//! Finding D of the second attacker review, on SQLite and on Postgres: a model entry's
//! seed comes from the usage records, so spend made while the entry was not listed
//! (`model_limits` cleared, spent, set again) still counts against it. Through the admin
//! API and `/v1/report`: the entry's `settled` in the key's and the user's quota views,
//! the caches' seeds, and the admission refusal after re-listing.
#![allow(clippy::unwrap_used)]

mod common;

use common::{error_code, eventually, Backend, TestServer};
use keyward::quota::Period;
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Row;

on_both_backends!(spend_made_while_a_model_entry_was_unlisted_counts_when_it_is_listed_again);

/// The spend limits of the entry: 10,000 micro-USD a month, 20,000 in total.
fn entry() -> Value {
    json!({"gpt-4o": {"spend_limits": {"month": {"usd": 0.01}, "total": {"usd": 0.02}}}})
}

/// `settled` of the spend limit of `period` of the `gpt-4o` scope of a quota view.
fn settled(view: &Value, period: &str) -> Value {
    let scope = view["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["model"] == "gpt-4o")
        .unwrap_or_else(|| panic!("no gpt-4o scope in {view}"));
    scope["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "spend" && l["period"] == period)
        .unwrap_or_else(|| panic!("no spend/{period} in {scope}"))["settled"]
        .clone()
}

async fn spend_made_while_a_model_entry_was_unlisted_counts_when_it_is_listed_again(b: Backend) {
    let s = TestServer::start(b).await;
    let put = s
        .admin(
            Method::PUT,
            "/admin/prices/openai/gpt-4o",
            Some(json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let user = format!("seeds-{}", uuid_like());
    let (key, secret) = s
        .create_key(
            json!({"user_id": user, "rate_limit": null, "tpm_limit": null,
            "concurrent_limit": null, "model_limits": entry()}),
        )
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    let key_path = format!("/admin/keys/{id}");
    let user_path = format!("/admin/users/{user}");
    // The user exists, without model entries, while the spend is made.
    let a = s
        .admin(
            Method::PUT,
            &user_path,
            Some(json!({"daily_request_limit": 1000})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);

    // Unlist the key's entry, then spend 9,000 micro-USD on a dated gpt-4o.
    let a = s
        .admin(
            Method::PATCH,
            &key_path,
            Some(json!({"model_limits": null})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let admit = s
        .admit(json!({"key": secret, "provider": "openai", "model": "gpt-4o-2024-08-06", "estimated_tokens": 200}))
        .await;
    assert_eq!(admit.status, 200, "{}", admit.body);
    let r = json!({"lease_id": admit.body["lease_id"], "cost_usd": 0.009, "upstream_status": 200});
    let reported = s.data_post("/v1/report", r).await;
    assert_eq!(reported.body["recorded"], true, "{}", reported.body);
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&s.db.url).await.unwrap();
    eventually(10, || async {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM usage_records WHERE key_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
        (row.try_get::<i64, _>("n").unwrap() == 1).then_some(())
    })
    .await;

    // List the entries again, on the key and on its user.
    let a = s
        .admin(
            Method::PATCH,
            &key_path,
            Some(json!({"model_limits": entry()})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = s
        .admin(
            Method::PATCH,
            &user_path,
            Some(json!({"model_limits": entry()})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);

    // Their settled figures hold the spend made while they were not listed.
    for path in [&key_path, &user_path] {
        let v = s.admin(Method::GET, &format!("{path}/quota"), None).await;
        assert_eq!(v.status, 200, "{}", v.body);
        assert_eq!(
            settled(&v.body, "month"),
            json!(0.009),
            "{path}: {}",
            v.body
        );
        assert_eq!(
            settled(&v.body, "total"),
            json!(0.009),
            "{path}: {}",
            v.body
        );
    }
    let cached = s
        .state
        .key_cache
        .get(&keyward::crypto::lookup_hash(&secret))
        .await
        .unwrap()
        .unwrap();
    for period in [Period::Month, Period::Total] {
        assert_eq!(
            cached
                .settled
                .get(Some("gpt-4o"), period)
                .map(|s| s.cost_micros),
            Some(9_000),
            "{period:?}"
        );
    }
    let cached = s.state.user_cache.get(&user).await.unwrap().unwrap();
    assert_eq!(
        cached
            .settled
            .get(Some("gpt-4o"), Period::Month)
            .map(|s| (s.requests, s.cost_micros)),
        Some((1, 9_000))
    );

    // So admission starts the entry's counters there: 9,000 + a 2,000 hold passes 10,000.
    let refused = s
        .admit(json!({"key": secret, "provider": "openai", "model": "gpt-4o", "estimated_tokens": 200}))
        .await;
    assert_eq!(
        (refused.status, error_code(&refused).as_str()),
        (402, "BUDGET_EXCEEDED"),
        "{}",
        refused.body
    );
    let e = &refused.body["error"];
    assert_eq!(
        (&e["limit"], &e["model"], &e["period"]),
        (&json!("spend"), &json!("gpt-4o"), &json!("month"))
    );
    // Another model is under no entry: still admitted.
    let other = s
        .admit(json!({"key": secret, "provider": "openai", "model": "o1", "estimated_tokens": 200}))
        .await;
    assert_eq!(other.status, 200, "{}", other.body);
    pool.close().await;
    s.stop().await;
}

/// A user id no other test run shares (the test database is shared per backend).
fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
