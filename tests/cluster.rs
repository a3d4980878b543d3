//! keyward on a real three-master Redis Cluster (`redis+cluster://` URL): three
//! instances admit exactly, account through the stream once, and see each other's
//! invalidations. The counter-store suite also runs on a cluster (`tests/counters.rs`,
//! `on_redis_cluster`).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{eventually, PrivateCluster, TestDb, TestServer};
use keyward::config;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_a_cluster_admit_exactly_account_once_and_invalidate() {
    let cluster = PrivateCluster::start().await;
    let db = Arc::new(TestDb::new(common::Backend::Postgres).await);
    let prefix = common::unique_prefix();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let mut raw = common::base_config(&db);
        raw.insert(config::REDIS_URL, cluster.url.clone());
        raw.insert(config::REDIS_PREFIX, prefix.clone());
        servers.push(TestServer::start_on(db.clone(), raw).await);
    }
    let (key, secret) = servers[0]
        .create_key(json!({"rate_limit": 50, "concurrent_limit": null}))
        .await;
    let id = key["id"].as_str().unwrap();

    // Exactly the limit, whatever instance is asked.
    let answers = futures_util::future::join_all(
        (0..200).map(|i| servers[i % 3].admit(json!({"key": secret, "estimated_tokens": 0}))),
    )
    .await;
    assert_eq!(answers.iter().filter(|a| a.status == 200).count(), 50);

    // Reports go through the stream on the cluster, once.
    let lease = answers.iter().find(|a| a.status == 200).unwrap().body["lease_id"].clone();
    for s in &servers {
        s.data_post("/v1/report", json!({"lease_id": lease, "cost_usd": 0.25}))
            .await;
    }
    let stats = eventually(15, || async {
        let stats = servers[1]
            .admin(Method::GET, &format!("/admin/keys/{id}/stats"), None)
            .await
            .body;
        (stats["total_requests"] == 1).then_some(stats)
    })
    .await;
    assert_eq!(stats["total_cost_usd"], 0.25);

    // An admin change on one instance reaches the others (pub/sub through the cluster).
    servers[0]
        .admin(
            Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"rate_limit": 500})),
        )
        .await;
    eventually(3, || async {
        let a = servers[2].admit(json!({"key": secret})).await;
        (a.headers
            .get("x-ratelimit-limit-requests")
            .and_then(|v| v.to_str().ok())
            == Some("500"))
        .then_some(())
    })
    .await;
    for s in servers {
        s.stop().await;
    }
}

/// A cluster node given as a standalone `redis://` URL: start-up stops with one line that
/// names the variable and says to use `redis+cluster://` (the node answered MOVED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_given_as_a_standalone_url_is_refused_with_the_way_out() {
    let cluster = PrivateCluster::start().await;
    let db = Arc::new(TestDb::new(common::Backend::Sqlite).await);
    let mut raw = common::base_config(&db);
    raw.insert(
        config::REDIS_URL,
        format!("redis://127.0.0.1:{}", cluster.ports[0]),
    );
    raw.insert(config::REDIS_PREFIX, common::unique_prefix());
    let refused = keyward::app::build(&config::Config::from_raw(&raw).unwrap())
        .await
        .err()
        .expect("a cluster node taken for a standalone Redis")
        .to_string();
    // (Its shards' tags spread over every master: some slot is always another node's.)
    assert!(
        refused.starts_with("KEYWARD_REDIS_URL: ") && refused.contains("redis+cluster://"),
        "{refused}"
    );
}
