//! The live figures of the admin quota views, on both shapes: a request
//! admitted and not yet reported shows in `live` (its request, its tokens, its spend
//! hold) while the database's `settled` is still 0; after its report `live.held` is 0
//! and `live.used` and `settled` are its cost. The key's own per-minute windows, its
//! model entry's window and its user's counters show too, read from any replica. With
//! Redis down the view still answers 200 with the database's figures and `live` null.
#![allow(clippy::unwrap_used)]

mod common;

use common::{eventually, Answer, Cluster, PrivateRedis, Shape, TestDb, TestServer};
use keyward::config;
use reqwest::Method;
use serde_json::{json, Value};

on_both_shapes!(an_unreported_request_shows_live_then_settles);

fn limit_of(body: &Value, scope: usize, kind: &str, period: &str) -> Value {
    body["scopes"][scope]["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == kind && l["period"] == period)
        .unwrap_or_else(|| panic!("no {kind}/{period} in scope {scope}: {body}"))
        .clone()
}

async fn view(s: &TestServer, path: &str) -> Answer {
    let v = s.admin(Method::GET, path, None).await;
    assert_eq!(v.status, 200, "{}", v.body);
    v
}

async fn an_unreported_request_shows_live_then_settles(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let price = json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10});
    let put = c.servers[0]
        .admin(Method::PUT, "/admin/prices/openai/gpt-4o", Some(price))
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let user = format!("u-{}", uuid::Uuid::new_v4());
    let u = c.servers[0]
        .admin(
            Method::PUT,
            &format!("/admin/users/{user}"),
            Some(json!({"daily_token_limit": 100_000, "spend_limits": {"day": {"usd": 1}}})),
        )
        .await;
    assert!(u.status == 200 || u.status == 201, "{}", u.body);
    let (key, secret) = c.servers[0]
        .create_key(
            json!({"user_id": user, "rate_limit": 10, "tpm_limit": 10_000,
            "concurrent_limit": null, "daily_request_limit": 100,
            "spend_limits": {"month": {"usd": 1}},
            "model_limits": {"gpt-4o": {"rate_limit": 5}}}),
        )
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    let (key_path, user_path) = (
        format!("/admin/keys/{id}/quota"),
        format!("/admin/users/{user}/quota"),
    );

    // Before any request: live zeros, and the empty windows have no reset.
    let v = view(c.any(1), &key_path).await;
    let rpm = limit_of(&v.body, 0, "requests", "minute");
    assert_eq!(
        rpm["live"],
        json!({"used": 0, "remaining": 10, "reset_at": null})
    );

    // Admitted, not reported: 200 tokens held at 10 USD/Mtok = 0.002 USD.
    let a = c
        .any(0)
        .admit(json!({"key": secret, "provider": "openai", "model": "gpt-4o", "estimated_tokens": 200}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let lease = a.body["lease_id"].as_str().unwrap().to_string();
    let v = view(c.any(1), &key_path).await;
    let b = &v.body;
    let rpm = limit_of(b, 0, "requests", "minute");
    assert_eq!(
        (&rpm["live"]["used"], &rpm["live"]["remaining"]),
        (&json!(1), &json!(9))
    );
    assert!(rpm["live"]["reset_at"].is_string(), "{rpm}");
    assert_eq!(limit_of(b, 0, "tokens", "minute")["live"]["used"], 200);
    let day = limit_of(b, 0, "requests", "day");
    assert_eq!(
        (&day["live"]["used"], &day["settled"]),
        (&json!(1), &json!(0))
    );
    assert_eq!(
        day["live"]["reset_at"], day["reset_at"],
        "the same UTC midnight"
    );
    let month = limit_of(b, 0, "spend", "month");
    assert_eq!(
        month["live"],
        json!({"used": 0, "held": 0.002, "remaining": 0.998, "reset_at": month["reset_at"]})
    );
    assert_eq!(month["settled"], 0);
    // The key's model entry counts its own window.
    assert_eq!(b["scopes"][1]["model"], "gpt-4o");
    let model_rpm = limit_of(b, 1, "requests", "minute");
    assert_eq!(model_rpm["live"]["used"], 1);
    assert_eq!(model_rpm["live"]["remaining"], 4);
    // The user's counters, shared by its keys.
    let v = view(c.any(2), &user_path).await;
    assert_eq!(limit_of(&v.body, 0, "tokens", "day")["live"]["used"], 200);
    let user_day = limit_of(&v.body, 0, "spend", "day");
    assert_eq!(
        (
            &user_day["live"]["used"],
            &user_day["live"]["held"],
            &user_day["settled"]
        ),
        (&json!(0), &json!(0.002), &json!(0))
    );

    // Reported: 50 prompt at 2.5 + 150 completion at 10 = 0.001625 USD.
    let r = json!({"lease_id": lease, "prompt_tokens": 50, "completion_tokens": 150, "upstream_status": 200});
    let reported = c.any(1).data_post("/v1/report", r).await;
    assert_eq!(reported.body["recorded"], true, "{}", reported.body);
    let v = view(c.any(2), &key_path).await;
    let month = limit_of(&v.body, 0, "spend", "month");
    assert_eq!(
        (
            &month["live"]["used"],
            &month["live"]["held"],
            &month["live"]["remaining"]
        ),
        (&json!(0.001625), &json!(0), &json!(0.998375))
    );
    // The database catches up when the accounting writer applies the record.
    let settled = eventually(20, || async {
        let v = view(c.any(0), &key_path).await;
        let month = limit_of(&v.body, 0, "spend", "month");
        (month["settled"] != 0).then_some(month)
    })
    .await;
    assert_eq!(settled["settled"], 0.001625);
    assert_eq!(settled["live"]["used"], 0.001625, "counted once: {settled}");
    let v = view(c.any(0), &user_path).await;
    let user_day = limit_of(&v.body, 0, "spend", "day");
    assert_eq!(
        (&user_day["live"]["used"], &user_day["live"]["held"]),
        (&json!(0.001625), &json!(0))
    );
    c.stop().await;
}

/// Redis down: the view answers from the database, `live` null everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_view_answers_with_the_databases_figures() {
    let mut redis = PrivateRedis::start().await;
    let db = std::sync::Arc::new(TestDb::new(common::Backend::Sqlite).await);
    let mut raw = common::base_config(&db);
    raw.insert(config::REDIS_URL, redis.url.clone());
    let s = TestServer::start_on(db, raw).await;
    let (key, secret) = s
        .create_key(json!({"rate_limit": 10, "daily_request_limit": 5, "concurrent_limit": null}))
        .await;
    let path = format!("/admin/keys/{}/quota", key["id"].as_str().unwrap());
    assert_eq!(s.admit(json!({"key": secret})).await.status, 200);
    let v = view(&s, &path).await;
    assert_eq!(limit_of(&v.body, 0, "requests", "day")["live"]["used"], 1);
    redis.stop();
    let v = view(&s, &path).await;
    for limit in v.body["scopes"][0]["limits"].as_array().unwrap() {
        assert_eq!(limit["live"], Value::Null, "{limit}");
    }
    assert_eq!(limit_of(&v.body, 0, "requests", "day")["settled"], 0);
    s.stop().await;
}
