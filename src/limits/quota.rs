//! Quota entries: what the counter store is asked to count for one request beyond the
//! key's own windows, concurrency and balance (`quota` is the vocabulary,
//! `admission` builds the entries).
//!
//! Each entry names a counter (a [`crate::quota::Scope::counter_id`]), what it counts and
//! its limit. Both stores check every entry of a request before taking anything, and
//! take from all of them in the same step (all or nothing). The counters:
//! - requests / tokens per minute: exact sliding windows (the key windows' bucket code);
//! - requests / tokens per UTC day: one counter per day, which the next day does not
//!   read (so it resets at 00:00 UTC); tokens are reserved, then corrected at report;
//! - spend per period: `spent` and `held` micro-USD per period start; a request holds its
//!   hold until its report (`held -= hold`, `spent += cost`) or its lease's expiry
//!   (renewals extend it). Each counter lists its holds with their lease's expiry and
//!   drops the expired ones (at most 100 per decision) before any decision reads it, so
//!   an unreported request stops holding when its lease expires, whichever key admits
//!   next; a hold leaves `held` once (its report, the purge of its key's expired leases
//!   or the counter's own purge, whichever comes first). A report whose lease's data is
//!   gone adds its cost to the spend counters of now it carries
//!   ([`crate::limits::Report::spend_now`]), once.
//!
//! Day and spend counters never read below their entry's seed of the current period
//! (`max(counter, seed)`), so one the store lost or one that drifted below the database
//! heals at the next admission.
//!
//! Periods are computed from the store's clock (`lua/admit.lua` with the same integer
//! steps as [`crate::quota::days_from_civil`]).

use crate::clock::MS_PER_DAY;
use crate::quota::Period;

/// What one quota entry counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaKind {
    RequestsPerMinute,
    TokensPerMinute,
    RequestsPerDay,
    TokensPerDay,
    /// Micro-USD per period (the request's hold while in flight, its cost once reported).
    Spend(Period),
}

impl QuotaKind {
    /// Every kind, for tests and listings.
    pub const ALL: [QuotaKind; 8] = [
        QuotaKind::RequestsPerMinute,
        QuotaKind::TokensPerMinute,
        QuotaKind::RequestsPerDay,
        QuotaKind::TokensPerDay,
        QuotaKind::Spend(Period::Day),
        QuotaKind::Spend(Period::Week),
        QuotaKind::Spend(Period::Month),
        QuotaKind::Spend(Period::Total),
    ];

    /// The kind as `lua/admit.lua` takes it (and the counter's name part in Redis).
    pub fn code(self) -> &'static str {
        match self {
            QuotaKind::RequestsPerMinute => "rm",
            QuotaKind::TokensPerMinute => "tm",
            QuotaKind::RequestsPerDay => "rd",
            QuotaKind::TokensPerDay => "td",
            QuotaKind::Spend(Period::Day) => "sd",
            QuotaKind::Spend(Period::Week) => "sw",
            QuotaKind::Spend(Period::Month) => "sm",
            QuotaKind::Spend(Period::Total) => "st",
        }
    }

    /// Counts requests (else tokens or micro-USD).
    pub fn counts_requests(self) -> bool {
        matches!(
            self,
            QuotaKind::RequestsPerMinute | QuotaKind::RequestsPerDay
        )
    }

    /// A per-minute window (else a calendar counter).
    pub fn per_minute(self) -> bool {
        matches!(
            self,
            QuotaKind::RequestsPerMinute | QuotaKind::TokensPerMinute
        )
    }

    /// The calendar period it resets with: `None` for the minute windows.
    pub fn period(self) -> Option<Period> {
        match self {
            QuotaKind::RequestsPerMinute | QuotaKind::TokensPerMinute => None,
            QuotaKind::RequestsPerDay | QuotaKind::TokensPerDay => Some(Period::Day),
            QuotaKind::Spend(p) => Some(p),
        }
    }
}

/// One limit to check and count for a request. A request's entries name distinct
/// `(counter, kind)` pairs (admission builds them from distinct scopes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaEntry {
    /// The scope's counter id ([`crate::quota::Scope::counter_id`]: 24 hex characters).
    pub counter: String,
    pub kind: QuotaKind,
    /// Requests, tokens or micro-USD; at least 1.
    pub limit: i64,
    /// Day counts and spend: what the database had applied in the period starting on
    /// this day `(start day, requests | tokens | micro-USD)`. When it is the current
    /// period's, the counter (a day's count, a spend's `spent`) is taken as the larger of
    /// itself and the seed (a missing one as 0): a counter the store lost, or one that
    /// drifted below the database (a limit removed then set again, a late report, a
    /// lost write), is raised to what the database had when the record was loaded.
    pub seed: Option<(i64, i64)>,
}

/// One entry as the decision saw it (after it, when admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaUse {
    /// Requests or tokens counted; for spend, `spent + held` micro-USD.
    pub used: i64,
    /// Milliseconds until it resets: for a window, until its oldest counted second leaves
    /// it (0 when empty); for a calendar counter, until its period ends; 0 = never (a
    /// total).
    pub reset_ms: i64,
}

/// The first day of the period of `kind` holding `now_ms`, and the milliseconds until
/// that period ends (0 for a total). `None` for the minute windows.
pub fn period_at(kind: QuotaKind, now_ms: i64) -> Option<(i64, i64)> {
    let period = kind.period()?;
    let start = period.start_day(now_ms.div_euclid(MS_PER_DAY));
    let reset = period
        .end_day(start)
        .map_or(0, |end| end * MS_PER_DAY - now_ms);
    Some((start, reset))
}

/// How long a calendar counter outlives its period in the store: reports of requests
/// admitted in it still settle there (the cost counts in the period the request was
/// admitted in), and nothing reads it after.
pub const PERIOD_MARGIN_MS: i64 = MS_PER_DAY;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::days_from_civil;

    #[test]
    fn periods_and_resets_from_the_clock() {
        // 2026-11-30 (a Monday) at 12:00 UTC.
        let day = days_from_civil(2026, 11, 30);
        let now = day * MS_PER_DAY + 12 * 3_600_000;
        assert_eq!(period_at(QuotaKind::RequestsPerMinute, now), None);
        assert_eq!(
            period_at(QuotaKind::TokensPerDay, now),
            Some((day, 12 * 3_600_000))
        );
        assert_eq!(
            period_at(QuotaKind::Spend(Period::Week), now),
            Some((day, 6 * MS_PER_DAY + 12 * 3_600_000))
        );
        assert_eq!(
            period_at(QuotaKind::Spend(Period::Month), now),
            Some((days_from_civil(2026, 11, 1), 12 * 3_600_000))
        );
        assert_eq!(
            period_at(QuotaKind::Spend(Period::Total), now),
            Some((0, 0))
        );
        let codes: Vec<&str> = QuotaKind::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(codes, ["rm", "tm", "rd", "td", "sd", "sw", "sm", "st"]);
    }
}
