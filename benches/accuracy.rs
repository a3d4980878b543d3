//! `cargo bench --bench accuracy`: how exactly keyward enforces limits across replicas.
//!
//! Three keyward processes share one Redis (a prefix of their own) and one Postgres
//! database (created for the run and dropped after, on the server named by
//! `KEYWARD_TEST_POSTGRES_URL`). Each scenario gets a fresh key and sends its requests
//! at once, spread over the replicas; the table shows what was admitted against the
//! limit.
//!
//! Under `cargo test` (no `--bench` argument) it does nothing.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Executor;
use support::Keyward;

const REPLICAS: usize = 3;

struct Cluster {
    replicas: Vec<Keyward>,
    client: reqwest::Client,
}

impl Cluster {
    fn data(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.replicas[i % REPLICAS].data)
    }

    async fn key(&self, body: Value) -> String {
        support::create_key(&self.client, self.replicas[0].admin, &body).await
    }

    async fn post(&self, i: usize, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.data(i)))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// `n` admissions at once; how many were allowed.
async fn burst(c: &Arc<Cluster>, n: usize, body: Value) -> usize {
    let calls = (0..n).map(|i| {
        let (c, body) = (c.clone(), body.clone());
        async move { c.post(i, "/v1/admit", body).await.0 == 200 }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count()
}

fn row(what: &str, limit: &str, concurrency: usize, admitted: &str, over: &str) {
    println!("| {what:<22} | {limit:>10} | {REPLICAS:>8} | {concurrency:>11} | {admitted:>10} | {over:>14} |");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("accuracy bench: skipped (run it with `cargo bench --bench accuracy`)");
        return;
    }
    sqlx::any::install_default_drivers();
    let base = std::env::var("KEYWARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let name = format!("kw_accuracy_{}", std::process::id());
    let admin_db = sqlx::AnyPool::connect(&base).await.unwrap();
    admin_db
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let prefix = format!("kw-accuracy-{}", std::process::id());
    let redis = std::env::var("KEYWARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
    let env = [
        ("KEYWARD_DATABASE_URL", url),
        (
            "KEYWARD_ENCRYPTION_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string(),
        ),
        ("KEYWARD_REDIS_URL", redis.clone()),
        ("KEYWARD_REDIS_PREFIX", prefix.clone()),
    ];
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(support::start(&env).await);
    }
    let c = Arc::new(Cluster {
        replicas,
        client: reqwest::Client::new(),
    });

    println!("keyward accuracy: {REPLICAS} replicas on one Redis and one Postgres, requests sent at once\n");
    println!("| limit                  |      limit | replicas | concurrency |   admitted | over-admission |");
    println!("|------------------------|-----------:|---------:|------------:|-----------:|---------------:|");

    let secret = c
        .key(json!({"rate_limit": 50, "concurrent_limit": null}))
        .await;
    let n = burst(&c, 200, json!({"key": secret, "estimated_tokens": 0})).await;
    row(
        "requests per minute",
        "50",
        200,
        &n.to_string(),
        &n.saturating_sub(50).to_string(),
    );

    let secret = c
        .key(json!({"rate_limit": null, "tpm_limit": 5000, "concurrent_limit": null}))
        .await;
    let n = burst(&c, 200, json!({"key": secret, "estimated_tokens": 100})).await;
    let tokens = n * 100;
    row(
        "tokens per minute",
        "5000",
        200,
        &tokens.to_string(),
        &tokens.saturating_sub(5000).to_string(),
    );

    // Concurrency: 50 holders, each holds its lease 20 ms, then reports; the peak of live
    // leases seen by the holders themselves.
    let secret = c
        .key(json!({"rate_limit": null, "concurrent_limit": 5}))
        .await;
    let (live, peak) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    let holders = (0..50).map(|i| {
        let (c, secret, live, peak) = (c.clone(), secret.clone(), live.clone(), peak.clone());
        async move {
            for _ in 0..400 {
                let (status, body) = c.post(i, "/v1/admit", json!({"key": secret})).await;
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                peak.fetch_max(live.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                live.fetch_sub(1, Ordering::SeqCst);
                c.post(i + 1, "/v1/report", json!({"lease_id": body["lease_id"]}))
                    .await;
                return;
            }
        }
    });
    futures_util::future::join_all(holders).await;
    let peak = peak.load(Ordering::SeqCst);
    row(
        "concurrent requests",
        "5",
        50,
        &format!("peak {peak}"),
        &(peak - 5).max(0).to_string(),
    );

    // Balance: 0.05 USD, every request costs 0.01; workers admit and report until 402.
    let secret = c
        .key(json!({"is_standalone": true, "initial_balance_usd": 0.05, "rate_limit": null, "concurrent_limit": null}))
        .await;
    let spent = Arc::new(AtomicI64::new(0));
    let workers = (0..12).map(|i| {
        let (c, secret, spent) = (c.clone(), secret.clone(), spent.clone());
        async move {
            for _ in 0..1000 {
                let (status, body) = c.post(i, "/v1/admit", json!({"key": secret})).await;
                match status {
                    200 => {
                        let r = json!({"lease_id": body["lease_id"], "cost_usd": 0.01});
                        c.post(i + 1, "/v1/report", r).await;
                        spent.fetch_add(10_000, Ordering::SeqCst);
                    }
                    402 => return,
                    _ => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        }
    });
    futures_util::future::join_all(workers).await;
    let spent = spent.load(Ordering::SeqCst);
    row(
        "balance (USD)",
        "0.05",
        12,
        &format!("{:.2}", spent as f64 / 1e6),
        &format!("{:.2}", (spent - 50_000).max(0) as f64 / 1e6),
    );
    println!(
        "\nThe balance may be overspent by at most one request's cost (0.01 here), by design."
    );

    drop(Arc::into_inner(c));
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("redis-cli -u {redis} --scan --pattern '{{{prefix}*' | xargs -r redis-cli -u {redis} DEL > /dev/null"))
        .status();
    admin_db
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
}
