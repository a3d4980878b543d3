//! Model prices: the admin API, `KEYWARD_PRICES_FILE`, invalidation across replicas, and
//! the pricing of `/v1/report` tokens.
#![allow(clippy::unwrap_used)]

mod common;

use common::{error_code, eventually, Backend, Cluster, Shape, TestServer, TOKEN};
use keyward::config;
use reqwest::Method;
use serde_json::{json, Value};

fn price(input: f64, output: f64) -> Value {
    json!({"input_per_mtok_usd": input, "output_per_mtok_usd": output})
}

async fn put(s: &TestServer, path: &str, body: Value) -> common::Answer {
    s.admin(Method::PUT, &format!("/admin/prices/{path}"), Some(body))
        .await
}

async fn admin_api(backend: Backend) {
    let s = TestServer::start(backend).await;
    // Set, with the optional classes defaulting to the input price.
    let a = put(&s, "openai/gpt-4o", price(2.5, 10.0)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["provider"], "openai");
    assert_eq!(a.body["model"], "gpt-4o");
    assert_eq!(a.body["input_per_mtok_usd"], 2.5);
    assert_eq!(a.body["output_per_mtok_usd"], 10);
    assert_eq!(a.body["cached_input_per_mtok_usd"], 2.5);
    assert_eq!(a.body["cache_write_per_mtok_usd"], 2.5);
    // A model with slashes is the rest of the path.
    let a = put(
        &s,
        "fireworks/accounts/fireworks/models/llama-v3",
        json!({"input_per_mtok_usd": 0.2, "output_per_mtok_usd": 0.000001,
               "cached_input_per_mtok_usd": 0.1, "cache_write_per_mtok_usd": 0}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["model"], "accounts/fireworks/models/llama-v3");
    assert_eq!(a.body["output_per_mtok_usd"], 0.000001);
    assert_eq!(a.body["cached_input_per_mtok_usd"], 0.1);
    assert_eq!(a.body["cache_write_per_mtok_usd"], 0);
    // Replacing a price replaces all of it.
    let first = put(
        &s,
        "anthropic/claude-sonnet-4",
        json!({"input_per_mtok_usd": 3, "output_per_mtok_usd": 15, "cached_input_per_mtok_usd": 0.3}),
    )
    .await;
    assert_eq!(first.body["cached_input_per_mtok_usd"], 0.3);
    let a = put(&s, "anthropic/claude-sonnet-4", price(4.0, 20.0)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["cached_input_per_mtok_usd"], 4);
    assert_eq!(a.body["created_at"], first.body["created_at"]);

    // All, sorted by provider then model.
    let all = s.admin(Method::GET, "/admin/prices", None).await;
    assert_eq!(all.status, 200);
    let names: Vec<String> = all.body["prices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["provider"].as_str().unwrap(),
                p["model"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "anthropic/claude-sonnet-4",
            "fireworks/accounts/fireworks/models/llama-v3",
            "openai/gpt-4o"
        ]
    );

    // Bad input: 400 with the contract's body, nothing stored.
    for (path, body) in [
        (
            "openai/x",
            json!({"input_per_mtok_usd": 1, "output_per_mtok_usd": 1, "extra": 1}),
        ),
        (
            "openai/x",
            json!({"input_per_mtok_usd": 0.1234567, "output_per_mtok_usd": 1}),
        ),
        (
            "openai/x",
            json!({"input_per_mtok_usd": 1000000.000001, "output_per_mtok_usd": 1}),
        ),
        (
            "openai/x",
            json!({"input_per_mtok_usd": 1, "output_per_mtok_usd": 2000000}),
        ),
        (
            "openai/x",
            json!({"input_per_mtok_usd": -1, "output_per_mtok_usd": 1}),
        ),
        (
            "openai/x",
            json!({"input_per_mtok_usd": "1", "output_per_mtok_usd": 1}),
        ),
        ("openai/x", json!({"input_per_mtok_usd": 1})),
        (
            "openai/x",
            json!({"input_per_mtok_usd": 1, "output_per_mtok_usd": 1, "cache_write_per_mtok_usd": 1e300}),
        ),
        ("open%20ai/x", price(1.0, 1.0)),
        ("open:ai/x", price(1.0, 1.0)),
        ("openai/gpt%00x", price(1.0, 1.0)),
        ("openai/%20", price(1.0, 1.0)),
        (&format!("openai/{}", "m".repeat(201)), price(1.0, 1.0)),
    ] {
        let a = put(&s, path, body.clone()).await;
        assert_eq!(a.status, 400, "{path} {body}: {}", a.body);
        assert_eq!(error_code(&a), "BAD_REQUEST");
    }
    let a = s
        .admin_raw(
            Method::PUT,
            "/admin/prices/openai/x",
            Some("[1]"),
            Some(TOKEN),
        )
        .await;
    assert_eq!((a.status, error_code(&a).as_str()), (400, "BAD_REQUEST"));
    let all = s.admin(Method::GET, "/admin/prices", None).await;
    assert_eq!(all.body["prices"].as_array().unwrap().len(), 3);

    // Delete: the price goes; a second time, or an unknown model, is 404.
    let a = s
        .admin(
            Method::DELETE,
            "/admin/prices/fireworks/accounts/fireworks/models/llama-v3",
            None,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body,
        json!({"provider": "fireworks", "model": "accounts/fireworks/models/llama-v3", "deleted": true})
    );
    for path in [
        "/admin/prices/fireworks/accounts/fireworks/models/llama-v3",
        "/admin/prices/openai/gpt-4",
        "/admin/prices/nobody/gpt-4o",
    ] {
        let a = s.admin(Method::DELETE, path, None).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (404, "NOT_FOUND"),
            "{path}"
        );
    }
    let a = s
        .admin(Method::DELETE, "/admin/prices/bad%20provider/x", None)
        .await;
    assert_eq!((a.status, error_code(&a).as_str()), (400, "BAD_REQUEST"));

    // Behind the admin token like every admin route.
    let a = s
        .admin_raw(Method::GET, "/admin/prices", None::<String>, None)
        .await;
    assert_eq!((a.status, error_code(&a).as_str()), (401, "UNAUTHORIZED"));
    let a = s
        .admin_raw(
            Method::PUT,
            "/admin/prices/openai/y",
            Some(price(1.0, 1.0).to_string()),
            Some("wrong-token-0123456789"),
        )
        .await;
    assert_eq!(a.status, 401);
    s.stop().await;
}

/// Creates a key without a balance (admitted without a price), picks an `openai`
/// provider key for it and reports `report` (plus the lease) for each of `reports`;
/// returns the key id.
async fn report_each(s: &TestServer, reports: &[Value]) -> String {
    let (key, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    for report in reports {
        let a = s
            .admit(json!({"key": secret, "provider": "openai", "select": true}))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let mut body = report.clone();
        body["lease_id"] = a.body["lease_id"].clone();
        let r = s.data_post("/v1/report", body.clone()).await;
        assert_eq!(r.status, 200, "{body}: {}", r.body);
        assert_eq!(r.body["recorded"], true);
    }
    key["id"].as_str().unwrap().to_string()
}

async fn total_cost(s: &TestServer, key_id: &str, requests: i64) -> Value {
    eventually(10, || async {
        let a = s
            .admin(Method::GET, &format!("/admin/keys/{key_id}/stats"), None)
            .await;
        (a.body["total_requests"] == requests).then(|| a.body["total_cost_usd"].clone())
    })
    .await
}

async fn reports_without_a_cost_are_priced(backend: Backend) {
    let s = TestServer::start(backend).await;
    let a = s
        .admin(
            Method::POST,
            "/admin/providers/openai/keys",
            Some(json!({"label": "a", "value": "sk-upstream-a"})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(put(&s, "openai/gpt-4o", price(2.5, 10.0)).await.status, 200);
    assert_eq!(put(&s, "openai/tiny", price(0.15, 0.6)).await.status, 200);
    assert_eq!(
        put(&s, "openai/absurd", price(1_000_000.0, 0.0))
            .await
            .status,
        200
    );

    // 1000 × 2.5 + 333 × 10 USD per million tokens = 0.00583 USD, by the dated id's
    // longest priced prefix.
    let key = report_each(
        &s,
        &[json!({"model": "gpt-4o-2024-08-06", "prompt_tokens": 1000, "completion_tokens": 333})],
    )
    .await;
    assert_eq!(total_cost(&s, &key, 1).await, 0.00583);

    // One token at 0.15 USD per million costs 1 micro-USD (rounded up, not down to 0).
    let key = report_each(&s, &[json!({"model": "tiny", "prompt_tokens": 1})]).await;
    assert_eq!(total_cost(&s, &key, 1).await, 0.000001);

    // An explicit cost wins; an unpriced model (and `gpt-4o`'s price is no price for
    // `gpt-4oo`), or a report without tokens, costs 0.
    let key = report_each(
        &s,
        &[
            json!({"model": "gpt-4o", "prompt_tokens": 1000000, "cost_usd": 0.25}),
            json!({"model": "gpt-4oo", "prompt_tokens": 1000000}),
            json!({"model": "gpt-4o"}),
            json!({"prompt_tokens": 1000000}),
        ],
    )
    .await;
    assert_eq!(total_cost(&s, &key, 4).await, 0.25);

    // A priced cost above what one request may cost is refused, not wrapped or clamped.
    let (_, secret) = s.create_key(json!({})).await;
    let a = s
        .admit(json!({"key": secret, "provider": "openai", "select": true}))
        .await;
    let r = s
        .data_post(
            "/v1/report",
            json!({"lease_id": a.body["lease_id"], "model": "absurd", "prompt_tokens": 1000001}),
        )
        .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (400, "BAD_REQUEST"),
        "{}",
        r.body
    );
    s.stop().await;
}

/// A price change on one replica reaches another one's cache at once, long before the
/// cache's TTL (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_change_reaches_every_replica() {
    let c = Cluster::start_n(Shape::Distributed, 2, |raw| {
        raw.insert(config::KEY_CACHE_TTL_S, "60".into());
    })
    .await;
    let (a, b) = (&c.servers[0], &c.servers[1]);
    let input_on_b = || async {
        b.state
            .prices
            .price_of("openai", "gpt-4o-2024-08-06")
            .await
            .unwrap()
            .map(|p| p.input)
    };
    assert_eq!(put(a, "openai/gpt-4o", price(2.5, 10.0)).await.status, 200);
    assert_eq!(input_on_b().await, Some(2_500_000));
    // b now holds openai's prices; a changes one, adds a longer prefix, deletes.
    assert_eq!(put(a, "openai/gpt-4o", price(5.0, 10.0)).await.status, 200);
    eventually(3, || async {
        (input_on_b().await == Some(5_000_000)).then_some(())
    })
    .await;
    assert_eq!(
        put(a, "openai/gpt-4o-2024-08", price(1.0, 1.0))
            .await
            .status,
        200
    );
    eventually(3, || async {
        (input_on_b().await == Some(1_000_000)).then_some(())
    })
    .await;
    for model in ["gpt-4o-2024-08", "gpt-4o"] {
        let d = a
            .admin(
                Method::DELETE,
                &format!("/admin/prices/openai/{model}"),
                None,
            )
            .await;
        assert_eq!(d.status, 200);
    }
    eventually(3, || async { input_on_b().await.is_none().then_some(()) }).await;
    c.stop().await;
}

/// `KEYWARD_PRICES_FILE` is stored at start-up: its entries replace the stored prices
/// of the models it names, and the others stay.
async fn the_prices_file_is_loaded_at_start(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.json");
    std::fs::write(
        &file,
        r#"{"openai/gpt-4o": {"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10, "cached_input_per_mtok_usd": 1.25},
            "fireworks/accounts/f/models/llama": {"input_per_mtok_usd": 0.2, "output_per_mtok_usd": 0.2}}"#,
    )
    .unwrap();
    let path = file.to_str().unwrap().to_string();
    let s = TestServer::start_with(backend, |raw| {
        raw.insert(config::PRICES_FILE, path.clone());
    })
    .await;
    let all = s.admin(Method::GET, "/admin/prices", None).await;
    let prices = all.body["prices"].as_array().unwrap();
    assert_eq!(prices.len(), 2, "{}", all.body);
    assert_eq!(prices[0]["model"], "accounts/f/models/llama");
    assert_eq!(prices[1]["cached_input_per_mtok_usd"], 1.25);
    assert_eq!(
        s.state
            .prices
            .price_of("openai", "gpt-4o-mini")
            .await
            .unwrap()
            .map(|p| p.output),
        Some(10_000_000)
    );
    // Changed through the API, then the server restarts on the same database.
    assert_eq!(put(&s, "openai/gpt-4o", price(9.0, 9.0)).await.status, 200);
    assert_eq!(put(&s, "openai/o1", price(15.0, 60.0)).await.status, 200);
    let db = s.db.clone();
    let mut raw = common::base_config(&db);
    s.stop().await;
    raw.insert(config::PRICES_FILE, path);
    let s = TestServer::start_on(db, raw).await;
    let all = s.admin(Method::GET, "/admin/prices", None).await;
    let by_model = |m: &str| {
        all.body["prices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["model"] == m)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        by_model("gpt-4o")["input_per_mtok_usd"],
        2.5,
        "the file wins at start"
    );
    assert_eq!(by_model("o1")["input_per_mtok_usd"], 15, "others stay");
    s.stop().await;
}

/// Admission prices the request: a key with a balance needs a price (`PRICE_UNKNOWN`
/// without one, `KEYWARD_DEFAULT_PRICE` else); the lease carries the price, so a price
/// change mid-request does not change what it is charged; a successful answer without
/// usage is charged its hold (shown as estimated), a failed one nothing.
async fn admission_prices_and_holds(backend: Backend) {
    let s = TestServer::start(backend).await;
    assert_eq!(put(&s, "openai/gpt-4o", price(2.5, 10.0)).await.status, 200);
    let (key, secret) = s
        .create_key(
            json!({"is_standalone": true, "initial_balance_usd": 1, "concurrent_limit": null}),
        )
        .await;
    let key_id = key["id"].as_str().unwrap().to_string();
    let admit = |model: Option<&str>| {
        let mut body = json!({"key": secret, "provider": "openai", "estimated_tokens": 1000});
        if let Some(model) = model {
            body["model"] = json!(model);
        }
        body
    };
    for model in [Some("gpt-5"), None] {
        let a = s.admit(admit(model)).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (403, "PRICE_UNKNOWN"),
            "{}",
            a.body
        );
    }
    // A key without a balance needs no price.
    let (_, free) = s.create_key(json!({})).await;
    let a = s
        .admit(json!({"key": free, "provider": "openai", "model": "gpt-5"}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);

    // Admitted at 2.5/10: the hold is 1000 tokens at 10 USD per million, 0.01 USD.
    let a = s.admit(admit(Some("gpt-4o-2024-08-06"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let priced_lease = a.body["lease_id"].clone();
    let a = s.admit(admit(Some("gpt-4o"))).await;
    let held_lease = a.body["lease_id"].clone();
    let a = s.admit(admit(Some("gpt-4o"))).await;
    let failed_lease = a.body["lease_id"].clone();
    let a = s.admit(admit(Some("gpt-4o"))).await;
    let timed_out_lease = a.body["lease_id"].clone();
    // The price doubles before the reports: they are charged the admission's price.
    assert_eq!(put(&s, "openai/gpt-4o", price(5.0, 20.0)).await.status, 200);
    for (lease, report) in [
        (
            &priced_lease,
            json!({"prompt_tokens": 1000, "completion_tokens": 100, "upstream_status": 200}),
        ),
        (&held_lease, json!({"upstream_status": 200})),
        (&failed_lease, json!({"upstream_status": 500})),
        (&timed_out_lease, json!({"upstream_status": 504})),
    ] {
        let mut body = report;
        body["lease_id"] = lease.clone();
        let r = s.data_post("/v1/report", body).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // 1000 × 2.5 + 100 × 10 = 3,500 micro-USD, plus the hold of 10,000, plus nothing
    // for the failure, plus the hold for the proxy's timeout (the upstream may have
    // gone on).
    assert_eq!(total_cost(&s, &key_id, 4).await, 0.0235);
    let stats = s
        .admin(Method::GET, &format!("/admin/keys/{key_id}/stats"), None)
        .await
        .body;
    assert_eq!(stats["estimated_requests"], 2, "{stats}");
    let k = s
        .admin(Method::GET, &format!("/admin/keys/{key_id}"), None)
        .await
        .body;
    assert_eq!(k["remaining_balance_usd"], 0.9765, "{k}");
    s.stop().await;

    // With a default price, an unpriced model is admitted and held at it.
    let s = TestServer::start_with(backend, |raw| {
        raw.insert(
            config::DEFAULT_PRICE,
            r#"{"input_per_mtok_usd": 1, "output_per_mtok_usd": 3}"#.into(),
        );
    })
    .await;
    let (key, secret) = s
        .create_key(json!({"is_standalone": true, "initial_balance_usd": 0.003}))
        .await;
    let key_id = key["id"].as_str().unwrap().to_string();
    let a = s
        .admit(json!({"key": secret, "model": "anything", "estimated_tokens": 1000}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // 0.003 USD held: a second request has to wait for the first.
    let b = s
        .admit(json!({"key": secret, "model": "anything", "estimated_tokens": 1}))
        .await;
    assert_eq!(
        (b.status, b.body["error"]["limit"].clone()),
        (429, json!("balance")),
        "{}",
        b.body
    );
    let r = s
        .data_post(
            "/v1/report",
            json!({"lease_id": a.body["lease_id"], "upstream_status": 200}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(total_cost(&s, &key_id, 1).await, 0.003);
    s.stop().await;
}

on_both_backends!(
    admin_api,
    reports_without_a_cost_are_priced,
    the_prices_file_is_loaded_at_start,
    admission_prices_and_holds
);

/// Runs the real binary's `serve` with `var` set to `value` (and nothing else of the
/// environment's `KEYWARD_*`), expecting it to refuse to start: its one line of stderr,
/// after checking that it exits 2 and writes nothing.
fn start_up_error(var: &str, value: &std::ffi::OsStr) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"));
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYWARD_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .arg("serve")
        .env(var, value)
        .env(
            config::DATABASE_URL,
            format!("sqlite://{}", dir.path().join("k.db").display()),
        )
        .env(config::LISTEN, "127.0.0.1:0")
        .env(config::ADMIN_LISTEN, "127.0.0.1:0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{var}={value:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{var}={value:?}: {err}");
    assert!(err.starts_with(&format!("keyward: {var}: ")), "{err}");
    assert!(!dir.path().join("k.db").exists(), "nothing started");
    err
}

/// A bad `KEYWARD_DEFAULT_PRICE` stops start-up with one line naming it.
#[test]
fn a_bad_default_price_stops_start_up_naming_the_variable() {
    for (value, says) in [
        ("2.5", "must be a JSON price"),
        (
            r#"{"input_per_mtok_usd": -1, "output_per_mtok_usd": 1}"#,
            "input_per_mtok_usd",
        ),
        (r#"{"input_per_mtok_usd": 1}"#, "output_per_mtok_usd"),
    ] {
        let err = start_up_error(config::DEFAULT_PRICE, value.as_ref());
        assert!(err.contains(says), "{value}: {err}");
    }
}

/// The real binary refuses a bad prices file before it serves, with one line naming
/// the variable and what is wrong.
#[test]
fn a_bad_prices_file_stops_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("missing.json", None, "cannot read"),
        (
            "not-json.json",
            Some("{\"openai/gpt-4o\": "),
            "not a JSON object",
        ),
        (
            "too-precise.json",
            Some(
                r#"{"openai/gpt-4o": {"input_per_mtok_usd": 0.0000001, "output_per_mtok_usd": 1}}"#,
            ),
            "more than 6 decimal places",
        ),
        (
            "no-provider.json",
            Some(r#"{"gpt-4o": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1}}"#),
            "provider/model",
        ),
        (
            "unknown-field.json",
            Some(
                r#"{"openai/gpt-4o": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1, "input_usd": 1}}"#,
            ),
            "unknown field",
        ),
    ];
    for (name, content, says) in cases {
        let path = dir.path().join(name);
        if let Some(content) = content {
            std::fs::write(&path, content).unwrap();
        }
        let err = start_up_error(config::PRICES_FILE, path.as_os_str());
        assert!(err.contains(says), "{name}: {err}");
    }
}

/// Reports settle while the database is away: a price held in memory still prices them,
/// and one that cannot be loaded leaves the cost at 0 instead of refusing the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_priced_from_memory_while_the_database_is_away() {
    let base = common::TestDb::new(Backend::Postgres).await;
    let (target, _) = common::reroute(&base.url, "unused");
    let proxy = common::PgProxy::start(target).await;
    let (_, proxied_url) = common::reroute(&base.url, &format!("127.0.0.1:{}", proxy.port));
    let db = std::sync::Arc::new(base);
    let mut raw = common::base_config(&db);
    raw.insert(config::DATABASE_URL, proxied_url);
    raw.insert(config::REDIS_URL, common::redis_url());
    let prefix = common::unique_prefix();
    raw.insert(config::REDIS_PREFIX, prefix.clone());
    let s = TestServer::start_on(db.clone(), raw).await;
    for provider in ["openai", "anthropic"] {
        let a = s
            .admin(
                Method::POST,
                &format!("/admin/providers/{provider}/keys"),
                Some(json!({"label": "a", "value": "sk-upstream-a"})),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    assert_eq!(put(&s, "openai/gpt-4o", price(2.5, 10.0)).await.status, 200);
    assert_eq!(
        put(&s, "anthropic/claude", price(3.0, 15.0)).await.status,
        200
    );
    let (key, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    let id = key["id"].as_str().unwrap().to_string();
    let mut leases = Vec::new();
    for provider in ["openai", "openai", "anthropic"] {
        let a = s
            .admit(json!({"key": secret, "provider": provider, "select": true}))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        leases.push(a.body["lease_id"].clone());
    }
    let report = |lease: &Value, model: &str| json!({"lease_id": lease, "model": model, "prompt_tokens": 1000, "completion_tokens": 100});
    // 1000 × 2.5 + 100 × 10 per million = 3500 micro-USD; loads openai's prices.
    let r = s
        .data_post("/v1/report", report(&leases[0], "gpt-4o"))
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);

    proxy.set_up(false);
    // openai's prices are in memory; anthropic's were never loaded.
    let r = s
        .data_post("/v1/report", report(&leases[1], "gpt-4o"))
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);
    let r = s
        .data_post("/v1/report", report(&leases[2], "claude"))
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);
    proxy.set_up(true);

    let conn = db.connect().await;
    let stats = eventually(30, || async {
        let stats = keyward::usage::store::stats(&conn, &id, i64::MIN, i64::MAX)
            .await
            .ok()?;
        (stats.requests == 3).then_some(stats)
    })
    .await;
    assert_eq!(stats.cost_micros, 2 * 3_500);
    s.stop().await;
    common::delete_prefix(&common::redis_url(), &prefix).await;
}
