use super::*;
use crate::money::Usd;
use crate::quota::{Period, Seed, SpendLimit, SpendLimits};

fn spend(usd: i64) -> Option<SpendLimit> {
    Some(SpendLimit {
        usd: Usd(usd * 1_000_000),
        alert_at_pct: vec![],
    })
}

fn key() -> ClientKey {
    let mut models = ModelLimits::new();
    models.insert(
        "gpt-4o".into(),
        LimitSet {
            rate_limit: Some(5),
            spend_limits: SpendLimits {
                day: spend(2),
                ..SpendLimits::default()
            },
            ..LimitSet::default()
        },
    );
    let seed = |start_day, requests, cost_micros| Seed {
        start_day,
        requests,
        tokens: 10 * requests,
        cost_micros,
    };
    let mut settled = Settled::default();
    settled.0.insert((None, Period::Month), seed(20_400, 0, 7));
    settled.0.insert((None, Period::Day), seed(20_422, 3, 0));
    settled
        .0
        .insert((Some("gpt-4o".into()), Period::Day), seed(20_422, 4, 9));
    ClientKey {
        id: "k1".into(),
        user_id: Some("u1".into()),
        rate_limit: Some(100),
        daily_request_limit: Some(1_000),
        spend_limits: SpendLimits {
            month: spend(50),
            ..SpendLimits::default()
        },
        model_limits: models,
        settled,
        ..ClientKey::default()
    }
}

fn user() -> UserLimits {
    let mut models = ModelLimits::new();
    models.insert(
        "gpt-4o-mini".into(),
        LimitSet {
            daily_token_limit: Some(10_000),
            ..LimitSet::default()
        },
    );
    UserLimits {
        user_id: "u1".into(),
        limits: LimitSet {
            rate_limit: Some(60),
            tpm_limit: Some(0),
            spend_limits: SpendLimits {
                total: spend(500),
                ..SpendLimits::default()
            },
            ..LimitSet::default()
        },
        model_limits: models,
        settled: Settled::default(),
    }
}

type Row<'a> = (
    ScopeKind,
    Option<&'a str>,
    &'static str,
    i64,
    Option<(i64, i64)>,
);

fn summary(q: &Quotas) -> Vec<Row<'_>> {
    q.entries
        .iter()
        .zip(&q.statuses)
        .map(|(e, s)| (s.scope, s.model.as_deref(), e.kind.code(), e.limit, e.seed))
        .collect()
}

#[test]
fn entries_come_from_every_scope_in_order() {
    let q = build(&key(), Some(&user()), Some("gpt-4o-2024-08-06"));
    assert_eq!(
        summary(&q),
        [
            (ScopeKind::Key, None, "rd", 1_000, Some((20_422, 3))),
            (ScopeKind::Key, None, "sm", 50_000_000, Some((20_400, 7))),
            (ScopeKind::Key, Some("gpt-4o"), "rm", 5, None),
            (
                ScopeKind::Key,
                Some("gpt-4o"),
                "sd",
                2_000_000,
                Some((20_422, 9))
            ),
            (ScopeKind::User, None, "rm", 60, None),
            (ScopeKind::User, None, "st", 500_000_000, None),
        ],
        "the key's rate_limit is its own window, a limit of 0 is none, the dated \
         model uses its listed prefix (the user lists none for it), day counts are \
         seeded with the day's requests and spend with the period's cost"
    );
    assert!(q.has_spend());
    // Counters are per scope: the key's and its model entry's differ, and one user's
    // entries name the same counter whichever key asks.
    assert_ne!(q.entries[0].counter, q.entries[2].counter);
    let mut other = key();
    other.id = "k2".into();
    let q2 = build(&other, Some(&user()), Some("gpt-4o"));
    let user_counter = |q: &Quotas| {
        q.entries
            .iter()
            .zip(&q.statuses)
            .find(|(_, s)| s.scope == ScopeKind::User)
            .map(|(e, _)| e.counter.clone())
    };
    assert_eq!(user_counter(&q), user_counter(&q2));
    assert_ne!(q.entries[0].counter, q2.entries[0].counter);
}

#[test]
fn a_user_model_entry_and_no_model() {
    let q = build(&key(), Some(&user()), Some("gpt-4o-mini"));
    let kinds: Vec<_> = summary(&q)
        .into_iter()
        .map(|(s, m, k, _, _)| (s, m, k))
        .collect();
    assert!(kinds.contains(&(ScopeKind::User, Some("gpt-4o-mini"), "td")));
    // The key lists "gpt-4o" only: it is the longest prefix of gpt-4o-mini before a `-`.
    assert!(kinds.contains(&(ScopeKind::Key, Some("gpt-4o"), "rm")));
    let none = build(&key(), None, None);
    assert_eq!(none.entries.len(), 2, "no model: no model entries; no user");
    assert!(build(&ClientKey::default(), None, Some("x"))
        .entries
        .is_empty());
}

#[test]
fn static_refusals_are_the_ones_that_could_never_pass() {
    let q = build(&key(), Some(&user()), Some("gpt-4o-mini"));
    assert_eq!(static_refusal(&q, 10_000, 0), None);
    match static_refusal(&q, 10_001, 0) {
        Some(StaticRefusal::Tokens(s)) => {
            assert_eq!(
                (s.scope, s.kind, s.limit),
                (ScopeKind::User, QuotaKind::TokensPerDay, 10_000)
            );
        }
        other => panic!("{other:?}"),
    }
    match static_refusal(&q, 0, 2_000_001) {
        Some(StaticRefusal::Spend(s)) => {
            assert_eq!(s.kind, QuotaKind::Spend(Period::Day));
            assert_eq!(describe(&s), "the key's day spend limit for model `gpt-4o`");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_report_is_counted_under_the_spend_entries_of_now() {
    let spends: Vec<_> = spend_now(&key(), Some(&user()), Some("gpt-4o"))
        .into_iter()
        .map(|e| e.kind.code())
        .collect();
    assert_eq!(spends, ["sm", "sd", "st"]);
    assert_eq!(spend_now(&key(), None, None).len(), 1, "no model, no user");
}
