//! `KEYWARD_ON_BACKEND_ERROR` with a real Redis killed and restarted under load: each
//! policy answers as documented, fast (the circuit breaker spares every request the
//! timeout), `/readyz` follows Redis, and keyward recovers by itself.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{error_code, eventually, PrivateCluster, PrivateRedis, TestDb, TestServer};
use keyward::config;
use serde_json::json;

async fn start(policy: &str) -> (PrivateRedis, TestServer) {
    let redis = PrivateRedis::start().await;
    let db = Arc::new(TestDb::new(common::Backend::Sqlite).await);
    let mut raw = common::base_config(&db);
    raw.insert(config::REDIS_URL, redis.url.clone());
    raw.insert(config::ON_BACKEND_ERROR, policy.to_string());
    (redis, TestServer::start_on(db, raw).await)
}

/// Admits in a loop from 4 tasks until stopped; returns every (status, seconds) seen.
fn load(
    s: &TestServer,
    secret: &str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<(u16, f64)>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, secret, stop, seen) = (
                s.client.clone(),
                format!("{}/v1/admit", s.data),
                secret.to_string(),
                stop.clone(),
                seen.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let status = client
                        .post(&url)
                        .json(&json!({"key": secret}))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    seen.lock()
                        .unwrap()
                        .push((status, t.elapsed().as_secs_f64()));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    let handle = tokio::spawn(async move {
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
    });
    (stop, handle)
}

async fn ready(s: &TestServer) -> u16 {
    s.client
        .get(format!("{}/readyz", s.data))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Kills Redis under load, runs `during`, restarts it, and checks recovery.
async fn outage<F, Fut>(policy: &str, key: serde_json::Value, during: F) -> Vec<(u16, f64)>
where
    F: FnOnce(Arc<TestServer>, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (mut redis, s) = start(policy).await;
    let s = Arc::new(s);
    let (_, secret) = s.create_key(key).await;
    assert_eq!(s.admit(json!({"key": secret})).await.status, 200);
    let (stop, load) = load(&s, &secret);
    tokio::time::sleep(Duration::from_millis(200)).await;

    redis.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready(&s).await, 503, "/readyz must say Redis is gone");
    during(s.clone(), secret.clone()).await;

    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();
    // Recovery without a restart: a fresh key is admitted through Redis again.
    let (_, fresh) = s.create_key(json!({})).await;
    eventually(10, || async {
        let a = s.admit(json!({"key": fresh})).await;
        (a.status == 200 && a.headers.get("x-keyward-degraded").is_none()).then_some(())
    })
    .await;
    assert_eq!(ready(&s).await, 200);
    let slowest = seen.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    assert!(
        slowest < 2.0,
        "a request took {slowest:.2} s: the outage was not cut short"
    );
    Arc::into_inner(s).unwrap().stop().await;
    seen
}

/// Every lane's socket dies with a Redis restart. A readiness check that lands on one
/// must open a fresh connection rather than report Redis down: on the old code, the
/// first checks after Redis came back answered 503 until admissions happened to hit and
/// replace each dead socket (and `outage`'s readiness assertion failed now and then).
/// And once `/readyz` says ready, admissions go through: the circuit breaker, opened by
/// the outage, had gone on refusing for up to a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_back_as_soon_as_redis_is() {
    let (mut redis, s) = start("deny").await;
    let (_, secret) = s.create_key(json!({})).await;
    // Enough admissions to open every lane.
    for _ in 0..4 {
        assert_eq!(s.admit(json!({"key": secret})).await.status, 200);
    }
    redis.stop();
    // Refusals enough to open the circuit breaker (3 in a row).
    for _ in 0..5 {
        assert_eq!(s.admit(json!({"key": secret})).await.status, 503);
    }
    redis.restart().await;
    for _ in 0..4 {
        let r = s
            .client
            .get(format!("{}/readyz", s.data))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(status, 200, "{}", r.text().await.unwrap());
    }
    // Ready means admitting: the check that found Redis closed the breaker.
    let a = s.admit(json!({"key": secret})).await;
    assert_eq!(
        a.status, 200,
        "ready, but the breaker still refuses: {}",
        a.body
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_refuses_with_503_fast_and_recovers() {
    let seen = outage(
        "deny",
        json!({"concurrent_limit": null}),
        |s, secret| async move {
            let started = Instant::now();
            for _ in 0..20 {
                let a = s.admit(json!({"key": secret})).await;
                assert_eq!(
                    (a.status, error_code(&a).as_str()),
                    (503, "BACKEND_UNAVAILABLE")
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "20 refusals took {:?}",
                started.elapsed()
            );
            // A lease as a replica of this deployment signs it (the key is the tests' own).
            let keyring = keyward::crypto::Keyring::new(
                &keyward::crypto::parse_key(common::ENCRYPTION_KEY).unwrap(),
                &[],
            );
            let lease = keyward::lease::SignedLease {
                lease: keyward::limits::LeaseId::new(&uuid::Uuid::new_v4().to_string()),
                provider_key_id: None,
                expires_at_ms: 0,
                hold_micros: 0,
                price: None,
            }
            .encode(&keyring);
            let r = s.data_post("/v1/report", json!({"lease_id": lease})).await;
            assert_eq!(
                r.status, 503,
                "a report is refused (and retried by its caller), not lost"
            );
        },
    )
    .await;
    assert!(
        seen.iter().all(|(status, _)| [200, 503].contains(status)),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_admits_uncounted_and_records_reports_in_the_database() {
    let seen = outage(
        "allow",
        json!({"rate_limit": 2, "concurrent_limit": null}),
        |s, secret| async move {
            for _ in 0..5 {
                let a = s.admit(json!({"key": secret})).await;
                assert_eq!(a.status, 200, "{}", a.body);
                assert_eq!(a.headers["x-keyward-degraded"], "allow");
            }
            // A report during the outage goes straight to the database.
            let a = s.admit(json!({"key": secret})).await;
            let lease = a.body["lease_id"].as_str().unwrap();
            let r = s
                .data_post("/v1/report", json!({"lease_id": lease, "prompt_tokens": 3}))
                .await;
            assert_eq!(r.body, json!({"recorded": true}));
            let key_id = a.body["key_id"].as_str().unwrap().to_string();
            let db = s.db.connect().await;
            eventually(5, || async {
                let stats = keyward::usage::store::stats(&db, &key_id, i64::MIN, i64::MAX)
                    .await
                    .ok()?;
                (stats.requests == 1).then_some(())
            })
            .await;
        },
    )
    .await;
    assert!(
        seen.iter().all(|(status, _)| [200, 429].contains(status)),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_enforces_limits_in_process_and_recovers() {
    outage(
        "local",
        json!({"rate_limit": 1000, "concurrent_limit": 3}),
        |s, secret| async move {
            // Per-replica limits: the slots the load holds count too, so fill them up.
            let mut held = 0;
            let mut refused = false;
            for _ in 0..50 {
                let a = s.admit(json!({"key": secret})).await;
                match a.status {
                    200 => {
                        assert_eq!(a.headers["x-keyward-degraded"], "local");
                        held += 1;
                    }
                    429 => {
                        assert_eq!(error_code(&a), "CONCURRENCY_LIMITED");
                        refused = true;
                        break;
                    }
                    other => panic!("unexpected {other}: {}", a.body),
                }
            }
            assert!(
                refused,
                "the in-process limit never refused ({held} admitted)"
            );
        },
    )
    .await;
}

/// The Redis shape's counters on `redis` under `KEYWARD_ON_BACKEND_ERROR=local`, with
/// the outage twin that answers while Redis fails, and the twin's accounting queue (kept
/// open: the twin's reports go there).
async fn local_counters(
    redis: &PrivateRedis,
) -> (
    keyward::limits::Counters,
    Arc<keyward::limits::memory::MemoryCounters>,
    tokio::sync::mpsc::Receiver<keyward::usage::UsageRecord>,
) {
    use keyward::limits::{memory::MemoryCounters, redis::RedisCounters, BackendErrorPolicy};
    let (tx, queue) = tokio::sync::mpsc::channel(1_000);
    let twin = Arc::new(MemoryCounters::new(600_000, tx));
    let counters = keyward::limits::Counters::Redis(Arc::new(
        RedisCounters::connect(&redis.url, &common::unique_prefix(), 600_000)
            .await
            .unwrap()
            .with_failure_policy(BackendErrorPolicy::Local, twin.clone()),
    ));
    (counters, twin, queue)
}

/// A report of `lease` as a proxy sends it: `tokens` (prompt, completion) and `cost`
/// micro-USD, after an upstream 200.
fn report_of(
    lease: keyward::limits::LeaseId,
    tokens: Option<(i64, i64)>,
    cost: i64,
) -> keyward::limits::Report {
    keyward::limits::Report {
        id: lease.to_string(),
        lease: Some(lease),
        tokens,
        cost_micros: cost,
        model: None,
        provider_key_id: None,
        provider: None,
        latency_ms: None,
        upstream_status: Some(200),
        cooldown_ms: 0,
        suspend_ms: 0,
        source: "data-token".into(),
        learned: None,
        lease_expires_at_ms: 0,
        token_classes: Default::default(),
        usage_source: Default::default(),
        spend_now: Vec::new(),
    }
}

/// The outage twin's live balances belong to the outage they were made in: a later
/// outage starts from the database snapshot, not from what the twin held before Redis
/// came back (spending through Redis in between would otherwise be invisible to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_outage_starts_from_the_database_balance() {
    use keyward::limits::{AdmitRequest, BalanceSnapshot, Decision, Denial, LeaseId, Verdict};

    let mut redis = PrivateRedis::start().await;
    let (counters, twin, _queue) = local_counters(&redis).await;
    let key = uuid::Uuid::new_v4().to_string();
    // `used` is what the database has applied: the snapshot the cache would hand over.
    let admit = |used: i64| {
        let counters = counters.clone();
        let lease = LeaseId::new(&key);
        async move {
            let request = AdmitRequest {
                lease: &lease,
                rpm: None,
                tpm: None,
                concurrency: None,
                tokens: 0,
                lease_ttl_ms: 60_000,
                provider: "openai",
                model: "gpt-4o",
                api_format: "openai_chat",
                balance: Some(BalanceSnapshot {
                    credited: 1_000,
                    used,
                    version: 1,
                }),
                hold_micros: 0,
                pool: None,
                quotas: &[],
            };
            let decision: Decision = counters.admit(&request).await.unwrap();
            (lease, decision)
        }
    };
    let spend = |lease: LeaseId, cost: i64| {
        let counters = counters.clone();
        async move {
            counters
                .report(&report_of(lease, None, cost))
                .await
                .unwrap();
        }
    };

    // Outage 1: the twin admits from the snapshot and spends 900 of 1,000.
    redis.stop();
    let (lease, d) = admit(0).await;
    assert_eq!(d.degraded, Some("local"), "{d:?}");
    spend(lease, 900).await;
    // Redis is back: the database has applied the 900; 100 more is spent through Redis.
    redis.restart().await;
    let lease = eventually(10, || async {
        let (lease, d) = admit(900).await;
        (d.degraded.is_none()).then_some((lease, d))
    })
    .await;
    assert!(
        matches!(lease.1.verdict, Verdict::Admitted { .. }),
        "{:?}",
        lease.1
    );
    spend(lease.0, 100).await;
    // Outage 2: the database says 1,000 of 1,000 are spent. The twin must not admit
    // from the 100 it still held from outage 1.
    redis.stop();
    let (_, d) = admit(1_000).await;
    assert_eq!(d.degraded, Some("local"), "{d:?}");
    assert!(
        matches!(
            d.verdict,
            Verdict::Denied {
                reason: Denial::BalanceExhausted,
                ..
            }
        ),
        "admitted from an earlier outage's balance: {d:?}"
    );
    // Redis back: the periodic sweep empties the twin (balances included), so keys seen
    // in outages do not stay in memory for ever.
    redis.restart().await;
    eventually(10, || async {
        admit(1_000).await.1.degraded.is_none().then_some(())
    })
    .await;
    assert!(twin.held_keys() > 0);
    counters.sweep();
    assert_eq!(twin.held_keys(), 0, "the outage twin was not swept");
}

/// A light lease the outage twin admitted reserved nothing in Redis: its report, once
/// Redis is back, must not take its reservation out of Redis's token window. On the old
/// code the report subtracted the 500 tokens it never took there from the second's
/// bucket (which held another admission's 100), and the window admitted 950 more
/// tokens under a limit of 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_admitted_in_an_outage_takes_nothing_back_from_redis() {
    use keyward::limits::{AdmitRequest, Counters, Denial, LeaseId, Verdict};

    let mut redis = PrivateRedis::start().await;
    let (counters, twin, _queue) = local_counters(&redis).await;
    // One second for Redis's scripts and the twin alike.
    let at = keyward::clock::now_ms() / 1000 * 1000 + 500;
    counters.time_shift().pin(at);
    Counters::Memory(twin.clone()).time_shift().pin(at);
    let key = uuid::Uuid::new_v4().to_string();
    let admit = |tokens: i64| {
        let counters = counters.clone();
        let lease = LeaseId::new(&key);
        async move {
            let request = AdmitRequest {
                lease: &lease,
                rpm: None,
                tpm: Some(1_000),
                concurrency: None,
                tokens,
                lease_ttl_ms: 60_000,
                provider: "openai",
                model: "gpt-4o",
                api_format: "openai_chat",
                balance: None,
                hold_micros: 0,
                pool: None,
                quotas: &[],
            };
            let d = counters.admit(&request).await.unwrap();
            // The lease as the admission signs it: its light part carries its report.
            (
                LeaseId {
                    light: d.light.clone(),
                    ..lease
                },
                d,
            )
        }
    };

    let (_, d) = admit(100).await;
    assert!(
        d.degraded.is_none() && matches!(d.verdict, Verdict::Admitted { .. }),
        "{d:?}"
    );
    // Redis goes away with its data saved, so it comes back holding that 100.
    let mut conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: Result<(), _> = redis::cmd("SHUTDOWN")
        .arg("SAVE")
        .query_async(&mut conn)
        .await;
    redis.stop();
    let (lease, d) = admit(500).await;
    assert_eq!(d.degraded, Some("local"), "{d:?}");
    redis.restart().await;
    let report = report_of(lease, Some((10, 0)), 0);
    // Until Redis answers again (a lane's first call after the restart falls back).
    eventually(10, || async {
        admit(0).await.1.degraded.is_none().then_some(())
    })
    .await;
    counters.report(&report).await.unwrap();
    let (_, d) = admit(950).await;
    assert!(d.degraded.is_none(), "{d:?}");
    assert!(
        matches!(
            d.verdict,
            Verdict::Denied {
                reason: Denial::Tokens,
                ..
            }
        ),
        "Redis's window lost tokens it held: {d:?}"
    );
}

/// The slot of a Redis key's hash tag.
fn slot_of(name: &str) -> u32 {
    let open = name.find('{').unwrap();
    let close = name[open..].find('}').unwrap() + open;
    keyward::limits::scripts::slot(&name[open + 1..close])
}

/// A replica on `cluster` under `deny`.
async fn on_cluster(cluster: &PrivateCluster) -> TestServer {
    let db = Arc::new(TestDb::new(common::Backend::Sqlite).await);
    let mut raw = common::base_config(&db);
    raw.insert(config::REDIS_URL, cluster.url.clone());
    raw.insert(config::ON_BACKEND_ERROR, "deny".to_string());
    TestServer::start_on(db, raw).await
}

/// A key's secret whose shard's master is (`on`) or is not (`!on`) the one on `port`.
async fn key_near(s: &TestServer, cluster: &PrivateCluster, port: u16, on: bool) -> String {
    let keyward::limits::Counters::Redis(redis) = &s.state.counters else {
        panic!("not the Redis shape");
    };
    loop {
        // No concurrency limit: the test's admissions hold their leases.
        let (key, secret) = s.create_key(json!({"concurrent_limit": null})).await;
        let id = key["id"].as_str().unwrap();
        let master = cluster.owner_of(slot_of(&redis.key(id, "rpm"))).await;
        if (master == port) == on {
            return secret;
        }
    }
}

/// One admission, which must answer within 3 s: (status, error code).
async fn admit_bounded(s: &TestServer, secret: &str) -> (u16, String) {
    let a = tokio::time::timeout(Duration::from_secs(3), s.admit(json!({"key": secret})))
        .await
        .expect("an admission hung: a cluster that cannot answer was waited for");
    let code = if a.status == 200 {
        String::new()
    } else {
        error_code(&a)
    };
    (a.status, code)
}

/// A master of a cluster killed (`KILL`) or paused (`STOP`): its tenants are refused
/// with 503 fast, the other masters' tenants are admitted, `/readyz` says 503; once it
/// is back, everything recovers.
async fn a_master_fails(signal: &str) {
    let mut cluster = PrivateCluster::start().await;
    let s = on_cluster(&cluster).await;
    let victim = cluster.ports[0];
    let doomed = key_near(&s, &cluster, victim, true).await;
    let healthy = key_near(&s, &cluster, victim, false).await;
    assert_eq!(admit_bounded(&s, &doomed).await.0, 200);
    assert_eq!(admit_bounded(&s, &healthy).await.0, 200);
    assert_eq!(ready(&s).await, 200);

    cluster.signal(victim, signal);
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(
            admit_bounded(&s, &doomed).await,
            (503, "BACKEND_UNAVAILABLE".to_string())
        );
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("{signal}: slowest refusal {slowest:?}");
    // The breaker may have opened on the doomed key's failures; once its window has
    // passed, the healthy masters' tenants are admitted.
    eventually(5, || async {
        (admit_bounded(&s, &healthy).await.0 == 200).then_some(())
    })
    .await;
    let started = Instant::now();
    assert_eq!(ready(&s).await, 503, "/readyz must say a master is gone");
    assert!(started.elapsed() < Duration::from_secs(3));

    if signal == "STOP" {
        cluster.signal(victim, "CONT");
    } else {
        cluster.restart(victim).await;
    }
    eventually(20, || async {
        (admit_bounded(&s, &doomed).await.0 == 200).then_some(())
    })
    .await;
    eventually(10, || async { (ready(&s).await == 200).then_some(()) }).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_master_refuses_its_tenants_fast_and_recovers() {
    a_master_fails("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_cluster_master_refuses_its_tenants_fast_and_recovers() {
    a_master_fails("STOP").await;
}

/// Once the cluster has marked a dead master failed, every master answers `CLUSTERDOWN`
/// (Redis's default `cluster-require-full-coverage yes`): the healthy masters' tenants
/// are refused with 503 fast too (before, their admissions hung, retried without end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_down_refuses_every_tenant_fast_and_recovers() {
    let mut cluster = PrivateCluster::start().await;
    // The failure is detected after 1 s instead of 15.
    for port in &cluster.ports {
        let mut conn = PrivateCluster::node(*port).await;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-node-timeout")
            .arg("1000")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let s = on_cluster(&cluster).await;
    let victim = cluster.ports[0];
    let healthy = key_near(&s, &cluster, victim, false).await;
    assert_eq!(admit_bounded(&s, &healthy).await.0, 200);

    cluster.signal(victim, "KILL");
    let survivor = cluster.ports[1];
    PrivateCluster::until_state(&[survivor], "fail").await;
    for _ in 0..3 {
        assert_eq!(
            admit_bounded(&s, &healthy).await,
            (503, "BACKEND_UNAVAILABLE".to_string())
        );
    }
    assert_eq!(ready(&s).await, 503);

    cluster.restart(victim).await;
    eventually(20, || async {
        (admit_bounded(&s, &healthy).await.0 == 200).then_some(())
    })
    .await;
    eventually(10, || async { (ready(&s).await == 200).then_some(()) }).await;
    s.stop().await;
}
