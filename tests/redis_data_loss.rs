//! Redis losing its data (a restart without persistence) under a running replica: a
//! shard's accounting stream made anew by a report (without the consumer group) is still
//! applied, and the shard count `{<prefix>}:layout` is recorded again, a different one
//! taking the replica out of readiness with an error naming the setting.
//! (Its own test binary: it installs a global subscriber to read the log lines.)
#![allow(clippy::unwrap_used)]

mod common;

use common::{eventually, Cluster, Shape};
use keyward::limits::Counters;
use reqwest::Method;
use serde_json::json;

fn logged(needle: &str) -> bool {
    logs().text().contains(needle)
}

/// The binary's log lines (keyward's, from INFO).
fn logs() -> &'static common::logs::Captured {
    common::captured_logs("keyward=info")
}

/// Guarantees 5/6 after a data loss: the report after a shard's stream was lost (DEL
/// stands for Redis restarting empty) reaches the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_after_redis_lost_the_stream_reaches_the_database() {
    let c = Cluster::start_n(Shape::Distributed, 1, |_| {}).await;
    let s = &c.servers[0];
    let Counters::Redis(redis) = &s.state.counters else {
        panic!("distributed shape without Redis");
    };
    let (key, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    let id = key["id"].as_str().unwrap().to_string();
    let report = || async {
        let lease = s.admit(json!({"key": secret})).await.body["lease_id"].clone();
        let r = s
            .data_post("/v1/report", json!({"lease_id": lease, "cost_usd": 0.5}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let requests = |n: i64| {
        let id = id.clone();
        async move {
            eventually(30, || async {
                let k = s
                    .admin(Method::GET, &format!("/admin/keys/{id}"), None)
                    .await;
                (k.body["total_requests"] == n).then_some(())
            })
            .await
        }
    };
    report().await;
    requests(1).await;
    // Every shard's stream goes, group and all (not the legacy one: it may be absent).
    let streams = redis.stream_keys();
    let mut conn = redis.conn().await.unwrap();
    for stream in &streams[..streams.len() - 1] {
        let _: i64 = redis::cmd("DEL")
            .arg(stream)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    report().await;
    requests(2).await;
    c.stop().await;
}

/// Guarantee 16 while running: the layout key lost with Redis's data is recorded again
/// within the period; another count there makes `/readyz` answer 503 with an error line
/// naming KEYWARD_REDIS_SHARDS; the same count again makes the replica ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_replica_reasserts_its_shard_count() {
    logs();
    let c = Cluster::start_n(Shape::Distributed, 1, |_| {}).await;
    let s = &c.servers[0];
    let Counters::Redis(redis) = &s.state.counters else {
        panic!("distributed shape without Redis");
    };
    let layout = redis.space().layout();
    let want = format!("shards={}", redis.space().shard_count());
    let mut conn = redis.conn().await.unwrap();
    let readyz = || async {
        let r = s
            .client
            .get(format!("{}/readyz", s.data))
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    assert_eq!(readyz().await.0, 200);

    let _: i64 = redis::cmd("DEL")
        .arg(&layout)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut check = conn.clone();
    eventually(15, || async {
        let held: Option<String> = redis::cmd("GET")
            .arg(&layout)
            .query_async(&mut check.clone())
            .await
            .unwrap();
        (held.as_deref() == Some(want.as_str())).then_some(())
    })
    .await;

    let other = format!("shards={}", redis.space().shard_count() + 1);
    let _: () = redis::cmd("SET")
        .arg(&layout)
        .arg(&other)
        .query_async(&mut conn)
        .await
        .unwrap();
    eventually(15, || async {
        let (status, body) = readyz().await;
        (status == 503 && body["checks"]["redis"] == "layout_mismatch").then_some(())
    })
    .await;
    assert!(
        logged("KEYWARD_REDIS_SHARDS"),
        "no error line names the setting"
    );

    let _: () = redis::cmd("SET")
        .arg(&layout)
        .arg(&want)
        .query_async(&mut check)
        .await
        .unwrap();
    eventually(15, || async { (readyz().await.0 == 200).then_some(()) }).await;
    c.stop().await;
}
