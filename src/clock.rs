//! Wall-clock time as integer Unix milliseconds, and its RFC 3339 form for JSON.
//!
//! Every timestamp keyward stores is UTC Unix milliseconds (`BIGINT`), the same in
//! Postgres and SQLite, so queries and day boundaries are identical on both backends.
//! (Rate-limit windows do not use this clock in the distributed shape: they use the
//! Redis server's.)

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

pub const MS_PER_DAY: i64 = 86_400_000;

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// `2026-11-21T20:33:03.123Z`.
pub fn to_rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The UTC calendar day of a day number (milliseconds / [`MS_PER_DAY`]).
pub fn day_to_date(day: i64) -> String {
    to_rfc3339(day * MS_PER_DAY)[..10].to_string()
}

/// Which end of a range a bare date stands for.
#[derive(Clone, Copy)]
pub enum DateEdge {
    /// A date means its first millisecond.
    Start,
    /// A date means its last millisecond (an inclusive end).
    End,
}

/// Parses an RFC 3339 timestamp, or a `YYYY-MM-DD` date taken at `edge`.
pub fn parse_instant(text: &str, edge: DateEdge) -> Result<i64, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| format!("`{text}` is not an RFC 3339 timestamp or a YYYY-MM-DD date"))?;
    let start = date
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
        .ok_or_else(|| format!("`{text}` is out of range"))?;
    Ok(match edge {
        DateEdge::Start => start,
        DateEdge::End => start + MS_PER_DAY - 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(to_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_instant("1970-01-02", DateEdge::Start), Ok(MS_PER_DAY));
        assert_eq!(
            parse_instant("1970-01-01", DateEdge::End),
            Ok(MS_PER_DAY - 1)
        );
        assert_eq!(
            parse_instant("1970-01-01T00:00:01+00:00", DateEdge::Start),
            Ok(1000)
        );
        assert!(parse_instant("yesterday", DateEdge::Start).is_err());
        assert_eq!(day_to_date(1), "1970-01-02");
    }
}
