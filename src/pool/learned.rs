//! What an upstream's rate-limit headers say about the provider key that served a
//! request: the requests and tokens it has left, and when those limits reset.
//!
//! - OpenAI: `x-ratelimit-remaining-{requests,tokens}` and
//!   `x-ratelimit-reset-{requests,tokens}`, resets as durations (`1s`, `6m0s`, `20ms`,
//!   `1h2m3.5s`).
//! - Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
//!   {remaining,reset}`, resets as RFC 3339 times. Its token limits fold into one: the
//!   fewest tokens left, with the reset of that limit (the latest, when several are as
//!   low), because any one of them used up stops the key.
//!
//! A key whose requests or tokens are used up cools down until the stated reset
//! ([`LearnedLimits::cooldown_ms`]), before the upstream refuses it with a 429. The
//! counter store keeps what was learned last per key for the admin listing
//! ([`Learned`]).
//!
//! Invariant: everything is bounded before use. A count outside `0..=MAX_LIMIT`, or a
//! value that does not read, is ignored (as if absent), never a panic; a reset is at
//! most [`MAX_RESET_MS`] (and a lease's report caps it further, see
//! `reporting::body::ProviderKeyPolicy`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::client_keys::input::MAX_LIMIT;
use crate::clock::to_rfc3339;

/// The longest reset taken from a header: a day, as for `Retry-After`.
pub const MAX_RESET_MS: i64 = 86_400_000;
/// How long the listing shows what was learned last, at least (longer while a stated
/// reset is ahead): long enough for an operator to look, short enough not to show
/// counts that stopped being true long ago.
pub const KEEP_MS: i64 = 600_000;

/// What one answer's rate-limit headers said. Resets are durations from the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LearnedLimits {
    pub remaining_requests: Option<i64>,
    pub remaining_tokens: Option<i64>,
    /// Until the request limit resets (ms from the report).
    pub requests_reset_ms: Option<i64>,
    /// Until the token limit resets (ms from the report).
    pub tokens_reset_ms: Option<i64>,
}

/// A count of requests or tokens left, or `None` when it does not read.
fn count(value: &str) -> Option<i64> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|n| (0..=MAX_LIMIT).contains(n))
}

/// Milliseconds in a Go-style duration (`1h2m3.5s`, `20ms`, `0`), rounded up and capped
/// at [`MAX_RESET_MS`]; `None` for anything else.
pub fn duration_ms(value: &str) -> Option<i64> {
    let mut rest = value.trim();
    if rest == "0" {
        return Some(0);
    }
    let mut total = 0.0_f64;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        // "1.", ".5" and "1.2.3" are not numbers here; `parse` would take the first two.
        let well_formed =
            !number.starts_with('.') && !number.ends_with('.') && number.matches('.').count() <= 1;
        let number: f64 = number.parse().ok().filter(|_| well_formed)?;
        let (unit_ms, after) = [
            ("ms", 1.0),
            ("us", 1e-3),
            ("µs", 1e-3),
            ("ns", 1e-6),
            ("h", 3_600_000.0),
            ("m", 60_000.0),
            ("s", 1_000.0),
        ]
        .iter()
        .find_map(|(unit, ms)| after.strip_prefix(unit).map(|a| (*ms, a)))?;
        total += number * unit_ms;
        parts += 1;
        rest = after;
    }
    if parts == 0 {
        return None;
    }
    // An overflowing number is infinite, and capped like any other long reset.
    Some(total.ceil().min(MAX_RESET_MS as f64) as i64)
}

/// Milliseconds from `now_ms` until an RFC 3339 time (0 when past), capped at
/// [`MAX_RESET_MS`]; `None` when it does not read.
pub fn until_ms(value: &str, now_ms: i64) -> Option<i64> {
    let at = chrono::DateTime::parse_from_rfc3339(value.trim()).ok()?;
    Some(
        at.timestamp_millis()
            .saturating_sub(now_ms)
            .clamp(0, MAX_RESET_MS),
    )
}

impl LearnedLimits {
    /// Reads the headers (names lowercase); `None` when none of them reads.
    pub fn from_headers(headers: &BTreeMap<String, &str>, now_ms: i64) -> Option<LearnedLimits> {
        let get = |name: &str| headers.get(name).copied();
        let mut learned = LearnedLimits {
            remaining_requests: get("x-ratelimit-remaining-requests").and_then(count),
            remaining_tokens: get("x-ratelimit-remaining-tokens").and_then(count),
            requests_reset_ms: get("x-ratelimit-reset-requests").and_then(duration_ms),
            tokens_reset_ms: get("x-ratelimit-reset-tokens").and_then(duration_ms),
        };
        let anthropic = |kind: &str| {
            let remaining = get(&format!("anthropic-ratelimit-{kind}-remaining")).and_then(count);
            let reset =
                get(&format!("anthropic-ratelimit-{kind}-reset")).and_then(|v| until_ms(v, now_ms));
            (remaining, reset)
        };
        let (remaining, reset) = anthropic("requests");
        learned.remaining_requests = learned.remaining_requests.or(remaining);
        learned.requests_reset_ms = learned.requests_reset_ms.or(reset);
        // The tightest token limit: the fewest left, then the latest reset.
        let tightest = ["tokens", "input-tokens", "output-tokens"]
            .into_iter()
            .map(anthropic)
            .filter_map(|(remaining, reset)| remaining.map(|r| (r, reset)))
            .min_by_key(|(remaining, reset)| (*remaining, std::cmp::Reverse(*reset)));
        if learned.remaining_tokens.is_none() {
            if let Some((remaining, reset)) = tightest {
                learned.remaining_tokens = Some(remaining);
                learned.tokens_reset_ms = learned.tokens_reset_ms.or(reset);
            }
        }
        (learned != LearnedLimits::default()).then_some(learned)
    }

    /// The same with each reset at most `max_ms`.
    pub fn capped(self, max_ms: i64) -> LearnedLimits {
        let cap = |r: Option<i64>| r.map(|r| r.min(max_ms.max(0)));
        LearnedLimits {
            requests_reset_ms: cap(self.requests_reset_ms),
            tokens_reset_ms: cap(self.tokens_reset_ms),
            ..self
        }
    }

    /// How long the key must rest: until the later reset of a limit that is used up; 0
    /// when none is (or a used-up limit stated no reset: keyward does not guess one).
    pub fn cooldown_ms(&self) -> i64 {
        let used_up = |remaining: Option<i64>, reset: Option<i64>| match remaining {
            Some(0) => reset.unwrap_or(0),
            _ => 0,
        };
        used_up(self.remaining_requests, self.requests_reset_ms)
            .max(used_up(self.remaining_tokens, self.tokens_reset_ms))
    }

    /// How long the counter store keeps them for the listing.
    pub fn keep_ms(&self) -> i64 {
        KEEP_MS
            .max(self.requests_reset_ms.unwrap_or(0))
            .max(self.tokens_reset_ms.unwrap_or(0))
    }

    /// The stored form: `remaining requests|remaining tokens|requests reset ms|tokens
    /// reset ms`, each empty when unknown.
    pub fn encode(&self) -> String {
        let text = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        format!(
            "{}|{}|{}|{}",
            text(self.remaining_requests),
            text(self.remaining_tokens),
            text(self.requests_reset_ms),
            text(self.tokens_reset_ms)
        )
    }
}

/// What was learned last about a key, and when (on the counter store's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    pub limits: LearnedLimits,
    pub at_ms: i64,
}

impl Learned {
    /// Reads the counter store's form `<kept until>|<LearnedLimits::encode>|<at ms>`;
    /// `None` for anything else.
    pub fn decode(text: &str) -> Option<Learned> {
        let parts: Vec<&str> = text.split('|').collect();
        let [_until, requests, tokens, requests_reset, tokens_reset, at] = parts[..] else {
            return None;
        };
        let field = |t: &str| -> Option<Option<i64>> {
            match t {
                "" => Some(None),
                t => t.parse().ok().map(Some),
            }
        };
        Some(Learned {
            limits: LearnedLimits {
                remaining_requests: field(requests)?,
                remaining_tokens: field(tokens)?,
                requests_reset_ms: field(requests_reset)?,
                tokens_reset_ms: field(tokens_reset)?,
            },
            at_ms: at.parse().ok()?,
        })
    }
}

/// The admin listing's view of [`Learned`].
#[derive(Debug, Serialize)]
pub struct LearnedView {
    pub remaining_requests: Option<i64>,
    pub remaining_tokens: Option<i64>,
    pub requests_reset_at: Option<String>,
    pub tokens_reset_at: Option<String>,
    pub learned_at: String,
}

impl From<&Learned> for LearnedView {
    fn from(l: &Learned) -> LearnedView {
        let at = |reset: Option<i64>| reset.map(|ms| to_rfc3339(l.at_ms.saturating_add(ms)));
        LearnedView {
            remaining_requests: l.limits.remaining_requests,
            remaining_tokens: l.limits.remaining_tokens,
            requests_reset_at: at(l.limits.requests_reset_ms),
            tokens_reset_at: at(l.limits.tokens_reset_ms),
            learned_at: to_rfc3339(l.at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &[(&str, &'a str)]) -> BTreeMap<String, &'a str> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[test]
    fn durations_read_as_go_writes_them() {
        for (text, ms) in [
            ("1s", 1_000),
            ("6m0s", 360_000),
            ("20ms", 20),
            ("1h2m3.5s", 3_723_500),
            ("0", 0),
            ("0s", 0),
            ("1.5ms", 2),
            ("300us", 1),
            ("10µs", 1),
            ("7ns", 1),
            (" 2s ", 2_000),
        ] {
            assert_eq!(duration_ms(text), Some(ms), "{text}");
        }
        for garbage in [
            "", "s", "1", "-1s", "1x", "1.s", ".5s", "1.2.3s", "1s2", "abc", "1 s", "NaNs", "infs",
            "1e3s",
        ] {
            assert_eq!(duration_ms(garbage), None, "{garbage:?}");
        }
        // Huge values are capped, never overflowed.
        assert_eq!(duration_ms("99999999999999999999h"), Some(MAX_RESET_MS));
        assert_eq!(
            duration_ms(&format!("{}s", "9".repeat(400))),
            Some(MAX_RESET_MS)
        );
    }

    #[test]
    fn rfc3339_times_become_durations() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T04:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(until_ms("2026-11-30T04:00:20Z", now), Some(20_000));
        assert_eq!(until_ms("2026-11-30T05:00:00.5+01:00", now), Some(500));
        assert_eq!(until_ms("2026-11-30T03:00:00Z", now), Some(0), "past");
        assert_eq!(until_ms("9999-12-31T23:59:59Z", now), Some(MAX_RESET_MS));
        for garbage in ["", "tomorrow", "2026-11-30", "1700000000"] {
            assert_eq!(until_ms(garbage, now), None, "{garbage}");
        }
    }

    #[test]
    fn openai_headers() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-requests", "20s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let l = LearnedLimits::from_headers(&h, 0).unwrap();
        assert_eq!(
            l,
            LearnedLimits {
                remaining_requests: Some(0),
                remaining_tokens: Some(149_984),
                requests_reset_ms: Some(20_000),
                tokens_reset_ms: Some(360_000),
            }
        );
        assert_eq!(l.cooldown_ms(), 20_000, "requests are used up");
        assert_eq!(l.capped(5_000).cooldown_ms(), 5_000);
        assert_eq!(l.keep_ms(), KEEP_MS);
    }

    #[test]
    fn anthropic_headers_fold_the_tightest_token_limit() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T04:00:00Z")
            .unwrap()
            .timestamp_millis();
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2026-11-30T04:00:01Z"),
            ("anthropic-ratelimit-tokens-remaining", "9000"),
            ("anthropic-ratelimit-tokens-reset", "2026-11-30T04:00:05Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-11-30T04:00:30Z",
            ),
            ("anthropic-ratelimit-output-tokens-remaining", "8000"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-11-30T04:00:02Z",
            ),
        ]);
        let l = LearnedLimits::from_headers(&h, now).unwrap();
        assert_eq!(
            l,
            LearnedLimits {
                remaining_requests: Some(49),
                remaining_tokens: Some(0),
                requests_reset_ms: Some(1_000),
                tokens_reset_ms: Some(30_000),
            }
        );
        assert_eq!(l.cooldown_ms(), 30_000, "input tokens are used up");
    }

    #[test]
    fn garbage_is_ignored() {
        assert_eq!(LearnedLimits::from_headers(&headers(&[]), 0), None);
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "99999999999999999999999"),
            ("x-ratelimit-reset-requests", "soon"),
            ("anthropic-ratelimit-tokens-remaining", "lots"),
            ("anthropic-ratelimit-requests-reset", "later"),
        ]);
        assert_eq!(LearnedLimits::from_headers(&h, 0), None);
        // Used up without a reset: no cooldown is guessed.
        let h = headers(&[("x-ratelimit-remaining-requests", "0")]);
        let l = LearnedLimits::from_headers(&h, 0).unwrap();
        assert_eq!(l.cooldown_ms(), 0);
        // A reset with requests left: no cooldown either.
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "20s"),
        ]);
        assert_eq!(LearnedLimits::from_headers(&h, 0).unwrap().cooldown_ms(), 0);
    }

    #[test]
    fn the_stored_form_round_trips() {
        let limits = LearnedLimits {
            remaining_requests: Some(0),
            remaining_tokens: None,
            requests_reset_ms: Some(20_000),
            tokens_reset_ms: None,
        };
        let text = format!("99|{}|1234", limits.encode());
        assert_eq!(
            Learned::decode(&text),
            Some(Learned {
                limits,
                at_ms: 1234
            })
        );
        for bad in ["", "1|2|3", "9|x||||1", "9|||||", "9||||||1"] {
            assert_eq!(Learned::decode(bad), None, "{bad}");
        }
    }
}
