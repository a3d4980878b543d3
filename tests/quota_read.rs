//! `Counters::read_quotas` on the in-process twin and on Redis (`lua/quota_read.lua`; the
//! shared Redis, then a Redis Cluster of the test's own):
//! the same admissions, reports and clock moves on both stores, their clocks pinned to
//! one instant (just before a UTC midnight that ends a day and a month, not a week),
//! and after each step both reads must be equal and hold the expected figures: a key's
//! own windows, every quota kind, seeds of missing spend counters, holds that leave at
//! their lease's expiry (without the read purging them: Redis is byte for byte the same
//! after a read), seconds leaving the windows, and the calendar resets.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use keyward::limits::memory::MemoryCounters;
use keyward::limits::redis::RedisCounters;
use keyward::limits::{
    AdmitRequest, Counters, LeaseId, LiveCounter, LiveFigure, QuotaEntry, QuotaKind, Report,
    Tenant, Verdict,
};
use keyward::quota::{days_from_civil, Period, Scope, ScopeKind};
use tokio::sync::mpsc;

const DAY: i64 = 86_400_000;

struct Stores {
    twin: Counters,
    redis: Counters,
    url: String,
    prefix: String,
}

impl Stores {
    fn both(&self) -> [&Counters; 2] {
        [&self.twin, &self.redis]
    }

    fn advance(&self, ms: i64) {
        for s in self.both() {
            s.time_shift().advance(ms);
        }
    }

    async fn admit(&self, r: &AdmitRequest<'_>) {
        for s in self.both() {
            let d = s.admit(r).await.unwrap();
            assert!(matches!(d.verdict, Verdict::Admitted { .. }), "{d:?}");
        }
    }

    async fn report(&self, lease: &LeaseId, tokens: (i64, i64), cost: i64) {
        let r = Report {
            lease: Some(lease.clone()),
            id: lease.to_string(),
            tokens: Some(tokens),
            cost_micros: cost,
            model: None,
            provider_key_id: None,
            provider: None,
            latency_ms: Some(10),
            upstream_status: Some(200),
            cooldown_ms: 0,
            suspend_ms: 0,
            source: "data-token".into(),
            learned: None,
            lease_expires_at_ms: 0,
            token_classes: Default::default(),
            usage_source: Default::default(),
            spend_now: Vec::new(),
        };
        for s in self.both() {
            s.report(&r).await.unwrap();
        }
    }

    /// Every key under the prefix with its DUMP: what a read must leave as it was (on the
    /// shared Redis; a cluster's keys are spread over its nodes, and the shared Redis
    /// already checks the script).
    async fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        if self.url.starts_with("redis+cluster") {
            return Vec::new();
        }
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{}:*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let dump: Vec<u8> = redis::cmd("DUMP")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            out.push((key, dump));
        }
        out
    }

    /// Reads on both stores (Redis left unchanged), asserts them equal; returns the twin's.
    /// (`key`: the tenant, a key without a user, whose shard holds them.)
    async fn read(&self, key: &str, counters: &[LiveCounter]) -> Vec<LiveFigure> {
        let before = self.snapshot().await;
        let tenant = Tenant::Key(key);
        let twin = self.twin.read_quotas(tenant, counters).await.unwrap();
        let redis = self.redis.read_quotas(tenant, counters).await.unwrap();
        assert_eq!(self.snapshot().await, before, "a read changed Redis");
        assert_eq!(twin, redis, "twin and Redis read differently");
        twin.figures
    }
}

fn used_held(figures: &[LiveFigure]) -> Vec<(i64, i64)> {
    figures.iter().map(|f| (f.used, f.held)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_and_redis_read_the_same_live_figures_and_change_nothing() {
    same_reads(&common::redis_url()).await;
}

/// The same on a three-master Redis Cluster of the test's own (the script's keys are all
/// under the deployment's hash tag, so in one slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_and_redis_cluster_read_the_same_live_figures() {
    let cluster = common::PrivateCluster::start().await;
    same_reads(&cluster.url).await;
}

async fn same_reads(url: &str) {
    let (tx, _rx) = mpsc::channel(1_000);
    let url = url.to_string();
    let prefix = common::unique_prefix();
    let stores = Stores {
        twin: Counters::Memory(Arc::new(MemoryCounters::new(600_000, tx))),
        redis: Counters::Redis(Arc::new(
            RedisCounters::connect(&url, &prefix, 600_000)
                .await
                .unwrap(),
        )),
        url,
        prefix,
    };
    // 2026-11-30 (a Monday) 23:58:30 UTC: midnight ends the day and the month.
    let midnight = days_from_civil(2026, 12, 1) * DAY;
    let t0 = midnight - 90_000;
    for s in stores.both() {
        s.time_shift().pin(t0);
    }
    let month_start = Period::Month.start_day(t0 / DAY);
    let counter = Scope {
        kind: ScopeKind::User,
        id: uuid::Uuid::new_v4().to_string(),
        model: None,
    }
    .counter_id();
    let seed = |kind| match kind {
        QuotaKind::Spend(Period::Month) => Some((month_start, 5_000)),
        QuotaKind::Spend(Period::Total) => Some((0, 7_000)),
        _ => None,
    };
    let entries: Vec<QuotaEntry> = QuotaKind::ALL
        .iter()
        .map(|&kind| QuotaEntry {
            counter: counter.clone(),
            kind,
            limit: 1_000_000,
            seed: seed(kind),
        })
        .collect();
    let key = uuid::Uuid::new_v4().to_string();
    let mut reads: Vec<LiveCounter> = [false, true]
        .map(|tokens| LiveCounter::KeyWindow {
            key_id: key.clone(),
            tokens,
        })
        .to_vec();
    reads.extend(entries.iter().map(|e| LiveCounter::Quota {
        counter: e.counter.clone(),
        kind: e.kind,
        seed: e.seed,
    }));
    // A counter nothing admitted through: a missing spend counter reads as its seed.
    reads.push(LiveCounter::Quota {
        counter: "0".repeat(24),
        kind: QuotaKind::Spend(Period::Month),
        seed: Some((month_start, 42)),
    });
    // Order: key rpm, key tpm, rm, tm, rd, td, sd, sw, sm, st, the untouched one.

    let f = stores.read(&key, &reads).await;
    let fresh = [0, 0, 0, 0, 0, 0, 0, 0, 5_000, 7_000, 42];
    assert_eq!(f.iter().map(|f| f.used).collect::<Vec<_>>(), fresh);
    assert_eq!(f[4].reset_ms, 90_000, "until midnight");
    assert_eq!(f[9].reset_ms, 0, "a total never resets");

    let stores = &stores;
    let admit = |lease: &LeaseId, tokens, hold, ttl| {
        let lease = lease.clone();
        let entries = entries.clone();
        async move {
            let r = AdmitRequest {
                lease: &lease,
                rpm: Some(100),
                tpm: Some(100_000),
                concurrency: None,
                tokens,
                lease_ttl_ms: ttl,
                provider: "openai",
                model: "gpt-4o",
                api_format: "openai_chat",
                balance: None,
                hold_micros: hold,
                pool: None,
                quotas: &entries,
            };
            stores.admit(&r).await;
        }
    };
    let (first, second) = (LeaseId::new(&key), LeaseId::new(&key));
    admit(&first, 100, 300, 30_000).await;
    stores.advance(20_000);
    admit(&second, 50, 200, 300_000).await;
    let f = stores.read(&key, &reads).await;
    assert_eq!(
        used_held(&f),
        [
            (2, 0),
            (150, 0),
            (2, 0),
            (150, 0),
            (2, 0),
            (150, 0),
            (0, 500),
            (0, 500),
            (5_000, 500),
            (7_000, 500),
            (42, 0)
        ]
    );
    assert_eq!(
        f[0].reset_ms, 41_000,
        "the first second leaves 61 s after it began"
    );

    // The second reports 60 tokens for 150 micro-USD: its hold leaves, its cost stays.
    stores.report(&second, (40, 20), 150).await;
    let f = stores.read(&key, &reads).await;
    assert_eq!(
        used_held(&f)[1..10],
        [
            (160, 0),
            (2, 0),
            (160, 0),
            (2, 0),
            (160, 0),
            (150, 300),
            (150, 300),
            (5_150, 300),
            (7_150, 300)
        ]
    );

    // The first lease expires: its holds no longer count, though no decision purged
    // them (the read leaves them listed: the snapshot check).
    stores.advance(15_000);
    let f = stores.read(&key, &reads).await;
    assert_eq!(
        used_held(&f)[6..10],
        [(150, 0), (150, 0), (5_150, 0), (7_150, 0)]
    );

    // 65 s after the first request its second has left the windows; the second's stays.
    stores.advance(30_000);
    let f = stores.read(&key, &reads).await;
    assert_eq!(used_held(&f)[..4], [(1, 0), (60, 0), (1, 0), (60, 0)]);
    assert_eq!(f[0].reset_ms, 16_000);

    // Past midnight: a new day and month (the week goes on), the windows empty.
    stores.advance(30_000);
    let f = stores.read(&key, &reads).await;
    assert_eq!(
        used_held(&f),
        [
            (0, 0),
            (0, 0),
            (0, 0),
            (0, 0),
            (0, 0),
            (0, 0),
            (0, 0),
            (150, 0),
            (0, 0),
            (7_150, 0),
            (0, 0)
        ]
    );
    assert_eq!((f[0].reset_ms, f[4].reset_ms), (0, DAY - 5_000));
    if !stores.url.starts_with("redis+cluster") {
        common::delete_prefix(&stores.url, &stores.prefix).await;
    }
}
