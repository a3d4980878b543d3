//! Spend ledger and webhook alerts, on SQLite and Postgres: the accounting writer keeps
//! `quota_usage` equal to the sums of `usage_records` per scope and period; each alert
//! threshold of a spend limit (key, key × model, user shared by keys) crosses once per
//! period, whatever repeats; alerts queue without a webhook URL and, once one is set,
//! are delivered signed to a receiver that fails for a while, each accepted once even
//! with two replicas sending. (Periods and bounds of the ledger: tests/spend_ledger.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use common::{base_config, eventually, Backend, TestDb, TestServer, DEFAULT_PRICE};
use hmac::{Hmac, Mac};
use keyward::alerts::store;
use keyward::config;
use keyward::quota::{Scope, ScopeKind};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::Row;

const SECRET: &str = "webhook-secret-for-tests-0123456789";

/// One request the receiver got: the alert id header, the signature header, the body,
/// and whether it answered 2xx.
#[derive(Clone, Debug)]
struct Received {
    id: String,
    signature: String,
    body: String,
    accepted: bool,
}

/// A webhook receiver on port 0 that answers 500 until `healthy` is set, then 200.
struct Receiver {
    url: String,
    healthy: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let healthy = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (h, g) = (healthy.clone(), got.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (h, g) = (h.clone(), g.clone());
                async move {
                    let accepted = h.load(Ordering::SeqCst);
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    assert_eq!(header("content-type"), "application/json");
                    g.lock().unwrap().push(Received {
                        id: header("x-keyward-alert-id"),
                        signature: header("x-keyward-signature"),
                        body,
                        accepted,
                    });
                    if accepted {
                        StatusCode::OK
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, healthy, got }
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn counter(kind: ScopeKind, id: &str, model: Option<&str>) -> String {
    Scope {
        kind,
        id: id.to_string(),
        model: model.map(str::to_string),
    }
    .counter_id()
}

/// Admits one request for `secret` with `model`, reports it at `cost` USD, and returns
/// the report's body (to repeat it).
async fn spend(s: &TestServer, secret: &str, model: &str, cost: f64) -> Value {
    let admitted = s
        .admit(json!({"key": secret, "model": model, "estimated_tokens": 10}))
        .await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    let report = json!({"lease_id": admitted.body["lease_id"], "model": model,
        "prompt_tokens": 7, "completion_tokens": 3, "cost_usd": cost});
    let answer = s.data_post("/v1/report", report.clone()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["recorded"], true, "{}", answer.body);
    report
}

async fn alerts(s: &TestServer, query: &str) -> Value {
    let a = s
        .admin(Method::GET, &format!("/admin/alerts{query}"), None)
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body
}

/// Every alert, following the cursor two at a time.
async fn all_alerts(s: &TestServer) -> Vec<Value> {
    let mut out = Vec::new();
    let mut query = "?limit=2".to_string();
    loop {
        let page = alerts(s, &query).await;
        out.extend(page["alerts"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=2&cursor={c}"),
            None => return out,
        }
    }
}

/// `(scope, model, period, threshold)` of each alert, sorted.
fn crossings(list: &[Value]) -> Vec<(String, Option<String>, String, i64)> {
    let mut out: Vec<_> = list
        .iter()
        .map(|a| {
            let p = &a["payload"];
            (
                p["scope"].as_str().unwrap().to_string(),
                p["model"].as_str().map(str::to_string),
                p["period"].as_str().unwrap().to_string(),
                p["threshold_pct"].as_i64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The ledger equals the sums of the usage records: for each scope, every period row
/// holds the records of its start day onwards (all records here are of today).
async fn check_ledger(db: &TestDb, scopes: &[(String, &str)]) {
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    for (counter, filter) in scopes {
        let sums = sqlx::query(&format!(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) AS t, \
             CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS c FROM usage_records WHERE {filter}"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        let want: (i64, i64, i64) = (
            sums.try_get("n").unwrap(),
            sums.try_get("t").unwrap(),
            sums.try_get("c").unwrap(),
        );
        assert!(want.0 > 0, "{filter}: no records");
        let rows = sqlx::query(
            "SELECT period, requests, tokens, cost_micros FROM quota_usage WHERE counter = $1",
        )
        .bind(counter)
        .fetch_all(&pool)
        .await
        .unwrap();
        let periods: Vec<String> = rows.iter().map(|r| r.try_get("period").unwrap()).collect();
        assert_eq!(rows.len(), 4, "{filter}: {periods:?}");
        for row in rows {
            let got: (i64, i64, i64) = (
                row.try_get("requests").unwrap(),
                row.try_get("tokens").unwrap(),
                row.try_get("cost_micros").unwrap(),
            );
            assert_eq!(
                got,
                want,
                "{filter}, {}",
                row.try_get::<String, _>("period").unwrap()
            );
        }
    }
    pool.close().await;
}

fn verify(r: &Received) -> Value {
    let (t, v1) = r.signature.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - t.parse::<i64>().unwrap()).abs() < 120, "{t}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{}", r.body).as_bytes());
    mac.verify_slice(&hex::decode(v1).unwrap())
        .expect("the signature verifies");
    let payload: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(payload["id"], json!(r.id));
    payload
}

async fn thresholds_cross_once_and_are_delivered_signed(backend: Backend) {
    // Phase 1: no webhook URL. Alerts queue.
    let db = Arc::new(TestDb::new(backend).await);
    let mut raw = base_config(&db);
    raw.insert(config::DEFAULT_PRICE, DEFAULT_PRICE.to_string());
    let s = TestServer::start_on(db.clone(), raw.clone()).await;
    let (a, secret_a) = s
        .create_key(json!({"user_id": "team-a", "rate_limit": null}))
        .await;
    let (b, secret_b) = s
        .create_key(json!({"user_id": "team-a", "rate_limit": null}))
        .await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE client_keys SET spend_limits = $2, model_limits = $3 WHERE id = $1")
        .bind(a)
        .bind(r#"{"month": {"usd": 10, "alert_at_pct": [50, 80, 100]}}"#)
        .bind(r#"{"gpt-4o": {"spend_limits": {"total": {"usd": 1, "alert_at_pct": [100]}}}}"#)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO users (user_id, limits, model_limits, created_at, updated_at) \
         VALUES ($1, $2, $3, 0, 0)",
    )
    .bind("team-a")
    .bind(r#"{"spend_limits": {"total": {"usd": 20, "alert_at_pct": [50, 100]}}}"#)
    .bind(r#"{"claude": {"spend_limits": {"week": {"usd": 30, "alert_at_pct": [50]}}}}"#)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    spend(&s, &secret_a, "claude-3", 4.0).await;
    spend(&s, &secret_a, "gpt-4o-2024-08-06", 1.5).await; // key 50%, key × gpt-4o 100%
    spend(&s, &secret_a, "claude-3", 3.0).await; // key 80%
    let last = spend(&s, &secret_a, "claude-3", 2.0).await; // key 100%, user 50%
    let again = s.data_post("/v1/report", last).await;
    assert_eq!(again.body["duplicate"], true, "{}", again.body);
    spend(&s, &secret_b, "claude-3", 9.5).await; // user 100% (20 of 20 USD)

    let expected = vec![
        ("key".to_string(), None, "month".to_string(), 50),
        ("key".to_string(), None, "month".to_string(), 80),
        ("key".to_string(), None, "month".to_string(), 100),
        (
            "key".to_string(),
            Some("gpt-4o".to_string()),
            "total".to_string(),
            100,
        ),
        ("user".to_string(), None, "total".to_string(), 50),
        ("user".to_string(), None, "total".to_string(), 100),
        // 18.5 USD of claude-3 from both keys: 50% of the user's 30 USD a week for claude.
        (
            "user".to_string(),
            Some("claude".to_string()),
            "week".to_string(),
            50,
        ),
    ];
    let queued = eventually(10, || async {
        let list = all_alerts(&s).await;
        (list.len() >= expected.len()).then_some(list)
    })
    .await;
    assert_eq!(crossings(&queued), expected);
    for alert in &queued {
        assert_eq!(alert["pending"], true);
        assert_eq!(alert["attempts"], 0);
        let p = &alert["payload"];
        assert_eq!(p["id"], alert["id"]);
        assert_eq!(p["type"], "spend.threshold");
        assert_eq!(p["user_id"], "team-a");
        match p["period"].as_str().unwrap() {
            "total" => assert_eq!(p["reset_at"], Value::Null),
            _ => assert!(p["reset_at"].as_str().unwrap().ends_with("T00:00:00.000Z")),
        }
    }
    let user_100 = queued
        .iter()
        .find(|a| a["payload"]["scope"] == "user" && a["payload"]["threshold_pct"] == 100)
        .unwrap();
    assert_eq!(user_100["payload"]["key_id"], json!(b));
    assert_eq!(user_100["payload"]["limit_usd"], json!(20));
    assert_eq!(user_100["payload"]["spend_usd"], json!(20));
    let pending = alerts(&s, "?pending=true").await;
    assert_eq!(pending["alerts"].as_array().unwrap().len(), expected.len());
    assert!(alerts(&s, "?pending=false").await["alerts"]
        .as_array()
        .unwrap()
        .is_empty());
    let bad = s
        .admin(Method::GET, "/admin/alerts?cursor=nonsense", None)
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let bad = s
        .admin(Method::GET, "/admin/alerts?pending=maybe", None)
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);

    check_ledger(
        &db,
        &[
            (counter(ScopeKind::Key, a, None), &format!("key_id = '{a}'")),
            (
                counter(ScopeKind::Key, a, Some("gpt-4o")),
                &format!("key_id = '{a}' AND model LIKE 'gpt-4o%'"),
            ),
            (counter(ScopeKind::Key, b, None), &format!("key_id = '{b}'")),
            (
                counter(ScopeKind::User, "team-a", None),
                "key_id IS NOT NULL",
            ),
            (
                counter(ScopeKind::User, "team-a", Some("claude")),
                "key_id IS NOT NULL AND model = 'claude-3'",
            ),
        ],
    )
    .await;
    s.stop().await;

    // Phase 2: two replicas with the URL; the receiver fails at first.
    let receiver = Receiver::start().await;
    raw.insert(config::WEBHOOK_URL, receiver.url.clone());
    raw.insert(config::WEBHOOK_SECRET, SECRET.to_string());
    let one = TestServer::start_on(db.clone(), raw.clone()).await;
    let two = TestServer::start_on(db.clone(), raw.clone()).await;
    eventually(10, || async {
        let list = alerts(&one, "?pending=true").await;
        let failed = list["alerts"].as_array().unwrap().iter().all(|a| {
            a["attempts"].as_i64() >= Some(1)
                && a["last_error"] == json!("the receiver answered HTTP 500")
        });
        failed.then_some(())
    })
    .await;
    receiver.healthy.store(true, Ordering::SeqCst);
    eventually(30, || async {
        let list = alerts(&two, "?pending=true").await;
        list["alerts"].as_array().unwrap().is_empty().then_some(())
    })
    .await;

    let got = receiver.got();
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for r in &got {
        let payload = verify(r);
        assert_eq!(payload["type"], "spend.threshold");
        if r.accepted {
            *accepted.entry(r.id.clone()).or_default() += 1;
        }
    }
    let ids: Vec<String> = queued
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(accepted.len(), ids.len(), "{accepted:?}");
    for id in &ids {
        assert_eq!(accepted.get(id), Some(&1), "{id} delivered {accepted:?}");
    }
    let delivered = alerts(&one, "?pending=false").await;
    for a in delivered["alerts"].as_array().unwrap() {
        assert!(a["delivered_at"].is_string(), "{a}");
        assert_eq!(a["next_attempt_at"], Value::Null);
        assert!(a["attempts"].as_i64().unwrap() >= 2, "{a}");
    }
    let scrape = one.metrics().await;
    assert!(scrape.contains("keyward_alerts_pending"), "{scrape}");
    assert!(
        scrape.contains("keyward_alert_deliveries_total{result=\"delivered\"}"),
        "{scrape}"
    );
    assert!(!scrape.contains(a) && !scrape.contains(SECRET));
    one.stop().await;
    two.stop().await;
}

/// Two claims at once take different alerts; a claimed alert is not claimed again until
/// its claim runs out or a failure sets its next attempt.
async fn claims_never_share_an_alert(backend: Backend) {
    let db = TestDb::new(backend).await;
    let db = db_connect(&db).await;
    let now = 1_800_000_000_000_i64;
    for i in 0..6 {
        sqlx::query("INSERT INTO alerts (id, payload, created_at, attempts, next_attempt_at) VALUES ($1, '{}', $2, 0, $2)")
            .bind(format!("{i:064}"))
            .bind(now - 10)
            .execute(&db.0)
            .await
            .unwrap();
    }
    let (a, b) = tokio::join!(
        store::claim(&db.1, now, now + 60_000, 4),
        store::claim(&db.1, now, now + 60_000, 4)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut ids: Vec<String> = a.iter().chain(&b).map(|c| c.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "{a:?} {b:?}");
    assert_eq!(a.len() + b.len(), 6);
    assert!(store::claim(&db.1, now + 1_000, now + 61_000, 10)
        .await
        .unwrap()
        .is_empty());
    store::failed(
        &db.1,
        &ids[0],
        "the receiver answered HTTP 503",
        now + 2_000,
    )
    .await
    .unwrap();
    let again = store::claim(&db.1, now + 2_000, now + 62_000, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].id.as_str(), again[0].attempts),
        (ids[0].as_str(), 1)
    );
    store::delivered(&db.1, &ids[0], now + 3_000).await.unwrap();
    assert_eq!(store::pending(&db.1).await.unwrap(), 5);
    assert!(store::claim(&db.1, now + 100_000, now + 160_000, 10)
        .await
        .unwrap()
        .iter()
        .all(|c| c.id != ids[0]));
}

/// A raw pool (for setting up rows) and keyward's `Db` on a migrated database.
async fn db_connect(db: &TestDb) -> (sqlx::AnyPool, keyward::db::Db) {
    let kw = db.connect().await;
    (sqlx::AnyPool::connect(&db.url).await.unwrap(), kw)
}

on_both_backends!(
    thresholds_cross_once_and_are_delivered_signed,
    claims_never_share_an_alert
);
