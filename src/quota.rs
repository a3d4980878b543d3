//! Quotas: the limits a key, a user (all keys with one `user_id` together) or a model
//! within either may carry beyond a key's own per-minute windows and concurrency, and the
//! UTC calendar they count in.
//!
//! This module is vocabulary only (no I/O): the admin API parses into it, the stores keep
//! it as JSON, admission turns it into counter entries, accounting reads its alert
//! thresholds. It sits below all of them.
//!
//! - A [`LimitSet`] holds requests and tokens per minute (exact sliding windows) and per
//!   UTC day, and spend limits in USD per UTC day, ISO week (Monday 00:00 UTC), calendar
//!   month, or in total, each with optional alert thresholds in percent.
//! - [`ModelLimits`] maps a model name to a `LimitSet`; a dated model id uses its longest
//!   listed prefix ([`crate::names::longest_prefix`]), like prices.
//! - Periods are counted in whole UTC days since the Unix epoch ([`Period::start_day`]);
//!   the Lua scripts compute the same numbers from the Redis server's clock
//!   (`tests/twin_equals_redis.rs` holds them equal).
//!
//! (Over 400 lines: about 120 are its tests, which pin the calendar arithmetic the
//! scripts repeat.)

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::MS_PER_DAY;
use crate::money::Usd;

/// Upper bound for every count limit (the same as the key's own limits).
pub const MAX_LIMIT: i64 = 1_000_000_000_000;
/// Upper bound for a spend limit: 10^9 USD in micro-USD, exact in Lua's doubles.
pub const MAX_SPEND_MICROS: i64 = 1_000_000_000 * 1_000_000;
/// At most this many alert thresholds per spend limit.
pub const MAX_THRESHOLDS: usize = 10;
/// At most this many models with their own limits, per key or user.
pub const MAX_MODELS: usize = 100;

/// A calendar period of a spend limit (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
    Total,
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Day, Period::Week, Period::Month, Period::Total];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// The first day (days since 1970-01-01) of the period that holds `day`; 0 for
    /// [`Period::Total`].
    pub fn start_day(self, day: i64) -> i64 {
        match self {
            Period::Day => day,
            // 1970-01-01 was a Thursday: Monday is 3 days before day 0 modulo 7.
            Period::Week => day - (day + 3).rem_euclid(7),
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                days_from_civil(y, m, 1)
            }
            Period::Total => 0,
        }
    }

    /// The first day of the next period after the one starting at `start_day`; `None`
    /// for [`Period::Total`], which never resets.
    pub fn end_day(self, start_day: i64) -> Option<i64> {
        match self {
            Period::Day => Some(start_day + 1),
            Period::Week => Some(start_day + 7),
            Period::Month => {
                let (y, m, _) = civil_from_days(start_day);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some(days_from_civil(y, m, 1))
            }
            Period::Total => None,
        }
    }

    /// The instant (ms) the period holding `now_ms` ends; `None` for a total.
    pub fn reset_at_ms(self, now_ms: i64) -> Option<i64> {
        let start = self.start_day(now_ms.div_euclid(MS_PER_DAY));
        self.end_day(start).map(|d| d * MS_PER_DAY)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm; the Lua
/// scripts use the same integer steps).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `(year, month, day)` of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A spend limit: at most `usd` in the period, with alerts when the period's spend
/// reaches each of `alert_at_pct` percent of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendLimit {
    pub usd: Usd,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alert_at_pct: Vec<u16>,
}

/// One optional spend limit per period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<SpendLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub week: Option<SpendLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<SpendLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<SpendLimit>,
}

impl SpendLimits {
    pub fn get(&self, period: Period) -> Option<&SpendLimit> {
        match period {
            Period::Day => self.day.as_ref(),
            Period::Week => self.week.as_ref(),
            Period::Month => self.month.as_ref(),
            Period::Total => self.total.as_ref(),
        }
    }

    /// The limits that are set, in [`Period::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Period, &SpendLimit)> {
        Period::ALL
            .into_iter()
            .filter_map(|p| self.get(p).map(|l| (p, l)))
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

/// The limits of one scope (a key, a user, or a model within either). `None` = no
/// limit of that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSet {
    /// Requests per minute (exact sliding window).
    #[serde(default)]
    pub rate_limit: Option<i64>,
    /// Tokens per minute (exact sliding window).
    #[serde(default)]
    pub tpm_limit: Option<i64>,
    /// Requests per UTC day.
    #[serde(default)]
    pub daily_request_limit: Option<i64>,
    /// Tokens per UTC day.
    #[serde(default)]
    pub daily_token_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "SpendLimits::is_empty")]
    pub spend_limits: SpendLimits,
}

impl LimitSet {
    pub fn is_empty(&self) -> bool {
        *self == LimitSet::default()
    }

    /// Refuses a limit outside `1..=MAX_LIMIT`, a spend limit that is not positive or
    /// above [`MAX_SPEND_MICROS`], and thresholds that are not distinct percentages
    /// from 1 to 100 (at most [`MAX_THRESHOLDS`]). The message names the field.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        for (name, value) in [
            ("rate_limit", self.rate_limit),
            ("tpm_limit", self.tpm_limit),
            ("daily_request_limit", self.daily_request_limit),
            ("daily_token_limit", self.daily_token_limit),
        ] {
            if let Some(v) = value {
                if !(1..=MAX_LIMIT).contains(&v) {
                    return Err(format!(
                        "{at}{name} must be from 1 to {MAX_LIMIT}, or null for no limit"
                    ));
                }
            }
        }
        for (period, limit) in self.spend_limits.iter() {
            let name = format!("{at}spend_limits.{}", period.as_str());
            if !(1..=MAX_SPEND_MICROS).contains(&limit.usd.micros()) {
                return Err(format!(
                    "{name}.usd must be more than 0 and at most {} USD",
                    MAX_SPEND_MICROS / 1_000_000
                ));
            }
            let mut seen = limit.alert_at_pct.clone();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != limit.alert_at_pct.len()
                || limit.alert_at_pct.len() > MAX_THRESHOLDS
                || limit.alert_at_pct.iter().any(|p| !(1..=100).contains(p))
            {
                return Err(format!(
                    "{name}.alert_at_pct must be at most {MAX_THRESHOLDS} distinct whole percentages from 1 to 100"
                ));
            }
        }
        Ok(())
    }
}

/// Limits per model: model name (or prefix) → its limits.
pub type ModelLimits = BTreeMap<String, LimitSet>;

/// Refuses more than [`MAX_MODELS`] models, a model name that is not printable or
/// longer than [`crate::names::MAX_NAME_CHARS`], and an invalid or empty set.
pub fn validate_models(models: &ModelLimits) -> Result<(), String> {
    if models.len() > MAX_MODELS {
        return Err(format!("model_limits may name at most {MAX_MODELS} models"));
    }
    for (model, set) in models {
        match crate::names::printable(model) {
            Some(m) if !m.is_empty() && m == model => {}
            _ => {
                return Err(format!(
                    "model_limits keys must be non-empty model names of at most {} printable characters, without surrounding spaces",
                    crate::names::MAX_NAME_CHARS
                ))
            }
        }
        if set.is_empty() {
            return Err(format!("model_limits.{model} sets no limit"));
        }
        set.validate(&format!("model_limits.{model}."))?;
    }
    Ok(())
}

/// What a scope had used, as applied to the database, when its record was loaded:
/// `(model entry or None for the whole scope, period)` → that period's [`Seed`]. Only
/// the periods the scope has a day count or spend limit for are held. At admission a
/// day or spend counter takes the larger of itself and its seed when the seed's start
/// day is the current period's (so a counter the store lost, or one that drifted below
/// the database, is never lower than what was settled when the record was loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled(pub BTreeMap<(Option<String>, Period), Seed>);

/// One period's figures from `quota_usage`: requests, tokens and micro-USD applied in the
/// period starting on `start_day` (zeros without a row).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seed {
    pub start_day: i64,
    pub requests: i64,
    pub tokens: i64,
    pub cost_micros: i64,
}

impl Settled {
    /// The seed for one scope's period, when known.
    pub fn get(&self, model: Option<&str>, period: Period) -> Option<Seed> {
        self.0.get(&(model.map(str::to_string), period)).copied()
    }
}

/// A user's limits (all keys with that `user_id` together), as admission sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserLimits {
    pub user_id: String,
    pub limits: LimitSet,
    pub model_limits: ModelLimits,
    pub settled: Settled,
}

/// Who a quota counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Key,
    User,
}

/// One scope: a key or a user, and optionally one of its model entries (the listed
/// prefix, not the request's full model id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub kind: ScopeKind,
    pub id: String,
    pub model: Option<String>,
}

impl Scope {
    /// A short, fixed-length, printable name for the scope's counters (user ids and
    /// model names may be 200 characters of any printable text; counter names are
    /// not): the first 12 bytes of SHA-256 over the kind, id and model, in hex.
    pub fn counter_id(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(match self.kind {
            ScopeKind::Key => b"k\0".as_slice(),
            ScopeKind::User => b"u\0".as_slice(),
        });
        h.update(self.id.as_bytes());
        if let Some(m) = &self.model {
            h.update(b"\0m\0");
            h.update(m.as_bytes());
        }
        hex::encode(&h.finalize()[..12])
    }
}

/// Whether a spend of `spend` micro-USD has reached `pct` percent of `limit`. The
/// threshold is rounded up, so 80% of 1 micro-USD needs the whole micro-USD. Alerts are
/// raised whenever a period's spend has reached a threshold (not only when one record
/// crosses it), so a threshold added or lowered below the spend alerts too; each alert's
/// id makes it once per period and limit.
pub fn reached(limit_micros: i64, pct: u16, spend: i64) -> bool {
    let scaled = i128::from(limit_micros) * i128::from(pct);
    let at = scaled.div_euclid(100) + i128::from(scaled % 100 != 0);
    i128::from(spend) >= at
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, NaiveDate};

    #[test]
    fn civil_days_agree_with_chrono() {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        for day in (-800_000..800_000).step_by(97) {
            let date = epoch + chrono::Duration::days(day);
            let (y, m, d) = civil_from_days(day);
            assert_eq!(
                (y, m, d),
                (
                    i64::from(date.year()),
                    i64::from(date.month()),
                    i64::from(date.day())
                )
            );
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn periods_start_and_end_on_utc_boundaries() {
        // 2026-11-30 is a Monday.
        let day = days_from_civil(2026, 11, 30);
        assert_eq!(Period::Week.start_day(day), day);
        assert_eq!(Period::Week.start_day(day + 6), day);
        assert_eq!(Period::Week.start_day(day - 1), day - 7);
        assert_eq!(Period::Month.start_day(day), days_from_civil(2026, 11, 1));
        assert_eq!(
            Period::Month.end_day(days_from_civil(2026, 12, 1)),
            Some(days_from_civil(2027, 1, 1))
        );
        assert_eq!(
            Period::Month.end_day(days_from_civil(2028, 2, 1)),
            Some(days_from_civil(2028, 3, 1))
        );
        assert_eq!(
            Period::Day.reset_at_ms(day * MS_PER_DAY + 5),
            Some((day + 1) * MS_PER_DAY)
        );
        assert_eq!(Period::Total.reset_at_ms(123), None);
    }

    #[test]
    fn limit_sets_refuse_what_cannot_be_counted() {
        let json = r#"{"daily_request_limit": 10,
            "spend_limits": {"month": {"usd": 100, "alert_at_pct": [50, 80, 100]}}}"#;
        let set: LimitSet = serde_json::from_str(json).unwrap_or_default();
        assert_eq!(set.validate(""), Ok(()));
        assert_eq!(
            set.spend_limits.month.as_ref().map(|l| l.usd.micros()),
            Some(100_000_000)
        );
        for bad in [
            r#"{"rate_limit": 0}"#,
            r#"{"spend_limits": {"day": {"usd": 0}}}"#,
            r#"{"spend_limits": {"day": {"usd": 1, "alert_at_pct": [80, 80]}}}"#,
            r#"{"spend_limits": {"day": {"usd": 1, "alert_at_pct": [101]}}}"#,
        ] {
            let set: LimitSet = serde_json::from_str(bad).unwrap_or_default();
            assert!(set.validate("").is_err(), "{bad}");
        }
        assert!(
            serde_json::from_str::<LimitSet>(r#"{"spend_limits": {"year": {"usd": 1}}}"#).is_err()
        );
        assert!(serde_json::from_str::<LimitSet>(r#"{"rpm": 1}"#).is_err());
        let mut models = ModelLimits::new();
        models.insert("gpt-4o".into(), LimitSet::default());
        assert!(validate_models(&models).is_err(), "an empty set");
        models.insert(
            "gpt-4o".into(),
            LimitSet {
                rate_limit: Some(5),
                ..LimitSet::default()
            },
        );
        assert_eq!(validate_models(&models), Ok(()));
        models.insert(
            " x".into(),
            LimitSet {
                rate_limit: Some(5),
                ..LimitSet::default()
            },
        );
        assert!(validate_models(&models).is_err());
    }

    #[test]
    fn thresholds_are_reached_at_their_rounded_up_share() {
        assert!(reached(100, 80, 80));
        assert!(reached(100, 80, 1000));
        assert!(!reached(100, 80, 79));
        // 80% of 1 micro-USD rounds up to the whole micro-USD.
        assert!(!reached(1, 80, 0));
        assert!(reached(1, 80, 1));
    }

    #[test]
    fn scopes_name_counters_apart() {
        let key = Scope {
            kind: ScopeKind::Key,
            id: "a".into(),
            model: None,
        };
        let user = Scope {
            kind: ScopeKind::User,
            id: "a".into(),
            model: None,
        };
        let model = Scope {
            model: Some("gpt-4o".into()),
            ..key.clone()
        };
        let ids = [key.counter_id(), user.counter_id(), model.counter_id()];
        assert_eq!(ids[0].len(), 24);
        assert!(ids[0] != ids[1] && ids[0] != ids[2] && ids[1] != ids[2]);
    }
}
