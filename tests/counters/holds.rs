//! Spend holds in the shared behaviour suite (run on the twin, Redis and a Cluster by
//! `on_both_stores!` in `tests/counters.rs`): a spend counter lists its holds with their
//! leases' expiry, so a hold leaves by its lease's expiry even when its key never admits
//! again, follows its lease's renewals, and leaves once however its report and the
//! purges interleave.

use keyward::limits::{AdmitRequest, Denial, LeaseId, QuotaEntry, QuotaKind};
use keyward::quota::Period;

use super::{admitted, denial, key, report, Kind, Store};
use super::{entry, used, with};

fn holding<'a>(lease: &'a LeaseId, quotas: &'a [QuotaEntry], hold: i64) -> AdmitRequest<'a> {
    AdmitRequest {
        hold_micros: hold,
        lease_ttl_ms: 10_000,
        ..with(lease, quotas)
    }
}

const HELD_IN_FLIGHT: Denial = Denial::Quota {
    index: 0,
    exhausted: false,
};

/// A user's spend hold taken by a key that never admits again (so nothing purges that
/// key's leases) is released once its lease expires, and the user's other keys can spend
/// it; the lease's late report then adds its cost but does not release the hold twice.
pub(super) async fn a_hold_of_a_key_that_never_admits_again_leaves_at_its_lease_expiry(kind: Kind) {
    let s = Store::new(kind).await;
    let (gone, other) = (key(), key());
    let user = [entry(QuotaKind::Spend(Period::Total), 1_000)];
    let stuck = s.user_lease(&gone);
    let d = s.admit(&holding(&stuck, &user, 1_000)).await;
    assert!(admitted(&d), "{d:?}");
    let waiting = s.user_lease(&other);
    let d = s.admit(&holding(&waiting, &user, 1)).await;
    assert_eq!(denial(&d), (HELD_IN_FLIGHT, Some(1_000)));
    assert_eq!(used(&d), [1_000]);

    // Past the lease's expiry: the other key's admission finds the hold gone.
    s.advance(10_001);
    let d = s.admit(&holding(&waiting, &user, 1_000)).await;
    assert!(admitted(&d), "the expired hold still counts: {d:?}");
    assert_eq!(used(&d), [1_000]);

    // The stuck lease reports late: its cost counts, its hold is not released again
    // (that would release the other key's hold in its place).
    let late = s.counters.report(&report(&stuck, None, 300)).await.unwrap();
    assert_eq!(late, keyward::limits::Reported::Recorded);
    let next = s.user_lease(&other);
    let d = s.admit(&holding(&next, &user, 1)).await;
    assert_eq!(denial(&d), (HELD_IN_FLIGHT, Some(1_000)));
    assert_eq!(used(&d), [1_300], "spent 300 + the other key's 1,000 held");

    // The other key's report releases its own hold, once.
    for _ in 0..2 {
        s.counters
            .report(&report(&waiting, None, 100))
            .await
            .unwrap();
    }
    let d = s.admit(&holding(&next, &user, 600)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [1_000], "spent 400 + 600 held");
    s.cleanup().await;
}

/// A renewal may shorten a lease: its spend hold then leaves at the new, earlier expiry
/// (the counter's note of its earliest hold expiry follows it down).
pub(super) async fn a_renewal_that_shortens_a_lease_releases_its_hold_earlier(kind: Kind) {
    let s = Store::new(kind).await;
    let (renewing, other) = (key(), key());
    let user = [entry(QuotaKind::Spend(Period::Day), 1_000)];
    let lease = s.user_lease(&renewing);
    assert!(admitted(&s.admit(&holding(&lease, &user, 800)).await));
    let renewed = s.renew(&lease, 1_000).await.unwrap();
    assert!(renewed.is_some());
    // Past the shortened expiry, long before the first one (10 s): released.
    s.advance(1_001);
    let probe = s.user_lease(&other);
    let d = s.admit(&holding(&probe, &user, 300)).await;
    assert!(admitted(&d), "the shortened hold still counts: {d:?}");
    assert_eq!(used(&d), [300]);
    s.cleanup().await;
}

/// A renewed lease keeps its spend hold until its new expiry, then releases it, whoever
/// admits next.
pub(super) async fn a_renewed_lease_keeps_its_hold_until_its_new_expiry(kind: Kind) {
    let s = Store::new(kind).await;
    let (renewing, other) = (key(), key());
    let user = [entry(QuotaKind::Spend(Period::Total), 1_000)];
    let lease = s.user_lease(&renewing);
    assert!(admitted(&s.admit(&holding(&lease, &user, 800)).await));
    s.advance(5_000);
    let renewed = s.renew(&lease, 60_000).await.unwrap();
    assert!(renewed.is_some());
    // Past its first expiry, within the renewed one: still held.
    s.advance(10_000);
    let probe = s.user_lease(&other);
    let d = s.admit(&holding(&probe, &user, 300)).await;
    assert_eq!(denial(&d), (HELD_IN_FLIGHT, Some(1_000)));
    assert_eq!(used(&d), [800]);
    // Past the renewed expiry: released.
    s.advance(50_001);
    let d = s.admit(&holding(&probe, &user, 300)).await;
    assert!(admitted(&d), "{d:?}");
    assert_eq!(used(&d), [300]);
    s.cleanup().await;
}
