//! Quotas under concurrency (issue 15): for each scope (key, user, model within either)
//! and each limit kind (requests and tokens per minute and per day, spend per period),
//! 200 requests at once spread over three replicas sharing Redis and Postgres admit
//! exactly the limit for counts, and never pass a spend limit by more than one
//! request's (actual − hold). Embedded: the same on one instance.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{error_code, Answer, Cluster, Shape};
use reqwest::Method;
use serde_json::{json, Value};

on_both_shapes!(
    key_day_requests_are_exact,
    key_day_tokens_are_exact,
    key_model_minute_requests_are_exact,
    user_minute_requests_are_exact_across_three_keys,
    user_day_tokens_are_exact_across_three_keys,
    user_model_minute_tokens_are_exact,
    key_month_spend_is_never_passed,
    user_day_spend_is_never_passed_across_three_keys,
);

const N: usize = 200;

async fn keys(c: &Cluster, n: usize, body: Value) -> Vec<String> {
    let mut secrets = Vec::new();
    for _ in 0..n {
        let (_, secret) = c.servers[0].create_key(body.clone()).await;
        secrets.push(secret);
    }
    secrets
}

async fn put_user(c: &Cluster, user: &str, limits: Value) {
    let a = c.servers[0]
        .admin(Method::PUT, &format!("/admin/users/{user}"), Some(limits))
        .await;
    assert!(a.status == 200 || a.status == 201, "{}", a.body);
}

/// `N` admits at once, spread over the instances and the given keys.
async fn burst(c: &Cluster, secrets: &[String], body: Value) -> Vec<Answer> {
    let futures = (0..N).map(|i| {
        let mut body = body.clone();
        body["key"] = json!(secrets[i % secrets.len()]);
        c.any(i).admit(body)
    });
    futures_util::future::join_all(futures).await
}

/// Exactly `expected` admitted; every other answer is the quota's refusal, naming it.
fn exactly(answers: &[Answer], expected: usize, limit: &str, scope: &str, period: &str) {
    let allowed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(allowed, expected, "admitted");
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(error_code(a), "RATE_LIMITED", "{}", a.body);
        let e = &a.body["error"];
        assert_eq!(e["limit"], limit, "{}", a.body);
        assert_eq!(e["scope"], scope, "{}", a.body);
        assert_eq!(e["period"], period, "{}", a.body);
        assert!(e["reset_at"].is_string(), "{}", a.body);
        assert!(e["retry_after_ms"].as_i64().unwrap() > 0, "{}", a.body);
    }
}

const OPEN: &str = r#"{"rate_limit": null, "concurrent_limit": null}"#;

fn open_key(extra: Value) -> Value {
    let mut body: Value = serde_json::from_str(OPEN).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn key_day_requests_are_exact(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let secrets = keys(&c, 1, open_key(json!({"daily_request_limit": 37}))).await;
    let answers = burst(&c, &secrets, json!({"estimated_tokens": 0})).await;
    exactly(&answers, 37, "requests", "key", "day");
    c.stop().await;
}

async fn key_day_tokens_are_exact(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let secrets = keys(&c, 1, open_key(json!({"daily_token_limit": 5_000}))).await;
    let answers = burst(&c, &secrets, json!({"estimated_tokens": 100})).await;
    exactly(&answers, 50, "tokens", "key", "day");
    c.stop().await;
}

async fn key_model_minute_requests_are_exact(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let body = open_key(json!({"model_limits": {"gpt-4o": {"rate_limit": 23}}}));
    let secrets = keys(&c, 1, body).await;
    // A dated id counts under its listed prefix (as `gpt-4o-mini` would: a listed prefix
    // covers every id that continues it after a `-`); another model is not limited by it.
    let answers = burst(
        &c,
        &secrets,
        json!({"model": "gpt-4o-2024-08-06", "estimated_tokens": 0}),
    )
    .await;
    exactly(&answers, 23, "requests", "key", "minute");
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.body["error"]["model"], "gpt-4o", "{}", a.body);
    }
    let other = c.servers[0]
        .admit(json!({"key": secrets[0], "model": "o1-preview", "estimated_tokens": 0}))
        .await;
    assert_eq!(other.status, 200, "{}", other.body);
    c.stop().await;
}

async fn user_minute_requests_are_exact_across_three_keys(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    put_user(&c, "team-a", json!({"rate_limit": 41})).await;
    let secrets = keys(&c, 3, open_key(json!({"user_id": "team-a"}))).await;
    let answers = burst(&c, &secrets, json!({"estimated_tokens": 0})).await;
    exactly(&answers, 41, "requests", "user", "minute");
    c.stop().await;
}

async fn user_day_tokens_are_exact_across_three_keys(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    put_user(&c, "team-b", json!({"daily_token_limit": 3_000})).await;
    let secrets = keys(&c, 3, open_key(json!({"user_id": "team-b"}))).await;
    let answers = burst(&c, &secrets, json!({"estimated_tokens": 100})).await;
    exactly(&answers, 30, "tokens", "user", "day");
    c.stop().await;
}

async fn user_model_minute_tokens_are_exact(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    put_user(
        &c,
        "team-c",
        json!({"model_limits": {"claude": {"tpm_limit": 1_900}}}),
    )
    .await;
    let secrets = keys(&c, 3, open_key(json!({"user_id": "team-c"}))).await;
    let answers = burst(
        &c,
        &secrets,
        json!({"model": "claude-sonnet-4", "estimated_tokens": 100}),
    )
    .await;
    exactly(&answers, 19, "tokens", "user", "minute");
    c.stop().await;
}

/// Each request holds 200 tokens at 10 USD per million output (0.002 USD) and really
/// costs 50 input at 2.5 + 150 output at 10 (0.001625 USD). Workers admit, wait a
/// little, report, until the limit refuses them for good (`BUDGET_EXCEEDED`). The spend
/// ends within one hold below the limit and never above it; never more requests are in
/// flight than the limit holds.
async fn spend_is_never_passed(c: Arc<Cluster>, secrets: Vec<String>, scope: &str, period: &str) {
    const HOLD: i64 = 2_000;
    const ACTUAL: i64 = 1_625;
    const LIMIT: i64 = 20_000;
    let spent = Arc::new(AtomicI64::new(0));
    let in_flight = Arc::new(AtomicI64::new(0));
    let most = Arc::new(AtomicI64::new(0));
    let workers: Vec<_> = (0..N)
        .map(|i| {
            let c = c.clone();
            let admit = json!({"key": secrets[i % secrets.len()], "provider": "openai",
                               "model": "gpt-4o", "estimated_tokens": 200});
            let (spent, in_flight, most) = (spent.clone(), in_flight.clone(), most.clone());
            let (scope, period) = (scope.to_string(), period.to_string());
            tokio::spawn(async move {
                for _ in 0..500 {
                    let a = c.any(i).admit(admit.clone()).await;
                    match (a.status, a.body["error"]["code"].as_str()) {
                        (200, _) => {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let lease = a.body["lease_id"].as_str().unwrap();
                            tokio::time::sleep(Duration::from_millis(3)).await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            let r = json!({"lease_id": lease, "prompt_tokens": 50,
                                           "completion_tokens": 150, "upstream_status": 200});
                            let rec = c.any(i + 1).data_post("/v1/report", r).await;
                            assert_eq!(rec.body["recorded"], true, "{}", rec.body);
                            spent.fetch_add(ACTUAL, Ordering::SeqCst);
                        }
                        (402, Some("BUDGET_EXCEEDED")) => {
                            let e = &a.body["error"];
                            assert_eq!(e["scope"], scope.as_str(), "{}", a.body);
                            assert_eq!(e["period"], period.as_str(), "{}", a.body);
                            return;
                        }
                        (429, Some("CONCURRENCY_LIMITED")) => {
                            tokio::time::sleep(Duration::from_millis(2)).await
                        }
                        other => panic!("unexpected {other:?}: {}", a.body),
                    }
                }
                panic!("the spend limit never refused");
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let spent = spent.load(Ordering::SeqCst);
    assert!(
        (LIMIT - HOLD..=LIMIT).contains(&spent),
        "spent {spent} micro-USD of {LIMIT}"
    );
    let most = most.load(Ordering::SeqCst);
    assert!(most <= LIMIT / HOLD, "{most} requests in flight at once");
}

async fn priced(shape: Shape) -> Arc<Cluster> {
    let c = Arc::new(Cluster::start(shape, |_| {}).await);
    let put = c.servers[0]
        .admin(
            Method::PUT,
            "/admin/prices/openai/gpt-4o",
            Some(json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    c
}

async fn key_month_spend_is_never_passed(shape: Shape) {
    let c = priced(shape).await;
    let body = open_key(json!({"spend_limits": {"month": {"usd": 0.02}}}));
    let secrets = keys(&c, 1, body).await;
    spend_is_never_passed(c.clone(), secrets, "key", "month").await;
    Arc::into_inner(c).unwrap().stop().await;
}

async fn user_day_spend_is_never_passed_across_three_keys(shape: Shape) {
    let c = priced(shape).await;
    put_user(
        &c,
        "team-d",
        json!({"spend_limits": {"day": {"usd": 0.02}}}),
    )
    .await;
    let secrets = keys(&c, 3, open_key(json!({"user_id": "team-d"}))).await;
    spend_is_never_passed(c.clone(), secrets, "user", "day").await;
    Arc::into_inner(c).unwrap().stop().await;
}
