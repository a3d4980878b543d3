//! Changing the shard count strands no usage record: records queued in the streams of
//! the layout before are applied by replicas started with another count, which find
//! those streams in the registry `{<prefix>}:streams`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    base_config, delete_prefix, eventually, redis_url, unique_prefix, Backend, TestDb, TestServer,
};
use keyward::config;
use keyward::limits::Counters;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_shard_layout_before_reach_the_database() {
    let db = std::sync::Arc::new(TestDb::new(Backend::Postgres).await);
    let prefix = unique_prefix();
    let raw = |shards: &str| layout(&db, &prefix, shards);
    let four = TestServer::start_on(db.clone(), raw("4")).await;
    let Counters::Redis(redis) = &four.state.counters else {
        panic!("distributed shape without Redis");
    };
    let redis = redis.clone();
    let old = redis.stream_keys()[1].clone();
    four.stop().await;
    // Queued while no replica runs (as a report whose database write had not happened
    // yet when the replicas were stopped).
    let mut conn = redis.conn().await.unwrap();
    let id = format!("old-layout-{}", uuid::Uuid::new_v4().simple());
    common::queue_usage_record(&mut conn, &old, &id).await;
    let layout = format!("{}:layout", redis.space().legacy_tag());
    let _: i64 = redis::cmd("DEL")
        .arg(&layout)
        .query_async(&mut conn)
        .await
        .unwrap();

    let eight = TestServer::start_on(db.clone(), raw("8")).await;
    let Counters::Redis(new) = &eight.state.counters else {
        panic!("distributed shape without Redis");
    };
    assert!(
        !new.stream_keys().contains(&old),
        "{old} is in the new layout"
    );
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let stored = eventually(30, || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .ok()?;
        (n == 1).then_some(n)
    })
    .await;
    assert_eq!(stored, 1);
    // Drained (and no longer promised by a replica of their layout), the old layout's
    // streams leave the registry, so the set does not grow; the current layout's stay.
    let registry = new.stream_registry();
    let keys = new.stream_keys();
    let mut current = keys[..keys.len() - 1].to_vec();
    current.sort();
    eventually(30, || async {
        let mut conn = redis.conn().await.ok()?;
        let mut members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&registry)
            .query_async(&mut conn)
            .await
            .ok()?;
        members.sort();
        (members == current).then_some(())
    })
    .await;
    eight.stop().await;
    delete_prefix(&redis_url(), &prefix).await;
}

/// The members of the registry `key`.
async fn registered(redis: &keyward::limits::redis::RedisCounters, key: &str) -> Vec<String> {
    let mut conn = redis.conn().await.unwrap();
    redis::cmd("SMEMBERS")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Two layouts running at once (the layout key was lost, and a replica started with
/// another count): neither's writers remove the other's idle streams from the registry,
/// so a record queued in one of them, whose replicas then die, is applied by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_layouts_at_once_keep_each_others_streams_registered() {
    let db = std::sync::Arc::new(TestDb::new(Backend::Postgres).await);
    let prefix = unique_prefix();
    let raw = |shards: &str| layout(&db, &prefix, shards);
    let four = TestServer::start_on(db.clone(), raw("4")).await;
    let Counters::Redis(redis) = &four.state.counters else {
        panic!("distributed shape without Redis");
    };
    let redis = redis.clone();
    let old = redis.stream_keys()[1].clone();
    let registry = redis.stream_registry();
    let mut conn = redis.conn().await.unwrap();
    let layout = format!("{}:layout", redis.space().legacy_tag());
    let _: i64 = redis::cmd("DEL")
        .arg(&layout)
        .query_async(&mut conn)
        .await
        .unwrap();
    let eight = TestServer::start_on(db.clone(), raw("8")).await;
    // Both layouts' shard streams (not the legacy one, last), each once: a tag of one
    // layout may be a tag of the other, depending on the prefix.
    let Counters::Redis(other) = &eight.state.counters else {
        panic!("distributed shape without Redis");
    };
    let mut expected: Vec<String> = [redis.stream_keys(), other.stream_keys()]
        .iter()
        .flat_map(|keys| keys[..keys.len() - 1].to_vec())
        .collect();
    expected.sort();
    expected.dedup();
    // Several claim rounds of both layouts' writers, every stream idle.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let mut members = registered(&redis, &registry).await;
    members.sort();
    assert_eq!(
        members, expected,
        "both layouts' streams stay registered while both run"
    );

    // The four-shard replica dies with a record queued but not yet applied.
    four.stop().await;
    let id = format!("met-{}", uuid::Uuid::new_v4().simple());
    common::queue_usage_record(&mut conn, &old, &id).await;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    eventually(30, || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    eight.stop().await;
    delete_prefix(&redis_url(), &prefix).await;
}

/// A replica's settings on `prefix` with `shards` tenant shards, its writer looking at the
/// registry again at each claim round (every second).
fn layout(db: &TestDb, prefix: &str, shards: &str) -> config::RawConfig {
    let mut raw = base_config(db);
    raw.insert(config::REDIS_URL, redis_url());
    raw.insert(config::REDIS_PREFIX, prefix.to_string());
    raw.insert(config::REDIS_SHARDS, shards.into());
    raw.insert(config::ACCOUNTING_CLAIM_IDLE_S, "1".into());
    raw
}
