//! Rate-limit headers on every admit answer, allowed or denied:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (OpenAI style, reset as a
//! duration like `1m2s` or `250ms`) and the IETF draft's structured `RateLimit-Policy` /
//! `RateLimit` fields for requests (`"requests";q=<limit>;w=60` and
//! `"requests";r=<remaining>;t=<seconds>`).
//!
//! With quotas, a request counts against several request (and token) limits: the key's
//! own window and each quota entry's (per minute or per UTC day, of the key, its model
//! entry, its user, the user's model entry). The headers show the most constraining one:
//! the least remaining (the key's own on a tie), with its reset, and `w` its window in
//! seconds (60 or 86400).

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::admission::quotas::QuotaStatus;
use crate::client_keys::ClientKey;
use crate::limits::{QuotaKind, Usage};

/// Go-style duration text, as OpenAI sends it: `0s`, `250ms`, `1.5s`, `1m2s`.
pub fn duration_text(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0 => "0s".to_string(),
        1..=999 => format!("{ms}ms"),
        1_000..=59_999 if ms % 1000 == 0 => format!("{}s", ms / 1000),
        // The decimal a float's shortest spelling gives (`1.5s`, `1.25s`), without one.
        1_000..=59_999 => {
            let (mut fraction, mut digits) = (ms % 1000, 3);
            while fraction % 10 == 0 {
                fraction /= 10;
                digits -= 1;
            }
            format!("{}.{fraction:0digits$}s", ms / 1000)
        }
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// Sets a header from text made for it: the value takes the string's buffer, no copy.
fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// Sets a header to a number (formatted without an intermediate `String`).
fn set_number(headers: &mut HeaderMap, name: &'static str, value: i64) {
    headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
}

/// Marks an answer given without Redis: `x-keyward-degraded: allow | local`.
pub fn degraded(headers: &mut HeaderMap, mode: Option<&'static str>) {
    if let Some(mode) = mode {
        headers.insert(
            HeaderName::from_static("x-keyward-degraded"),
            HeaderValue::from_static(mode),
        );
    }
}

/// One request or token limit as the headers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shown {
    limit: i64,
    remaining: i64,
    reset_ms: i64,
    window_s: i64,
}

/// The limit with the least remaining among the key's own (`own`: limit, used, reset)
/// and the quota entries of `kinds` (first wins a tie).
fn tightest(
    own: Option<(i64, i64, i64)>,
    quotas: &[QuotaStatus],
    kinds: [QuotaKind; 2],
) -> Option<Shown> {
    let own = own.map(|(limit, used, reset_ms)| Shown {
        limit,
        remaining: (limit - used).max(0),
        reset_ms,
        window_s: 60,
    });
    let entries = quotas
        .iter()
        .filter(|q| kinds.contains(&q.kind))
        .map(|q| Shown {
            limit: q.limit,
            remaining: (q.limit - q.used.used).max(0),
            reset_ms: q.used.reset_ms,
            window_s: if q.kind.per_minute() { 60 } else { 86_400 },
        });
    own.into_iter().chain(entries).reduce(|best, s| {
        if s.remaining < best.remaining {
            s
        } else {
            best
        }
    })
}

pub fn apply(headers: &mut HeaderMap, key: &ClientKey, usage: &Usage, quotas: &[QuotaStatus]) {
    // Room for all ten at once, rather than growing the map on the way.
    headers.reserve(10);
    let requests = tightest(
        key.rate_limit
            .map(|l| (l, usage.requests_used, usage.requests_reset_ms)),
        quotas,
        [QuotaKind::RequestsPerMinute, QuotaKind::RequestsPerDay],
    );
    let tokens = tightest(
        key.tpm_limit
            .map(|l| (l, usage.tokens_used, usage.tokens_reset_ms)),
        quotas,
        [QuotaKind::TokensPerMinute, QuotaKind::TokensPerDay],
    );
    if let Some(Shown {
        limit,
        remaining,
        reset_ms,
        window_s,
    }) = requests
    {
        set_number(headers, "x-ratelimit-limit-requests", limit);
        set_number(headers, "x-ratelimit-remaining-requests", remaining);
        set(
            headers,
            "x-ratelimit-reset-requests",
            duration_text(reset_ms),
        );
        set(
            headers,
            "ratelimit-policy",
            format!("\"requests\";q={limit};w={window_s}"),
        );
        let reset_s = (reset_ms.max(0) + 999) / 1000;
        set(
            headers,
            "ratelimit",
            format!("\"requests\";r={remaining};t={reset_s}"),
        );
    }
    if let Some(shown) = tokens {
        set_number(headers, "x-ratelimit-limit-tokens", shown.limit);
        set_number(headers, "x-ratelimit-remaining-tokens", shown.remaining);
        set(
            headers,
            "x-ratelimit-reset-tokens",
            duration_text(shown.reset_ms),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tightest_limit_is_shown() {
        use crate::limits::QuotaUse;
        use crate::quota::ScopeKind;
        let key = ClientKey {
            rate_limit: Some(100),
            ..ClientKey::default()
        };
        let usage = Usage {
            requests_used: 10,
            requests_reset_ms: 30_000,
            ..Usage::default()
        };
        let day = QuotaStatus {
            scope: ScopeKind::User,
            model: None,
            kind: QuotaKind::RequestsPerDay,
            limit: 50,
            used: QuotaUse {
                used: 45,
                reset_ms: 3_600_000,
            },
        };
        let mut headers = HeaderMap::new();
        apply(&mut headers, &key, &usage, std::slice::from_ref(&day));
        assert_eq!(headers["x-ratelimit-remaining-requests"], "5");
        assert_eq!(headers["x-ratelimit-limit-requests"], "50");
        assert_eq!(headers["ratelimit-policy"], "\"requests\";q=50;w=86400");
        assert_eq!(headers["ratelimit"], "\"requests\";r=5;t=3600");
        assert!(headers.get("x-ratelimit-limit-tokens").is_none());
        // With more room left than the key's own window, the key's is shown.
        let roomy = QuotaStatus {
            limit: 1_000,
            used: QuotaUse {
                used: 0,
                reset_ms: 0,
            },
            ..day
        };
        let mut headers = HeaderMap::new();
        apply(&mut headers, &key, &usage, &[roomy]);
        assert_eq!(headers["x-ratelimit-remaining-requests"], "90");
        assert_eq!(headers["ratelimit-policy"], "\"requests\";q=100;w=60");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(-5), "0s");
        assert_eq!(duration_text(250), "250ms");
        assert_eq!(duration_text(1_000), "1s");
        assert_eq!(duration_text(1_500), "1.5s");
        // As a float's shortest spelling (what it was formatted with before).
        for ms in 1_001..60_000 {
            if ms % 1000 != 0 {
                assert_eq!(duration_text(ms), format!("{}s", ms as f64 / 1000.0));
            }
        }
        assert_eq!(duration_text(61_000), "1m1s");
    }
}
