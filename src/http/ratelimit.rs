//! Rate-limit headers on every admit answer, allowed or denied:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (OpenAI style, reset as a
//! duration like `1m2s` or `250ms`) and the IETF draft's structured `RateLimit-Policy` /
//! `RateLimit` fields for requests (`"requests";q=<limit>;w=60` and
//! `"requests";r=<remaining>;t=<seconds>`).

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::client_keys::ClientKey;
use crate::limits::Usage;

/// Go-style duration text, as OpenAI sends it: `0s`, `250ms`, `1.5s`, `1m2s`.
pub fn duration_text(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0 => "0s".to_string(),
        1..=999 => format!("{ms}ms"),
        1_000..=59_999 if ms % 1000 == 0 => format!("{}s", ms / 1000),
        1_000..=59_999 => format!("{}s", (ms as f64 / 1000.0)),
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static(name), value);
    }
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

pub fn apply(headers: &mut HeaderMap, key: &ClientKey, usage: &Usage) {
    if let Some(limit) = key.rate_limit {
        let remaining = (limit - usage.requests_used).max(0);
        set(headers, "x-ratelimit-limit-requests", limit.to_string());
        set(
            headers,
            "x-ratelimit-remaining-requests",
            remaining.to_string(),
        );
        set(
            headers,
            "x-ratelimit-reset-requests",
            duration_text(usage.requests_reset_ms),
        );
        set(
            headers,
            "ratelimit-policy",
            format!("\"requests\";q={limit};w=60"),
        );
        let reset_s = (usage.requests_reset_ms.max(0) + 999) / 1000;
        set(
            headers,
            "ratelimit",
            format!("\"requests\";r={remaining};t={reset_s}"),
        );
    }
    if let Some(limit) = key.tpm_limit {
        set(headers, "x-ratelimit-limit-tokens", limit.to_string());
        set(
            headers,
            "x-ratelimit-remaining-tokens",
            (limit - usage.tokens_used).max(0).to_string(),
        );
        set(
            headers,
            "x-ratelimit-reset-tokens",
            duration_text(usage.tokens_reset_ms),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(-5), "0s");
        assert_eq!(duration_text(250), "250ms");
        assert_eq!(duration_text(1_000), "1s");
        assert_eq!(duration_text(1_500), "1.5s");
        assert_eq!(duration_text(61_000), "1m1s");
    }
}
