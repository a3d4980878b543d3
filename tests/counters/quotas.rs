//! Quota entries in the shared behaviour suite (run on the twin, Redis and a Cluster by
//! `on_both_stores!` in `tests/counters.rs`): shared user counters, model entries, all
//! or nothing, UTC day and month resets on the store's clock, the spend bound, seeds.

use keyward::limits::{AdmitRequest, Decision, Denial, LeaseId, QuotaEntry, QuotaKind, QuotaUse};
use keyward::quota::{Period, Scope, ScopeKind};

use super::{admitted, denial, key, report, request, Kind, Store};

pub(super) const DAY: i64 = 86_400_000;

/// A quota entry on a fresh counter.
pub(super) fn entry(kind: QuotaKind, limit: i64) -> QuotaEntry {
    let scope = Scope {
        kind: ScopeKind::User,
        id: uuid::Uuid::new_v4().to_string(),
        model: None,
    };
    QuotaEntry {
        counter: scope.counter_id(),
        kind,
        limit,
        seed: None,
    }
}

pub(super) fn with<'a>(lease: &'a LeaseId, quotas: &'a [QuotaEntry]) -> AdmitRequest<'a> {
    AdmitRequest {
        quotas,
        ..request(lease)
    }
}

pub(super) fn used(d: &Decision) -> Vec<i64> {
    d.quotas.iter().map(|q| q.used).collect()
}

/// The store's clock now (an admission of a key of its own reads it).
pub(super) async fn now(s: &Store) -> i64 {
    s.admit(&request(&LeaseId::new(&key()))).await.usage.now_ms
}

/// One user entry counts the admissions of both its keys.
pub(super) async fn a_user_entry_is_shared_by_its_keys(kind: Kind) {
    let s = Store::new(kind).await;
    let (k1, k2) = (key(), key());
    let user = [entry(QuotaKind::RequestsPerMinute, 3)];
    for k in [&k1, &k2, &k1] {
        let lease = s.user_lease(k);
        assert!(admitted(&s.admit(&with(&lease, &user)).await));
    }
    let lease = s.user_lease(&k2);
    let d = s.admit(&with(&lease, &user)).await;
    assert_eq!(
        denial(&d).0,
        Denial::Quota {
            index: 0,
            exhausted: true
        }
    );
    assert_eq!(used(&d), [3]);
    assert!(d.quotas[0].reset_ms > 59_000, "{d:?}");
    // The key's own windows know nothing of it.
    assert_eq!(d.usage.requests_used, 0);
    s.cleanup().await;
}

/// A key × model entry counts the requests that carry it only (admission adds it for its
/// model alone), beside the key's own entry.
pub(super) async fn a_model_entry_counts_its_model_only(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let own = entry(QuotaKind::RequestsPerDay, 10);
    let model = entry(QuotaKind::RequestsPerDay, 2);
    let for_model = [own.clone(), model.clone()];
    let other = [own.clone()];
    for _ in 0..2 {
        let lease = LeaseId::new(&k);
        assert!(admitted(&s.admit(&with(&lease, &for_model)).await));
    }
    let lease = LeaseId::new(&k);
    let d = s.admit(&with(&lease, &for_model)).await;
    assert_eq!(
        denial(&d).0,
        Denial::Quota {
            index: 1,
            exhausted: true
        }
    );
    assert_eq!(used(&d), [2, 2]);
    let d = s.admit(&with(&lease, &other)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [3]);
    s.cleanup().await;
}

/// A refusal by one entry takes nothing from the others, nor from the key's windows,
/// slots or balance; nor does a pool refusal.
pub(super) async fn a_refusal_by_one_entry_takes_nothing_anywhere(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let quotas = [
        entry(QuotaKind::RequestsPerDay, 100),
        entry(QuotaKind::TokensPerMinute, 100),
        entry(QuotaKind::Spend(Period::Month), 10_000),
        entry(QuotaKind::TokensPerDay, 1_000),
    ];
    fn limited<'a>(lease: &'a LeaseId, quotas: &'a [QuotaEntry], tokens: i64) -> AdmitRequest<'a> {
        AdmitRequest {
            rpm: Some(100),
            tpm: Some(10_000),
            tokens,
            hold_micros: 500,
            ..with(lease, quotas)
        }
    }
    let first = LeaseId::new(&k);
    let d = s.admit(&limited(&first, &quotas, 60)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [1, 60, 500, 60]);
    for _ in 0..3 {
        let lease = LeaseId::new(&k);
        let d = s.admit(&limited(&lease, &quotas, 50)).await;
        assert_eq!(
            denial(&d).0,
            Denial::Quota {
                index: 1,
                exhausted: true
            }
        );
        assert_eq!(used(&d), [1, 60, 500, 60]);
        assert_eq!((d.usage.requests_used, d.usage.in_flight), (1, 1));
    }
    // A pool with no room refuses after every entry passed: nothing is taken either.
    let provider = super::common::unique_prefix();
    let pool =
        keyward::pool::cache::Roster::new(vec![super::candidate(&provider, 0, Some(1), None)]);
    assert!(matches!(
        super::pick(&s, &pool, 0).await,
        keyward::limits::Pick::Picked(0)
    ));
    let lease = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            pool: Some(&pool),
            ..limited(&lease, &quotas, 10)
        })
        .await;
    assert_eq!(denial(&d).0, Denial::PoolExhausted);
    assert_eq!(used(&d), [1, 60, 500, 60]);
    let lease = LeaseId::new(&k);
    let d = s.admit(&limited(&lease, &quotas, 40)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [2, 100, 1_000, 100]);
    s.cleanup().await;
}

/// A day counter resets at the next 00:00 UTC of the store's clock, a month's spend at
/// the first of the next month; each refusal says when.
pub(super) async fn day_and_month_counters_reset_at_utc_boundaries(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let day = [entry(QuotaKind::RequestsPerDay, 2)];
    let t = now(&s).await;
    let midnight = (t.div_euclid(DAY) + 1) * DAY;
    s.advance(midnight - t - 5_000);
    for _ in 0..2 {
        let lease = LeaseId::new(&k);
        assert!(admitted(&s.admit(&with(&lease, &day)).await));
    }
    let lease = LeaseId::new(&k);
    let d = s.admit(&with(&lease, &day)).await;
    let (reason, retry) = denial(&d);
    assert!(matches!(reason, Denial::Quota { index: 0, .. }));
    assert_eq!(retry, Some(midnight - d.usage.now_ms));
    assert_eq!(d.quotas[0].reset_ms, midnight - d.usage.now_ms);
    s.advance(retry.unwrap_or_default());
    let d = s.admit(&with(&lease, &day)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [1], "yesterday's requests do not count");

    let month = [entry(QuotaKind::Spend(Period::Month), 1_000)];
    let t = now(&s).await;
    let first = Period::Month.reset_at_ms(t).unwrap_or_default();
    s.advance(first - t - 5_000);
    let lease = LeaseId::new(&k);
    let d = s
        .admit(&AdmitRequest {
            hold_micros: 1_000,
            ..with(&lease, &month)
        })
        .await;
    assert!(admitted(&d), "{d:?}");
    s.counters
        .report(&report(&lease, None, 1_000))
        .await
        .unwrap();
    let next = LeaseId::new(&k);
    let spend = AdmitRequest {
        hold_micros: 1,
        ..with(&next, &month)
    };
    let d = s.admit(&spend).await;
    let (reason, retry) = denial(&d);
    assert_eq!(
        reason,
        Denial::Quota {
            index: 0,
            exhausted: true
        }
    );
    assert_eq!(retry, Some(first - d.usage.now_ms));
    assert_eq!(used(&d), [1_000]);
    s.advance(retry.unwrap_or_default());
    let d = s.admit(&spend).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [1], "a new month starts from nothing");
    s.cleanup().await;
}

/// Spend passes its limit by at most one request's actual − hold when requests go one at
/// a time; requests in flight hold theirs (a refusal that frees soon), and an expired
/// lease releases its hold.
pub(super) async fn spend_passes_its_limit_only_by_actual_minus_hold(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let limit = [entry(QuotaKind::Spend(Period::Total), 1_000)];
    fn held<'a>(lease: &'a LeaseId, quotas: &'a [QuotaEntry]) -> AdmitRequest<'a> {
        AdmitRequest {
            hold_micros: 300,
            lease_ttl_ms: 10_000,
            ..with(lease, quotas)
        }
    }
    // Three in flight hold 900: a fourth would pass the limit if they cost their holds.
    let leases: Vec<LeaseId> = (0..4).map(|_| LeaseId::new(&k)).collect();
    for lease in &leases[..3] {
        assert!(admitted(&s.admit(&held(lease, &limit)).await));
    }
    let d = s.admit(&held(&leases[3], &limit)).await;
    assert_eq!(
        denial(&d),
        (
            Denial::Quota {
                index: 0,
                exhausted: false
            },
            Some(1_000)
        )
    );
    assert_eq!(
        d.quotas,
        [QuotaUse {
            used: 900,
            reset_ms: 0
        }]
    );
    // They expire unreported: the key's next admission releases their holds.
    s.advance(10_001);
    let d = s.admit(&held(&leases[3], &limit)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [300]);
    // One at a time, each costing 700 for a hold of 300.
    s.counters
        .report(&report(&leases[3], None, 700))
        .await
        .unwrap();
    let second = LeaseId::new(&k);
    let d = s.admit(&held(&second, &limit)).await;
    assert!(admitted(&d), "700 + 300 fits in 1,000: {d:?}");
    s.counters
        .report(&report(&second, None, 700))
        .await
        .unwrap();
    let third = LeaseId::new(&k);
    let d = s.admit(&held(&third, &limit)).await;
    assert_eq!(
        denial(&d),
        (
            Denial::Quota {
                index: 0,
                exhausted: true
            },
            None
        ),
        "a total never resets"
    );
    assert_eq!(used(&d), [1_400], "limit + (700 − 300), and no more");
    s.cleanup().await;
}
