//! Quotas under concurrency, every scope × every limit kind: for the key, the
//! key's model entry, the user (three keys) and the user's model entry, each with
//! requests and tokens per minute, requests and tokens per UTC day, and a spend limit,
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
    key_counts_are_exact,
    key_model_counts_are_exact,
    user_counts_are_exact_across_three_keys,
    user_model_counts_are_exact_across_three_keys,
    key_month_spend_is_never_passed,
    key_model_week_spend_is_never_passed,
    user_day_spend_is_never_passed_across_three_keys,
    user_model_total_spend_is_never_passed_across_three_keys,
);

const N: usize = 200;
/// The model every request names: a dated id, counted under the listed entry `gpt-4o`.
const MODEL: &str = "gpt-4o-2024-08-06";

#[derive(Clone, Copy, PartialEq)]
enum Scope {
    Key,
    KeyModel,
    User,
    UserModel,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Key | Scope::KeyModel => "key",
            Scope::User | Scope::UserModel => "user",
        }
    }

    fn model(self) -> Option<&'static str> {
        matches!(self, Scope::KeyModel | Scope::UserModel).then_some("gpt-4o")
    }
}

/// One count limit: its field, its value, the estimate each request names, how many of
/// the 200 it admits, and how the refusal names it.
struct Count {
    field: &'static str,
    limit: i64,
    estimate: i64,
    admits: usize,
    what: &'static str,
    period: &'static str,
}

const COUNTS: [Count; 4] = [
    Count {
        field: "rate_limit",
        limit: 23,
        estimate: 0,
        admits: 23,
        what: "requests",
        period: "minute",
    },
    Count {
        field: "tpm_limit",
        limit: 1_900,
        estimate: 100,
        admits: 19,
        what: "tokens",
        period: "minute",
    },
    Count {
        field: "daily_request_limit",
        limit: 37,
        estimate: 0,
        admits: 37,
        what: "requests",
        period: "day",
    },
    Count {
        field: "daily_token_limit",
        limit: 4_100,
        estimate: 100,
        admits: 41,
        what: "tokens",
        period: "day",
    },
];

/// Sets `limits` (a limit set) on the scope and returns the secrets of its keys (one
/// for a key scope, three of one user for a user scope), every key otherwise open.
async fn scoped(c: &Cluster, scope: Scope, limits: Value, user: &str) -> Vec<String> {
    let mut key = json!({"rate_limit": null, "concurrent_limit": null});
    let mut n = 1;
    match scope {
        Scope::Key => {
            for (k, v) in limits.as_object().unwrap() {
                key[k] = v.clone();
            }
        }
        Scope::KeyModel => key["model_limits"] = json!({"gpt-4o": limits}),
        Scope::User | Scope::UserModel => {
            let body = if scope == Scope::User {
                limits
            } else {
                json!({"model_limits": {"gpt-4o": limits}})
            };
            let a = c.servers[0]
                .admin(Method::PUT, &format!("/admin/users/{user}"), Some(body))
                .await;
            assert!(a.status == 200 || a.status == 201, "{}", a.body);
            key["user_id"] = json!(user);
            n = 3;
        }
    }
    let mut secrets = Vec::new();
    for _ in 0..n {
        secrets.push(c.servers[0].create_key(key.clone()).await.1);
    }
    secrets
}

/// `N` admits at once, spread over the instances and the given keys.
async fn burst(c: &Cluster, secrets: &[String], estimate: i64) -> Vec<Answer> {
    let futures = (0..N).map(|i| {
        let body = json!({"key": secrets[i % secrets.len()], "model": MODEL,
                          "estimated_tokens": estimate});
        c.any(i).admit(body)
    });
    futures_util::future::join_all(futures).await
}

/// Each count limit of the scope, one at a time: exactly the limit is admitted, and
/// every other answer is that limit's refusal, naming it.
async fn counts_are_exact(shape: Shape, scope: Scope) {
    let c = Cluster::start(shape, |_| {}).await;
    for (i, count) in COUNTS.iter().enumerate() {
        let user = format!("team-{i}");
        let secrets = scoped(&c, scope, json!({count.field: count.limit}), &user).await;
        let answers = burst(&c, &secrets, count.estimate).await;
        let allowed = answers.iter().filter(|a| a.status == 200).count();
        assert_eq!(allowed, count.admits, "{} of {}", count.field, scope.name());
        for a in answers.iter().filter(|a| a.status != 200) {
            assert_eq!(error_code(a), "RATE_LIMITED", "{}", a.body);
            let e = &a.body["error"];
            assert_eq!(e["limit"], count.what, "{}", a.body);
            assert!(e["retry_after_ms"].as_i64().unwrap() > 0, "{}", a.body);
            if scope == Scope::Key && count.period == "minute" {
                continue; // the key's own window: not a quota, no scope fields
            }
            assert_eq!(e["scope"], scope.name(), "{}", a.body);
            assert_eq!(e["model"].as_str(), scope.model(), "{}", a.body);
            assert_eq!(e["period"], count.period, "{}", a.body);
            assert!(e["reset_at"].is_string(), "{}", a.body);
        }
    }
    c.stop().await;
}

async fn key_counts_are_exact(shape: Shape) {
    counts_are_exact(shape, Scope::Key).await;
}

async fn key_model_counts_are_exact(shape: Shape) {
    counts_are_exact(shape, Scope::KeyModel).await;
}

async fn user_counts_are_exact_across_three_keys(shape: Shape) {
    counts_are_exact(shape, Scope::User).await;
}

async fn user_model_counts_are_exact_across_three_keys(shape: Shape) {
    counts_are_exact(shape, Scope::UserModel).await;
}

/// Each request holds 200 tokens at 10 USD per million output (0.002 USD) and really
/// costs 50 input at 2.5 + 150 output at 10 (0.001625 USD). `N` workers admit, wait a
/// little, report, until the limit refuses them for good (`BUDGET_EXCEEDED`). The spend
/// ends within one hold below the limit and never above it; never more requests are in
/// flight than the limit holds.
async fn spend_is_never_passed(shape: Shape, scope: Scope, period: &'static str) {
    const HOLD: i64 = 2_000;
    const ACTUAL: i64 = 1_625;
    const LIMIT: i64 = 20_000;
    let c = Arc::new(Cluster::start(shape, |_| {}).await);
    let put = c.servers[0]
        .admin(
            Method::PUT,
            "/admin/prices/openai/gpt-4o",
            Some(json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let limits = json!({"spend_limits": {period: {"usd": 0.02}}});
    let secrets = scoped(&c, scope, limits, "team-spend").await;
    let spent = Arc::new(AtomicI64::new(0));
    let in_flight = Arc::new(AtomicI64::new(0));
    let most = Arc::new(AtomicI64::new(0));
    let workers: Vec<_> = (0..N)
        .map(|i| {
            let c = c.clone();
            let admit = json!({"key": secrets[i % secrets.len()], "provider": "openai",
                               "model": MODEL, "estimated_tokens": 200});
            let (spent, in_flight, most) = (spent.clone(), in_flight.clone(), most.clone());
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
                            assert_eq!(e["scope"], scope.name(), "{}", a.body);
                            assert_eq!(e["model"].as_str(), scope.model(), "{}", a.body);
                            assert_eq!(e["period"], period, "{}", a.body);
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
    Arc::into_inner(c).unwrap().stop().await;
}

async fn key_month_spend_is_never_passed(shape: Shape) {
    spend_is_never_passed(shape, Scope::Key, "month").await;
}

async fn key_model_week_spend_is_never_passed(shape: Shape) {
    spend_is_never_passed(shape, Scope::KeyModel, "week").await;
}

async fn user_day_spend_is_never_passed_across_three_keys(shape: Shape) {
    spend_is_never_passed(shape, Scope::User, "day").await;
}

async fn user_model_total_spend_is_never_passed_across_three_keys(shape: Shape) {
    spend_is_never_passed(shape, Scope::UserModel, "total").await;
}
