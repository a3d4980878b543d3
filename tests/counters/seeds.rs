//! Seeds and late reports in the shared behaviour suite (run on the twin, Redis and a
//! Cluster by `on_both_stores!` in `tests/counters.rs`): a day or spend counter never
//! reads below its seed of the current period (missing, lost, or drifted below the
//! database), and a report accepted after its lease was purged still adds its cost to
//! the spend counters of now, once.

use keyward::limits::{AdmitRequest, Denial, LeaseId, QuotaEntry, QuotaKind, Report, Reported};
use keyward::quota::Period;

use super::quotas::{entry, now, used, with, DAY};
use super::{admitted, denial, key, report, Kind, Store};

fn seeded(kind: QuotaKind, limit: i64, seed: (i64, i64)) -> QuotaEntry {
    QuotaEntry {
        seed: Some(seed),
        ..entry(kind, limit)
    }
}

/// A spend counter takes the larger of itself and its seed when the seed is the current
/// period's (missing: from the seed), else ignores the seed: so a limit removed and set
/// again sees what was spent meanwhile.
pub(super) async fn spend_counters_never_read_below_their_seed(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let this_month = Period::Month.start_day(now(&s).await.div_euclid(DAY));
    let current = [seeded(
        QuotaKind::Spend(Period::Month),
        1_000,
        (this_month, 900),
    )];
    let hold = |lease, quotas| AdmitRequest {
        hold_micros: 200,
        ..with(lease, quotas)
    };
    let lease = LeaseId::new(&k);
    let d = s.admit(&hold(&lease, &current)).await;
    let full = Denial::Quota {
        index: 0,
        exhausted: true,
    };
    assert_eq!(denial(&d).0, full, "missing: from its seed");
    assert_eq!(used(&d), [900]);
    // Last month's figure is not this month's.
    let stale = [QuotaEntry {
        seed: Some((this_month - 1, 900)),
        ..current[0].clone()
    }];
    let d = s.admit(&hold(&lease, &stale)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [200]);
    s.counters.report(&report(&lease, None, 100)).await.unwrap();
    // The counter exists (spent 100); the database has 900 since (the limit was removed
    // meanwhile, or a report never reached the counter): the counter is raised to it.
    let again = LeaseId::new(&k);
    let d = s.admit(&hold(&again, &current)).await;
    assert_eq!(denial(&d).0, full, "{d:?}");
    assert_eq!(used(&d), [900]);
    // A seed below the counter changes nothing.
    let low = [QuotaEntry {
        seed: Some((this_month, 50)),
        ..current[0].clone()
    }];
    let d = s.admit(&hold(&again, &low)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [300], "spent 100 + held 200");
    s.cleanup().await;
}

/// Day request and token counters are seeded too: a day quota survives a lost counter
/// (a fresh store, an embedded restart) and one that drifted below the database.
pub(super) async fn a_day_quota_survives_a_lost_counter(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let today = now(&s).await.div_euclid(DAY);
    // The database counted 9 requests and 900 tokens today; the store holds nothing.
    let entries = [
        seeded(QuotaKind::RequestsPerDay, 10, (today, 9)),
        seeded(QuotaKind::TokensPerDay, 1_000, (today, 900)),
    ];
    let tokens = |lease, n| AdmitRequest {
        tokens: n,
        ..with(lease, &entries)
    };
    let first = LeaseId::new(&k);
    let d = s.admit(&tokens(&first, 100)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [10, 1_000], "the seeds, then this request");
    let d = s.admit(&tokens(&LeaseId::new(&k), 0)).await;
    assert_eq!(
        denial(&d).0,
        Denial::Quota {
            index: 0,
            exhausted: true
        },
        "the 11th request of the day: {d:?}"
    );
    // Yesterday's figures are not today's.
    let stale = [QuotaEntry {
        seed: Some((today - 1, 10)),
        ..entry(QuotaKind::RequestsPerDay, 10)
    }];
    let d = s.admit(&with(&LeaseId::new(&k), &stale)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [1]);
    s.cleanup().await;
}

/// A report accepted after its lease was purged (its key admitted after the lease
/// expired) adds its cost to the spend counters of now that exist, once; without them
/// (the old code) admission kept admitting past the limit.
pub(super) async fn a_late_report_reaches_the_spend_counters_of_now(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let limit = [entry(QuotaKind::Spend(Period::Day), 1_000)];
    let short = |lease, quotas| AdmitRequest {
        hold_micros: 100,
        lease_ttl_ms: 2_000,
        ..with(lease, quotas)
    };
    let late = LeaseId::new(&k);
    assert!(admitted(&s.admit(&short(&late, &limit)).await));
    s.advance(2_300);
    // The key admits again: its expired lease is purged with its data (and its hold).
    let next = LeaseId::new(&k);
    let d = s.admit(&short(&next, &limit)).await;
    assert_eq!(used(&d), [100], "only the new hold: {d:?}");
    let unknown = entry(QuotaKind::Spend(Period::Day), 1_000);
    let late_report = Report {
        spend_now: vec![limit[0].clone(), unknown.clone()],
        ..report(&late, None, 600)
    };
    s.counters.report(&late_report).await.unwrap();
    let third = LeaseId::new(&k);
    let d = s.admit(&short(&third, &limit)).await;
    assert_eq!(used(&d), [800], "600 spent + two holds of 100: {d:?}");
    // Once: the duplicate guard stops the repeat.
    s.counters.report(&late_report).await.unwrap();
    let fourth = LeaseId::new(&k);
    let d = s.admit(&short(&fourth, &limit)).await;
    assert_eq!(used(&d), [900], "600 spent + three holds: {d:?}");
    // A counter that did not exist is not created by a late report.
    let unknown = [unknown];
    let d = s.admit(&short(&fourth, &unknown)).await;
    assert_eq!(used(&d), [100], "{d:?}");
    s.cleanup().await;
}

/// A late report of a lease its key's next admission purged settles with the lease's own
/// data (kept until its duplicate guard lapses): its cost reaches the spend counters it
/// was admitted under, model entries included, even when the report names no model (its
/// spend of now lists only the key's entry), and only once.
pub(super) async fn a_purged_leases_late_report_counts_on_its_own_entries(kind: Kind) {
    let s = Store::new(kind).await;
    let k = key();
    let key_entry = entry(QuotaKind::Spend(Period::Day), 1_000);
    let model_entry = entry(QuotaKind::Spend(Period::Day), 1_000);
    let both = [key_entry.clone(), model_entry.clone()];
    let key_only = [key_entry.clone()];
    let short = |lease, quotas| AdmitRequest {
        hold_micros: 100,
        lease_ttl_ms: 2_000,
        ..with(lease, quotas)
    };
    let late = LeaseId::new(&k);
    assert!(admitted(&s.admit(&short(&late, &both)).await));
    s.advance(2_300);
    // A request without a model purges the expired lease (and its holds).
    let next = LeaseId::new(&k);
    let d = s.admit(&short(&next, &key_only)).await;
    assert_eq!(used(&d), [100], "only the new hold: {d:?}");
    let late_report = Report {
        spend_now: key_only.to_vec(),
        ..report(&late, None, 600)
    };
    s.counters.report(&late_report).await.unwrap();
    s.counters.report(&late_report).await.unwrap();
    let third = LeaseId::new(&k);
    let d = s.admit(&short(&third, &both)).await;
    assert_eq!(
        used(&d),
        [800, 700],
        "key: 600 spent + two holds; model entry: 600 spent + one hold: {d:?}"
    );
    // After its guard lapsed, a purged lease's late report is refused as ever (and its
    // data has left: a key's purged leases never outlive their guard).
    let stale = LeaseId::new(&k);
    let d = s.admit(&short(&stale, &key_only)).await;
    let keyward::limits::Verdict::Admitted { expires_at_ms } = d.verdict else {
        panic!("{d:?}")
    };
    s.advance(2_000 + 600_000 + 1);
    let purger = LeaseId::new(&k);
    assert!(admitted(&s.admit(&short(&purger, &key_only)).await));
    let r = Report {
        lease_expires_at_ms: expires_at_ms,
        ..report(&stale, None, 600)
    };
    assert_eq!(s.counters.report(&r).await.unwrap(), Reported::TooLate);
    if let Some((url, prefix)) = &s.redis {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let space = keyward::limits::scripts::KeySpace::new(
            prefix,
            keyward::limits::scripts::DEFAULT_SHARDS,
        );
        let shard = space.shard_of(keyward::limits::Tenant::Key(&k));
        let lx = space.client(shard, &k, "lx");
        let kept: i64 = redis::cmd("HLEN")
            .arg(&lx)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept, 0, "the purged leases' data left with their guard");
    }
    s.cleanup().await;
}
