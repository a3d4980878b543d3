//! The counter store's behaviour suite, run on both implementations: the Lua scripts on a
//! real Redis (each test under its own key prefix) and the in-process twin. Time moves
//! through the store's time-shift hook, so minute-long windows are tested without
//! sleeping.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "counters/holds.rs"]
mod holds;
#[path = "counters/quotas.rs"]
mod quotas;
#[path = "counters/seeds.rs"]
mod seeds;
use holds::*;
use quotas::*;
use seeds::*;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use keyward::limits::memory::MemoryCounters;
use keyward::limits::redis::RedisCounters;
use keyward::limits::scripts::admit::{AdmitArgs, AdmitKeys};
use keyward::limits::scripts::admit_window::{AdmitWindowArgs, AdmitWindowKeys};
use keyward::limits::scripts::{source, KeySpace};
use keyward::limits::{
    AdmitRequest, BalanceSnapshot, CounterError, Counters, Decision, Denial, LeaseId, LightLease,
    Pick, Report, Reported, SelectRequest, Verdict,
};
use keyward::pool::cache::{Candidate, Roster};
use keyward::usage::UsageRecord;
use tokio::sync::{mpsc, Mutex};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Redis,
    /// A three-master Redis Cluster of the test's own.
    Cluster,
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Kind::Memory).await; }
            )*
        }
                mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Kind::Redis).await; }
            )*
        }
        mod on_redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Kind::Cluster).await; }
            )*
        }
    };
}

on_both_stores!(
    request_window_is_exact_at_second_boundaries,
    a_second_leaves_the_window_with_everything_it_counted,
    retry_after_is_the_time_until_capacity_frees,
    tokens_are_reserved_then_settled,
    a_lease_admitted_without_a_token_limit_settles_no_tokens,
    denied_requests_consume_nothing,
    leases_expire_free_their_slot_and_renew,
    expired_leases_leave_the_store_in_bounded_batches,
    reports_count_once_even_after_the_lease_expired,
    a_lease_is_reported_once_however_late_the_repeat,
    concurrent_admissions_never_exceed_any_limit,
    balance_changes_apply_once_by_version,
    balance_overspend_is_bounded_by_one_request,
    holds_wait_for_leases_and_expired_leases_release_theirs,
    live_balances_never_wrap_and_no_report_is_lost,
    selection_goes_by_priority_then_least_recently_picked,
    pool_changes_apply_at_once_and_keep_pick_history,
    full_provider_keys_are_skipped_until_their_window_has_room,
    cooling_and_suspended_keys_are_skipped_until_they_recover,
    a_report_cools_a_key_not_picked_since_start,
    a_pool_refusal_leaves_the_client_untouched,
    only_one_request_gets_a_keys_last_unit,
    a_sweep_keeps_a_suspension_of_a_key_never_picked,
    a_pool_with_2100_priorities_selects_in_order,
    causes_last_as_long_as_cooldowns_and_reset_clears_both,
    a_leases_provider_key_part_runs_once_and_never_too_late,
    learned_limits_cool_a_used_up_key_and_are_shown_for_a_while,
    a_user_entry_is_shared_by_its_keys,
    a_model_entry_counts_its_model_only,
    a_refusal_by_one_entry_takes_nothing_anywhere,
    day_and_month_counters_reset_at_utc_boundaries,
    spend_passes_its_limit_only_by_actual_minus_hold,
    spend_counters_never_read_below_their_seed,
    a_day_quota_survives_a_lost_counter,
    a_late_report_reaches_the_spend_counters_of_now,
    a_purged_leases_late_report_counts_on_its_own_entries,
    a_hold_of_a_key_that_never_admits_again_leaves_at_its_lease_expiry,
    a_renewed_lease_keeps_its_hold_until_its_new_expiry,
    a_renewal_that_shortens_a_lease_releases_its_hold_earlier,
    a_light_admission_writes_no_lease_record_and_its_report_settles_its_tokens,
    a_renewed_light_lease_is_reported_on_time_and_once,
    a_light_admissions_pool_refusal_gives_back_request_and_tokens,
    a_light_lease_holds_its_slot_until_reported_or_expired,
    a_key_switching_between_the_admit_scripts_keeps_its_window_counts_exact,
);

struct Store {
    counters: Counters,
    queue: Option<Mutex<mpsc::Receiver<UsageRecord>>>,
    redis: Option<(String, String)>,
    /// Kept alive for the test; its processes end on drop.
    _cluster: Option<common::PrivateCluster>,
}

impl Store {
    async fn new(kind: Kind) -> Store {
        match kind {
            Kind::Memory => {
                let (tx, rx) = mpsc::channel(100_000);
                Store {
                    counters: Counters::Memory(Arc::new(MemoryCounters::new(600_000, tx))),
                    queue: Some(Mutex::new(rx)),
                    redis: None,
                    _cluster: None,
                }
            }
            Kind::Redis => {
                let url = common::redis_url();
                let prefix = common::unique_prefix();
                let redis = RedisCounters::connect(&url, &prefix, 600_000)
                    .await
                    .unwrap();
                Store {
                    counters: Counters::Redis(Arc::new(redis)),
                    queue: None,
                    redis: Some((url, prefix)),
                    _cluster: None,
                }
            }
            Kind::Cluster => {
                let cluster = common::PrivateCluster::start().await;
                assert_eq!(cluster.node_count(), 3);
                let redis = RedisCounters::connect(&cluster.url, &common::unique_prefix(), 600_000)
                    .await
                    .unwrap();
                Store {
                    counters: Counters::Redis(Arc::new(redis)),
                    queue: None,
                    redis: None,
                    _cluster: Some(cluster),
                }
            }
        }
    }

    /// Every record queued for the database so far.
    async fn queued(&self) -> Vec<UsageRecord> {
        match (&self.queue, &self.counters) {
            (Some(queue), _) => {
                let mut queue = queue.lock().await;
                let mut out = Vec::new();
                while let Ok(r) = queue.try_recv() {
                    out.push(r);
                }
                out
            }
            (None, Counters::Redis(redis)) => common::stream_records(redis).await,
            _ => unreachable!(),
        }
    }

    /// A lease of a key of the suite's user: on the user's shard, as admission places the
    /// keys of one user (they share its quota counters).
    fn user_lease(&self, key: &str) -> LeaseId {
        let user = keyward::limits::Tenant::User("suite-user");
        LeaseId::new(key).on_shard(self.counters.shard_of(user))
    }

    fn advance(&self, ms: i64) {
        self.counters.time_shift().advance(ms);
    }

    async fn admit(&self, r: &AdmitRequest<'_>) -> Decision {
        let decision = self.counters.admit(r).await.unwrap();
        if let Some(light) = &decision.light {
            // What the signed lease carries (see `signed`).
            LIGHT
                .lock()
                .unwrap()
                .get_or_insert_with(Default::default)
                .insert(r.lease.to_string(), light.clone());
        }
        // What one side of a refused admission took is given back before the next step.
        self.counters.settled().await;
        decision
    }

    /// Renews `lease` as the signed lease names it.
    async fn renew(&self, lease: &LeaseId, ttl_ms: i64) -> Result<Option<i64>, CounterError> {
        self.counters.renew(&signed(lease), ttl_ms).await
    }

    async fn cleanup(self) {
        if let Some((url, prefix)) = self.redis {
            common::delete_prefix(&url, &prefix).await;
        }
    }
}

/// Light admissions' data by lease (what their signed leases carry), kept by
/// [`Store::admit`].
static LIGHT: std::sync::Mutex<Option<std::collections::HashMap<String, LightLease>>> =
    std::sync::Mutex::new(None);

/// `lease` as its signed lease names it: with a light admission's data
/// ([`LeaseId::light`]), as admission signs it.
fn signed(lease: &LeaseId) -> LeaseId {
    let light = LIGHT
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(&lease.to_string()).cloned());
    LeaseId {
        light: light.or_else(|| lease.light.clone()),
        ..lease.clone()
    }
}

fn request(lease: &LeaseId) -> AdmitRequest<'_> {
    AdmitRequest {
        lease,
        rpm: None,
        tpm: None,
        concurrency: None,
        tokens: 0,
        lease_ttl_ms: 300_000,
        provider: "openai",
        model: "gpt-4o",
        api_format: "openai_chat",
        balance: None,
        hold_micros: 0,
        pool: None,
        quotas: &[],
    }
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn admitted(d: &Decision) -> bool {
    matches!(d.verdict, Verdict::Admitted { .. })
}

fn denial(d: &Decision) -> (Denial, Option<i64>) {
    match d.verdict {
        Verdict::Denied {
            reason,
            retry_after_ms,
        } => (reason, retry_after_ms),
        Verdict::Admitted { .. } => panic!("admitted: {d:?}"),
    }
}

/// Moves the store's clock to `frac` milliseconds into a second; returns that second.
async fn align(store: &Store, frac: i64) -> i64 {
    let probe = LeaseId::new(&key());
    let now = store.admit(&request(&probe)).await.usage.now_ms;
    let shift = (frac - now.rem_euclid(1000)).rem_euclid(1000);
    store.advance(shift);
    (now + shift).div_euclid(1000)
}

fn report(lease: &LeaseId, tokens: Option<(i64, i64)>, cost: i64) -> Report {
    Report {
        lease: Some(signed(lease)),
        id: lease.to_string(),
        tokens,
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
    }
}

async fn request_window_is_exact_at_second_boundaries(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let b = align(&s, 500).await;
    for _ in 0..3 {
        let lease = LeaseId::new(&k);
        let d = s
            .admit(&AdmitRequest {
                rpm: Some(3),
                ..request(&lease)
            })
            .await;
        assert!(admitted(&d), "{d:?}");
    }
    let lease = LeaseId::new(&k);
    let r = AdmitRequest {
        rpm: Some(3),
        ..request(&lease)
    };
    let d = s.admit(&r).await;
    assert_eq!(denial(&d).0, Denial::Requests);
    assert_eq!(d.usage.requests_used, 3);
    // 60 s later we are in bucket b+60: the requests of bucket b are at most 60 s old, so
    // they still count (a 60-bucket window would over-admit here).
    s.advance(60_000);
    let d = s.admit(&r).await;
    assert_eq!(d.usage.now_ms.div_euclid(1000), b + 60);
    let (reason, retry) = denial(&d);
    assert_eq!(reason, Denial::Requests);
    assert_eq!(retry, Some((b + 61) * 1000 - d.usage.now_ms));
    // The first millisecond of bucket b+61 has room again.
    s.advance(retry.unwrap());
    let d = s.admit(&r).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.requests_used, 1);
    s.cleanup().await;
}

/// Several admissions (and picks) in one second, then one in a later second: when the
/// first second leaves the window, all it counted leaves with it, and only that.
async fn a_second_leaves_the_window_with_everything_it_counted(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let provider = common::unique_prefix();
    let pool = Roster::new(vec![candidate(&provider, 0, Some(1_000), Some(100_000))]);
    let admit = |tokens| {
        let (s, k, pool) = (&s, &k, &pool);
        async move {
            let lease = LeaseId::new(k);
            let d = s
                .admit(&AdmitRequest {
                    rpm: Some(1_000),
                    tpm: Some(100_000),
                    tokens,
                    pool: Some(pool),
                    ..request(&lease)
                })
                .await;
            assert!(admitted(&d), "{d:?}");
            assert_eq!(d.picked, Some(0));
            d.usage
        }
    };
    align(&s, 200).await;
    for _ in 0..3 {
        admit(10).await;
    }
    s.advance(30_000);
    admit(7).await;
    // 61 s after the first second: only the later second's request and tokens remain.
    s.advance(31_000);
    let usage = admit(5).await;
    assert_eq!((usage.requests_used, usage.tokens_used), (2, 12));
    // The provider key's windows forgot the same: 998 more requests fit in its 1,000.
    for _ in 0..998 {
        assert!(matches!(pick(&s, &pool, 0).await, Pick::Picked(0)));
    }
    assert!(matches!(pick(&s, &pool, 0).await, Pick::Exhausted { .. }));
    s.cleanup().await;
}

async fn retry_after_is_the_time_until_capacity_frees(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let b = align(&s, 250).await;
    // Two requests now, three 20 s later: limit 5 is full.
    for (at, n) in [(0, 2), (20_000, 3)] {
        s.advance(at);
        for _ in 0..n {
            let lease = LeaseId::new(&k);
            assert!(admitted(
                &s.admit(&AdmitRequest {
                    rpm: Some(5),
                    ..request(&lease)
                })
                .await
            ));
        }
    }
    let lease = LeaseId::new(&k);
    let r = AdmitRequest {
        rpm: Some(5),
        ..request(&lease)
    };
    let d = s.admit(&r).await;
    let (_, retry) = denial(&d);
    // One slot frees when bucket b leaves the window: at the start of second b+61.
    assert_eq!(retry, Some((b + 61) * 1000 - d.usage.now_ms));
    assert!(d.usage.requests_reset_ms > 0);
    // (Real time passes between calls too: "early" is 50 ms early, not 1.)
    s.advance(retry.unwrap() - 50);
    assert_eq!(denial(&s.admit(&r).await).0, Denial::Requests, "early");
    s.advance(50);
    assert!(admitted(&s.admit(&r).await));
    s.cleanup().await;
}

async fn tokens_are_reserved_then_settled(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    align(&s, 100).await;
    let a = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            tpm: Some(1_000),
            tokens: 600,
            ..request(&a)
        })
        .await;
    assert!(admitted(&d));
    assert_eq!(d.usage.tokens_used, 600);
    let b = LeaseId::new(&k);
    let rb = AdmitRequest {
        tpm: Some(1_000),
        tokens: 600,
        ..request(&b)
    };
    let (reason, retry) = denial(&s.admit(&rb).await);
    assert_eq!(reason, Denial::Tokens);
    assert!(retry.unwrap() > 59_000, "{retry:?}");
    // The report replaces the 600 reserved by the 150 used.
    assert_eq!(
        s.counters
            .report(&report(&a, Some((100, 50)), 0))
            .await
            .unwrap(),
        Reported::Recorded
    );
    let d = s.admit(&rb).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.tokens_used, 750);
    // A report without token counts keeps the reservation (the proxy could not count).
    assert_eq!(
        s.counters.report(&report(&b, None, 0)).await.unwrap(),
        Reported::Recorded
    );
    let c = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            tpm: Some(1_000),
            tokens: 0,
            ..request(&c)
        })
        .await;
    assert_eq!(d.usage.tokens_used, 750);
    // Reported usage above the reservation counts in full.
    s.counters
        .report(&report(&c, Some((200, 40)), 0))
        .await
        .unwrap();
    let e = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            tpm: Some(1_000),
            tokens: 11,
            ..request(&e)
        })
        .await;
    assert_eq!(denial(&d).0, Denial::Tokens, "990 + 11 > 1000");
    assert_eq!(d.usage.tokens_used, 990);
    assert!(admitted(
        &s.admit(&AdmitRequest {
            tpm: Some(1_000),
            tokens: 10,
            ..request(&e)
        })
        .await
    ));
    s.cleanup().await;
}

/// A lease admitted while its key had no TPM limit reserved nothing in the token window:
/// its report adds nothing there either, even when a limit set since then has the
/// second's bucket counting other requests' tokens (the twin once settled it anyway).
async fn a_lease_admitted_without_a_token_limit_settles_no_tokens(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    align(&s, 100).await;
    let unlimited = LeaseId::new(&k);
    assert!(admitted(&s.admit(&request(&unlimited)).await));
    // The limit arrives within the same second; another request reserves 10 tokens.
    let limited = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            tpm: Some(1_000),
            tokens: 10,
            ..request(&limited)
        })
        .await;
    assert_eq!(d.usage.tokens_used, 10);
    assert_eq!(
        s.counters
            .report(&report(&unlimited, Some((300, 200)), 0))
            .await
            .unwrap(),
        Reported::Recorded
    );
    let probe = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            tpm: Some(1_000),
            ..request(&probe)
        })
        .await;
    assert_eq!(d.usage.tokens_used, 10, "{d:?}");
    s.cleanup().await;
}

async fn denied_requests_consume_nothing(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    align(&s, 100).await;
    fn limits(lease: &LeaseId) -> AdmitRequest<'_> {
        AdmitRequest {
            rpm: Some(10),
            tpm: Some(1_000),
            concurrency: Some(1),
            tokens: 100,
            ..request(lease)
        }
    }
    let a = LeaseId::new(&k);
    assert!(admitted(&s.admit(&limits(&a)).await));
    for _ in 0..5 {
        let b = LeaseId::new(&k);
        let d = s.admit(&limits(&b)).await;
        assert_eq!(denial(&d).0, Denial::Concurrency);
        assert_eq!(
            (
                d.usage.requests_used,
                d.usage.tokens_used,
                d.usage.in_flight
            ),
            (1, 100, 1)
        );
    }
    // Denied for tokens: no request, no slot either.
    s.counters
        .report(&report(&a, Some((50, 50)), 0))
        .await
        .unwrap();
    let big = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            tokens: 950,
            ..limits(&big)
        })
        .await;
    assert_eq!(denial(&d).0, Denial::Tokens);
    assert_eq!(
        (
            d.usage.requests_used,
            d.usage.tokens_used,
            d.usage.in_flight
        ),
        (1, 100, 0)
    );
    // Exactly one more was counted after all those refusals.
    let c = LeaseId::new(&k);
    let d = s.admit(&limits(&c)).await;
    assert!(admitted(&d));
    assert_eq!(
        (
            d.usage.requests_used,
            d.usage.tokens_used,
            d.usage.in_flight
        ),
        (2, 200, 1)
    );
    s.cleanup().await;
}

async fn leases_expire_free_their_slot_and_renew(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    fn slots(lease: &LeaseId) -> AdmitRequest<'_> {
        AdmitRequest {
            concurrency: Some(2),
            lease_ttl_ms: 10_000,
            ..request(lease)
        }
    }
    let (a, b, c) = (LeaseId::new(&k), LeaseId::new(&k), LeaseId::new(&k));
    assert!(admitted(&s.admit(&slots(&a)).await));
    assert!(admitted(&s.admit(&slots(&b)).await));
    let (reason, retry) = denial(&s.admit(&slots(&c)).await);
    assert_eq!(reason, Denial::Concurrency);
    assert!((9_000..=10_000).contains(&retry.unwrap()), "{retry:?}");
    s.advance(5_000);
    let renewed = s.renew(&a, 10_000).await.unwrap();
    assert!(renewed.is_some());
    // b expires (never reported, never renewed); a, renewed, still holds its slot.
    s.advance(5_500);
    let d = s.admit(&slots(&c)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.in_flight, 2);
    let e = LeaseId::new(&k);
    let (reason, retry) = denial(&s.admit(&slots(&e)).await);
    assert_eq!(reason, Denial::Concurrency);
    // a, renewed at 5 s for 10 s, is the first live lease to expire: at 15 s, 4.5 s on.
    assert!((4_000..=4_500).contains(&retry.unwrap()), "{retry:?}");
    assert_eq!(
        s.renew(&b, 10_000).await.unwrap(),
        None,
        "an expired lease cannot be renewed"
    );
    assert_eq!(s.renew(&LeaseId::new(&k), 10_000).await.unwrap(), None);
    // A reported lease frees its slot at once and cannot be renewed.
    s.counters.report(&report(&a, None, 0)).await.unwrap();
    assert_eq!(s.renew(&a, 10_000).await.unwrap(), None);
    assert!(admitted(&s.admit(&slots(&e)).await));
    s.cleanup().await;
}

/// Expired leases do not stay in Redis: each decision on the key that counts them (under
/// a concurrency limit) removes up to 100 of them with their reservation data, if any
/// (bounded memory per key, and bounded work per decision when many expire together). In
/// both stores they stop counting at once.
async fn expired_leases_leave_the_store_in_bounded_batches(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    // Leases the store counts: a key with a concurrency limit (too high to refuse), its
    // light leases members of the lease set without a record.
    fn counted(lease: &LeaseId) -> AdmitRequest<'_> {
        AdmitRequest {
            concurrency: Some(1_000),
            ..request(lease)
        }
    }
    let short = |lease| AdmitRequest {
        lease_ttl_ms: 1_000,
        ..counted(lease)
    };
    let leases: Vec<LeaseId> = (0..250).map(|_| LeaseId::new(&k)).collect();
    for lease in &leases {
        assert!(admitted(&s.admit(&short(lease)).await));
    }
    let stored = || {
        let (counters, k) = (&s.counters, &k);
        async move {
            let Counters::Redis(redis) = counters else {
                return None;
            };
            let mut conn = redis.conn().await.unwrap();
            let (leases, data): (i64, i64) = redis::pipe()
                .cmd("ZCARD")
                .arg(redis.key(k, "leases"))
                .cmd("HLEN")
                .arg(redis.key(k, "ld"))
                .query_async(&mut conn)
                .await
                .unwrap();
            Some(leases.max(data))
        }
    };
    let redis = matches!(kind, Kind::Redis | Kind::Cluster);
    assert_eq!(stored().await, redis.then_some(250));
    s.advance(1_500);
    let d = s.admit(&counted(&LeaseId::new(&k))).await;
    assert_eq!(d.usage.in_flight, 1, "only the new lease is live");
    assert_eq!(stored().await, redis.then_some(150 + 1));
    // A refusal removes a batch too. A concurrency refusal waits for the live lease
    // (300 s), not for one of the expired leases still in the set.
    let one_slot = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            concurrency: Some(1),
            ..counted(&one_slot)
        })
        .await;
    let (reason, retry) = denial(&d);
    assert_eq!((reason, d.usage.in_flight), (Denial::Concurrency, 1));
    assert!(retry.unwrap() > 290_000, "{retry:?}");
    assert_eq!(stored().await, redis.then_some(50 + 1));
    let d = s.admit(&counted(&LeaseId::new(&k))).await;
    assert_eq!(d.usage.in_flight, 2);
    assert_eq!(stored().await, redis.then_some(2));
    // None of the removed leases can be renewed; their reports still count (once).
    assert_eq!(s.renew(&leases[0], 10_000).await.unwrap(), None);
    assert_eq!(
        s.counters
            .report(&report(&leases[0], None, 0))
            .await
            .unwrap(),
        Reported::Recorded
    );
    s.cleanup().await;
}

async fn reports_count_once_even_after_the_lease_expired(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let lease = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            lease_ttl_ms: 1_000,
            ..request(&lease)
        })
        .await;
    assert!(admitted(&d));
    s.advance(5_000);
    let r = Report {
        model: Some("gpt-4o-mini".into()),
        ..report(&lease, Some((7, 3)), 1_234)
    };
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Recorded);
    for _ in 0..2 {
        assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Duplicate);
    }
    let queued = s.queued().await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    let rec = &queued[0];
    assert_eq!(rec.id, lease.to_string());
    assert_eq!(rec.key_id.as_deref(), Some(k.as_str()));
    assert_eq!(
        (rec.prompt_tokens, rec.completion_tokens, rec.cost_micros),
        (7, 3, 1_234)
    );
    // The model it was admitted for, not the report's: a report cannot move usage out
    // of the model whose allow-list and limits admitted it.
    assert_eq!(rec.model.as_deref(), Some("gpt-4o"));
    assert_eq!((rec.latency_ms, rec.upstream_status), (Some(10), Some(200)));
    // A live lease's report takes provider, model and format from the admission.
    let live = LeaseId::new(&k);
    s.admit(&request(&live)).await;
    s.counters.report(&report(&live, None, 0)).await.unwrap();
    let queued = s.queued().await;
    let rec = queued.iter().find(|r| r.id == live.to_string()).unwrap();
    assert_eq!(rec.provider.as_deref(), Some("openai"));
    assert_eq!(rec.model.as_deref(), Some("gpt-4o"));
    assert_eq!(rec.api_format.as_deref(), Some("openai_chat"));
    s.cleanup().await;
}

/// The duplicate guard outlives the last moment a lease may be reported: the guard time
/// after its latest expiry (renewals move it past the one signed into the lease id).
/// After that a report is refused as too late, so a repeat is never counted twice, and
/// a lease never reported in time cannot be reported at all.
async fn a_lease_is_reported_once_however_late_the_repeat(kind: Kind) {
    const GUARD_MS: i64 = 600_000; // the suite's duplicate-guard time
    let s = Store::new(kind).await;
    let k = key();
    let lease = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            lease_ttl_ms: 1_000,
            ..request(&lease)
        })
        .await;
    let Verdict::Admitted { expires_at_ms } = d.verdict else {
        panic!("{d:?}")
    };
    s.advance(500);
    let renewed = s.renew(&lease, 1_000).await.unwrap().unwrap();
    assert!(renewed > expires_at_ms);
    s.advance(600); // past the signed expiry, before the renewed one
    let r = Report {
        lease_expires_at_ms: expires_at_ms,
        ..report(&lease, None, 1_000)
    };
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Recorded);
    // A guard of `GUARD_MS` from the report would lapse here; it lasts until the
    // guard time after the renewed expiry.
    s.advance(GUARD_MS + 200);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Duplicate);
    s.advance(1_000);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::TooLate);
    // A lease never reported until the guard time after its expiry: too late, nothing queued.
    let late = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            lease_ttl_ms: 1_000,
            ..request(&late)
        })
        .await;
    let Verdict::Admitted { expires_at_ms } = d.verdict else {
        panic!("{d:?}")
    };
    s.advance(1_000 + GUARD_MS + 1);
    let r = Report {
        lease_expires_at_ms: expires_at_ms,
        ..report(&late, None, 1_000)
    };
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::TooLate);
    let queued = s.queued().await;
    assert_eq!(
        queued.iter().filter(|q| q.id == lease.to_string()).count(),
        1
    );
    assert!(
        !queued.iter().any(|q| q.id == late.to_string()),
        "{queued:?}"
    );
    s.cleanup().await;
}

async fn concurrent_admissions_never_exceed_any_limit(kind: Kind) {
    let s = Arc::new(Store::new(kind).await);
    align(&s, 100).await;
    // `mixed`: every other request's names are too long for a light lease, so it keeps a
    // record (`lua/admit.lua` in Redis) while the others take `lua/admit_window.lua`:
    // both count the same slots.
    let long = "m".repeat(120);
    for (rpm, tpm, conc, tokens, expected, mixed) in [
        (Some(50), None, None, 0, 50, false),
        (None, Some(5_000), None, 100, 50, false),
        (None, None, Some(5), 0, 5, false),
        (Some(1_000), None, Some(5), 0, 5, true),
    ] {
        let k = key();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (s, k, long) = (s.clone(), k.clone(), long.clone());
                tokio::spawn(async move {
                    let lease = LeaseId::new(&k);
                    let r = AdmitRequest {
                        rpm,
                        tpm,
                        concurrency: conc,
                        tokens,
                        model: if mixed && i % 2 == 1 { &long } else { "gpt-4o" },
                        ..request(&lease)
                    };
                    admitted(&s.admit(&r).await)
                })
            })
            .collect();
        let mut admitted_count = 0;
        for t in tasks {
            admitted_count += usize::from(t.await.unwrap());
        }
        assert_eq!(
            admitted_count, expected,
            "rpm {rpm:?} tpm {tpm:?} concurrency {conc:?} mixed {mixed}"
        );
    }
    Arc::into_inner(s).unwrap().cleanup().await;
}

async fn balance_changes_apply_once_by_version(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    fn with(lease: &LeaseId, credited: i64, used: i64, version: i64) -> AdmitRequest<'_> {
        AdmitRequest {
            balance: Some(BalanceSnapshot {
                credited,
                used,
                version,
            }),
            ..request(lease)
        }
    }
    let a = LeaseId::new(&k);
    let d = s.admit(&with(&a, 1_000, 0, 0)).await;
    assert_eq!(d.usage.balance_remaining, Some(1_000));
    s.counters.report(&report(&a, None, 400)).await.unwrap();
    // An admin credit of 500 (version 1): applied once, whoever sees it first.
    for _ in 0..2 {
        let l = LeaseId::new(&k);
        let d = s.admit(&with(&l, 1_500, 0, 1)).await;
        assert_eq!(d.usage.balance_remaining, Some(1_100));
        s.counters.report(&report(&l, None, 0)).await.unwrap();
    }
    // A replica with a stale record (version 0) does not roll the credit back.
    let l = LeaseId::new(&k);
    assert_eq!(
        s.admit(&with(&l, 1_000, 0, 0))
            .await
            .usage
            .balance_remaining,
        Some(1_100)
    );
    s.counters.report(&report(&l, None, 1_100)).await.unwrap();
    let l = LeaseId::new(&k);
    let d = s.admit(&with(&l, 1_500, 0, 1)).await;
    assert_eq!(denial(&d), (Denial::BalanceExhausted, None));
    assert_eq!(d.usage.balance_remaining, Some(0));
    s.cleanup().await;
}

/// Guarantee 10: with holds, a balance goes below zero by at most one request's
/// (actual cost − hold), under any concurrency; and what is held caps what is in flight.
async fn balance_overspend_is_bounded_by_one_request(kind: Kind) {
    const CREDIT: i64 = 50_000;
    const HOLD: i64 = 10_000;
    // Actual costs from half the hold to one and a half times it.
    const OVERSHOOT: i64 = HOLD / 2;
    let s = Arc::new(Store::new(kind).await);
    let k = key();
    let in_flight = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let most_in_flight = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let snapshot = BalanceSnapshot {
        credited: CREDIT,
        used: 0,
        version: 0,
    };
    let workers: Vec<_> = (0..20)
        .map(|w| {
            let (s, k) = (s.clone(), k.clone());
            let (in_flight, most) = (in_flight.clone(), most_in_flight.clone());
            tokio::spawn(async move {
                let mut spent = 0;
                for i in 0..200 {
                    let lease = LeaseId::new(&k);
                    let r = AdmitRequest {
                        balance: Some(snapshot),
                        hold_micros: HOLD,
                        ..request(&lease)
                    };
                    match s.admit(&r).await.verdict {
                        Verdict::Admitted { .. } => {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                            let cost = HOLD - OVERSHOOT + (w * 7 + i * 13) % (2 * OVERSHOOT + 1);
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            s.counters
                                .report(&report(&lease, None, cost))
                                .await
                                .unwrap();
                            spent += cost;
                        }
                        Verdict::Denied {
                            reason: Denial::BalanceExhausted,
                            ..
                        } => break,
                        Verdict::Denied { .. } => tokio::task::yield_now().await,
                    }
                }
                spent
            })
        })
        .collect();
    let mut spent = 0;
    for w in workers {
        spent += w.await.unwrap();
    }
    assert!(
        spent >= CREDIT - HOLD,
        "the balance can be used until less than a hold is left ({spent})"
    );
    assert!(
        spent <= CREDIT + OVERSHOOT,
        "overspent by more than one request's (actual - hold): {spent}"
    );
    let most = most_in_flight.load(Ordering::SeqCst);
    assert!(
        most <= CREDIT / HOLD,
        "{most} requests in flight, but the balance holds only {}",
        CREDIT / HOLD
    );
    let lease = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            balance: Some(snapshot),
            ..request(&lease)
        })
        .await;
    assert_eq!(d.usage.balance_remaining, Some(CREDIT - spent));
    Arc::into_inner(s).unwrap().cleanup().await;
}

/// A hold larger than the whole balance is refused as insufficient (it could never be
/// covered), one larger than what is not held waits for the leases in flight, and a
/// lease that expires unreported gives its hold back.
async fn holds_wait_for_leases_and_expired_leases_release_theirs(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let snapshot = BalanceSnapshot {
        credited: 1_000,
        used: 0,
        version: 0,
    };
    let admit = |lease, hold| AdmitRequest {
        balance: Some(snapshot),
        hold_micros: hold,
        lease_ttl_ms: 5_000,
        ..request(lease)
    };
    let first = LeaseId::new(&k);
    let d = s.admit(&admit(&first, 1_001)).await;
    assert_eq!(denial(&d), (Denial::BalanceExhausted, None), "{d:?}");
    let d = s.admit(&admit(&first, 600)).await;
    assert!(admitted(&d), "{d:?}");
    let second = LeaseId::new(&k);
    let d = s.admit(&admit(&second, 600)).await;
    let (reason, retry) = denial(&d);
    assert_eq!(reason, Denial::BalanceCommitted, "{d:?}");
    assert!(retry.is_some_and(|ms| ms > 0 && ms <= 5_000), "{d:?}");
    // 400 are not held: a hold of 400 goes ahead (on a longer lease).
    let third = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            lease_ttl_ms: 60_000,
            ..admit(&third, 400)
        })
        .await;
    assert!(admitted(&d), "{d:?}");
    // The first lease lapses unreported: its hold is released, the third's stays.
    s.advance(5_001);
    let fourth = LeaseId::new(&k);
    let d = s.admit(&admit(&fourth, 600)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.balance_remaining, Some(1_000));
    // Its report charges the real cost and releases its hold: 700 left, 400 held.
    s.counters
        .report(&report(&fourth, None, 300))
        .await
        .unwrap();
    let fifth = LeaseId::new(&k);
    let d = s.admit(&admit(&fifth, 301)).await;
    assert_eq!(denial(&d).0, Denial::BalanceCommitted, "{d:?}");
    let d = s.admit(&admit(&fifth, 300)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.balance_remaining, Some(700));
    s.cleanup().await;
}

/// Seeded near-limit balances (as a database holding them would hand them over): the
/// live balance is held within ±MAX_TOTAL instead of wrapping or losing precision, every
/// report is recorded once, and a report the script refuses changes nothing, so its
/// retry is recorded rather than answered "duplicate".
async fn live_balances_never_wrap_and_no_report_is_lost(kind: Kind) {
    use keyward::money::MAX_TOTAL;
    let s = Store::new(kind).await;
    fn with(lease: &LeaseId, credited: i64, used: i64, version: i64) -> AdmitRequest<'_> {
        AdmitRequest {
            balance: Some(BalanceSnapshot {
                credited,
                used,
                version,
            }),
            ..request(lease)
        }
    }
    // A balance at the top of the range: kept exactly, and debited exactly.
    let k = key();
    let a = LeaseId::new(&k);
    let d = s.admit(&with(&a, MAX_TOTAL, 0, 0)).await;
    assert_eq!(d.usage.balance_remaining, Some(MAX_TOTAL));
    let r = report(&a, Some((1, 1)), 1);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Recorded);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Duplicate);
    let b = LeaseId::new(&k);
    let d = s.admit(&with(&b, MAX_TOTAL, 0, 0)).await;
    assert_eq!(d.usage.balance_remaining, Some(MAX_TOTAL - 1));

    // Extremes that overflow an i64 when subtracted: refused as exhausted, not wrapped
    // into a huge positive balance.
    let k = key();
    let c = LeaseId::new(&k);
    let d = s.admit(&with(&c, -2, i64::MAX, 0)).await;
    assert_eq!(denial(&d).0, Denial::BalanceExhausted);
    assert!(d.usage.balance_remaining.unwrap() <= 0, "{d:?}");
    // A credit taking it past the top: held at the top.
    let e = LeaseId::new(&k);
    let d = s.admit(&with(&e, i64::MAX, i64::MIN, 1)).await;
    assert!(admitted(&d), "{d:?}");
    assert!(d.usage.balance_remaining.unwrap() <= MAX_TOTAL);
    s.counters
        .report(&report(&e, None, keyward::money::MAX_REPORT_MICROS))
        .await
        .unwrap();

    if let Some((url, prefix)) = &s.redis {
        // A live balance the script cannot read: the report fails before it writes
        // anything, and once the balance is repaired its retry is recorded, once.
        let k = key();
        let f = LeaseId::new(&k);
        assert!(admitted(&s.admit(&with(&f, 1_000_000, 0, 0)).await));
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let bal = common::redis::client_key(prefix, &k, "bal");
        let _: () = redis::cmd("HSET")
            .arg(&bal)
            .arg("rem")
            .arg("garbage")
            .query_async(&mut conn)
            .await
            .unwrap();
        let before = s.queued().await.len();
        let r = report(&f, Some((5, 5)), 10);
        assert!(s.counters.report(&r).await.is_err());
        assert_eq!(s.queued().await.len(), before, "nothing was queued");
        let _: () = redis::cmd("HSET")
            .arg(&bal)
            .arg("rem")
            .arg("1000000")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Recorded);
        assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Duplicate);
        let rem: i64 = redis::cmd("HGET")
            .arg(&bal)
            .arg("rem")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(rem, 999_990);
        let queued = s.queued().await;
        assert_eq!(queued.len(), before + 1);
        assert_eq!(queued.last().unwrap().cost_micros, 10);
    }
    s.cleanup().await;
}

#[tokio::test]
async fn scripts_assert_their_inputs() {
    let url = common::redis_url();
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let prefix = common::unique_prefix();
    let keys = AdmitKeys::new(&KeySpace::new(&prefix, 1), 0, &key());
    // A negative limit and a missing lease token are refused before anything is written.
    let script = redis::Script::new(source::ADMIT);
    // Valid arguments but for the ones a case names.
    let args = |rpm_limit, balance_tracked, lease_token, light| AdmitArgs {
        rpm_limit,
        tpm_limit: 0,
        concurrency_limit: 1,
        tokens: 0,
        lease_token,
        lease_ttl_ms: 1000,
        lease_meta: "||".into(),
        balance_tracked,
        credited: 0,
        used: 0,
        balance_version: 0,
        time_shift_ms: 0,
        hold: 0,
        now_ms: 0,
        guard_ttl_ms: 60_000,
        light,
    };
    let mut call = script.prepare_invoke();
    keys.push(&mut call);
    args(-1, false, "", false).push(&mut call);
    let result: redis::RedisResult<Vec<i64>> = call.invoke_async(&mut conn).await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("rpm limit"), "{error}");
    // A light admission (no lease record) of a key whose leases hold a balance is refused
    // too.
    let mut call = script.prepare_invoke();
    keys.push(&mut call);
    args(0, true, "t", true).push(&mut call);
    let result: redis::RedisResult<Vec<i64>> = call.invoke_async(&mut conn).await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("light"), "{error}");
    // The window script refuses negative tokens, and a slot without a lease token, before
    // it writes anything either.
    let script = redis::Script::new(source::ADMIT_WINDOW);
    for (tokens, lease_token) in [(-1, "t"), (0, "")] {
        let mut call = script.prepare_invoke();
        AdmitWindowKeys {
            rpm: keys.rpm.clone(),
            leases: keys.leases.clone(),
            ld: keys.ld.clone(),
        }
        .push(&mut call);
        AdmitWindowArgs {
            rpm_limit: 10,
            tpm_limit: 100,
            tokens,
            lease_ttl_ms: 1000,
            time_shift_ms: 0,
            now_ms: 0,
            concurrency_limit: 1,
            lease_token,
        }
        .push(&mut call);
        let result: redis::RedisResult<Vec<i64>> = call.invoke_async(&mut conn).await;
        let error = result.unwrap_err().to_string();
        assert!(error.contains("arguments"), "{error}");
    }
    let written: i64 = redis::cmd("EXISTS")
        .arg(&keys.all()[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(written, 0);
}

#[tokio::test]
async fn lost_scripts_are_reloaded() {
    // A private Redis, so flushing its scripts touches nobody else.
    let private = common::PrivateRedis::start().await;
    let counters = RedisCounters::connect(&private.url, "kw", 600_000)
        .await
        .unwrap();
    let k = key();
    // Counted leases (a concurrency limit), so the answer tells both admissions apart.
    let counted = |lease| AdmitRequest {
        concurrency: Some(10),
        ..request(lease)
    };
    let lease = LeaseId::new(&k);
    assert!(admitted(&counters.admit(&counted(&lease)).await.unwrap()));
    let client = redis::Client::open(private.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let lease = LeaseId::new(&k);
    let d = counters.admit(&counted(&lease)).await.unwrap();
    assert!(admitted(&d), "NOSCRIPT was not handled");
    assert_eq!(d.usage.in_flight, 2);
    counters.ready().await.unwrap();
}

fn candidate(
    provider: &str,
    priority: i64,
    max_rpm: Option<i64>,
    max_tpm: Option<i64>,
) -> Candidate {
    Candidate {
        id: uuid::Uuid::new_v4().to_string(),
        provider: provider.to_string(),
        label: format!("p{priority}"),
        priority,
        max_rpm,
        max_tpm,
        value: "sk-upstream".to_string(),
    }
}

/// Picks from these candidates, as the pool cache would hand them over.
async fn pick(s: &Store, pool: &[Candidate], tokens: i64) -> Pick {
    let pool = Roster::new(pool.to_vec());
    let request = SelectRequest {
        provider: &pool[0].provider,
        candidates: &pool,
        tokens,
    };
    s.counters.select(&request).await.unwrap()
}

async fn picked_id(s: &Store, pool: &[Candidate], tokens: i64) -> String {
    match pick(s, pool, tokens).await {
        Pick::Picked(i) => pool[i].id.clone(),
        other => panic!("nothing picked: {other:?}"),
    }
}

/// A report on a provider key only (no lease), e.g. an upstream 429.
fn pool_report(id: &str, cooldown_ms: i64, suspend_ms: i64) -> Report {
    Report {
        lease: None,
        id: uuid::Uuid::new_v4().to_string(),
        tokens: None,
        cost_micros: 0,
        model: None,
        provider_key_id: Some(id.to_string()),
        provider: None,
        latency_ms: None,
        upstream_status: Some(429),
        cooldown_ms,
        suspend_ms,
        source: "data-token".into(),
        learned: None,
        lease_expires_at_ms: 0,
        token_classes: Default::default(),
        usage_source: Default::default(),
        spend_now: Vec::new(),
    }
}

async fn selection_goes_by_priority_then_least_recently_picked(kind: Kind) {
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let pool = vec![
        candidate(&provider, 0, None, None),
        candidate(&provider, 0, None, None),
        candidate(&provider, 0, None, None),
        candidate(&provider, 1, None, None),
    ];
    // Never-picked keys first (in their given order), then the least recently picked.
    let mut picks = Vec::new();
    for _ in 0..6 {
        picks.push(picked_id(&s, &pool, 0).await);
        s.advance(5);
    }
    let ids: Vec<&str> = pool.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(picks, [ids[0], ids[1], ids[2], ids[0], ids[1], ids[2]]);
    // The lower priority only when every key of the higher one is unusable.
    for c in &pool[..3] {
        s.counters
            .report(&Report {
                // The data plane names the provider (its pool's keys are under its tag).
                provider: Some(provider.clone()),
                ..pool_report(&c.id, 10_000, 0)
            })
            .await
            .unwrap();
    }
    assert_eq!(picked_id(&s, &pool, 0).await, ids[3]);
    s.cleanup().await;
}

async fn pool_changes_apply_at_once_and_keep_pick_history(kind: Kind) {
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let mut pool: Vec<Candidate> = (0..3)
        .map(|_| candidate(&provider, 0, None, None))
        .collect();
    let ids: Vec<String> = pool.iter().map(|c| c.id.clone()).collect();
    for expected in &ids[..2] {
        assert_eq!(&picked_id(&s, &pool, 0).await, expected);
        s.advance(5);
    }
    // A key joins: the next call sees it (Redis resyncs the pool), and the keys already
    // picked keep their history: never-picked ones first, then the least recently picked.
    pool.push(candidate(&provider, 0, None, None));
    let mut picks = Vec::new();
    for _ in 0..4 {
        picks.push(picked_id(&s, &pool, 0).await);
        s.advance(5);
    }
    assert_eq!(
        picks,
        [&ids[2], &pool[3].id, &ids[0], &ids[1]].map(String::clone)
    );
    // A priority change applies to the very next pick.
    pool[2].priority = -1;
    for _ in 0..2 {
        assert_eq!(picked_id(&s, &pool, 0).await, ids[2]);
        s.advance(5);
    }
    // A key that leaves the pool is never picked again.
    pool.remove(2);
    for _ in 0..3 {
        assert_ne!(picked_id(&s, &pool, 0).await, ids[2]);
        s.advance(5);
    }
    s.cleanup().await;
}

async fn full_provider_keys_are_skipped_until_their_window_has_room(kind: Kind) {
    let s = Store::new(kind).await;
    align(&s, 200).await;
    let provider = common::unique_prefix();
    let pool = vec![
        candidate(&provider, 0, Some(1), Some(100)),
        candidate(&provider, 1, None, None),
    ];
    assert_eq!(picked_id(&s, &pool, 10).await, pool[0].id);
    assert_eq!(
        picked_id(&s, &pool, 10).await,
        pool[1].id,
        "a key at its RPM is skipped"
    );
    s.advance(61_000);
    assert_eq!(
        picked_id(&s, &pool, 10).await,
        pool[0].id,
        "back once its window has room"
    );
    // TPM: the estimate must fit too.
    let tpm_only = vec![candidate(&provider, 0, None, Some(100)), pool[1].clone()];
    assert_eq!(picked_id(&s, &tpm_only, 80).await, tpm_only[0].id);
    assert_eq!(
        picked_id(&s, &tpm_only, 30).await,
        pool[1].id,
        "80 + 30 > 100"
    );
    assert_eq!(
        picked_id(&s, &tpm_only, 20).await,
        tpm_only[0].id,
        "80 + 20 fits"
    );
    // A key that can never take the estimate is skipped, even one never picked before.
    let small = vec![candidate(&provider, 0, None, Some(100)), pool[1].clone()];
    assert_eq!(picked_id(&s, &small, 150).await, pool[1].id, "150 > 100");
    s.cleanup().await;
}

async fn a_report_cools_a_key_not_picked_since_start(kind: Kind) {
    // After a restart the twin has picked nothing yet; the report names the provider.
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let pool = vec![
        candidate(&provider, 0, None, None),
        candidate(&provider, 0, None, None),
    ];
    let r = Report {
        provider: Some(provider.clone()),
        ..pool_report(&pool[0].id, 20_000, 0)
    };
    s.counters.report(&r).await.unwrap();
    for _ in 0..2 {
        assert_eq!(picked_id(&s, &pool, 0).await, pool[1].id);
        s.advance(5);
    }
    s.advance(20_000);
    assert_eq!(picked_id(&s, &pool, 0).await, pool[0].id);
    s.cleanup().await;
}

async fn cooling_and_suspended_keys_are_skipped_until_they_recover(kind: Kind) {
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let pool = vec![
        candidate(&provider, 0, None, None),
        candidate(&provider, 0, None, None),
    ];
    // The twin learns which provider a key belongs to when it is first picked.
    picked_id(&s, &pool, 0).await;
    picked_id(&s, &pool, 0).await;
    s.counters
        .report(&Report {
            provider: Some(provider.clone()),
            ..pool_report(&pool[0].id, 30_000, 0)
        })
        .await
        .unwrap();
    s.counters
        .report(&Report {
            provider: Some(provider.clone()),
            ..pool_report(&pool[1].id, 0, 600_000)
        })
        .await
        .unwrap();
    match pick(&s, &pool, 0).await {
        Pick::Exhausted { retry_after_ms } => assert!(
            (29_000..=30_000).contains(&retry_after_ms),
            "earliest recovery is the cooldown: {retry_after_ms}"
        ),
        other => panic!("{other:?}"),
    }
    s.advance(30_000);
    assert_eq!(
        picked_id(&s, &pool, 0).await,
        pool[0].id,
        "the cooldown ended"
    );
    assert_eq!(
        picked_id(&s, &pool, 0).await,
        pool[0].id,
        "the suspended key stays out"
    );
    s.advance(570_001);
    assert_eq!(
        picked_id(&s, &pool, 0).await,
        pool[1].id,
        "a suspension ends by itself"
    );
    s.cleanup().await;
}

async fn a_pool_refusal_leaves_the_client_untouched(kind: Kind) {
    let s = Store::new(kind).await;
    align(&s, 100).await;
    let provider = common::unique_prefix();
    let pool = Roster::new(vec![candidate(&provider, 0, Some(1), None)]);
    assert_eq!(picked_id(&s, &pool, 0).await, pool[0].id);
    let k = key();
    let client = |lease| AdmitRequest {
        rpm: Some(10),
        tpm: Some(1_000),
        concurrency: Some(3),
        tokens: 100,
        pool: Some(&pool),
        ..request(lease)
    };
    let lease = LeaseId::new(&k);
    let d = s.admit(&client(&lease)).await;
    let (reason, retry) = denial(&d);
    assert_eq!(reason, Denial::PoolExhausted);
    assert!(retry.unwrap() > 59_000);
    assert_eq!(
        (
            d.usage.requests_used,
            d.usage.tokens_used,
            d.usage.in_flight
        ),
        (0, 0, 0)
    );
    assert_eq!(d.picked, None);
    // Without the pool the same request goes through, and is the first one counted.
    let lease = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            pool: None,
            ..client(&lease)
        })
        .await;
    assert!(admitted(&d));
    assert_eq!(
        (
            d.usage.requests_used,
            d.usage.tokens_used,
            d.usage.in_flight
        ),
        (1, 100, 1)
    );
    s.cleanup().await;
}

/// A lease's provider-key part (in Redis `lua/pool_report.lua`, sent beside report.lua
/// without waiting for its answer) runs once, however late the repeat, and not at all for
/// a report refused as too late; a lease renewed past its signed expiry and reported
/// later than the guard ttl after it is recorded without it.
async fn a_leases_provider_key_part_runs_once_and_never_too_late(kind: Kind) {
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let pool = Roster::new(vec![candidate(&provider, 0, None, None)]);
    let k = key();
    let a_429 = |(lease, expiry): &(LeaseId, i64)| Report {
        provider_key_id: Some(pool[0].id.clone()),
        provider: Some(provider.clone()),
        upstream_status: Some(429),
        cooldown_ms: 30_000,
        lease_expires_at_ms: *expiry,
        ..report(lease, None, 0)
    };

    let first = admitted_with_pick(&s, &pool, &k).await;
    let r = a_429(&first);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Recorded);
    assert!(cooling(&s, &pool).await, "the 429 cools the key down");
    s.counters
        .reset_provider_key(&provider, &pool[0].id)
        .await
        .unwrap();
    // Longer than a cluster client's resend window (the guard's 2 minutes before): the
    // repeat is a duplicate on both sides.
    s.advance(180_000);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Duplicate);
    assert!(
        !cooling(&s, &pool).await,
        "a repeat cools nothing down again"
    );

    // Too late: refused on both sides.
    let second = admitted_with_pick(&s, &pool, &k).await;
    s.advance(300_000 + 600_000 + 1);
    let r = a_429(&second);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::TooLate);
    assert!(
        !cooling(&s, &pool).await,
        "a report refused as too late cools nothing down"
    );

    // A lease whose pick took nothing there (admitted while Redis failed): its report's
    // provider key part has nothing to do but still runs once, so a repeat saying more
    // (a 429 this time) changes nothing either.
    let (lease, expiry) = admitted_with_pick(&s, &pool, &k).await;
    let untaken = LeaseId {
        taken: None,
        ..lease
    };
    let quiet = Report {
        upstream_status: Some(200),
        cooldown_ms: 0,
        ..a_429(&(untaken.clone(), expiry))
    };
    assert_eq!(s.counters.report(&quiet).await.unwrap(), Reported::Recorded);
    let r = a_429(&(untaken, expiry));
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Duplicate);
    assert!(
        !cooling(&s, &pool).await,
        "a repeat saying more changes nothing"
    );

    // Renewed past its signed expiry and reported later than the guard ttl after it.
    let third = admitted_with_pick(&s, &pool, &k).await;
    assert!(s
        .counters
        .renew(&third.0, 1_500_000)
        .await
        .unwrap()
        .is_some());
    s.advance(300_000 + 600_000 + 1);
    let r = a_429(&third);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Recorded);
    assert!(
        !cooling(&s, &pool).await,
        "its provider key's part is dropped"
    );
    s.cleanup().await;
}

/// An admission of key `k` with a pick from `pool`: the lease as its signed id carries it
/// (the pick's units and pool), and its expiry.
async fn admitted_with_pick(s: &Store, pool: &Roster, k: &str) -> (LeaseId, i64) {
    let lease = LeaseId::new(k);
    let d = s
        .admit(&AdmitRequest {
            pool: Some(pool),
            ..request(&lease)
        })
        .await;
    let Verdict::Admitted { expires_at_ms } = d.verdict else {
        panic!("{d:?}")
    };
    assert_eq!(d.picked, Some(0), "{d:?}");
    // As the signed lease carries them: the pick, its pool, a light admission's data.
    let lease = LeaseId {
        taken: d.taken,
        pool: d.taken.map(|_| pool[0].provider.clone()),
        light: d.light.clone(),
        ..lease
    };
    (lease, expires_at_ms)
}

/// Whether the pool's one key is cooling down (or suspended) now.
async fn cooling(s: &Store, pool: &[Candidate]) -> bool {
    matches!(pick(s, pool, 0).await, Pick::Exhausted { .. })
}

async fn only_one_request_gets_a_keys_last_unit(kind: Kind) {
    let s = Arc::new(Store::new(kind).await);
    align(&s, 100).await;
    for _ in 0..20 {
        let provider = common::unique_prefix();
        let pool = Arc::new(Roster::new(vec![candidate(&provider, 0, Some(1), None)]));
        let racers: Vec<_> = (0..12)
            .map(|i| {
                let (s, pool) = (s.clone(), pool.clone());
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        matches!(pick(&s, &pool, 0).await, Pick::Picked(_))
                    } else {
                        let lease = LeaseId::new(&uuid::Uuid::new_v4().to_string());
                        let r = AdmitRequest {
                            pool: Some(&pool),
                            ..request(&lease)
                        };
                        admitted(&s.admit(&r).await)
                    }
                })
            })
            .collect();
        let mut winners = 0;
        for r in racers {
            winners += usize::from(r.await.unwrap());
        }
        assert_eq!(winners, 1);
    }
    Arc::into_inner(s).unwrap().cleanup().await;
}

async fn a_sweep_keeps_a_suspension_of_a_key_never_picked(kind: Kind) {
    // A key revoked upstream (401) that this process has not picked since it started:
    // the periodic sweep must not forget the suspension (nor a cooldown), or the key is
    // picked again.
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let pool = vec![
        candidate(&provider, 0, None, None),
        candidate(&provider, 0, None, None),
        candidate(&provider, 0, None, None),
    ];
    for (i, (cooldown, suspend)) in [(0, 600_000), (300_000, 0)].into_iter().enumerate() {
        let r = Report {
            provider: Some(provider.clone()),
            upstream_status: Some(if suspend > 0 { 401 } else { 429 }),
            ..pool_report(&pool[i].id, cooldown, suspend)
        };
        s.counters.report(&r).await.unwrap();
    }
    s.advance(15_000);
    s.counters.sweep();
    for _ in 0..3 {
        assert_eq!(picked_id(&s, &pool, 0).await, pool[2].id);
        s.advance(5);
    }
    s.cleanup().await;
}

async fn a_pool_with_2100_priorities_selects_in_order(kind: Kind) {
    // The admin API allows priorities 0 to 1,000,000, so a pool can hold more distinct
    // priorities than fit beside a millisecond time in a sorted-set score's 53 bits.
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let mut pool: Vec<Candidate> = (0..2_100)
        .map(|p| candidate(&provider, p, None, None))
        .collect();
    // Two keys share the last priority: least recently picked still alternates there.
    pool.push(candidate(&provider, 2_099, None, None));
    assert_eq!(picked_id(&s, &pool, 0).await, pool[0].id);
    for c in &pool[..2_099] {
        let r = Report {
            provider: Some(provider.clone()),
            ..pool_report(&c.id, 600_000, 0)
        };
        s.counters.report(&r).await.unwrap();
    }
    let mut picks = Vec::new();
    for _ in 0..4 {
        picks.push(picked_id(&s, &pool, 0).await);
        s.advance(5);
    }
    let (a, b) = (pool[2_099].id.clone(), pool[2_100].id.clone());
    assert_eq!(picks, [a.clone(), b.clone(), a, b]);
    s.cleanup().await;
}

async fn causes_last_as_long_as_cooldowns_and_reset_clears_both(kind: Kind) {
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let pool = vec![
        candidate(&provider, 0, None, None),
        candidate(&provider, 1, None, None),
    ];
    let ids: Vec<String> = pool.iter().map(|c| c.id.clone()).collect();
    let state = || s.counters.pool_state(&provider, &ids);
    // A 429 from a lease (with an overlong source: it is cut), then a 401 on the same key.
    let long = format!("lease {}", "x".repeat(1_000));
    let cooled = Report {
        provider: Some(provider.clone()),
        source: long,
        ..pool_report(&ids[0], 10_000, 0)
    };
    s.counters.report(&cooled).await.unwrap();
    s.advance(1_000);
    let suspended = Report {
        provider: Some(provider.clone()),
        upstream_status: Some(401),
        ..pool_report(&ids[0], 0, 60_000)
    };
    s.counters.report(&suspended).await.unwrap();
    let live = state().await.unwrap();
    let cd = live[0].cooldown_cause.clone().expect("a cooldown cause");
    let susp = live[0]
        .suspension_cause
        .clone()
        .expect("a suspension cause");
    assert_eq!(
        (cd.upstream_status, susp.upstream_status),
        (Some(429), Some(401))
    );
    assert_eq!(cd.source.len(), keyward::pool::MAX_CAUSE_SOURCE);
    assert!(cd.source.starts_with("lease xxx"));
    assert_eq!(susp.source, "data-token");
    assert!(
        (900..=1_100).contains(&(susp.at_ms - cd.at_ms)),
        "{cd:?} {susp:?}"
    );
    assert_eq!(live[1], keyward::pool::LiveState::default());
    // The cooldown ends: its cause is no longer shown; the suspension's still is.
    s.advance(9_500);
    let live = state().await.unwrap();
    assert_eq!(
        (
            live[0].cooldown_remaining_ms,
            live[0].cooldown_cause.is_none()
        ),
        (0, true)
    );
    assert!(live[0].suspension_cause.is_some());
    assert_eq!(picked_id(&s, &pool, 0).await, ids[1]);
    // Reset: usable at once, nothing shown.
    s.counters
        .reset_provider_key(&provider, &ids[0])
        .await
        .unwrap();
    let live = state().await.unwrap();
    assert_eq!(
        (
            live[0].suspended_remaining_ms,
            live[0].suspension_cause.is_none()
        ),
        (0, true)
    );
    assert_eq!(picked_id(&s, &pool, 0).await, ids[0]);
    s.cleanup().await;
}

/// What rate-limit headers said: a used-up limit cools the key until its reset (only
/// ever lengthening a cooldown), the cause says so, and the last snapshot is shown for
/// [`learned::KEEP_MS`] (or until a later reset), on both stores alike.
async fn learned_limits_cool_a_used_up_key_and_are_shown_for_a_while(kind: Kind) {
    use keyward::pool::learned::{self, LearnedLimits};
    let s = Store::new(kind).await;
    let provider = common::unique_prefix();
    let pool = vec![
        candidate(&provider, 0, None, None),
        candidate(&provider, 1, None, None),
    ];
    let ids: Vec<String> = pool.iter().map(|c| c.id.clone()).collect();
    let learned = |requests: i64, reset_ms: i64| Report {
        provider: Some(provider.clone()),
        upstream_status: Some(200),
        learned: Some(LearnedLimits {
            remaining_requests: Some(requests),
            remaining_tokens: Some(5_000),
            requests_reset_ms: Some(reset_ms),
            tokens_reset_ms: Some(60_000),
        }),
        ..pool_report(&ids[0], 0, 0)
    };
    // Requests left: no cooldown, the snapshot is shown.
    s.counters.report(&learned(7, 20_000)).await.unwrap();
    let live = s.counters.pool_state(&provider, &ids).await.unwrap();
    let seen = live[0].learned.expect("a snapshot");
    assert_eq!(seen.limits.remaining_requests, Some(7));
    assert_eq!(seen.limits.tokens_reset_ms, Some(60_000));
    assert_eq!((live[0].cooldown_remaining_ms, live[1].learned), (0, None));
    assert_eq!(picked_id(&s, &pool, 0).await, ids[0]);
    // Used up, reset in 20 s: skipped until then.
    s.counters.report(&learned(0, 20_000)).await.unwrap();
    let live = s.counters.pool_state(&provider, &ids).await.unwrap();
    assert!((19_000..=20_000).contains(&live[0].cooldown_remaining_ms));
    let cause = live[0].cooldown_cause.clone().expect("a cause");
    assert!(cause.from_headers, "{cause:?}");
    assert_eq!(cause.upstream_status, Some(200));
    assert_eq!(live[0].learned.unwrap().limits.remaining_requests, Some(0));
    assert_eq!(picked_id(&s, &pool, 0).await, ids[1]);
    // A shorter learned reset does not shorten it.
    s.counters.report(&learned(0, 1_000)).await.unwrap();
    s.advance(2_000);
    assert_eq!(picked_id(&s, &pool, 0).await, ids[1]);
    // An upstream 429 with used-up headers keeps its own cooldown (and cause).
    let refused = Report {
        upstream_status: Some(429),
        cooldown_ms: 30_000,
        ..learned(0, 5_000)
    };
    assert_eq!(refused.learned_cooldown_ms(), 0);
    s.counters.report(&refused).await.unwrap();
    let live = s.counters.pool_state(&provider, &ids).await.unwrap();
    let cause = live[0].cooldown_cause.clone().unwrap();
    assert_eq!(
        (cause.upstream_status, cause.from_headers),
        (Some(429), false)
    );
    assert!(live[0].cooldown_remaining_ms > 25_000);
    // Back after the cooldown; the snapshot stays until its keep time.
    s.advance(31_000);
    assert_eq!(picked_id(&s, &pool, 0).await, ids[0]);
    s.counters.sweep();
    let live = s.counters.pool_state(&provider, &ids).await.unwrap();
    assert!(live[0].learned.is_some() && live[0].cooldown_cause.is_none());
    s.advance(learned::KEEP_MS);
    s.counters.sweep();
    let live = s.counters.pool_state(&provider, &ids).await.unwrap();
    assert_eq!(live[0].learned, None);
    // A reset forgets the snapshot too.
    s.counters.report(&learned(0, 20_000)).await.unwrap();
    s.counters
        .reset_provider_key(&provider, &ids[0])
        .await
        .unwrap();
    let live = s.counters.pool_state(&provider, &ids).await.unwrap();
    assert_eq!((live[0].cooldown_remaining_ms, live[0].learned), (0, None));
    s.cleanup().await;
}

/// Whether Redis holds the lease set or the lease data of `key_id` (a key without a user);
/// `None` for the twin.
async fn lease_keys_exist(s: &Store, key_id: &str) -> Option<(bool, bool)> {
    let Counters::Redis(redis) = &s.counters else {
        return None;
    };
    let mut conn = redis.conn().await.unwrap();
    let (leases, ld): (bool, bool) = redis::pipe()
        .cmd("EXISTS")
        .arg(redis.key(key_id, "leases"))
        .cmd("EXISTS")
        .arg(redis.key(key_id, "ld"))
        .query_async(&mut conn)
        .await
        .unwrap();
    Some((leases, ld))
}

/// Whether Redis holds `lease` (of a key without a user) in its key's lease set, and its
/// record in `ld`; `None` for the twin.
async fn lease_stored(s: &Store, lease: &LeaseId) -> Option<(bool, bool)> {
    let Counters::Redis(redis) = &s.counters else {
        return None;
    };
    let mut conn = redis.conn().await.unwrap();
    let (member, record): (Option<f64>, bool) = redis::pipe()
        .cmd("ZSCORE")
        .arg(redis.key(&lease.key_id, "leases"))
        .arg(&lease.token)
        .cmd("HEXISTS")
        .arg(redis.key(&lease.key_id, "ld"))
        .arg(&lease.token)
        .query_async(&mut conn)
        .await
        .unwrap();
    Some((member.is_some(), record))
}

/// A key with a concurrency limit but no balance or corrected quota entry admits light
/// with a slot (`lua/admit_window.lua` in Redis): its lease is a member of the lease set
/// without a record, counted as any. A report frees the slot once (its repeat frees
/// nothing), an unreported lease frees it at its expiry, a renewal keeps it past its
/// signed expiry. Admissions that keep a record (`lua/admit.lua`) count the same slots;
/// one that expired unreported is left by the window script's purge for its report
/// (which settles it from its record) or for admit.lua's purge (which moves its record to
/// `lx`, whence its late report settles it).
async fn a_light_lease_holds_its_slot_until_reported_or_expired(kind: Kind) {
    let s = Store::new(kind).await;
    let redis = !matches!(kind, Kind::Memory);
    let k = key();
    fn slots(lease: &LeaseId) -> AdmitRequest<'_> {
        AdmitRequest {
            rpm: Some(100),
            tpm: Some(100_000),
            concurrency: Some(2),
            tokens: 100,
            lease_ttl_ms: 10_000,
            ..request(lease)
        }
    }
    // Names too long for a light lease to carry: the admission keeps a record.
    const LONG: &str = "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm";
    fn recorded(lease: &LeaseId) -> AdmitRequest<'_> {
        AdmitRequest {
            model: LONG,
            ..slots(lease)
        }
    }
    align(&s, 100).await;
    let before = window_calls();
    let (a, b, c) = (LeaseId::new(&k), LeaseId::new(&k), LeaseId::new(&k));
    for (lease, n) in [(&a, 1), (&b, 2)] {
        let d = s.admit(&slots(lease)).await;
        assert!(admitted(&d) && d.light.is_some(), "{d:?}");
        assert_eq!(d.usage.in_flight, n);
        assert_eq!(
            lease_stored(&s, lease).await,
            redis.then_some((true, false))
        );
    }
    let d = s.admit(&slots(&c)).await;
    let (reason, retry) = denial(&d);
    assert_eq!((reason, d.usage.in_flight), (Denial::Concurrency, 2));
    assert!((9_000..=10_000).contains(&retry.unwrap()), "{retry:?}");
    // A report frees its slot, once: its repeat frees nothing.
    for expected in [Reported::Recorded, Reported::Duplicate] {
        let reported = s.counters.report(&report(&a, Some((10, 10)), 0)).await;
        assert_eq!(reported.unwrap(), expected);
    }
    assert_eq!(lease_stored(&s, &a).await, redis.then_some((false, false)));
    let d = s.admit(&slots(&c)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.in_flight, 2);
    let d = s.admit(&slots(&LeaseId::new(&k))).await;
    assert_eq!(denial(&d).0, Denial::Concurrency);
    // A renewal keeps c past its signed expiry; b, unreported, frees its slot at its
    // expiry, and leaves the lease set with the next second's first decision.
    s.advance(5_000);
    assert!(s.renew(&c, 10_000).await.unwrap().is_some());
    s.advance(5_500);
    assert_eq!(s.renew(&b, 10_000).await.unwrap(), None, "expired");
    let e = LeaseId::new(&k);
    let d = s.admit(&slots(&e)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.in_flight, 2);
    assert_eq!(lease_stored(&s, &b).await, redis.then_some((false, false)));
    let (reason, retry) = denial(&s.admit(&slots(&LeaseId::new(&k))).await);
    assert_eq!(reason, Denial::Concurrency);
    // c, renewed at 5.1 s for 10 s, is the first live lease to expire: 4.5 s on.
    assert!((4_000..=4_500).contains(&retry.unwrap()), "{retry:?}");
    // An admission with a record counts the light leases, and they count it.
    let d = s.admit(&recorded(&LeaseId::new(&k))).await;
    assert_eq!((denial(&d).0, d.usage.in_flight), (Denial::Concurrency, 2));
    s.counters.report(&report(&e, None, 0)).await.unwrap();
    let r = LeaseId::new(&k);
    let d = s.admit(&recorded(&r)).await;
    assert!(admitted(&d) && d.light.is_none(), "{d:?}");
    assert_eq!(d.usage.in_flight, 2);
    assert_eq!(lease_stored(&s, &r).await, redis.then_some((true, true)));
    if let Counters::Redis(redis) = &s.counters {
        // The first record, while light leases keep the set live: ld expires with it.
        let mut conn = redis.conn().await.unwrap();
        let ttl: (i64, i64) = redis::pipe()
            .cmd("PTTL")
            .arg(redis.key(&k, "ld"))
            .cmd("PTTL")
            .arg(redis.key(&k, "leases"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl.0 >= ttl.1 && ttl.1 > 0, "{ttl:?}");
    }
    let d = s.admit(&slots(&LeaseId::new(&k))).await;
    assert_eq!((denial(&d).0, d.usage.in_flight), (Denial::Concurrency, 2));
    // Both expire unreported. The window script's purge removes c, not r: its record
    // waits for its report or admit.lua's purge, counted nowhere meanwhile.
    s.advance(20_000);
    let g = LeaseId::new(&k);
    let d = s.admit(&slots(&g)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(d.usage.in_flight, 1);
    assert_eq!(lease_stored(&s, &c).await, redis.then_some((false, false)));
    assert_eq!(lease_stored(&s, &r).await, redis.then_some((true, true)));
    // Its late report settles it from its record (the model it was admitted for).
    let reported = s.counters.report(&report(&r, Some((1, 1)), 7)).await;
    assert_eq!(reported.unwrap(), Reported::Recorded);
    assert_eq!(lease_stored(&s, &r).await, redis.then_some((false, false)));
    // Another one left so is purged by admit.lua's first decision of a second (its
    // record moves to lx), and its late report settles from there.
    let r2 = LeaseId::new(&k);
    assert!(admitted(&s.admit(&recorded(&r2)).await));
    s.advance(20_000);
    let d = s.admit(&slots(&LeaseId::new(&k))).await;
    assert_eq!(d.usage.in_flight, 1);
    assert_eq!(lease_stored(&s, &g).await, redis.then_some((false, false)));
    assert_eq!(lease_stored(&s, &r2).await, redis.then_some((true, true)));
    s.advance(1_000);
    let d = s.admit(&recorded(&LeaseId::new(&k))).await;
    assert_eq!(d.usage.in_flight, 2);
    assert_eq!(lease_stored(&s, &r2).await, redis.then_some((false, false)));
    let reported = s.counters.report(&report(&r2, None, 0)).await;
    assert_eq!(reported.unwrap(), Reported::Recorded);
    let queued = s.queued().await;
    for lease in [&r, &r2] {
        let rec = queued.iter().find(|q| q.id == lease.to_string()).unwrap();
        assert_eq!(rec.model.as_deref(), Some(LONG));
    }
    if redis {
        // The light decisions took the window script.
        assert!(window_calls() - before >= 10, "{}", window_calls() - before);
    }
    s.cleanup().await;
}

/// A key without a balance or a quota entry its report corrects admits "light": no lease
/// record (without a concurrency limit neither the lease set nor its data exist after
/// it, and no lease is counted); its signed lease carries its second, its tokens and its
/// names, and its report settles the tokens in the window and records the names all the
/// same. A key with a concurrency limit counts its light leases in the lease set, still
/// with no data in `ld`.
async fn a_light_admission_writes_no_lease_record_and_its_report_settles_its_tokens(kind: Kind) {
    let s = Store::new(kind).await;
    let redis = !matches!(kind, Kind::Memory);
    let k = key();
    let light = |lease| AdmitRequest {
        rpm: Some(100),
        tpm: Some(1_000),
        tokens: 100,
        ..request(lease)
    };
    let a = LeaseId::new(&k);
    let d = s.admit(&light(&a)).await;
    assert!(admitted(&d), "{d:?}");
    let carried = d.light.clone().expect("a light admission");
    assert_eq!(carried.second, d.usage.now_ms.div_euclid(1000));
    assert_eq!(carried.kt, Some(100));
    assert_eq!(carried.meta, "openai|gpt-4o|openai_chat");
    assert_eq!((d.usage.tokens_used, d.usage.in_flight), (100, 0));
    assert_eq!(
        lease_keys_exist(&s, &k).await,
        redis.then_some((false, false))
    );
    // Reported with 30 + 10 tokens: the window holds 40 of the 100 reserved.
    assert_eq!(
        s.counters
            .report(&report(&a, Some((30, 10)), 5))
            .await
            .unwrap(),
        Reported::Recorded
    );
    assert_eq!(
        s.counters
            .report(&report(&a, Some((30, 10)), 5))
            .await
            .unwrap(),
        Reported::Duplicate
    );
    let b = LeaseId::new(&k);
    let d = s.admit(&light(&b)).await;
    assert_eq!((d.usage.requests_used, d.usage.tokens_used), (2, 140));
    let queued = s.queued().await;
    let rec = queued.iter().find(|r| r.id == a.to_string()).unwrap();
    assert_eq!(
        (
            rec.provider.as_deref(),
            rec.model.as_deref(),
            rec.api_format.as_deref()
        ),
        (Some("openai"), Some("gpt-4o"), Some("openai_chat"))
    );
    assert_eq!(
        (rec.prompt_tokens, rec.completion_tokens, rec.cost_micros),
        (30, 10, 5)
    );
    // Names too long to carry keep a record.
    let long = "m".repeat(120);
    let c = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            model: &long,
            ..light(&c)
        })
        .await;
    assert!(admitted(&d) && d.light.is_none(), "{d:?}");
    assert_eq!(d.usage.in_flight, 1);
    assert_eq!(
        lease_keys_exist(&s, &k).await,
        redis.then_some((true, true))
    );
    // A key with a concurrency limit counts every lease; a light one has no record.
    let k2 = key();
    let counted = |lease| AdmitRequest {
        concurrency: Some(2),
        ..light(lease)
    };
    let (x, y, z) = (LeaseId::new(&k2), LeaseId::new(&k2), LeaseId::new(&k2));
    let d = s.admit(&counted(&x)).await;
    assert!(admitted(&d) && d.light.is_some(), "{d:?}");
    assert_eq!(d.usage.in_flight, 1);
    assert_eq!(
        lease_keys_exist(&s, &k2).await,
        redis.then_some((true, false))
    );
    assert_eq!(s.admit(&counted(&y)).await.usage.in_flight, 2);
    assert_eq!(denial(&s.admit(&counted(&z)).await).0, Denial::Concurrency);
    s.cleanup().await;
}

/// A light lease is in no lease set, yet its renewal works: a report after its signed
/// expiry plus the guard time, but within that of its renewed expiry, is on time; a
/// repeat is a duplicate, and a reported or expired light lease is not renewed.
async fn a_renewed_light_lease_is_reported_on_time_and_once(kind: Kind) {
    const GUARD_MS: i64 = 600_000; // the suite's duplicate-guard time
    let s = Store::new(kind).await;
    let k = key();
    let short = |lease| AdmitRequest {
        lease_ttl_ms: 1_000,
        ..request(lease)
    };
    let (a, b) = (LeaseId::new(&k), LeaseId::new(&k));
    let d = s.admit(&short(&a)).await;
    let Verdict::Admitted { expires_at_ms } = d.verdict else {
        panic!("{d:?}")
    };
    assert!(d.light.is_some());
    assert!(s.admit(&short(&b)).await.light.is_some());
    s.advance(500);
    let renewed = s.renew(&a, 10_000).await.unwrap().unwrap();
    assert!(renewed > expires_at_ms + 9_000, "{renewed} {expires_at_ms}");
    s.advance(1_000);
    // b expired: its renewal is refused; a, renewed, renews again.
    assert_eq!(s.renew(&b, 10_000).await.unwrap(), None);
    let renewed = s.renew(&a, 10_000).await.unwrap().unwrap();
    // Past the signed expiry and its guard, within the guard after the renewed expiry.
    s.advance(GUARD_MS + 1_000);
    let r = Report {
        lease_expires_at_ms: expires_at_ms,
        ..report(&a, Some((1, 1)), 10)
    };
    assert!(s.counters.time_shift().now_ms() > expires_at_ms + GUARD_MS);
    assert!(s.counters.time_shift().now_ms() <= renewed + GUARD_MS);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Recorded);
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::Duplicate);
    // b, never renewed, is too late by now.
    let late = Report {
        lease_expires_at_ms: expires_at_ms,
        ..report(&b, None, 10)
    };
    assert_eq!(s.counters.report(&late).await.unwrap(), Reported::TooLate);
    // A reported light lease is not renewed.
    let c = LeaseId::new(&k);
    assert!(s.admit(&short(&c)).await.light.is_some());
    s.counters.report(&report(&c, None, 0)).await.unwrap();
    assert_eq!(s.renew(&c, 10_000).await.unwrap(), None);
    let queued = s.queued().await;
    assert_eq!(queued.iter().filter(|q| q.id == a.to_string()).count(), 1);
    s.cleanup().await;
}

/// A light admission refused by the pool takes nothing: in Redis its client part (two
/// scripts at once, see `limits::redis::split`) is cancelled with the data its lease
/// would carry, giving back its request and tokens.
async fn a_light_admissions_pool_refusal_gives_back_request_and_tokens(kind: Kind) {
    let s = Store::new(kind).await;
    align(&s, 100).await;
    let provider = common::unique_prefix();
    let pool = Roster::new(vec![candidate(&provider, 0, Some(1), None)]);
    assert_eq!(picked_id(&s, &pool, 0).await, pool[0].id);
    let k = key();
    let client = |lease| AdmitRequest {
        rpm: Some(10),
        tpm: Some(1_000),
        tokens: 100,
        pool: Some(&pool),
        ..request(lease)
    };
    let refused = [LeaseId::new(&k), LeaseId::new(&k)];
    for lease in &refused {
        let d = s.admit(&client(lease)).await;
        assert_eq!(denial(&d).0, Denial::PoolExhausted);
        assert_eq!(d.light, None);
        assert_eq!(
            (
                d.usage.requests_used,
                d.usage.tokens_used,
                d.usage.in_flight
            ),
            (0, 0, 0)
        );
    }
    let lease = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            pool: None,
            ..client(&lease)
        })
        .await;
    assert!(admitted(&d) && d.light.is_some(), "{d:?}");
    assert_eq!(
        (
            d.usage.requests_used,
            d.usage.tokens_used,
            d.usage.in_flight
        ),
        (1, 100, 0)
    );
    s.cleanup().await;
}

/// How many calls of `lua/admit_window.lua` this process made so far (its duration's
/// count; other tests add theirs, so only a lower bound of a test's own).
fn window_calls() -> u64 {
    keyward::metrics::get()
        .script_seconds
        .with_label_values(&["admit_window"])
        .get_sample_count()
}

/// A light key without quota entries is decided by `lua/admit_window.lua`, the same key's
/// admission that keeps a record (here: names too long for its lease to carry) by
/// `lua/admit.lua`: both read and write the same window fields, so a key whose
/// admissions switch scripts mid-window (and back) keeps its counts exact, each script's
/// reports settle in the other's counts, and every second leaves the window on time
/// whichever script settles it.
async fn a_key_switching_between_the_admit_scripts_keeps_its_window_counts_exact(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    fn windows(lease: &LeaseId) -> AdmitRequest<'_> {
        AdmitRequest {
            rpm: Some(6),
            tpm: Some(1_000),
            tokens: 100,
            ..request(lease)
        }
    }
    const LONG: &str = "a-model-name-longer-than-a-light-lease-carries-so-its-admission-keeps-a-record-in-the-store";
    fn counted(lease: &LeaseId) -> AdmitRequest<'_> {
        AdmitRequest {
            concurrency: Some(10),
            model: LONG,
            ..windows(lease)
        }
    }
    let used = |d: &Decision| (d.usage.requests_used, d.usage.tokens_used);
    let b = align(&s, 100).await;
    let before = window_calls();
    // Second b: two light admissions.
    let a1 = LeaseId::new(&k);
    let d = s.admit(&windows(&a1)).await;
    assert!(admitted(&d) && d.light.is_some(), "{d:?}");
    assert_eq!(used(&d), (1, 100));
    let d = s.admit(&windows(&LeaseId::new(&k))).await;
    assert_eq!(used(&d), (2, 200));
    // Second b+1: an admission with a record (admit.lua), counted.
    s.advance(1_000);
    let c1 = LeaseId::new(&k);
    let d = s.admit(&counted(&c1)).await;
    assert!(admitted(&d) && d.light.is_none(), "{d:?}");
    assert_eq!((used(&d), d.usage.in_flight), ((3, 300), 1));
    // 30 of its 100 tokens used: bucket b+1 keeps 30.
    let reported = s.counters.report(&report(&c1, Some((20, 10)), 0)).await;
    assert_eq!(reported.unwrap(), Reported::Recorded);
    // Second b+2: light again, then counted, then light.
    s.advance(1_000);
    let d = s.admit(&windows(&LeaseId::new(&k))).await;
    assert_eq!(used(&d), (4, 330));
    // 50 of a1's 100: bucket b keeps 150.
    let reported = s.counters.report(&report(&a1, Some((50, 0)), 0)).await;
    assert_eq!(reported.unwrap(), Reported::Recorded);
    assert_eq!(used(&s.admit(&counted(&LeaseId::new(&k))).await), (5, 380));
    assert_eq!(used(&s.admit(&windows(&LeaseId::new(&k))).await), (6, 480));
    // Full: room again when second b leaves, at b+61.
    let d = s.admit(&windows(&LeaseId::new(&k))).await;
    let (reason, retry) = denial(&d);
    assert_eq!(reason, Denial::Requests);
    assert_eq!(retry, Some((b + 61) * 1000 - d.usage.now_ms));
    assert_eq!(used(&d), (6, 480));
    let d = s.admit(&counted(&LeaseId::new(&k))).await;
    let wait = (b + 61) * 1000 - d.usage.now_ms;
    assert_eq!(
        (denial(&d), used(&d)),
        ((Denial::Requests, Some(wait)), (6, 480))
    );
    // At b+61 the light script settles second b away (2 requests, 150 tokens) ...
    s.advance(wait);
    let d = s.admit(&windows(&LeaseId::new(&k))).await;
    assert_eq!(d.usage.now_ms.div_euclid(1000), b + 61);
    assert_eq!(used(&d), (5, 430));
    assert_eq!(used(&s.admit(&counted(&LeaseId::new(&k))).await), (6, 530));
    // ... and at b+62 admit.lua settles second b+1 away (1 request, 30 tokens).
    s.advance(1_000);
    let d = s.admit(&counted(&LeaseId::new(&k))).await;
    assert_eq!(used(&d), (6, 600));
    assert_eq!(d.usage.requests_reset_ms, (b + 63) * 1000 - d.usage.now_ms);
    let d = s.admit(&windows(&LeaseId::new(&k))).await;
    assert_eq!(denial(&d).0, Denial::Requests);
    if !matches!(kind, Kind::Memory) {
        // Seven light decisions here took the window script.
        assert!(window_calls() - before >= 7, "{}", window_calls() - before);
    }
    s.cleanup().await;
}
