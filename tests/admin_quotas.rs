//! Quotas in the admin API, on SQLite and on a real Postgres: a key's quota
//! fields (create, patch, view, clear), users' limits (CRUD, paging), the quota views
//! over `quota_usage`, the caches' settled seeds, bad input refused with nothing
//! changed, and changes reaching a second replica's caches.
//!
//! Longer than 400 lines: one scenario per guarantee, and the table of bad bodies is
//! the point of its test.
#![allow(clippy::unwrap_used)]

mod common;

use common::{error_code, eventually, Backend, Cluster, Shape, TestServer};
use keyward::clock::{now_ms, MS_PER_DAY};
use keyward::config;
use keyward::quota::{Period, Scope, ScopeKind};
use reqwest::Method;
use serde_json::{json, Value};

on_both_backends!(
    keys_carry_quotas_and_patch_merges_them,
    bad_key_quotas_are_refused_and_change_nothing,
    users_are_created_replaced_patched_listed_and_deleted,
    bad_users_are_refused_and_change_nothing,
    quota_views_and_cache_seeds_read_this_periods_usage,
    concurrent_user_patches_lose_nothing,
);

async fn patch_key(s: &TestServer, id: &str, body: Value) -> common::Answer {
    s.admin(Method::PATCH, &format!("/admin/keys/{id}"), Some(body))
        .await
}

async fn keys_carry_quotas_and_patch_merges_them(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s
        .create_key(json!({
            "user_id": "alice", "daily_request_limit": 1000, "daily_token_limit": 50000,
            "spend_limits": {"month": {"usd": 100, "alert_at_pct": [80, 100]}, "day": {"usd": 2.5}},
            "model_limits": {"gpt-4o": {"rate_limit": 10, "spend_limits": {"week": {"usd": 5}}}},
        }))
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    assert_eq!(key["daily_request_limit"], 1000);
    assert_eq!(key["daily_token_limit"], 50000);
    assert_eq!(
        key["spend_limits"],
        json!({"month": {"usd": 100, "alert_at_pct": [80, 100]}, "day": {"usd": 2.5}})
    );
    assert_eq!(key["model_limits"]["gpt-4o"]["rate_limit"], 10);
    assert_eq!(key["model_limits"]["gpt-4o"]["tpm_limit"], Value::Null);
    assert_eq!(
        key["model_limits"]["gpt-4o"]["spend_limits"]["week"]["usd"],
        5
    );
    let got = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(got.body, key);

    // Absent: kept.
    let p = patch_key(&s, &id, json!({"name": "renamed"})).await;
    assert_eq!(p.status, 200, "{}", p.body);
    for field in ["daily_request_limit", "spend_limits", "model_limits"] {
        assert_eq!(p.body[field], key[field], "{field}");
    }
    // Given: set; a spend or model map is replaced whole.
    let p = patch_key(
        &s,
        &id,
        json!({"daily_token_limit": 7, "spend_limits": {"total": {"usd": 1000}}}),
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["daily_token_limit"], 7);
    assert_eq!(p.body["daily_request_limit"], 1000);
    assert_eq!(p.body["spend_limits"], json!({"total": {"usd": 1000}}));
    assert_eq!(p.body["model_limits"], key["model_limits"]);
    // null (or an empty map): cleared, in the view and in the columns.
    let p = patch_key(
        &s,
        &id,
        json!({"daily_request_limit": null, "spend_limits": null, "model_limits": {}}),
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    for field in ["daily_request_limit", "spend_limits", "model_limits"] {
        assert_eq!(p.body[field], Value::Null, "{field}");
    }
    assert_eq!(p.body["daily_token_limit"], 7);
    let db = pool(&s).await;
    let (spend, models): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT spend_limits, model_limits FROM client_keys WHERE id = $1")
            .bind(&id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((spend, models), (None, None));
    // A key created without quotas has none.
    let (plain, _) = s.create_key(json!({})).await;
    for field in [
        "daily_request_limit",
        "daily_token_limit",
        "spend_limits",
        "model_limits",
    ] {
        assert_eq!(plain[field], Value::Null, "{field}");
    }
    s.stop().await;
}

/// Bodies every quota field refuses, with the text the message must hold (the field),
/// when the message can name it.
fn bad_limit_bodies() -> Vec<(Value, Option<&'static str>)> {
    let too_many: serde_json::Map<String, Value> = (0..101)
        .map(|i| (format!("m{i}"), json!({"rate_limit": 1})))
        .collect();
    vec![
        (
            json!({"daily_request_limit": 0}),
            Some("daily_request_limit"),
        ),
        (json!({"daily_token_limit": -5}), Some("daily_token_limit")),
        (
            json!({"daily_request_limit": 1_000_000_000_001_i64}),
            Some("daily_request_limit"),
        ),
        (json!({"daily_request_limit": 1.5}), None),
        (json!({"daily_token_limit": "5"}), None),
        (
            json!({"spend_limits": {"month": {"usd": 0}}}),
            Some("spend_limits.month.usd"),
        ),
        (
            json!({"spend_limits": {"week": {"usd": -1}}}),
            Some("spend_limits.week.usd"),
        ),
        (json!({"spend_limits": {"day": {"usd": 0.0000001}}}), None),
        (
            json!({"spend_limits": {"day": {"usd": 1, "alert_at_pct": [1,2,3,4,5,6,7,8,9,10,11]}}}),
            Some("spend_limits.day.alert_at_pct"),
        ),
        (
            json!({"spend_limits": {"day": {"usd": 1, "alert_at_pct": [0]}}}),
            Some("alert_at_pct"),
        ),
        (
            json!({"spend_limits": {"day": {"usd": 1, "alert_at_pct": [50, 50]}}}),
            Some("alert_at_pct"),
        ),
        (
            json!({"spend_limits": {"day": {"usd": 1, "alert_at_pct": [-5]}}}),
            None,
        ),
        (json!({"spend_limits": {"year": {"usd": 1}}}), Some("year")),
        (
            json!({"spend_limits": {"day": {"usd": 1, "bogus": 1}}}),
            Some("bogus"),
        ),
        (json!({"model_limits": {"gpt-4o": {"rpm": 1}}}), Some("rpm")),
        (
            json!({"model_limits": {"gpt-4o": {"rate_limit": 0}}}),
            Some("model_limits.gpt-4o.rate_limit"),
        ),
        (
            json!({"model_limits": {"gpt-4o": {}}}),
            Some("model_limits.gpt-4o"),
        ),
        (
            json!({"model_limits": {"x".repeat(201): {"rate_limit": 1}}}),
            Some("model_limits"),
        ),
        (
            json!({"model_limits": {"gpt\u{7}4o": {"rate_limit": 1}}}),
            Some("model_limits"),
        ),
        (
            json!({"model_limits": {"gpt\u{200b}-4o": {"rate_limit": 1}}}),
            Some("model_limits"),
        ),
        (
            json!({"model_limits": {" gpt-4o": {"rate_limit": 1}}}),
            Some("model_limits"),
        ),
        (json!({"model_limits": too_many}), Some("model_limits")),
        (json!({"daily_quota": 5}), Some("daily_quota")),
    ]
}

fn assert_refused(a: &common::Answer, body: &Value, names: Option<&str>) {
    assert_eq!(a.status, 400, "{body} was accepted: {}", a.body);
    assert_eq!(error_code(a), "BAD_REQUEST");
    if let Some(name) = names {
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(name),
            "{body}: `{message}` does not name {name}"
        );
    }
}

async fn bad_key_quotas_are_refused_and_change_nothing(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s
        .create_key(json!({"user_id": "held", "daily_request_limit": 5,
            "spend_limits": {"day": {"usd": 1}}, "model_limits": {"gpt-4o": {"rate_limit": 2}}}))
        .await;
    let id = key["id"].as_str().unwrap();
    for (bad, names) in bad_limit_bodies() {
        let mut create = bad.clone();
        create["user_id"] = json!("refused");
        let a = s.admin(Method::POST, "/admin/keys", Some(create)).await;
        assert_refused(&a, &bad, names);
        let a = patch_key(&s, id, bad.clone()).await;
        assert_refused(&a, &bad, names);
    }
    let listed = s
        .admin(Method::GET, "/admin/keys?user_id=refused", None)
        .await;
    assert_eq!(
        listed.body["keys"],
        json!([]),
        "a refused create stored a key"
    );
    let after = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(after.body, key, "a refused patch changed the key");
    s.stop().await;
}

async fn user(s: &TestServer, method: Method, id: &str, body: Option<Value>) -> common::Answer {
    s.admin(method, &format!("/admin/users/{id}"), body).await
}

async fn users_are_created_replaced_patched_listed_and_deleted(b: Backend) {
    let s = TestServer::start(b).await;
    assert_eq!(
        error_code(&user(&s, Method::GET, "bob", None).await),
        "NOT_FOUND"
    );
    assert!(s.state.user_cache.get("bob").await.unwrap().is_none());
    let put = json!({"rate_limit": 50, "spend_limits": {"month": {"usd": 20, "alert_at_pct": [50, 90]}},
        "model_limits": {"gpt-4o": {"daily_token_limit": 1000}}});
    let created = user(&s, Method::PUT, "bob", Some(put)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["user_id"], "bob");
    assert_eq!(created.body["rate_limit"], 50);
    assert_eq!(
        created.body["spend_limits"]["month"]["alert_at_pct"],
        json!([50, 90])
    );
    assert_eq!(
        created.body["model_limits"]["gpt-4o"]["daily_token_limit"],
        1000
    );
    // The change reached this replica's cache at once (its negative entry was dropped).
    let cached = s.state.user_cache.get("bob").await.unwrap().unwrap();
    assert_eq!(cached.limits.rate_limit, Some(50));
    assert_eq!(cached.model_limits["gpt-4o"].daily_token_limit, Some(1000));

    // PUT again replaces the whole set.
    let replaced = user(
        &s,
        Method::PUT,
        "bob",
        Some(json!({"daily_request_limit": 9})),
    )
    .await;
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    assert_eq!(replaced.body["created_at"], created.body["created_at"]);
    for field in ["rate_limit", "spend_limits", "model_limits"] {
        assert_eq!(replaced.body[field], Value::Null, "{field}");
    }
    // PATCH: absent kept, null cleared.
    let p = user(&s, Method::PATCH, "bob", Some(json!({"tpm_limit": 100}))).await;
    assert_eq!(
        (
            p.body["tpm_limit"].clone(),
            p.body["daily_request_limit"].clone()
        ),
        (json!(100), json!(9))
    );
    let p = user(
        &s,
        Method::PATCH,
        "bob",
        Some(json!({"daily_request_limit": null})),
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["daily_request_limit"], Value::Null);
    assert_eq!(user(&s, Method::GET, "bob", None).await.body, p.body);
    assert_eq!(
        s.state
            .user_cache
            .get("bob")
            .await
            .unwrap()
            .unwrap()
            .limits
            .tpm_limit,
        Some(100)
    );
    let missing = user(&s, Method::PATCH, "nobody", Some(json!({"rate_limit": 1}))).await;
    assert_eq!(error_code(&missing), "NOT_FOUND");

    // Any printable id, paged by id.
    let mut ids = vec!["bob".to_string(), "模型-é".to_string(), "a b:c".to_string()];
    ids.extend((0..4).map(|i| format!("u{i}")));
    for id in &ids[1..] {
        let a = user(&s, Method::PUT, id, Some(json!({"rate_limit": 1}))).await;
        assert_eq!(a.status, 201, "{id}: {}", a.body);
        assert_eq!(
            user(&s, Method::GET, id, None).await.body["user_id"],
            id.as_str()
        );
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut path = "/admin/users?limit=2".to_string();
    loop {
        let page = s.admin(Method::GET, &path, None).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let users = page.body["users"].as_array().unwrap();
        assert!(users.len() <= 2);
        seen.extend(
            users
                .iter()
                .map(|u| u["user_id"].as_str().unwrap().to_string()),
        );
        match page.body["next_after"].as_str() {
            Some(after) => {
                let url = reqwest::Url::parse_with_params(
                    "http://x/admin/users?limit=2",
                    [("after", after)],
                )
                .unwrap();
                path = format!("{}?{}", url.path(), url.query().unwrap());
            }
            None => break,
        }
    }
    assert_eq!(seen, ids);
    for bad in ["/admin/users?limit=many", "/admin/users?bogus=1"] {
        assert_eq!(
            error_code(&s.admin(Method::GET, bad, None).await),
            "BAD_REQUEST"
        );
    }

    // Deleting a user removes its limits; its keys keep working.
    let (_, secret) = s.create_key(json!({"user_id": "bob"})).await;
    let d = user(&s, Method::DELETE, "bob", None).await;
    assert_eq!(d.body, json!({"user_id": "bob", "deleted": true}));
    assert!(s.state.user_cache.get("bob").await.unwrap().is_none());
    assert_eq!(
        error_code(&user(&s, Method::GET, "bob", None).await),
        "NOT_FOUND"
    );
    assert_eq!(
        error_code(&user(&s, Method::DELETE, "bob", None).await),
        "NOT_FOUND"
    );
    assert_eq!(s.admit(json!({"key": secret})).await.status, 200);
    s.stop().await;
}

async fn bad_users_are_refused_and_change_nothing(b: Backend) {
    let s = TestServer::start(b).await;
    let stored = user(
        &s,
        Method::PUT,
        "kept",
        Some(json!({"rate_limit": 3, "spend_limits": {"day": {"usd": 1}}})),
    )
    .await;
    assert_eq!(stored.status, 201);
    let mut bodies = bad_limit_bodies();
    bodies.push((json!({"rate_limit": 0}), Some("rate_limit")));
    bodies.push((json!({"tpm_limit": -1}), Some("tpm_limit")));
    bodies.push((json!({"user_id": "x"}), Some("user_id")));
    for (bad, names) in bodies {
        assert_refused(
            &user(&s, Method::PUT, "fresh", Some(bad.clone())).await,
            &bad,
            names,
        );
        assert_refused(
            &user(&s, Method::PUT, "kept", Some(bad.clone())).await,
            &bad,
            names,
        );
        assert_refused(
            &user(&s, Method::PATCH, "kept", Some(bad.clone())).await,
            &bad,
            names,
        );
    }
    // Ids: too long, a control character, only invisible or blank.
    let long = "x".repeat(201);
    for id in [long.as_str(), "a%07b", "%E2%80%8B", "%20%20", "a%00"] {
        for method in [Method::PUT, Method::PATCH, Method::GET, Method::DELETE] {
            let a = user(&s, method.clone(), id, Some(json!({"rate_limit": 1}))).await;
            assert_refused(&a, &json!(id), Some("user_id"));
        }
        let a = s
            .admin(Method::GET, &format!("/admin/users/{id}/quota"), None)
            .await;
        assert_refused(&a, &json!(id), Some("user_id"));
    }
    assert_eq!(
        error_code(&user(&s, Method::GET, "fresh", None).await),
        "NOT_FOUND"
    );
    assert_eq!(user(&s, Method::GET, "kept", None).await.body, stored.body);
    let listed = s.admin(Method::GET, "/admin/users", None).await;
    assert_eq!(listed.body["users"].as_array().unwrap().len(), 1);
    s.stop().await;
}

/// Patches of different fields of one user, sent at once, all land: each writes only
/// over the version it read, and retries otherwise.
async fn concurrent_user_patches_lose_nothing(b: Backend) {
    let s = TestServer::start(b).await;
    let fields = [
        "rate_limit",
        "tpm_limit",
        "daily_request_limit",
        "daily_token_limit",
    ];
    for round in 0..5 {
        let id = format!("racer{round}");
        assert_eq!(user(&s, Method::PUT, &id, None).await.status, 201);
        let patches = fields.iter().enumerate().map(|(i, field)| {
            let (s, id) = (&s, id.clone());
            async move { user(s, Method::PATCH, &id, Some(json!({ *field: i + 1 }))).await }
        });
        for a in futures_util::future::join_all(patches).await {
            assert_eq!(a.status, 200, "{}", a.body);
        }
        let got = user(&s, Method::GET, &id, None).await;
        for (i, field) in fields.iter().enumerate() {
            assert_eq!(got.body[*field], json!(i + 1), "{field} lost: {}", got.body);
        }
    }
    s.stop().await;
}

/// A connection to the server's database, beside keyward's own.
async fn pool(s: &TestServer) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&s.db.url).await.unwrap()
}

/// Writes a `quota_usage` row as the accounting writer would.
async fn usage_row(
    db: &sqlx::AnyPool,
    counter: &str,
    period: Period,
    start: i64,
    used: (i64, i64, i64),
) {
    sqlx::query("INSERT INTO quota_usage (counter, period, start_day, requests, tokens, cost_micros, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 0)")
        .bind(counter).bind(period.as_str()).bind(start).bind(used.0).bind(used.1).bind(used.2)
        .execute(db).await.unwrap();
}

fn limit_of<'a>(scope: &'a Value, kind: &str, period: &str) -> &'a Value {
    scope["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == kind && l["period"] == period)
        .unwrap_or_else(|| panic!("no {kind}/{period} in {scope}"))
}

fn day_text(day: i64) -> String {
    keyward::clock::to_rfc3339(day * MS_PER_DAY)
}

async fn quota_views_and_cache_seeds_read_this_periods_usage(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, secret) = s
        .create_key(json!({"user_id": "dave", "daily_request_limit": 100, "daily_token_limit": 1000,
            "spend_limits": {"day": {"usd": 5}, "month": {"usd": 100, "alert_at_pct": [80]}, "total": {"usd": 1000}},
            "model_limits": {"gpt-4o": {"rate_limit": 10, "spend_limits": {"week": {"usd": 2}}}}}))
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    let scope = |kind, id: &str, model: Option<&str>| Scope {
        kind,
        id: id.into(),
        model: model.map(Into::into),
    };
    let (own, model) = (
        scope(ScopeKind::Key, &id, None).counter_id(),
        scope(ScopeKind::Key, &id, Some("gpt-4o")).counter_id(),
    );
    let today = now_ms().div_euclid(MS_PER_DAY);
    let db = pool(&s).await;
    usage_row(&db, &own, Period::Day, today, (7, 70, 1_250_000)).await;
    usage_row(&db, &own, Period::Day, today - 1, (9, 90, 9_000_000)).await; // yesterday: not read
    usage_row(
        &db,
        &own,
        Period::Month,
        Period::Month.start_day(today),
        (8, 80, 3_000_000),
    )
    .await;
    usage_row(&db, &own, Period::Total, 0, (9, 90, 4_000_000)).await;
    // A model entry reads the usage records (finding D), not its `quota_usage` rows: a
    // row that disagrees is ignored, and a dated model counts under its listed prefix.
    usage_row(
        &db,
        &model,
        Period::Week,
        Period::Week.start_day(today),
        (9, 90, 9_000_000),
    )
    .await;
    sqlx::query("INSERT INTO usage_records (id, key_id, model, prompt_tokens, completion_tokens, cost_micros, created_at) VALUES ($1, $2, $3, 4, 6, 500000, $4)")
        .bind(format!("seed-{id}")).bind(&id).bind("gpt-4o-2024-08-06").bind(now_ms())
        .execute(&db).await.unwrap();

    let v = s
        .admin(Method::GET, &format!("/admin/keys/{id}/quota"), None)
        .await;
    assert_eq!(v.status, 200, "{}", v.body);
    assert_eq!(
        (v.body["key_id"].as_str(), v.body["user_id"].as_str()),
        (Some(id.as_str()), Some("dave"))
    );
    let scopes = v.body["scopes"].as_array().unwrap();
    assert_eq!(scopes.len(), 2);
    let (k, m) = (&scopes[0], &scopes[1]);
    assert_eq!(
        (
            k["scope"].as_str(),
            k["model"].clone(),
            k["counter"].as_str()
        ),
        (Some("key"), Value::Null, Some(own.as_str()))
    );
    assert_eq!(limit_of(k, "requests", "minute")["limit"], 100);
    assert_eq!(limit_of(k, "requests", "minute")["settled"], Value::Null);
    assert_eq!(limit_of(k, "requests", "day")["settled"], 7);
    assert_eq!(limit_of(k, "tokens", "day")["settled"], 70);
    let day = limit_of(k, "spend", "day");
    assert_eq!(
        (day["limit"].clone(), day["settled"].clone()),
        (json!(5), json!(1.25))
    );
    assert_eq!(day["period_start"], json!(day_text(today)));
    assert_eq!(day["reset_at"], json!(day_text(today + 1)));
    let month = limit_of(k, "spend", "month");
    assert_eq!(
        (month["settled"].clone(), month["alert_at_pct"].clone()),
        (json!(3), json!([80]))
    );
    let total = limit_of(k, "spend", "total");
    assert_eq!(
        (total["settled"].clone(), total["reset_at"].clone()),
        (json!(4), Value::Null)
    );
    assert_eq!(
        (m["model"].as_str(), m["counter"].as_str()),
        (Some("gpt-4o"), Some(model.as_str()))
    );
    assert_eq!(limit_of(m, "requests", "minute")["limit"], 10);
    let week = limit_of(m, "spend", "week");
    assert_eq!(week["settled"], json!(0.5));
    assert_eq!(
        week["reset_at"],
        json!(day_text(Period::Week.start_day(today) + 7))
    );
    // Nothing admitted yet: the counters hold nothing, and a day or spend counter
    // reads as the database's figure (as admission would take it); minute windows are
    // not seeded.
    for scope in scopes {
        for limit in scope["limits"].as_array().unwrap() {
            let live = &limit["live"];
            if limit["period"] == "minute" {
                assert_eq!(live["used"], 0, "{limit}");
            } else {
                assert_eq!(live["used"], limit["settled"], "{limit}");
            }
            if limit["kind"] == "spend" {
                assert_eq!(live["held"], 0, "{limit}");
            }
        }
    }
    // The key cache fills the seeds on load: this period's spend, per scope and period.
    let cached = s
        .state
        .key_cache
        .get(&keyward::crypto::lookup_hash(&secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        cached
            .settled
            .get(None, Period::Day)
            .map(|s| (s.start_day, s.cost_micros)),
        Some((today, 1_250_000))
    );
    assert_eq!(
        cached
            .settled
            .get(None, Period::Month)
            .map(|s| (s.start_day, s.cost_micros)),
        Some((Period::Month.start_day(today), 3_000_000))
    );
    assert_eq!(
        cached
            .settled
            .get(None, Period::Total)
            .map(|s| (s.start_day, s.cost_micros)),
        Some((0, 4_000_000))
    );
    assert_eq!(
        cached.settled.get(None, Period::Week),
        None,
        "no week limit"
    );
    assert_eq!(
        cached
            .settled
            .get(Some("gpt-4o"), Period::Week)
            .map(|s| (s.start_day, s.cost_micros)),
        Some((Period::Week.start_day(today), 500_000))
    );

    // A user: its view and its cache's seeds.
    let put = user(
        &s,
        Method::PUT,
        "dave",
        Some(json!({"spend_limits": {"day": {"usd": 3}}, "daily_request_limit": 50})),
    )
    .await;
    assert_eq!(put.status, 201);
    let user_counter = scope(ScopeKind::User, "dave", None).counter_id();
    usage_row(&db, &user_counter, Period::Day, today, (4, 40, 1_000_000)).await;
    let v = s.admin(Method::GET, "/admin/users/dave/quota", None).await;
    assert_eq!(v.status, 200, "{}", v.body);
    let u = &v.body["scopes"][0];
    assert_eq!(
        (u["scope"].as_str(), u["id"].as_str()),
        (Some("user"), Some("dave"))
    );
    assert_eq!(limit_of(u, "spend", "day")["settled"], 1);
    assert_eq!(limit_of(u, "requests", "day")["settled"], 4);
    let cached = s.state.user_cache.get("dave").await.unwrap().unwrap();
    assert_eq!(
        cached.settled.get(None, Period::Day).map(|s| (
            s.start_day,
            s.requests,
            s.tokens,
            s.cost_micros
        )),
        Some((today, 4, 40, 1_000_000)),
        "day count seeds too"
    );
    for missing in [
        "/admin/users/nobody/quota",
        "/admin/keys/00000000-0000-4000-8000-000000000000/quota",
    ] {
        assert_eq!(
            error_code(&s.admin(Method::GET, missing, None).await),
            "NOT_FOUND"
        );
    }
    s.stop().await;
}

/// Two replicas sharing a database and Redis, caches kept for a minute: a change on one
/// reaches the other's key and user caches at once (long before the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_changes_reach_every_replica() {
    let c = Cluster::start_n(Shape::Distributed, 2, |raw| {
        raw.insert(config::KEY_CACHE_TTL_S, "60".into());
        raw.insert(config::NEGATIVE_CACHE_TTL_S, "60".into());
    })
    .await;
    let (a, b) = (&c.servers[0], &c.servers[1]);
    let on_b = || async { b.state.user_cache.get("erin").await.unwrap() };
    assert!(on_b().await.is_none(), "now held as unknown on b");
    assert_eq!(
        user(a, Method::PUT, "erin", Some(json!({"rate_limit": 5})))
            .await
            .status,
        201
    );
    eventually(3, || async {
        on_b().await.filter(|u| u.limits.rate_limit == Some(5))
    })
    .await;
    assert_eq!(
        user(a, Method::PATCH, "erin", Some(json!({"rate_limit": 6})))
            .await
            .status,
        200
    );
    eventually(3, || async {
        on_b().await.filter(|u| u.limits.rate_limit == Some(6))
    })
    .await;
    assert_eq!(user(a, Method::DELETE, "erin", None).await.status, 200);
    eventually(3, || async { on_b().await.is_none().then_some(()) }).await;

    let (key, secret) = a.create_key(json!({})).await;
    let hash = keyward::crypto::lookup_hash(&secret);
    let key_on_b = || async { b.state.key_cache.get(&hash).await.unwrap().unwrap() };
    assert!(key_on_b().await.model_limits.is_empty());
    let id = key["id"].as_str().unwrap();
    let p = patch_key(
        a,
        id,
        json!({"model_limits": {"gpt-4o": {"rate_limit": 3}}, "daily_request_limit": 4}),
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    eventually(3, || async {
        let k = key_on_b().await;
        (k.model_limits.contains_key("gpt-4o") && k.daily_request_limit == Some(4)).then_some(())
    })
    .await;
    c.stop().await;
}
