//! The client-key admin API (contract section 4, seed `ApiKeyService`), on SQLite and on a
//! real Postgres.
#![allow(clippy::unwrap_used)]

mod common;

use common::{error_code, Backend, TestServer, TOKEN};
use keyward::usage::{store as usage_store, UsageRecord, UsageSource};
use reqwest::Method;
use serde_json::{json, Value};

on_both_backends!(
    create_uses_defaults_and_shows_the_secret_once,
    create_with_every_field,
    lists_by_user_and_standalone_newest_first_with_active_filter,
    patch_changes_only_updatable_fields,
    delete_disables_and_keeps_the_record,
    reveal_returns_the_secret_that_was_created,
    balance_adjustment_follows_every_rule,
    stats_give_totals_average_latency_and_days,
    usage_batches_apply_exactly_once,
    expiry_on_request_disables_or_deletes_and_keeps_history,
    expiry_runs_periodically,
    admin_token_is_required_and_checked,
    admin_api_without_a_token_refuses_everything,
    health_and_readiness,
);

async fn create_uses_defaults_and_shows_the_secret_once(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, secret) = s.create_key(json!({})).await;
    assert!(
        secret.starts_with("sk-kw-") && secret.len() == 49,
        "{secret}"
    );
    assert_eq!(key["prefix"], json!(secret[..12]));
    assert_eq!(key["rate_limit"], 100);
    assert_eq!(key["concurrent_limit"], 5);
    assert_eq!(key["tpm_limit"], Value::Null);
    assert_eq!(key["is_active"], true);
    assert_eq!(key["is_standalone"], false);
    assert_eq!(key["balance_usd"], Value::Null);
    assert_eq!(key["remaining_balance_usd"], Value::Null);
    assert_eq!(key["expires_at"], Value::Null);
    assert_eq!(key["allowed_models"], Value::Null);
    assert!(key["name"].as_str().unwrap().starts_with("API Key "));
    for field in [
        "id",
        "created_at",
        "updated_at",
        "last_used_at",
        "user_id",
        "auto_delete_on_expiry",
    ] {
        assert!(key.get(field).is_some(), "Key has no {field}");
    }
    let id = key["id"].as_str().unwrap();
    // Neither get nor list shows the secret, its hash or its ciphertext again.
    let got = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    let listed = s.admin(Method::GET, "/admin/keys", None).await;
    for answer in [&got, &listed] {
        let text = answer.body.to_string();
        assert!(!text.contains(&secret), "secret leaked: {text}");
        assert!(
            !text.contains("enc:v1:") && !text.contains("key_hash"),
            "{text}"
        );
    }
    assert_eq!(got.body["id"], key["id"]);
    s.stop().await;
}

async fn create_with_every_field(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s
        .create_key(json!({
            "user_id": "u-1", "name": "  ci key  ",
            "allowed_providers": ["openai", "openai", "anthropic"],
            "allowed_api_formats": [], "allowed_models": ["gpt-4o"],
            "rate_limit": null, "tpm_limit": 5000, "concurrent_limit": null,
            "expire_days": 30, "auto_delete_on_expiry": true,
        }))
        .await;
    assert_eq!(key["user_id"], "u-1");
    assert_eq!(key["name"], "ci key");
    assert_eq!(key["allowed_providers"], json!(["openai", "anthropic"]));
    assert_eq!(
        key["allowed_api_formats"],
        Value::Null,
        "empty list means all"
    );
    assert_eq!(key["allowed_models"], json!(["gpt-4o"]));
    assert_eq!(key["rate_limit"], Value::Null);
    assert_eq!(key["tpm_limit"], 5000);
    assert_eq!(key["concurrent_limit"], Value::Null);
    assert_eq!(key["auto_delete_on_expiry"], true);
    let expires =
        chrono::DateTime::parse_from_rfc3339(key["expires_at"].as_str().unwrap()).unwrap();
    let days = (expires.timestamp() - chrono::Utc::now().timestamp()) as f64 / 86_400.0;
    assert!((29.9..=30.0).contains(&days), "{days}");

    let (key, _) = s
        .create_key(json!({"expires_at": "2999-01-02T03:04:05Z", "is_standalone": true, "initial_balance_usd": 12.345678}))
        .await;
    assert_eq!(key["expires_at"], "2999-01-02T03:04:05.000Z");
    assert_eq!(key["is_standalone"], true);
    assert_eq!(key["balance_usd"], 12.345678);
    assert_eq!(key["remaining_balance_usd"], 12.345678);
    assert_eq!(key["balance_used_usd"], 0);
    s.stop().await;
}

async fn lists_by_user_and_standalone_newest_first_with_active_filter(b: Backend) {
    let s = TestServer::start(b).await;
    let (a1, _) = s
        .create_key(json!({"user_id": "alice", "name": "a1"}))
        .await;
    let (a2, _) = s
        .create_key(json!({"user_id": "alice", "name": "a2"}))
        .await;
    let (_b1, _) = s.create_key(json!({"user_id": "bob", "name": "b1"})).await;
    let (s1, _) = s
        .create_key(json!({"user_id": "alice", "name": "s1", "is_standalone": true}))
        .await;
    let (s2, _) = s
        .create_key(json!({"name": "s2", "is_standalone": true}))
        .await;
    s.admin(
        Method::DELETE,
        &format!("/admin/keys/{}", a1["id"].as_str().unwrap()),
        None,
    )
    .await;
    s.admin(
        Method::DELETE,
        &format!("/admin/keys/{}", s2["id"].as_str().unwrap()),
        None,
    )
    .await;

    let names = |answer: common::Answer| -> Vec<String> {
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap().to_string())
            .collect()
    };
    let get = |q: &'static str| s.admin(Method::GET, q, None);
    assert_eq!(
        names(get("/admin/keys?user_id=alice").await),
        ["a2", "a1"],
        "standalone keys excluded"
    );
    assert_eq!(
        names(get("/admin/keys?user_id=alice&active=true").await),
        ["a2"]
    );
    assert_eq!(
        names(get("/admin/keys?user_id=alice&active=false").await),
        ["a1"]
    );
    assert_eq!(names(get("/admin/keys?user_id=bob&active=").await), ["b1"]);
    assert_eq!(names(get("/admin/keys").await), ["b1", "a2", "a1"]);
    assert_eq!(names(get("/admin/keys/standalone").await), ["s2", "s1"]);
    assert_eq!(
        names(get("/admin/keys/standalone?active=true").await),
        ["s1"]
    );
    assert_eq!(
        names(get("/admin/keys/standalone?active=false").await),
        ["s2"]
    );
    assert_eq!(
        names(get("/admin/keys?user_id=nobody").await),
        Vec::<String>::new()
    );
    let _ = (a2, s1);
    s.stop().await;
}

async fn patch_changes_only_updatable_fields(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s
        .create_key(
            json!({"user_id": "u", "name": "old", "allowed_models": ["a"], "tpm_limit": 10}),
        )
        .await;
    let path = format!("/admin/keys/{}", key["id"].as_str().unwrap());
    // Timestamps have millisecond resolution: let one pass, so updated_at must move.
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let patched = s
        .admin(
            Method::PATCH,
            &path,
            Some(json!({
                "name": "new", "allowed_models": [], "allowed_providers": ["openai"],
                "rate_limit": 7, "tpm_limit": null, "concurrent_limit": 2, "is_active": false,
                "expires_at": "2998-05-06T07:08:09Z", "auto_delete_on_expiry": false,
            })),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let k = &patched.body;
    assert_eq!(k["name"], "new");
    assert_eq!(k["allowed_models"], Value::Null);
    assert_eq!(k["allowed_providers"], json!(["openai"]));
    assert_eq!(
        (k["rate_limit"].clone(), k["tpm_limit"].clone()),
        (json!(7), Value::Null)
    );
    assert_eq!(k["concurrent_limit"], 2);
    assert_eq!(k["is_active"], false);
    assert_eq!(k["expires_at"], "2998-05-06T07:08:09.000Z");
    assert_eq!(k["auto_delete_on_expiry"], false);
    assert_eq!(k["user_id"], "u", "untouched");
    assert_ne!(k["updated_at"], key["updated_at"]);

    // Absent fields stay; null clears.
    let again = s
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"expires_at": null, "is_active": true})),
        )
        .await;
    assert_eq!(again.body["name"], "new");
    assert_eq!(again.body["rate_limit"], 7);
    assert_eq!(again.body["expires_at"], Value::Null);
    assert_eq!(again.body["is_active"], true);

    // Fields that are not updatable are refused, and nothing changes.
    let before = s.admin(Method::GET, &path, None).await.body;
    for body in [
        json!({"user_id": "other"}),
        json!({"is_standalone": true}),
        json!({"balance_usd": 5}),
        json!({"secret": "x"}),
        json!({"name": "fine", "prefix": "sk-"}),
        json!({"name": null}),
        json!({"is_active": null}),
        json!({"rate_limit": 0}),
    ] {
        let a = s.admin(Method::PATCH, &path, Some(body.clone())).await;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        assert_eq!(error_code(&a), "BAD_REQUEST");
    }
    assert_eq!(s.admin(Method::GET, &path, None).await.body, before);
    let missing = s
        .admin(
            Method::PATCH,
            "/admin/keys/00000000-0000-4000-8000-000000000000",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(
        (missing.status, error_code(&missing).as_str()),
        (404, "NOT_FOUND")
    );
    s.stop().await;
}

async fn delete_disables_and_keeps_the_record(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s.create_key(json!({})).await;
    let path = format!("/admin/keys/{}", key["id"].as_str().unwrap());
    let deleted = s.admin(Method::DELETE, &path, None).await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.body["is_active"], false);
    let got = s.admin(Method::GET, &path, None).await;
    assert_eq!(
        (got.status, got.body["is_active"].clone()),
        (200, json!(false))
    );
    let missing = s
        .admin(
            Method::DELETE,
            "/admin/keys/00000000-0000-4000-8000-000000000000",
            None,
        )
        .await;
    assert_eq!(missing.status, 404);
    s.stop().await;
}

async fn reveal_returns_the_secret_that_was_created(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, secret) = s.create_key(json!({})).await;
    let id = key["id"].as_str().unwrap();
    let revealed = s
        .admin(Method::POST, &format!("/admin/keys/{id}/reveal"), None)
        .await;
    assert_eq!(revealed.status, 200);
    assert_eq!(revealed.body, json!({"secret": secret}));
    // The stored form is a hash plus an enc:v1: ciphertext, never the secret.
    let db = s.db.connect().await;
    let stored = keyward::client_keys::store::get(&db, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.key_hash, keyward::crypto::lookup_hash(&secret));
    assert!(stored.key_encrypted.starts_with("enc:v1:") && !stored.key_encrypted.contains(&secret));
    let missing = s
        .admin(
            Method::POST,
            "/admin/keys/00000000-0000-4000-8000-000000000000/reveal",
            None,
        )
        .await;
    assert_eq!(missing.status, 404);
    s.stop().await;
}

async fn balance_adjustment_follows_every_rule(b: Backend) {
    let s = TestServer::start(b).await;
    let (standalone, _) = s
        .create_key(json!({"is_standalone": true, "initial_balance_usd": 10}))
        .await;
    let (unlimited, _) = s.create_key(json!({"is_standalone": true})).await;
    let (normal, _) = s.create_key(json!({})).await;
    let path = |k: &Value| format!("/admin/keys/{}/balance", k["id"].as_str().unwrap());
    let server = &s;
    let adjust = |k: &Value, amount: Value| {
        let p = path(k);
        async move {
            server
                .admin(Method::POST, &p, Some(json!({"amount_usd": amount})))
                .await
        }
    };

    let a = adjust(&standalone, json!(2.5)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["balance_usd"], 12.5);
    let a = adjust(&standalone, json!(-0.000001)).await;
    assert_eq!(a.body["remaining_balance_usd"], 12.499999);

    for (key, amount, code) in [
        (&normal, json!(5), "NOT_STANDALONE"),
        (&standalone, json!(0), "ZERO_AMOUNT"),
        (&standalone, json!(-12.5), "BALANCE_REFUSED"),
        (&unlimited, json!(-1), "BALANCE_REFUSED"),
    ] {
        let a = adjust(key, amount.clone()).await;
        assert_eq!(
            (a.status, error_code(&a)),
            (422, code.to_string()),
            "{amount}"
        );
    }
    // Exactly the remaining balance may be deducted.
    let a = adjust(&standalone, json!(-12.499999)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["remaining_balance_usd"], 0);

    // A key without a balance limit that is credited starts with exactly that much.
    let a = adjust(&unlimited, json!(3)).await;
    assert_eq!(a.body["remaining_balance_usd"], 3);

    // Spending moves the remaining balance; a deduction beyond what is left is refused.
    let db = s.db.connect().await;
    let id = unlimited["id"].as_str().unwrap();
    usage_store::apply(&db, &[record("r1", id, 1_000, 2_000_000)])
        .await
        .unwrap();
    let a = adjust(&unlimited, json!(-1.5)).await;
    assert_eq!(a.status, 422, "only 1 USD is left: {}", a.body);
    let a = adjust(&unlimited, json!(-1)).await;
    assert_eq!(
        (a.status, a.body["remaining_balance_usd"].clone()),
        (200, json!(0))
    );

    for (amount, why) in [
        (json!("5"), "a string"),
        (json!(0.0000001), "more than 6 decimals"),
        (json!(1e12), "out of range"),
        (json!(null), "null"),
        (json!(true), "a boolean"),
    ] {
        let a = adjust(&standalone, amount).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{why}"
        );
    }
    let after = s
        .admin(
            Method::GET,
            &format!("/admin/keys/{}", standalone["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        after.body["remaining_balance_usd"], 0,
        "refused adjustments changed nothing"
    );
    let missing = s
        .admin(
            Method::POST,
            "/admin/keys/00000000-0000-4000-8000-000000000000/balance",
            Some(json!({"amount_usd": 1})),
        )
        .await;
    assert_eq!(missing.status, 404);
    s.stop().await;
}

fn record(id: &str, key_id: &str, created_at: i64, cost_micros: i64) -> UsageRecord {
    UsageRecord {
        id: id.to_string(),
        key_id: Some(key_id.to_string()),
        provider: Some("openai".into()),
        model: Some("gpt-4o".into()),
        api_format: None,
        provider_key_id: None,
        prompt_tokens: 10,
        completion_tokens: 5,
        cost_micros,
        latency_ms: Some(100),
        upstream_status: Some(200),
        created_at,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        source: UsageSource::Reported,
    }
}

const DAY1: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const DAY: i64 = 86_400_000;

async fn stats_give_totals_average_latency_and_days(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s.create_key(json!({})).await;
    let (other, _) = s.create_key(json!({})).await;
    let id = key["id"].as_str().unwrap();
    let mut rows = vec![
        record("a", id, DAY1 + 1_000, 1_500_000),
        record("b", id, DAY1 + 2_000, 500_000),
        record("c", id, DAY1 + DAY + 5, 250_000),
        record("d", id, DAY1 + 3 * DAY, 1),
        record("x", other["id"].as_str().unwrap(), DAY1, 9_000_000),
    ];
    rows[1].latency_ms = Some(300);
    rows[2].latency_ms = None;
    rows[2].completion_tokens = 100;
    // Token classes (within the tokens) and where the numbers came from.
    rows[0].cached_tokens = 4;
    rows[0].reasoning_tokens = 2;
    rows[0].source = UsageSource::Parsed;
    rows[1].cache_write_tokens = 3;
    rows[1].source = UsageSource::Estimated;
    rows[2].cached_tokens = 1;
    rows[2].reasoning_tokens = 50;
    rows[2].source = UsageSource::Estimated;
    rows[4].cached_tokens = 1_000;
    rows[4].source = UsageSource::Estimated;
    let db = s.db.connect().await;
    usage_store::apply(&db, &rows).await.unwrap();

    let all = s
        .admin(Method::GET, &format!("/admin/keys/{id}/stats"), None)
        .await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(all.body["key_id"], id);
    assert_eq!(all.body["total_requests"], 4);
    assert_eq!(all.body["total_tokens"], 15 * 3 + 110);
    assert_eq!(all.body["total_cost_usd"], 2.250001);
    // (100 + 300 + 100) / 3: rows without latency do not count.
    assert_eq!(
        all.body["avg_response_time_ms"].as_f64().unwrap().round(),
        167.0
    );
    assert_eq!(
        (
            &all.body["total_cached_tokens"],
            &all.body["total_cache_write_tokens"],
            &all.body["total_reasoning_tokens"],
            &all.body["estimated_requests"],
        ),
        (&json!(5), &json!(3), &json!(52), &json!(2))
    );
    let none = json!({"cached_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0, "estimated_requests": 0});
    let day = |base: Value, classes: &Value| {
        let mut day = base;
        day.as_object_mut()
            .unwrap()
            .extend(classes.as_object().unwrap().clone());
        day
    };
    assert_eq!(
        all.body["daily_stats"],
        json!([
            day(
                json!({"date": "2026-01-01", "requests": 2, "tokens": 30, "cost_usd": 2}),
                &json!({"cached_tokens": 4, "cache_write_tokens": 3, "reasoning_tokens": 2, "estimated_requests": 1})
            ),
            day(
                json!({"date": "2026-01-02", "requests": 1, "tokens": 110, "cost_usd": 0.25}),
                &json!({"cached_tokens": 1, "cache_write_tokens": 0, "reasoning_tokens": 50, "estimated_requests": 1})
            ),
            day(
                json!({"date": "2026-01-04", "requests": 1, "tokens": 15, "cost_usd": 0.000001}),
                &none
            ),
        ])
    );

    // A date range: dates are whole UTC days, inclusive at both ends.
    let range = s
        .admin(
            Method::GET,
            &format!("/admin/keys/{id}/stats?start=2026-01-02&end=2026-01-04"),
            None,
        )
        .await;
    assert_eq!(range.body["total_requests"], 2);
    assert_eq!(range.body["daily_stats"].as_array().unwrap().len(), 2);
    let range = s
        .admin(
            Method::GET,
            &format!("/admin/keys/{id}/stats?start=2026-01-01T00:00:01.500Z&end=2026-01-01"),
            None,
        )
        .await;
    assert_eq!(range.body["total_requests"], 1);
    assert_eq!(range.body["total_cost_usd"], 0.5);

    let empty = s
        .admin(
            Method::GET,
            &format!("/admin/keys/{id}/stats?start=2030-01-01"),
            None,
        )
        .await;
    assert_eq!(empty.body["total_requests"], 0);
    assert_eq!(empty.body["total_cached_tokens"], 0);
    assert_eq!(empty.body["estimated_requests"], 0);
    assert_eq!(empty.body["daily_stats"], json!([]));

    for q in [
        "?start=yesterday",
        "?end=2026-13-01",
        "?start=2026-02-01&end=2026-01-01",
        "?bogus=1",
    ] {
        let a = s
            .admin(Method::GET, &format!("/admin/keys/{id}/stats{q}"), None)
            .await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{q}"
        );
    }
    let missing = s
        .admin(
            Method::GET,
            "/admin/keys/00000000-0000-4000-8000-000000000000/stats",
            None,
        )
        .await;
    assert_eq!(missing.status, 404);
    s.stop().await;
}

async fn usage_batches_apply_exactly_once(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s
        .create_key(json!({"is_standalone": true, "initial_balance_usd": 5}))
        .await;
    let id = key["id"].as_str().unwrap();
    let db = s.db.connect().await;
    let batch = vec![
        record("lease-1", id, DAY1, 1_000_000),
        record("lease-2", id, DAY1 + 10, 250_000),
    ];
    let first = usage_store::apply(&db, &batch).await.unwrap();
    assert_eq!((first.inserted, first.duplicates), (2, 0));
    // A retried batch, and a batch overlapping it, count nothing twice.
    let again = usage_store::apply(&db, &batch).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 2));
    let overlap = usage_store::apply(
        &db,
        &[batch[1].clone(), record("lease-3", id, DAY1 + 20, 0)],
    )
    .await
    .unwrap();
    assert_eq!((overlap.inserted, overlap.duplicates), (1, 1));

    let k = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await
        .body;
    assert_eq!(k["total_requests"], 3);
    assert_eq!(k["total_tokens"], 45);
    assert_eq!(k["total_cost_usd"], 1.25);
    assert_eq!(k["balance_used_usd"], 1.25);
    assert_eq!(k["remaining_balance_usd"], 3.75);
    assert_eq!(k["last_used_at"], "2026-01-01T00:00:00.020Z");
    let stats = s
        .admin(Method::GET, &format!("/admin/keys/{id}/stats"), None)
        .await
        .body;
    assert_eq!(stats["total_requests"], 3);

    // A batch larger than one statement's rows, with a record repeated inside a chunk
    // and across chunks, and one applied before: each counts once.
    let (other, _) = s.create_key(json!({})).await;
    let other = other["id"].as_str().unwrap();
    let mut large: Vec<_> = (0..450)
        .map(|i| record(&format!("large-{i}"), other, DAY1 + i, 1))
        .collect();
    large.insert(3, large[2].clone());
    large.push(large[10].clone());
    large.push(batch[0].clone());
    let applied = usage_store::apply(&db, &large).await.unwrap();
    assert_eq!((applied.inserted, applied.duplicates), (450, 3));
    let k = s
        .admin(Method::GET, &format!("/admin/keys/{other}"), None)
        .await
        .body;
    assert_eq!(k["total_requests"], 450);
    assert_eq!(k["total_cost_usd"], 0.00045);

    // Spending past the balance (one in-flight request's worth) never shows as negative.
    usage_store::apply(&db, &[record("lease-4", id, DAY1 + 30, 4_000_000)])
        .await
        .unwrap();
    let k = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await
        .body;
    assert_eq!(k["balance_used_usd"], 5.25);
    assert_eq!(k["remaining_balance_usd"], 0);
    s.stop().await;
}

async fn expiry_on_request_disables_or_deletes_and_keeps_history(b: Backend) {
    let s = TestServer::start(b).await;
    let (keep, _) = s
        .create_key(json!({"name": "keep", "auto_delete_on_expiry": false}))
        .await;
    let (gone, _) = s
        .create_key(json!({"name": "gone", "auto_delete_on_expiry": true}))
        .await;
    let (follows, _) = s.create_key(json!({"name": "follows"})).await;
    let (future, _) = s
        .create_key(json!({"name": "future", "expire_days": 1}))
        .await;
    let (never, _) = s.create_key(json!({"name": "never"})).await;
    for k in [&keep, &gone, &follows] {
        let p = format!("/admin/keys/{}", k["id"].as_str().unwrap());
        let a = s
            .admin(
                Method::PATCH,
                &p,
                Some(json!({"expires_at": "2020-01-01T00:00:00Z"})),
            )
            .await;
        assert_eq!(a.status, 200);
    }
    let db = s.db.connect().await;
    let gone_id = gone["id"].as_str().unwrap();
    usage_store::apply(&db, &[record("h1", gone_id, DAY1, 10)])
        .await
        .unwrap();

    let done = s
        .admin(
            Method::POST,
            "/admin/keys/expire",
            Some(json!({"auto_delete": true})),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    // keep: its own false wins over the default; gone: deleted; follows: default (delete).
    assert_eq!(done.body["processed"], 3);
    assert_eq!(
        (done.body["deleted"].clone(), done.body["disabled"].clone()),
        (json!(2), json!(1))
    );
    let server = &s;
    let status = |k: &Value| {
        let p = format!("/admin/keys/{}", k["id"].as_str().unwrap());
        async move {
            let a = server.admin(Method::GET, &p, None).await;
            (a.status, a.body["is_active"].clone())
        }
    };
    assert_eq!(status(&keep).await, (200, json!(false)));
    assert_eq!(status(&gone).await.0, 404);
    assert_eq!(status(&follows).await.0, 404);
    assert_eq!(status(&future).await, (200, json!(true)));
    assert_eq!(status(&never).await, (200, json!(true)));
    // The deleted key's usage history is still there.
    let history = usage_store::stats(&db, gone_id, i64::MIN, i64::MAX)
        .await
        .unwrap();
    assert_eq!(history.requests, 1);

    // A second pass finds nothing; without a body the default (disable) applies.
    let (late, _) = s.create_key(json!({"name": "late"})).await;
    let p = format!("/admin/keys/{}", late["id"].as_str().unwrap());
    s.admin(Method::PATCH, &p, Some(json!({"expires_at": "2021-01-01"})))
        .await;
    let done = s.admin(Method::POST, "/admin/keys/expire", None).await;
    assert_eq!(done.body["processed"], 1);
    assert_eq!(done.body["disabled"], 1);
    assert_eq!(status(&late).await, (200, json!(false)));
    s.stop().await;
}

async fn expiry_runs_periodically(b: Backend) {
    let s = TestServer::start_with(b, |raw| {
        raw.insert(keyward::config::EXPIRY_INTERVAL_S, "1".into());
    })
    .await;
    let (key, _) = s.create_key(json!({})).await;
    let p = format!("/admin/keys/{}", key["id"].as_str().unwrap());
    s.admin(
        Method::PATCH,
        &p,
        Some(json!({"expires_at": "2020-01-01T00:00:00Z"})),
    )
    .await;
    let mut active = json!(true);
    for _ in 0..40 {
        active = s.admin(Method::GET, &p, None).await.body["is_active"].clone();
        if active == json!(false) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        active,
        json!(false),
        "the periodic job did not disable the expired key"
    );
    s.stop().await;
}

async fn admin_token_is_required_and_checked(b: Backend) {
    let s = TestServer::start(b).await;
    for token in [
        None,
        Some("wrong"),
        Some("test-admin-token-012345678"),
        Some(""),
    ] {
        let a = s
            .admin_raw(Method::POST, "/admin/keys", Some("{}"), token)
            .await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (401, "UNAUTHORIZED"),
            "{token:?}"
        );
        assert_eq!(a.headers["www-authenticate"], "Bearer");
    }
    let list = s.admin(Method::GET, "/admin/keys", None).await;
    assert_eq!(
        list.body["keys"],
        json!([]),
        "refused calls created nothing"
    );
    let ok = s
        .admin_raw(Method::GET, "/admin/keys", None::<String>, Some(TOKEN))
        .await;
    assert_eq!(ok.status, 200);
    s.stop().await;
}

async fn admin_api_without_a_token_refuses_everything(b: Backend) {
    let s = TestServer::start_with(b, |raw| {
        raw.remove(keyward::config::ADMIN_TOKEN);
    })
    .await;
    let id = "00000000-0000-4000-8000-000000000000";
    for (method, path) in [
        (Method::POST, "/admin/keys".to_string()),
        (Method::GET, "/admin/keys".to_string()),
        (Method::GET, "/admin/keys/standalone".to_string()),
        (Method::POST, "/admin/keys/expire".to_string()),
        (Method::GET, format!("/admin/keys/{id}")),
        (Method::PATCH, format!("/admin/keys/{id}")),
        (Method::DELETE, format!("/admin/keys/{id}")),
        (Method::POST, format!("/admin/keys/{id}/reveal")),
        (Method::POST, format!("/admin/keys/{id}/balance")),
        (Method::GET, format!("/admin/keys/{id}/stats")),
    ] {
        for token in [None, Some(TOKEN), Some("")] {
            let a = s.admin_raw(method.clone(), &path, Some("{}"), token).await;
            assert_eq!(
                (a.status, error_code(&a).as_str()),
                (403, "ADMIN_DISABLED"),
                "{method} {path}"
            );
        }
    }
    s.stop().await;
}

async fn health_and_readiness(b: Backend) {
    let s = TestServer::start(b).await;
    let health = s
        .client
        .get(format!("{}/healthz", s.data))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = s
        .client
        .get(format!("{}/readyz", s.data))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "ok");
    let nothing = s
        .client
        .get(format!("{}/nothing", s.data))
        .send()
        .await
        .unwrap();
    assert_eq!(nothing.status(), 404);
    let body: Value = nothing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    s.stop().await;
}
