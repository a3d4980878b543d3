//! A stalled accounting writer shows in `/metrics`: while the database refuses every
//! batch with an error worth retrying, the queue depth counts the consumer group's
//! pending entries and the lag grows; both fall back once the database accepts again.
//! (Its own test binary: the gauges are process-wide, so no other server may set them.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{eventually, Cluster, Shape};
use reqwest::Method;
use serde_json::json;
use sqlx::{AnyPool, Executor};

fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_shows_in_queue_depth_and_lag() {
    let c = Cluster::start_n(Shape::Distributed, 1, |_| {}).await;
    let s = &c.servers[0];
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&c.db.url).await.unwrap();
    // 57P03 (cannot_connect_now) is "try again later": the writer retries, it does not
    // set the records aside.
    pool.execute(
        "CREATE FUNCTION kw_test_stall() RETURNS trigger AS $$ BEGIN \
           RAISE EXCEPTION 'test stall' USING ERRCODE = '57P03'; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER kw_test_stall BEFORE INSERT ON usage_records \
           FOR EACH ROW EXECUTE FUNCTION kw_test_stall();",
    )
    .await
    .unwrap();
    let (key, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    for _ in 0..3 {
        let lease = s.admit(json!({"key": secret})).await.body["lease_id"].clone();
        let r = s
            .data_post("/v1/report", json!({"lease_id": lease, "cost_usd": 0.5}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    eventually(20, || async {
        let scrape = s.metrics().await;
        let depth = metric(&scrape, "keyward_accounting_queue_depth");
        let lag = metric(&scrape, "keyward_accounting_lag_seconds");
        (depth >= 3.0 && lag >= 2.0).then_some(())
    })
    .await;

    pool.execute("DROP TRIGGER kw_test_stall ON usage_records")
        .await
        .unwrap();
    let id = key["id"].as_str().unwrap().to_string();
    eventually(30, || async {
        let k = s
            .admin(Method::GET, &format!("/admin/keys/{id}"), None)
            .await;
        (k.body["total_requests"] == 3).then_some(())
    })
    .await;
    eventually(20, || async {
        let scrape = s.metrics().await;
        (metric(&scrape, "keyward_accounting_queue_depth") == 0.0
            && metric(&scrape, "keyward_accounting_lag_seconds") == 0.0)
            .then_some(())
    })
    .await;
    // Nothing was set aside: the stall was the database's, not the records'.
    let list = s
        .admin(Method::GET, "/admin/accounting/dead-letters", None)
        .await;
    assert_eq!(list.body["total"], 0, "{}", list.body);
    pool.close().await;
    c.stop().await;
}
