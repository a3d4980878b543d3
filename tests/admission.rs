//! `/v1/admit`, `/v1/report` and `/v1/leases/{id}/renew` over HTTP: the contract's
//! guarantees 1 to 5 with real servers. Distributed: three instances on one Redis and one
//! Postgres, requests spread over them. Embedded: one instance on SQLite.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{error_code, eventually, Answer, Cluster, Shape, TestServer};
use keyward::config;
use reqwest::Method;
use serde_json::{json, Value};

on_both_shapes!(
    static_checks_refuse_before_anything_is_counted,
    exactly_the_rpm_limit_is_admitted_under_concurrency,
    exactly_the_tpm_limit_is_admitted_under_concurrency,
    concurrency_slots_are_never_exceeded_and_are_released,
    unreported_leases_free_their_slot_on_expiry_and_renewal_keeps_it,
    a_denied_request_consumes_nothing,
    reports_count_once_even_after_the_lease_expired,
    admin_changes_reach_every_instance_at_once,
    a_small_balance_is_never_overspent_by_more_than_one_request,
    bad_data_plane_input_is_refused,
    a_light_lease_renews_settles_and_reports_once,
);

async fn key(c: &Cluster, body: Value) -> (String, String) {
    let (key, secret) = c.servers[0].create_key(body).await;
    (key["id"].as_str().unwrap().to_string(), secret)
}

fn header(a: &Answer, name: &str) -> Option<String> {
    a.headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

/// Fires `n` admits at once, spread over the instances.
async fn burst(c: &Cluster, n: usize, body: Value) -> Vec<Answer> {
    let futures = (0..n).map(|i| c.any(i).admit(body.clone()));
    futures_util::future::join_all(futures).await
}

async fn usage_applied(c: &Cluster, key_id: &str, requests: i64) -> Value {
    let s = &c.servers[0];
    eventually(15, || async {
        let stats = s
            .admin(Method::GET, &format!("/admin/keys/{key_id}/stats"), None)
            .await
            .body;
        (stats["total_requests"] == requests).then_some(stats)
    })
    .await
}

async fn static_checks_refuse_before_anything_is_counted(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let (id, secret) = key(
        &c,
        json!({"rate_limit": 10, "tpm_limit": 1000, "allowed_providers": ["openai"],
               "allowed_models": ["gpt-4o"], "allowed_api_formats": ["openai_chat"]}),
    )
    .await;
    let ok = json!({"key": secret, "provider": "openai", "model": "gpt-4o", "api_format": "openai_chat", "estimated_tokens": 10});
    let with = |field: &str, value: Value| {
        let mut body = ok.clone();
        body[field] = value;
        body
    };
    let s = c.any(1);
    for (body, status, code) in [
        (json!({}), 401, "MISSING_KEY"),
        (json!({"key": ""}), 401, "MISSING_KEY"),
        (
            json!({"key": "sk-kw-thisisnotakeythisisnotakeythisisnotakey123"}),
            401,
            "INVALID_KEY",
        ),
        (json!({"key": "short"}), 401, "INVALID_KEY"),
        (
            with("provider", json!("anthropic")),
            403,
            "PROVIDER_NOT_ALLOWED",
        ),
        (with("provider", Value::Null), 403, "PROVIDER_NOT_ALLOWED"),
        (with("model", json!("gpt-4")), 403, "MODEL_NOT_ALLOWED"),
        (
            with("api_format", json!("anthropic_messages")),
            403,
            "API_FORMAT_NOT_ALLOWED",
        ),
        (
            with("estimated_tokens", json!(1001)),
            413,
            "TOKENS_EXCEED_LIMIT",
        ),
    ] {
        let a = s.admit(body.clone()).await;
        assert_eq!(
            (a.status, error_code(&a)),
            (status, code.to_string()),
            "{body}"
        );
        assert!(
            !a.body.to_string().contains(&secret[10..]),
            "the key is echoed"
        );
    }
    // A request naming no provider is told so, not shown a made-up name.
    let a = s.admit(with("provider", Value::Null)).await;
    assert_eq!(
        a.body["error"]["message"],
        "the request names no provider, and this key allows only listed ones"
    );
    // Nothing above was counted: the first real admission sees an empty window.
    let a = s.admit(ok.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        header(&a, "x-ratelimit-remaining-requests").as_deref(),
        Some("9")
    );
    assert_eq!(
        header(&a, "x-ratelimit-remaining-tokens").as_deref(),
        Some("990")
    );
    assert_eq!(a.body["limits"]["requests"]["remaining"], 9);

    // Expired: refused at once, by every instance, with no expiry job running.
    let path = format!("/admin/keys/{id}");
    c.servers[0]
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"expires_at": "2020-01-01T00:00:00Z"})),
        )
        .await;
    for s in &c.servers {
        let a = s.admit(ok.clone()).await;
        assert_eq!((a.status, error_code(&a).as_str()), (403, "KEY_EXPIRED"));
    }
    // Still so once disabled, as the expiry job disables an expired key.
    c.servers[0]
        .admin(Method::PATCH, &path, Some(json!({"is_active": false})))
        .await;
    for s in &c.servers {
        let a = s.admit(ok.clone()).await;
        assert_eq!((a.status, error_code(&a).as_str()), (403, "KEY_EXPIRED"));
    }
    c.servers[0]
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"expires_at": null, "is_active": true})),
        )
        .await;
    c.servers[0].admin(Method::DELETE, &path, None).await;
    for s in &c.servers {
        let a = s.admit(ok.clone()).await;
        assert_eq!((a.status, error_code(&a).as_str()), (403, "KEY_DISABLED"));
    }
    c.stop().await;
}

async fn exactly_the_rpm_limit_is_admitted_under_concurrency(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let (_, secret) = key(&c, json!({"rate_limit": 50, "concurrent_limit": null})).await;
    let started = std::time::Instant::now();
    let answers = burst(&c, 200, json!({"key": secret, "estimated_tokens": 0})).await;
    // The window opened with the first admission, somewhere in the burst: a refusal
    // waits for it to close, a minute after, less what of the burst had passed (on a
    // loaded machine the burst itself can take seconds).
    let burst_ms = started.elapsed().as_millis() as i64;
    let allowed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(allowed, 50);
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!((a.status, error_code(a).as_str()), (429, "RATE_LIMITED"));
        assert_eq!(a.body["error"]["limit"], "requests");
        let retry_ms = a.body["error"]["retry_after_ms"].as_i64().unwrap();
        assert!(
            (59_000 - burst_ms..=61_000).contains(&retry_ms),
            "{retry_ms} (burst {burst_ms} ms)"
        );
        let retry_after: i64 = header(a, "retry-after").unwrap().parse().unwrap();
        assert_eq!(retry_after, (retry_ms + 999) / 1000);
        assert_eq!(
            header(a, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert_eq!(
            header(a, "ratelimit-policy").as_deref(),
            Some("\"requests\";q=50;w=60")
        );
    }
    c.stop().await;
}

async fn exactly_the_tpm_limit_is_admitted_under_concurrency(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let (_, secret) = key(
        &c,
        json!({"rate_limit": null, "tpm_limit": 5000, "concurrent_limit": null}),
    )
    .await;
    let answers = burst(&c, 200, json!({"key": secret, "estimated_tokens": 100})).await;
    assert_eq!(answers.iter().filter(|a| a.status == 200).count(), 50);
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!((a.status, error_code(a).as_str()), (429, "RATE_LIMITED"));
        assert_eq!(a.body["error"]["limit"], "tokens");
        assert!(header(a, "retry-after").is_some());
    }
    c.stop().await;
}

async fn concurrency_slots_are_never_exceeded_and_are_released(shape: Shape) {
    let c = Arc::new(Cluster::start(shape, |_| {}).await);
    let (_, secret) = key(&c, json!({"rate_limit": null, "concurrent_limit": 5})).await;
    let live = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let holders: Vec<_> = (0..50)
        .map(|i| {
            let (c, secret, live, peak) = (c.clone(), secret.clone(), live.clone(), peak.clone());
            tokio::spawn(async move {
                let s = c.any(i);
                for _ in 0..2_000 {
                    let a = s.admit(json!({"key": secret})).await;
                    if a.status == 429 {
                        assert_eq!(error_code(&a), "CONCURRENCY_LIMITED");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    assert_eq!(a.status, 200, "{}", a.body);
                    let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                    let lease = a.body["lease_id"].as_str().unwrap();
                    let r = c
                        .any(i + 1)
                        .data_post("/v1/report", json!({"lease_id": lease}))
                        .await;
                    assert_eq!(r.body["recorded"], true);
                    return true;
                }
                false
            })
        })
        .collect();
    for h in holders {
        assert!(
            h.await.unwrap(),
            "a holder never got a slot: slots were not released"
        );
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 5, "{peak} leases were live at once");
    assert!(peak >= 2, "the test did not overlap holders ({peak})");
    Arc::into_inner(c).unwrap().stop().await;
}

async fn unreported_leases_free_their_slot_on_expiry_and_renewal_keeps_it(shape: Shape) {
    let c = Cluster::start(shape, |raw| {
        raw.insert(config::LEASE_TTL_S, "1".into());
    })
    .await;
    let (_, secret) = key(&c, json!({"rate_limit": null, "concurrent_limit": 2})).await;
    let body = json!({"key": secret});
    let first = c.any(0).admit(body.clone()).await;
    let second = c.any(1).admit(body.clone()).await;
    assert_eq!((first.status, second.status), (200, 200));
    let denied = c.any(2).admit(body.clone()).await;
    assert_eq!(error_code(&denied), "CONCURRENCY_LIMITED");
    assert!(denied.body["error"]["retry_after_ms"].as_i64().unwrap() <= 1_000);
    // Keep the first lease alive by renewing it; let the second expire unreported.
    let lease = first.body["lease_id"].as_str().unwrap().to_string();
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = c
            .any(i)
            .data_post(&format!("/v1/leases/{lease}/renew"), json!({}))
            .await;
        assert_eq!(r.status, 200, "renewal {i}: {}", r.body);
    }
    // 1.6 s later: the second lease expired, the renewed first one did not.
    let third = c.any(1).admit(body.clone()).await;
    assert_eq!(third.status, 200, "an expired lease still held its slot");
    let fourth = c.any(2).admit(body.clone()).await;
    assert_eq!(
        error_code(&fourth),
        "CONCURRENCY_LIMITED",
        "the renewed lease lost its slot"
    );
    let stale = second.body["lease_id"].as_str().unwrap();
    let r = c
        .any(0)
        .data_post(&format!("/v1/leases/{stale}/renew"), json!({}))
        .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "LEASE_NOT_FOUND")
    );
    c.stop().await;
}

async fn a_denied_request_consumes_nothing(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let (_, secret) = key(
        &c,
        json!({"rate_limit": 10, "tpm_limit": 1000, "concurrent_limit": 1}),
    )
    .await;
    let body = json!({"key": secret, "estimated_tokens": 100});
    let a = c.any(0).admit(body.clone()).await;
    assert_eq!(a.status, 200);
    for i in 0..5 {
        let d = c.any(i).admit(body.clone()).await;
        assert_eq!(error_code(&d), "CONCURRENCY_LIMITED");
        // Headers on a denial too, and they show nothing more was counted.
        assert_eq!(
            header(&d, "x-ratelimit-remaining-requests").as_deref(),
            Some("9")
        );
        assert_eq!(
            header(&d, "x-ratelimit-remaining-tokens").as_deref(),
            Some("900")
        );
    }
    let lease = a.body["lease_id"].as_str().unwrap();
    c.any(1)
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "prompt_tokens": 60, "completion_tokens": 40}),
        )
        .await;
    let big = c
        .any(2)
        .admit(json!({"key": secret, "estimated_tokens": 950}))
        .await;
    assert_eq!(
        (
            error_code(&big).as_str(),
            big.body["error"]["limit"].clone()
        ),
        ("RATE_LIMITED", json!("tokens"))
    );
    let next = c.any(0).admit(body.clone()).await;
    assert_eq!(next.status, 200);
    assert_eq!(
        header(&next, "x-ratelimit-remaining-requests").as_deref(),
        Some("8")
    );
    assert_eq!(
        header(&next, "x-ratelimit-remaining-tokens").as_deref(),
        Some("800")
    );
    c.stop().await;
}

async fn reports_count_once_even_after_the_lease_expired(shape: Shape) {
    let c = Cluster::start(shape, |raw| {
        raw.insert(config::LEASE_TTL_S, "1".into());
        raw.insert(config::DEFAULT_PRICE, common::DEFAULT_PRICE.into());
    })
    .await;
    let (id, secret) = key(
        &c,
        json!({"is_standalone": true, "initial_balance_usd": 10}),
    )
    .await;
    let body = json!({"key": secret, "model": "gpt-4o"});
    let a = c.any(0).admit(body.clone()).await;
    let lease = a.body["lease_id"].as_str().unwrap().to_string();
    let report = json!({"lease_id": lease, "prompt_tokens": 10, "completion_tokens": 5,
                        "cost_usd": 0.5, "latency_ms": 100, "upstream_status": 200});
    let answers: Vec<_> = (0..3)
        .map(|i| c.any(i).data_post("/v1/report", report.clone()))
        .collect();
    let answers = futures_util::future::join_all(answers).await;
    let recorded = answers
        .iter()
        .filter(|r| r.body == json!({"recorded": true}))
        .count();
    let duplicates = answers
        .iter()
        .filter(|r| r.body == json!({"recorded": false, "duplicate": true}))
        .count();
    assert_eq!((recorded, duplicates), (1, 2));

    // A lease that expired before its report is still recorded.
    let late = c.any(1).admit(body.clone()).await;
    let late_lease = late.body["lease_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let r = c
        .any(2)
        .data_post(
            "/v1/report",
            json!({"lease_id": late_lease, "cost_usd": 0.25, "prompt_tokens": 1}),
        )
        .await;
    assert_eq!(r.body, json!({"recorded": true}));

    let stats = usage_applied(&c, &id, 2).await;
    assert_eq!(stats["total_cost_usd"], 0.75);
    assert_eq!(stats["total_tokens"], 16);
    let k = c.servers[0]
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await
        .body;
    assert_eq!(k["total_requests"], 2);
    assert_eq!(k["balance_used_usd"], 0.75);
    assert_eq!(k["remaining_balance_usd"], 9.25);
    // The admit answer shows the live balance too.
    let a = c.any(0).admit(body.clone()).await;
    assert_eq!(a.body["remaining_balance_usd"], 9.25);
    c.stop().await;
}

async fn admin_changes_reach_every_instance_at_once(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let (id, secret) = key(&c, json!({"rate_limit": 100})).await;
    let body = json!({"key": secret});
    for s in &c.servers {
        assert_eq!(
            header(&s.admit(body.clone()).await, "x-ratelimit-limit-requests").as_deref(),
            Some("100")
        );
    }
    c.servers[0]
        .admin(
            Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"rate_limit": 7})),
        )
        .await;
    for s in &c.servers {
        // Pub/sub is asynchronous: allow it a moment, far below the cache TTL.
        eventually(2, || async {
            let a = s.admit(body.clone()).await;
            (header(&a, "x-ratelimit-limit-requests").as_deref() == Some("7")).then_some(())
        })
        .await;
    }
    c.stop().await;
}

/// Guarantee 10 under concurrency: 50 requests at once, spread over the replicas, on a
/// 0.01 USD balance. Each holds its estimate at the model's price (200 tokens at 10 USD
/// per million: 0.002 USD) and really costs less (50 input tokens at 2.5 + 150 output
/// at 10: 0.001625 USD). Never more requests are in flight than the balance holds, the
/// balance is used up to less than one hold, and it never goes below zero; then one
/// request that uses more than its estimate takes it below zero by exactly its
/// (actual - hold), and no request passes after.
async fn a_small_balance_is_never_overspent_by_more_than_one_request(shape: Shape) {
    const HOLD: i64 = 2_000;
    const ACTUAL: i64 = 1_625;
    const CREDIT: i64 = 10_000;
    let c = Arc::new(Cluster::start(shape, |_| {}).await);
    let put = c.servers[0]
        .admin(
            Method::PUT,
            "/admin/prices/openai/gpt-4o",
            Some(json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let (id, secret) = key(
        &c,
        json!({"is_standalone": true, "initial_balance_usd": 0.01, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let admit =
        json!({"key": secret, "provider": "openai", "model": "gpt-4o", "estimated_tokens": 200});
    let spent = Arc::new(AtomicI64::new(0));
    let in_flight = Arc::new(AtomicI64::new(0));
    let most = Arc::new(AtomicI64::new(0));
    let workers: Vec<_> = (0..50)
        .map(|i| {
            let (c, admit) = (c.clone(), admit.clone());
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
                            let r = json!({"lease_id": lease, "prompt_tokens": 50, "completion_tokens": 150, "upstream_status": 200});
                            assert_eq!(
                                c.any(i + 1).data_post("/v1/report", r).await.body["recorded"],
                                true
                            );
                            spent.fetch_add(ACTUAL, Ordering::SeqCst);
                        }
                        (402, Some("INSUFFICIENT_BALANCE")) => return,
                        (429, Some("CONCURRENCY_LIMITED")) => {
                            tokio::time::sleep(Duration::from_millis(2)).await
                        }
                        other => panic!("unexpected {other:?}: {}", a.body),
                    }
                }
                panic!("the balance never ran out");
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let spent = spent.load(Ordering::SeqCst);
    assert!(
        (CREDIT - HOLD..=CREDIT).contains(&spent),
        "spent {spent} micro-USD of {CREDIT}"
    );
    let most = most.load(Ordering::SeqCst);
    assert!(most <= CREDIT / HOLD, "{most} requests in flight at once");
    let requests = spent / ACTUAL;
    let stats = usage_applied(&c, &id, requests).await;
    assert_eq!(stats["total_tokens"], requests * 200, "{stats}");
    let k = c.servers[0]
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await
        .body;
    let used = |k: &Value| (k["balance_used_usd"].as_f64().unwrap() * 1e6).round() as i64;
    assert_eq!(used(&k), spent, "{k}");

    // What is left (less than one hold) is too little for another request; credit one
    // hold, and a request that uses 3,000 output tokens instead of its 200 overshoots.
    let a = c.any(1).admit(admit.clone()).await;
    assert_eq!(error_code(&a), "INSUFFICIENT_BALANCE", "{}", a.body);
    let topped = c.servers[0]
        .admin(
            Method::POST,
            &format!("/admin/keys/{id}/balance"),
            Some(json!({"amount_usd": 0.002})),
        )
        .await;
    assert_eq!(topped.status, 200, "{}", topped.body);
    let a = eventually(2, || async {
        let a = c.any(2).admit(admit.clone()).await;
        (a.status == 200).then_some(a)
    })
    .await;
    let r = json!({"lease_id": a.body["lease_id"], "prompt_tokens": 0, "completion_tokens": 3000});
    assert_eq!(c.any(0).data_post("/v1/report", r).await.status, 200);
    let stats = usage_applied(&c, &id, requests + 1).await;
    let k = c.servers[0]
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await
        .body;
    let overshoot = 30_000 - HOLD;
    let left = CREDIT + HOLD - used(&k);
    assert!(
        left >= -overshoot && left < 0,
        "{left} micro-USD left, one request's (actual - hold) is {overshoot}: {k} {stats}"
    );
    assert_eq!(k["remaining_balance_usd"], 0, "shown as 0, never below");
    let a = c.any(0).admit(admit.clone()).await;
    assert_eq!(error_code(&a), "INSUFFICIENT_BALANCE", "{}", a.body);

    // A credit (a balance version the counters have not seen) reopens the key everywhere.
    c.servers[0]
        .admin(
            Method::POST,
            &format!("/admin/keys/{id}/balance"),
            Some(json!({"amount_usd": 1})),
        )
        .await;
    for s in &c.servers {
        eventually(2, || async {
            (s.admit(admit.clone()).await.status == 200).then_some(())
        })
        .await;
    }
    Arc::into_inner(c).unwrap().stop().await;
}

async fn bad_data_plane_input_is_refused(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let (_, secret) = key(&c, json!({})).await;
    let s: &TestServer = c.any(0);
    for (path, body) in [
        ("/v1/admit", json!({"key": secret, "estimated_tokens": -1})),
        (
            "/v1/admit",
            json!({"key": secret, "estimated_tokens": "10"}),
        ),
        ("/v1/admit", json!({"key": secret, "unknown": true})),
        ("/v1/admit", json!({"key": 42})),
        ("/v1/report", json!({"prompt_tokens": -5})),
        ("/v1/report", json!({"cost_usd": -0.1})),
        ("/v1/report", json!({"cost_usd": 0.0000001})),
        ("/v1/report", json!({"upstream_status": 42})),
        ("/v1/report", json!({"latency_ms": "fast"})),
        ("/v1/report", json!({"provider_key_id": "not-a-uuid"})),
        ("/v1/report", json!({"lease_id": null, "extra": 1})),
    ] {
        // With the data-plane token, so that reports without a lease reach validation.
        let a = s.data_post_token(path, body.clone()).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{path} {body}"
        );
    }
    // Nothing was counted by any of that.
    let a = s.admit(json!({"key": secret})).await;
    assert_eq!(
        header(&a, "x-ratelimit-remaining-requests").as_deref(),
        Some("99")
    );
    c.stop().await;
}

/// Guarantee 5 through an outage: Postgres goes away while 500 reports arrive (some of
/// them twice); when it returns, all 500 are applied, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_survive_a_database_outage_and_apply_once() {
    let base = common::TestDb::new(common::Backend::Postgres).await;
    let (target, _) = common::reroute(&base.url, "unused");
    let proxy = common::PgProxy::start(target).await;
    let (_, proxied_url) = common::reroute(&base.url, &format!("127.0.0.1:{}", proxy.port));
    let db = Arc::new(base);
    let prefix = common::unique_prefix();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let mut raw = common::base_config(&db);
        raw.insert(config::DATABASE_URL, proxied_url.clone());
        raw.insert(config::REDIS_URL, common::redis_url());
        raw.insert(config::REDIS_PREFIX, prefix.clone());
        raw.insert(config::DEFAULT_PRICE, common::DEFAULT_PRICE.into());
        servers.push(TestServer::start_on(db.clone(), raw).await);
    }
    let (key, secret) = servers[0]
        .create_key(json!({"is_standalone": true, "initial_balance_usd": 1000,
                           "rate_limit": null, "concurrent_limit": null}))
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    // The cost is known after the first report, so the balance does not serialise the rest.
    let first = servers[0].admit(json!({"key": secret})).await;
    let lease = first.body["lease_id"].as_str().unwrap();
    servers[0]
        .data_post("/v1/report", json!({"lease_id": lease, "cost_usd": 0.001}))
        .await;
    let mut leases = Vec::new();
    for i in 0..500 {
        let a = servers[i % 2].admit(json!({"key": secret})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        leases.push(a.body["lease_id"].as_str().unwrap().to_string());
    }

    proxy.set_up(false);
    let reports = leases.iter().enumerate().map(|(i, lease)| {
        let s = &servers[i % 2];
        let body = json!({"lease_id": lease, "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.001});
        async move {
            // A 503 says "retry later" (on a loaded machine a Redis reply can take longer
            // than its timeout): the caller retries, as callers do; a report retried
            // still applies once.
            let send = || async {
                for _ in 0..20 {
                    let answer = s.data_post("/v1/report", body.clone()).await;
                    if answer.status != 503 {
                        return answer;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                s.data_post("/v1/report", body.clone()).await
            };
            let first = send().await;
            // Every tenth report is retried by its caller.
            let again = if i % 10 == 0 { Some(send().await) } else { None };
            (first, again)
        }
    });
    for (first, again) in futures_util::future::join_all(reports).await {
        assert_eq!(first.body, json!({"recorded": true}));
        if let Some(again) = again {
            assert_eq!(again.body["duplicate"], true);
        }
    }
    // The hot path needs no database: cached keys are still admitted during the outage.
    for s in &servers {
        assert_eq!(s.admit(json!({"key": secret})).await.status, 200);
    }
    // While the database is away, nothing was applied and nothing was lost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = servers[1]
        .admin(Method::GET, &format!("/admin/keys/{id}/stats"), None)
        .await;
    assert_eq!(
        stats.status, 503,
        "the database is supposed to be unreachable: {}",
        stats.body
    );
    proxy.set_up(true);

    let conn = db.connect().await;
    let stats = eventually(30, || async {
        let s = keyward::usage::store::stats(&conn, &id, i64::MIN, i64::MAX)
            .await
            .ok()?;
        (s.requests >= 501).then_some(s)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = keyward::usage::store::stats(&conn, &id, i64::MIN, i64::MAX)
        .await
        .unwrap_or(stats);
    assert_eq!(stats.requests, 501, "every report applied exactly once");
    assert_eq!(stats.tokens, 1000);
    assert_eq!(stats.cost_micros, 501_000);
    let k = servers[0]
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await
        .body;
    assert_eq!(k["total_requests"], 501);
    assert_eq!(k["balance_used_usd"], 0.501);
    for s in servers {
        s.stop().await;
    }
    common::delete_prefix(&common::redis_url(), &prefix).await;
}

/// Guarantee 5 when a replica dies holding queue entries: a consumer reads 20 reports off
/// the queue and dies before applying them; another replica takes them over once they
/// have been idle for `KEYWARD_ACCOUNTING_CLAIM_IDLE_S` and applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_held_by_a_dead_replica_are_claimed_and_applied() {
    use keyward::limits::redis::RedisCounters;
    use keyward::limits::{LeaseId, Report};

    let db = Arc::new(common::TestDb::new(common::Backend::Postgres).await);
    let prefix = common::unique_prefix();
    let mut raw = common::base_config(&db);
    raw.insert(config::REDIS_URL, common::redis_url());
    raw.insert(config::REDIS_PREFIX, prefix.clone());
    raw.insert(config::ACCOUNTING_CLAIM_IDLE_S, "1".into());
    let first = TestServer::start_on(db.clone(), raw.clone()).await;
    let (key, _) = first.create_key(json!({})).await;
    let id = key["id"].as_str().unwrap().to_string();
    first.stop().await;

    // Reports accepted while no writer runs, then taken off the queue by a doomed consumer.
    let counters = RedisCounters::connect(&common::redis_url(), &prefix, 600_000)
        .await
        .unwrap();
    for _ in 0..20 {
        let lease = LeaseId::new(&id);
        let report = Report {
            id: lease.to_string(),
            lease: Some(lease),
            cooldown_ms: 0,
            suspend_ms: 0,
            source: "data-token".into(),
            learned: None,
            lease_expires_at_ms: 0,
            tokens: Some((2, 3)),
            cost_micros: 7,
            model: None,
            provider_key_id: None,
            provider: None,
            latency_ms: None,
            upstream_status: None,
            token_classes: Default::default(),
            usage_source: Default::default(),
            spend_now: Vec::new(),
        };
        counters.report(&report).await.unwrap();
    }
    let mut conn = counters.conn().await.unwrap();
    let taken: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(keyward::accounting::stream::GROUP)
        .arg("doomed-replica")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(counters.stream_key_for(&id))
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(taken.keys[0].ids.len(), 20);

    let second = TestServer::start_on(db.clone(), raw).await;
    let conn_db = db.connect().await;
    let stats = eventually(20, || async {
        let s = keyward::usage::store::stats(&conn_db, &id, i64::MIN, i64::MAX)
            .await
            .ok()?;
        (s.requests == 20).then_some(s)
    })
    .await;
    assert_eq!((stats.tokens, stats.cost_micros), (100, 140));
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(counters.stream_key_for(&id))
        .arg(keyward::accounting::stream::GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    let pending = match pending {
        redis::Value::Array(items) => redis::from_redis_value_ref::<i64>(&items[0]).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(pending, 0, "claimed entries were acknowledged");
    second.stop().await;
    common::delete_prefix(&common::redis_url(), &prefix).await;
}

/// Guarantee 6: an admission is one Redis round trip. MONITOR on a private redis-server
/// shows every command a client sends; commands run inside a script are tagged `lua`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_is_one_redis_round_trip() {
    let redis = common::PrivateRedis::start().await;
    let db = Arc::new(common::TestDb::new(common::Backend::Sqlite).await);
    let mut raw = common::base_config(&db);
    raw.insert(config::REDIS_URL, redis.url.clone());
    let s = TestServer::start_on(db.clone(), raw).await;
    let (_, secret) = s
        .create_key(json!({"rate_limit": 1000, "tpm_limit": 100000, "concurrent_limit": null}))
        .await;
    s.admit(json!({"key": secret})).await; // the key record is now cached

    // Into a file, unbuffered: a pipe nobody reads would fill up and stall it.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("monitor.txt");
    let mut monitor = std::process::Command::new("stdbuf")
        .args(["-o0", "redis-cli", "-p", &redis.port.to_string(), "monitor"])
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..50 {
        assert_eq!(
            s.admit(json!({"key": secret, "estimated_tokens": 10}))
                .await
                .status,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = monitor.kill();
    let _ = monitor.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    // `<time> [<db> <client address>] "<COMMAND>" …`, a script's own commands tagged `lua`.
    let sent: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| l.contains('"') && !l.contains(" lua]"))
        .filter_map(|l| {
            let client = l.split('[').nth(1)?.split(']').next()?;
            Some((client, l.split('"').nth(1)?))
        })
        .collect();
    // The accounting writer's polling and registry rounds run beside the data plane, on
    // connections that carry no admission: its commands there are not the admissions'.
    let lanes: std::collections::HashSet<&str> = sent
        .iter()
        .filter(|(_, c)| c.eq_ignore_ascii_case("evalsha"))
        .map(|(client, _)| *client)
        .collect();
    let writers = [
        "XREADGROUP",
        "XAUTOCLAIM",
        "XINFO",
        "XLEN",
        "XPENDING",
        "XGROUP",
        "XACK",
        "SADD",
        "SMEMBERS",
        "SREM",
        "HSET",
        "HGET",
        "HGETALL",
    ];
    let client_commands: Vec<&str> = sent
        .iter()
        .filter(|(client, c)| {
            lanes.contains(client) || !writers.iter().any(|w| w.eq_ignore_ascii_case(c))
        })
        .map(|(_, c)| *c)
        .collect();
    let evalsha = client_commands
        .iter()
        .filter(|c| c.eq_ignore_ascii_case("evalsha"))
        .count();
    assert_eq!(evalsha, 50, "{client_commands:?}");
    assert_eq!(
        client_commands.len(),
        50,
        "other round trips: {client_commands:?}"
    );
    s.stop().await;
}

/// Key records come from the in-process cache, unknown keys are remembered for
/// `KEYWARD_NEGATIVE_CACHE_TTL_S`, and both are reloaded after their TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_records_are_cached_and_unknown_keys_remembered() {
    use keyward::client_keys::input::NewKey;
    use keyward::client_keys::store::{self, Secrets};

    let s = TestServer::start_with(common::Backend::Sqlite, |raw| {
        raw.insert(config::NEGATIVE_CACHE_TTL_S, "1".into());
        raw.insert(config::KEY_CACHE_TTL_S, "1".into());
    })
    .await;
    let secret = "sk-kw-written-straight-into-the-database-0123456";
    assert_eq!(
        error_code(&s.admit(json!({"key": secret})).await),
        "INVALID_KEY"
    );
    // Written behind keyward's back (no invalidation): the negative entry still answers.
    let db = s.db.connect().await;
    let new_key = NewKey {
        user_id: None,
        name: None,
        allowed_providers: None,
        allowed_api_formats: None,
        allowed_models: None,
        rate_limit: Some(5),
        tpm_limit: None,
        concurrent_limit: None,
        expires_at: None,
        is_standalone: false,
        balance_micros: None,
        auto_delete_on_expiry: None,
        daily_request_limit: None,
        daily_token_limit: None,
        spend_limits: Default::default(),
        model_limits: Default::default(),
    };
    let id = uuid::Uuid::new_v4().to_string();
    let hash = keyward::crypto::lookup_hash(secret);
    let secrets = Secrets {
        id: &id,
        key_hash: &hash,
        key_encrypted: "enc:v1:unused",
        prefix: "sk-kw-writ",
        name: "direct",
    };
    store::insert(&db, &new_key, &secrets, keyward::clock::now_ms())
        .await
        .unwrap();
    assert_eq!(
        error_code(&s.admit(json!({"key": secret})).await),
        "INVALID_KEY"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let a = s.admit(json!({"key": secret})).await;
    assert_eq!(
        a.status, 200,
        "the negative entry outlived its TTL: {}",
        a.body
    );
    assert_eq!(
        header(&a, "x-ratelimit-limit-requests").as_deref(),
        Some("5")
    );
    // A change behind keyward's back shows once the positive entry's TTL has passed.
    let patch = keyward::client_keys::input::KeyPatch {
        rate_limit: Some(Some(9)),
        ..Default::default()
    };
    store::update(&db, &id, &patch, keyward::clock::now_ms())
        .await
        .unwrap();
    let limit = eventually(5, || async {
        let a = s.admit(json!({"key": secret})).await;
        header(&a, "x-ratelimit-limit-requests").filter(|l| l == "9")
    })
    .await;
    assert_eq!(limit, "9");
    s.stop().await;
}

/// A key without a concurrency limit, balance or token or spend quota admits "light" (no
/// lease record in the store; the signed lease id carries its report's data): over HTTP,
/// on any instance, its renewals keep it live past its signed expiry, its report settles
/// its tokens in the window once (a repeat is a duplicate), and a reported lease is no
/// longer renewed.
async fn a_light_lease_renews_settles_and_reports_once(shape: Shape) {
    let c = Cluster::start(shape, |raw| {
        raw.insert(config::LEASE_TTL_S, "1".into());
    })
    .await;
    let (id, secret) = key(
        &c,
        json!({"rate_limit": 10, "tpm_limit": 1000, "concurrent_limit": null}),
    )
    .await;
    let body = json!({"key": secret, "estimated_tokens": 100, "provider": "openai",
                      "model": "gpt-4o", "api_format": "openai.chat"});
    let a = c.any(0).admit(body.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let lease = a.body["lease_id"].as_str().unwrap().to_string();
    // Light: the id carries the second, the tokens and the names (after shard and pick).
    assert_eq!(lease.split('.').count(), 10, "{lease}");
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = c
            .any(i)
            .data_post(&format!("/v1/leases/{lease}/renew"), json!({}))
            .await;
        assert_eq!(r.status, 200, "renewal {i}: {}", r.body);
    }
    let report = json!({"lease_id": lease, "prompt_tokens": 10, "completion_tokens": 5});
    let answers: Vec<_> = (0..3)
        .map(|i| c.any(i).data_post("/v1/report", report.clone()))
        .collect();
    let answers = futures_util::future::join_all(answers).await;
    let recorded = answers
        .iter()
        .filter(|r| r.body == json!({"recorded": true}))
        .count();
    let bodies: Vec<&Value> = answers.iter().map(|r| &r.body).collect();
    assert_eq!(recorded, 1, "{bodies:?}");
    let r = c
        .any(1)
        .data_post(&format!("/v1/leases/{lease}/renew"), json!({}))
        .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "LEASE_NOT_FOUND")
    );
    // Its 100 reserved tokens became the 15 reported.
    let next = c.any(2).admit(body.clone()).await;
    assert_eq!(next.status, 200);
    assert_eq!(
        header(&next, "x-ratelimit-remaining-tokens").as_deref(),
        Some("885")
    );
    let stats = usage_applied(&c, &id, 1).await;
    assert_eq!(stats["total_tokens"], 15);
    c.stop().await;
}
