//! The provider key pool over HTTP: admin API, `/v1/select`, admit with `"select": true`,
//! report effects, racing instances and encryption-key rotation.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{error_code, eventually, Answer, Cluster, Shape, TestServer};
use keyward::config;
use reqwest::Method;
use serde_json::{json, Value};

on_both_shapes!(
    provider_keys_are_managed_without_ever_showing_their_value,
    selection_goes_by_priority_and_rotates_least_recently_used,
    upstream_429_cools_a_key_and_401_suspends_it,
    exactly_one_instance_gets_a_keys_last_unit_every_round,
    admit_with_select_refused_by_the_pool_leaves_the_client_as_it_was,
    provider_usage_reaches_the_admin_api_through_the_queue,
    bad_provider_input_is_refused,
    cooldowns_show_their_cause_and_reset_clears_them,
    a_named_report_without_a_lease_counts_once,
);

async fn add(s: &TestServer, provider: &str, body: Value) -> Value {
    s.add_provider_key(provider, body).await
}

async fn select(s: &TestServer, provider: &str) -> Answer {
    s.data_post_token(
        "/v1/select",
        json!({"provider": provider, "estimated_tokens": 10}),
    )
    .await
}

fn picked(a: &Answer) -> String {
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["provider_key"]["id"].as_str().unwrap().to_string()
}

async fn list(s: &TestServer, provider: &str) -> Vec<Value> {
    s.provider_keys(provider).await
}

async fn provider_keys_are_managed_without_ever_showing_their_value(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let second = add(
        s,
        "openai",
        json!({"label": "second", "value": "sk-up-second-0001", "priority": 1}),
    )
    .await;
    let first = add(
        s,
        "openai",
        json!({"label": "first", "value": "sk-up-first-0001", "priority": 0, "max_rpm": 60, "max_tpm": 9000}),
    )
    .await;
    add(
        s,
        "anthropic",
        json!({"label": "other", "value": "sk-up-other-0001"}),
    )
    .await;
    assert_eq!(
        (
            first["priority"].clone(),
            first["max_rpm"].clone(),
            first["max_tpm"].clone()
        ),
        (json!(0), json!(60), json!(9000))
    );
    assert_eq!(first["is_active"], true);

    let keys = list(s, "openai").await;
    let labels: Vec<&str> = keys.iter().map(|k| k["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["first", "second"], "by priority");
    for k in &keys {
        for field in [
            "requests_last_60s",
            "tokens_last_60s",
            "cooldown_remaining_ms",
            "suspended",
        ] {
            assert!(k["live"].get(field).is_some(), "no live {field}: {k}");
        }
    }
    // The value is never in an answer, and is stored encrypted.
    let id = first["id"].as_str().unwrap();
    let patched = s
        .admin(
            Method::PATCH,
            &format!("/admin/provider-keys/{id}"),
            Some(json!({"label": "renamed", "max_rpm": null, "priority": 5})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(
        (
            patched.body["label"].clone(),
            patched.body["max_rpm"].clone()
        ),
        (json!("renamed"), Value::Null)
    );
    for answer in [
        json!(keys),
        first.clone(),
        second.clone(),
        patched.body.clone(),
    ] {
        assert!(
            !answer.to_string().contains("sk-up-"),
            "a value leaked: {answer}"
        );
    }
    let db = c.db.connect().await;
    let stored = keyward::pool::store::get(&db, id).await.unwrap().unwrap();
    assert!(
        stored.key_encrypted.starts_with("enc:v1:") && !stored.key_encrypted.contains("sk-up-")
    );
    // Selection returns the value, and only selection does.
    let sel = select(c.any(1), "anthropic").await;
    assert_eq!(sel.body["provider_key"]["value"], "sk-up-other-0001");
    assert_eq!(sel.body["provider_key"]["label"], "other");

    let deleted = s
        .admin(Method::DELETE, &format!("/admin/provider-keys/{id}"), None)
        .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(list(s, "openai").await.len(), 1);
    let missing = s
        .admin(Method::DELETE, &format!("/admin/provider-keys/{id}"), None)
        .await;
    assert_eq!(
        (missing.status, error_code(&missing).as_str()),
        (404, "NOT_FOUND")
    );
    c.stop().await;
}

async fn selection_goes_by_priority_and_rotates_least_recently_used(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let a = add(
        s,
        "openai",
        json!({"label": "a", "value": "sk-a-000000", "priority": 0}),
    )
    .await;
    let b = add(
        s,
        "openai",
        json!({"label": "b", "value": "sk-b-000000", "priority": 0}),
    )
    .await;
    let low = add(
        s,
        "openai",
        json!({"label": "low", "value": "sk-low-0000", "priority": 3}),
    )
    .await;
    let ids = [a["id"].as_str().unwrap(), b["id"].as_str().unwrap()];
    let mut picks = Vec::new();
    for i in 0..6 {
        picks.push(picked(&select(c.any(i), "openai").await));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Equal priorities alternate; the lower priority is never used while they have room.
    assert!(picks.iter().all(|p| ids.contains(&p.as_str())), "{picks:?}");
    for pair in picks.windows(2) {
        assert_ne!(pair[0], pair[1], "least recently used rotates: {picks:?}");
    }
    // Disabling both makes the low-priority key the only choice; disabling it too leaves none.
    for id in ids {
        let p = s
            .admin(
                Method::PATCH,
                &format!("/admin/provider-keys/{id}"),
                Some(json!({"is_active": false})),
            )
            .await;
        assert_eq!(p.status, 200);
    }
    eventually(2, || async {
        (picked(&select(c.any(2), "openai").await) == low["id"].as_str().unwrap()).then_some(())
    })
    .await;
    let low_id = low["id"].as_str().unwrap();
    s.admin(
        Method::PATCH,
        &format!("/admin/provider-keys/{low_id}"),
        Some(json!({"is_active": false})),
    )
    .await;
    let none = eventually(2, || async {
        let a = select(c.any(1), "openai").await;
        (a.status == 503).then_some(a)
    })
    .await;
    assert_eq!(error_code(&none), "NO_PROVIDER_KEY");
    let unknown = select(c.any(0), "no-such-provider").await;
    assert_eq!(
        (unknown.status, error_code(&unknown).as_str()),
        (503, "NO_PROVIDER_KEY")
    );
    c.stop().await;
}

async fn upstream_429_cools_a_key_and_401_suspends_it(shape: Shape) {
    let c = Cluster::start(shape, |raw| {
        raw.insert(config::PROVIDER_SUSPEND_S, "2".into());
    })
    .await;
    let s = &c.servers[0];
    let (_, secret) = s
        .create_key(json!({"rate_limit": null, "concurrent_limit": null}))
        .await;
    let a = add(s, "openai", json!({"label": "a", "value": "sk-a-000000"})).await;
    let b = add(s, "openai", json!({"label": "b", "value": "sk-b-000000"})).await;
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());

    // An admission with select gets a provider key; its 429 cools that key for retry_after_s.
    let admitted = c
        .any(1)
        .admit(json!({"key": secret, "provider": "openai", "select": true}))
        .await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    let first = admitted.body["provider_key"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(admitted.body["provider_key"]["value"]
        .as_str()
        .unwrap()
        .starts_with("sk-"));
    let lease = admitted.body["lease_id"].as_str().unwrap();
    let r = c
        .any(2)
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "provider_key_id": first, "upstream_status": 429, "retry_after_s": 30}),
        )
        .await;
    assert_eq!(r.body["recorded"], true);
    let other = if first == a_id { b_id } else { a_id };
    for i in 0..3 {
        assert_eq!(
            picked(&select(c.any(i), "openai").await),
            other,
            "the cooling key is skipped"
        );
    }
    // The other key answers 401: suspended. Both out: 429 with the earliest recovery.
    let r = c
        .any(0)
        .data_post_token(
            "/v1/report",
            json!({"provider_key_id": other, "upstream_status": 401}),
        )
        .await;
    assert_eq!(r.body["recorded"], true);
    let exhausted = select(c.any(1), "openai").await;
    assert_eq!(
        (exhausted.status, error_code(&exhausted).as_str()),
        (429, "PROVIDER_KEYS_EXHAUSTED")
    );
    let retry = exhausted.body["error"]["retry_after_ms"].as_i64().unwrap();
    assert!(
        (1..=2_000).contains(&retry),
        "the suspension (2 s) ends first: {retry}"
    );
    assert!(exhausted.headers.get("retry-after").is_some());
    let keys = list(s, "openai").await;
    let live = |id: &str| keys.iter().find(|k| k["id"] == id).unwrap()["live"].clone();
    assert!(live(&first)["cooldown_remaining_ms"].as_i64().unwrap() > 25_000);
    assert_eq!(live(other)["suspended"], true);
    // The suspension ends by itself.
    tokio::time::sleep(Duration::from_millis(retry as u64 + 100)).await;
    assert_eq!(picked(&select(c.any(2), "openai").await), other);
    c.stop().await;
}

/// A report of an upstream 429 finds the key's provider among the pools in memory: with
/// the database unreachable it still cools the key, and the event is counted under the
/// key's provider (a database lookup would fail and count it as "unknown").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_needs_no_database() {
    let base = common::TestDb::new(common::Backend::Postgres).await;
    let (target, _) = common::reroute(&base.url, "unused");
    let proxy = common::PgProxy::start(target).await;
    let (_, proxied_url) = common::reroute(&base.url, &format!("127.0.0.1:{}", proxy.port));
    let db = Arc::new(base);
    let mut raw = common::base_config(&db);
    raw.insert(config::DATABASE_URL, proxied_url);
    raw.insert(config::REDIS_URL, common::redis_url());
    raw.insert(config::REDIS_PREFIX, common::unique_prefix());
    let s = TestServer::start_on(db.clone(), raw).await;
    // A provider of this test's own, so the process-wide metric is this test's alone.
    let provider = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let a = add(&s, &provider, json!({"label": "a", "value": "sk-a-000000"})).await;
    let b = add(&s, &provider, json!({"label": "b", "value": "sk-b-000000"})).await;
    let first = picked(&select(&s, &provider).await);
    let other = if first == a["id"] {
        b["id"].clone()
    } else {
        a["id"].clone()
    };

    proxy.set_up(false);
    let r = s
        .data_post_token(
            "/v1/report",
            json!({"provider_key_id": first, "upstream_status": 429, "retry_after_s": 30}),
        )
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);
    assert_eq!(
        picked(&select(&s, &provider).await),
        other,
        "the cooling key is skipped"
    );
    let text = s.metrics().await;
    let counted = text.lines().any(|l| {
        l.starts_with("keyward_provider_key_events_total{")
            && l.contains(&format!("provider=\"{provider}\""))
            && l.contains("event=\"cooldown\"")
            && l.ends_with(" 1")
    });
    assert!(counted, "no cooldown event for {provider}:\n{text}");
    proxy.set_up(true);
    s.stop().await;
}

/// A replica serves only once it hears invalidations: its subscription's first clear of
/// every cache (messages may have been missed before it) then finds nothing to clear,
/// and a pool it loaded while starting is not dropped under a request that needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_once_it_hears_invalidations() {
    let db = Arc::new(common::TestDb::new(common::Backend::Postgres).await);
    let mut raw = common::base_config(&db);
    let prefix = common::unique_prefix();
    raw.insert(config::REDIS_URL, common::redis_url());
    raw.insert(config::REDIS_PREFIX, prefix.clone());
    let s = TestServer::start_on(db.clone(), raw).await;
    let mut conn = redis::Client::open(common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (_, listeners): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("{prefix}:invalidate"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(listeners, 1, "serving before listening");
    s.stop().await;
}

/// A lease's report needs no database either, on a replica that never loaded the pool:
/// the lease carries its pick's provider (the pool's tag), so the 429 cools the key down
/// with the database unreachable (a lookup of the key's provider would fail, and the
/// provider key's part of the report would be skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leases_429_needs_no_database_on_a_replica_without_the_pool() {
    let base = common::TestDb::new(common::Backend::Postgres).await;
    let (target, _) = common::reroute(&base.url, "unused");
    let proxy = common::PgProxy::start(target).await;
    let (_, proxied_url) = common::reroute(&base.url, &format!("127.0.0.1:{}", proxy.port));
    let db = Arc::new(base);
    let mut raw = common::base_config(&db);
    raw.insert(config::DATABASE_URL, proxied_url);
    raw.insert(config::REDIS_URL, common::redis_url());
    raw.insert(config::REDIS_PREFIX, common::unique_prefix());
    let admitting = TestServer::start_on(db.clone(), raw.clone()).await;
    let reporting = TestServer::start_on(db.clone(), raw).await;
    let provider = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    add(
        &admitting,
        &provider,
        json!({"label": "a", "value": "sk-a-000000"}),
    )
    .await;
    let (_, secret) = admitting
        .create_key(json!({"rate_limit": null, "concurrent_limit": null}))
        .await;
    let a = admitting
        .admit(json!({"key": secret, "provider": provider, "select": true}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let lease = a.body["lease_id"].as_str().unwrap();

    proxy.set_up(false);
    let r = reporting
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "upstream_status": 429, "retry_after_s": 30}),
        )
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);
    let s = select(&admitting, &provider).await;
    assert_ne!(s.status, 200, "the pool's one key cools down: {}", s.body);
    proxy.set_up(true);
    reporting.stop().await;
    admitting.stop().await;
}

async fn exactly_one_instance_gets_a_keys_last_unit_every_round(shape: Shape) {
    let c = Arc::new(Cluster::start(shape, |_| {}).await);
    for round in 0..15 {
        let provider = format!("race{round}");
        add(
            &c.servers[0],
            &provider,
            json!({"label": "only", "value": "sk-race-0000", "max_rpm": 1}),
        )
        .await;
        let racers: Vec<_> = (0..9)
            .map(|i| {
                let (c, provider) = (c.clone(), provider.clone());
                tokio::spawn(async move { select(c.any(i), &provider).await.status })
            })
            .collect();
        let mut statuses = Vec::new();
        for r in racers {
            statuses.push(r.await.unwrap());
        }
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "round {round}: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 429),
            "{statuses:?}"
        );
    }
    Arc::into_inner(c).unwrap().stop().await;
}

async fn admit_with_select_refused_by_the_pool_leaves_the_client_as_it_was(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let (_, secret) = s
        .create_key(json!({"rate_limit": 10, "tpm_limit": 1000, "concurrent_limit": 2}))
        .await;
    add(
        s,
        "openai",
        json!({"label": "only", "value": "sk-only-0000", "max_rpm": 1}),
    )
    .await;
    let body =
        json!({"key": secret, "provider": "openai", "select": true, "estimated_tokens": 100});
    let ok = c.any(0).admit(body.clone()).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.headers["x-ratelimit-remaining-requests"], "9");
    for i in 0..4 {
        let refused = c.any(i).admit(body.clone()).await;
        assert_eq!(
            (refused.status, error_code(&refused).as_str()),
            (429, "PROVIDER_KEYS_EXHAUSTED")
        );
        assert!(refused.headers.get("retry-after").is_some());
        // The client's window, tokens and slots are as before the refusal.
        assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "9");
        assert_eq!(refused.headers["x-ratelimit-remaining-tokens"], "900");
    }
    let plain = c
        .any(1)
        .admit(json!({"key": secret, "estimated_tokens": 100}))
        .await;
    assert_eq!(plain.status, 200, "one slot was still free: {}", plain.body);
    assert_eq!(plain.headers["x-ratelimit-remaining-requests"], "8");
    let no_provider = c.any(2).admit(json!({"key": secret, "select": true})).await;
    assert_eq!(
        (no_provider.status, error_code(&no_provider).as_str()),
        (400, "BAD_REQUEST")
    );
    c.stop().await;
}

async fn provider_usage_reaches_the_admin_api_through_the_queue(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let (_, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    let key = add(
        s,
        "openai",
        json!({"label": "k", "value": "sk-k-000000", "max_tpm": 100000}),
    )
    .await;
    let id = key["id"].as_str().unwrap();
    for i in 0..3 {
        let a = c.any(i).admit(json!({"key": secret, "provider": "openai", "select": true, "estimated_tokens": 500})).await;
        let lease = a.body["lease_id"].as_str().unwrap();
        let r = json!({"lease_id": lease, "provider_key_id": id, "prompt_tokens": 7, "completion_tokens": 3});
        for _ in 0..2 {
            c.any(i + 1).data_post("/v1/report", r.clone()).await; // the repeat counts nothing
        }
    }
    // Live window: reservations (500 each) replaced by the reported 10 each.
    let keys = list(s, "openai").await;
    assert_eq!(
        keys[0]["live"]["requests_last_60s"], 0,
        "no max_rpm: requests are not counted"
    );
    assert_eq!(keys[0]["live"]["tokens_last_60s"], 30);
    let totals = eventually(15, || async {
        let keys = list(s, "openai").await;
        (keys[0]["total_requests"] == 3).then(|| keys[0].clone())
    })
    .await;
    assert_eq!(totals["total_tokens"], 30);
    assert!(totals["last_used_at"].is_string());
    let usage = s
        .admin(
            Method::GET,
            &format!("/admin/provider-keys/{id}/usage?limit=500"),
            None,
        )
        .await;
    assert_eq!(usage.status, 200, "{}", usage.body);
    let windows = usage.body["windows"].as_array().unwrap();
    let total: i64 = windows
        .iter()
        .map(|w| w["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 3);
    let one = s
        .admin(
            Method::GET,
            &format!("/admin/provider-keys/{id}/usage?limit=0"),
            None,
        )
        .await;
    assert_eq!(
        one.body["windows"].as_array().unwrap().len(),
        1,
        "limit is clamped to at least 1"
    );
    c.stop().await;
}

async fn bad_provider_input_is_refused(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    for (path, body) in [
        ("/admin/providers/openai/keys", json!({"label": "x"})),
        (
            "/admin/providers/openai/keys",
            json!({"label": "x", "value": "has space"}),
        ),
        (
            "/admin/providers/openai/keys",
            json!({"label": "x", "value": "v", "priority": -1}),
        ),
        (
            "/admin/providers/openai/keys",
            json!({"label": "x", "value": "v", "max_rpm": 0}),
        ),
        (
            "/admin/providers/openai/keys",
            json!({"label": "x", "value": "v", "is_active": false}),
        ),
        (
            "/admin/providers/bad%20name/keys",
            json!({"label": "x", "value": "v"}),
        ),
    ] {
        let a = s.admin(Method::POST, path, Some(body.clone())).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{path} {body}"
        );
        assert!(!a.body.to_string().contains("has space"));
    }
    let key = add(s, "openai", json!({"label": "x", "value": "v-000000"})).await;
    let id = key["id"].as_str().unwrap();
    for body in [
        json!({"provider": "other"}),
        json!({"max_tpm": -1}),
        json!({"value": "new"}),
        json!({"is_active": "no"}),
    ] {
        let a = s
            .admin(
                Method::PATCH,
                &format!("/admin/provider-keys/{id}"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(a.status, 400, "{body}");
    }
    let a = s
        .admin(
            Method::GET,
            &format!("/admin/provider-keys/{id}/usage?limit=many"),
            None,
        )
        .await;
    assert_eq!(a.status, 400);
    let a = s
        .admin(Method::GET, "/admin/provider-keys/not-a-uuid/usage", None)
        .await;
    assert_eq!(a.status, 400);
    for body in [
        json!({}),
        json!({"provider": "bad name"}),
        json!({"provider": "openai", "estimated_tokens": -1}),
    ] {
        let a = s.data_post_token("/v1/select", body.clone()).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{body}"
        );
    }
    let a = s
        .data_post_token(
            "/v1/report",
            json!({"provider_key_id": id, "upstream_status": 429, "retry_after_s": -1}),
        )
        .await;
    assert_eq!(a.status, 400);
    assert_eq!(
        list(s, "openai").await[0]["live"]["cooldown_remaining_ms"],
        0,
        "a refused report changed nothing"
    );
    c.stop().await;
}

/// Rotation: secrets written under an old key are readable under the new one after
/// rotation, even once the old key is gone; an undecryptable one disables its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reencrypts_everything_and_disables_what_it_cannot_read() {
    const OLD: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const NEW: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let db = Arc::new(common::TestDb::new(common::Backend::Postgres).await);
    let with_keys = |current: &str, previous: Option<&str>| {
        let mut raw = common::base_config(&db);
        raw.insert(config::ENCRYPTION_KEY, current.to_string());
        if let Some(previous) = previous {
            raw.insert(config::ENCRYPTION_KEYS_PREVIOUS, previous.to_string());
        }
        raw
    };
    let old = TestServer::start_on(db.clone(), with_keys(OLD, None)).await;
    let (client_key, secret) = old.create_key(json!({})).await;
    add(
        &old,
        "openai",
        json!({"label": "good", "value": "sk-rotate-good"}),
    )
    .await;
    old.stop().await;

    // A provider key written with a key nobody has any more.
    let conn = db.connect().await;
    let stranger = keyward::crypto::Keyring::new(&[9u8; 32], &[]);
    keyward::pool::store::insert(
        &conn,
        &uuid::Uuid::new_v4().to_string(),
        "openai",
        "lost",
        &stranger.encrypt("sk-lost"),
        0,
        None,
        None,
        keyward::clock::now_ms(),
    )
    .await
    .unwrap();

    let rotating = TestServer::start_on(db.clone(), with_keys(NEW, Some(OLD))).await;
    let r = rotating
        .admin(Method::POST, "/admin/encryption/rotate", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, json!({"reencrypted": 2, "failed": 1}));
    let keys = list(&rotating, "openai").await;
    let lost = keys.iter().find(|k| k["label"] == "lost").unwrap();
    assert_eq!(lost["is_active"], false, "an undecryptable key is disabled");
    rotating.stop().await;

    // Only the new key configured: everything rotated is still readable.
    let fresh = TestServer::start_on(db.clone(), with_keys(NEW, None)).await;
    let id = client_key["id"].as_str().unwrap();
    let revealed = fresh
        .admin(Method::POST, &format!("/admin/keys/{id}/reveal"), None)
        .await;
    assert_eq!(revealed.body["secret"].as_str(), Some(secret.as_str()));
    let sel = select(&fresh, "openai").await;
    assert_eq!(sel.body["provider_key"]["value"], "sk-rotate-good");
    let again = fresh
        .admin(Method::POST, "/admin/encryption/rotate", None)
        .await;
    // Running it again is harmless; the unreadable secret is still unreadable.
    assert_eq!(again.body, json!({"reencrypted": 2, "failed": 1}));
    fresh.stop().await;
}

async fn cooldowns_show_their_cause_and_reset_clears_them(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let (_, secret) = s
        .create_key(json!({"rate_limit": null, "concurrent_limit": null}))
        .await;
    let a = add(s, "openai", json!({"label": "a", "value": "sk-a-000000"})).await;
    let b = add(s, "openai", json!({"label": "b", "value": "sk-b-000000"})).await;
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);

    // A lease's 429 cools its key; a 403 without a lease suspends the other.
    let admitted = c
        .any(1)
        .admit(json!({"key": secret, "provider": "openai", "select": true}))
        .await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    let first = admitted.body["provider_key"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if first == a_id { b_id } else { a_id };
    let lease = admitted.body["lease_id"].as_str().unwrap();
    let r = c
        .any(2)
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "provider_key_id": first, "upstream_status": 429, "retry_after_s": 3600}),
        )
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);
    let r = c
        .any(2)
        .data_post_token(
            "/v1/report",
            json!({"provider_key_id": other, "upstream_status": 403}),
        )
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);
    // The source names the lease by its inner id (`<key id>.<token>`), as usage does.
    let inner = common::lease_record_id(lease);
    let exhausted = select(c.any(0), "openai").await;
    assert_eq!(exhausted.status, 429, "{}", exhausted.body);

    let keys = list(c.any(1), "openai").await;
    let live = |id: &str| keys.iter().find(|k| k["id"] == id).unwrap()["live"].clone();
    let at = |cause: &Value| {
        let at = chrono::DateTime::parse_from_rfc3339(cause["at"].as_str().unwrap()).unwrap();
        assert!(
            at > before && at < chrono::Utc::now() + chrono::Duration::seconds(5),
            "{cause}"
        );
    };
    let cooled = live(&first);
    assert_eq!(cooled["cooldown_cause"]["upstream_status"], 429, "{cooled}");
    assert_eq!(cooled["cooldown_cause"]["source"], format!("lease {inner}"));
    at(&cooled["cooldown_cause"]);
    assert_eq!(cooled["suspension_cause"], Value::Null);
    let suspended = live(other);
    assert_eq!(suspended["suspended"], true);
    assert_eq!(
        suspended["suspension_cause"]["upstream_status"], 403,
        "{suspended}"
    );
    assert_eq!(suspended["suspension_cause"]["source"], "data-token");
    at(&suspended["suspension_cause"]);
    assert_eq!(suspended["cooldown_cause"], Value::Null);

    // Reset: the cooldown ends at once, on every instance.
    let reset = c
        .any(2)
        .admin(
            Method::POST,
            &format!("/admin/provider-keys/{first}/reset"),
            None,
        )
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(reset.body["id"], first.as_str());
    assert_eq!(
        reset.body["live"]["cooldown_remaining_ms"], 0,
        "{}",
        reset.body
    );
    assert_eq!(reset.body["live"]["cooldown_cause"], Value::Null);
    for i in 0..3 {
        assert_eq!(picked(&select(c.any(i), "openai").await), first);
    }
    // And the suspension.
    let reset = s
        .admin(
            Method::POST,
            &format!("/admin/provider-keys/{other}/reset"),
            None,
        )
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(reset.body["live"]["suspended"], false, "{}", reset.body);
    let mut seen = std::collections::HashSet::new();
    for i in 0..4 {
        seen.insert(picked(&select(c.any(i), "openai").await));
    }
    assert!(seen.contains(other), "the suspended key is back: {seen:?}");
    for k in list(s, "openai").await {
        assert_eq!(
            (&k["live"]["cooldown_cause"], &k["live"]["suspension_cause"]),
            (&Value::Null, &Value::Null),
            "{k}"
        );
    }
    // An unknown key: 404 with the contract's error body.
    let unknown = uuid::Uuid::new_v4();
    let missing = s
        .admin(
            Method::POST,
            &format!("/admin/provider-keys/{unknown}/reset"),
            None,
        )
        .await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(!error_code(&missing).is_empty());
    c.stop().await;
}

/// Two replicas, one of which missed the invalidation of a pool change (the message was
/// lost): they hold different pools. Neither may rewrite the pool in Redis on every
/// request (each resyncing its own, in turn, until the cache TTL): the one holding the
/// older pool reloads it from the database once, and from then on both use the newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_different_pools_do_not_rewrite_it_in_turn() {
    let prefix = common::unique_prefix();
    let own_prefix = |raw: &mut keyward::config::RawConfig| {
        raw.insert(config::REDIS_PREFIX, prefix.clone());
    };
    let mut c = Cluster::start_n(Shape::Distributed, 1, own_prefix).await;
    let first = add(
        &c.servers[0],
        "openai",
        json!({"label": "a", "value": "sk-a-000000"}),
    )
    .await;
    assert_eq!(picked(&select(&c.servers[0], "openai").await), first["id"]);

    // A key added without any invalidation reaching the first replica.
    let db = c.db.connect().await;
    let second = uuid::Uuid::new_v4().to_string();
    let keyring = keyward::crypto::Keyring::new(
        &keyward::crypto::parse_key(common::ENCRYPTION_KEY).unwrap(),
        &[],
    );
    keyward::pool::store::insert(
        &db,
        &second,
        "openai",
        "b",
        &keyring.encrypt("sk-b-000000"),
        0,
        None,
        None,
        keyward::clock::now_ms(),
    )
    .await
    .unwrap();
    // A second replica starts: it loads the pool with both keys.
    let mut raw = common::base_config(&c.db);
    raw.insert(config::REDIS_URL, common::redis_url());
    own_prefix(&mut raw);
    c.servers
        .push(TestServer::start_on(c.db.clone(), raw).await);

    let redis = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let def = format!("{{{prefix}:p:openai}}:def");
    let mut versions = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        seen.insert(picked(&select(c.any(i + 1), "openai").await));
        let v: String = redis::cmd("HGET")
            .arg(&def)
            .arg("_v")
            .query_async(&mut conn)
            .await
            .unwrap();
        versions.push(v);
    }
    let rewrites = versions.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(
        rewrites, 0,
        "the pool in Redis changed {rewrites} times: {versions:?}"
    );
    assert!(
        seen.contains(&second),
        "the first replica still picks from the old pool"
    );
    c.stop().await;
    common::delete_prefix(&common::redis_url(), &prefix).await;
}

/// Guarantee 6 for reports without a lease: a gateway that names its report
/// (`report_id`) may retry it on any replica; one is recorded, the repeats answer
/// `duplicate` and count nothing. A name is bounded and goes only without a lease.
async fn a_named_report_without_a_lease_counts_once(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let key = add(s, "openai", json!({"label": "k", "value": "sk-k-000000"})).await;
    let id = key["id"].as_str().unwrap();
    let report = |name: &str| {
        json!({"report_id": name, "provider_key_id": id, "prompt_tokens": 7,
               "completion_tokens": 3, "cost_usd": 0.01})
    };
    let answers = futures_util::future::join_all((0..3).map(|i| {
        c.any(i)
            .data_post_token("/v1/report", report("gw-1:req-42"))
    }))
    .await;
    let mut bodies: Vec<String> = answers.iter().map(|a| a.body.to_string()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        [
            r#"{"duplicate":true,"recorded":false}"#,
            r#"{"duplicate":true,"recorded":false}"#,
            r#"{"recorded":true}"#
        ]
    );
    // Another name is another report.
    let other = c
        .any(1)
        .data_post_token("/v1/report", report("gw-1:req-43"))
        .await;
    assert_eq!(other.body, json!({"recorded": true}));
    let totals = eventually(15, || async {
        let keys = list(s, "openai").await;
        (keys[0]["total_requests"] == 2).then(|| keys[0].clone())
    })
    .await;
    assert_eq!(totals["total_tokens"], 20);

    // Bad names, and a name beside a lease: 400, nothing recorded.
    let (_, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    let lease = s.admit(json!({"key": secret})).await.body["lease_id"].clone();
    for body in [
        report(""),
        report(&"x".repeat(129)),
        report("with space"),
        report("caf\u{e9}"),
        json!({"report_id": "r-1", "lease_id": lease}),
        json!({"report_id": 7}),
    ] {
        let a = s.data_post_token("/v1/report", body.clone()).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{body}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(list(s, "openai").await[0]["total_requests"], 2);
    c.stop().await;
}
