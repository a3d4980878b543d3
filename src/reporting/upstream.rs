//! The proxies' report (`POST /v1/report/upstream`): the upstream's status, its
//! rate-limit headers and an excerpt of its answer, turned into the report that
//! `/v1/report` settles.
//!
//! (Over 400 lines: the body's format is documented here in full, and its tests, about
//! 160 lines, sit beside it; the code is about 230.)
//!
//! The shipped Envoy configuration keeps the answer's first bytes (`head`) and a rolling
//! window of its last bytes (`tail`) while the answer streams through to the client, and
//! posts them after the last chunk. keyward, not the proxy, reads the usage from them
//! ([`crate::usage::parse`]), so one parser serves every proxy.
//!
//! The body (JSON; `head` and `tail` base64, so any bytes travel):
//!
//! ```text
//! {"status": 200,                          the upstream's HTTP status (required)
//!  "api_format": "openai_chat",            or "path": "/v1/chat/completions" (the
//!                                          request's path, read as /authz reads it)
//!  "headers": {"retry-after": "30", …},    the upstream's answer headers the proxy
//!                                          passes on (content-encoding, retry-after,
//!                                          rate-limit headers: see
//!                                          `pool::learned`), names in any case;
//!                                          a header whose name is over 200 characters
//!                                          or whose value is over 1 KiB, or with
//!                                          control characters (but tab), is ignored
//!  "head": "<base64>", "tail": "<base64>", each at most 64 KiB once decoded
//!  "complete": true,                       head then tail is exactly the body
//!  "latency_ms": 812}                      optional
//! ```
//!
//! Invariants:
//! - Tokens are reported only when [`crate::usage::parse::parse`] found the upstream's final
//!   usage; otherwise the report carries none and the admission's reservation stays
//!   (as for a `/v1/report` without tokens). No cost is set here: the settling side
//!   prices the tokens at the lease's price, or charges the lease's hold for a
//!   successful answer whose usage it could not read ([`super::Reports::settle`]).
//! - Every field is bounded before anything is decoded or parsed: an oversized body is
//!   refused whole ([`UpstreamError::TooLarge`]), never truncated.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;

use super::body::{ReportBody, MAX_REPORT_TOKENS};
use crate::pool::learned::LearnedLimits;
use crate::usage::api_format;
use crate::usage::parse::{self, ApiFormat, Excerpt, Outcome, Usage};

/// The most bytes of `head`, and of `tail`, once decoded.
pub const MAX_PART_BYTES: usize = 64 * 1024;
/// The most upstream headers one report may carry.
pub const MAX_HEADERS: usize = 64;
/// The longest header value taken (a rate-limit header is a few dozen bytes).
pub const MAX_HEADER_VALUE: usize = 1024;
/// The longest request path taken for `path`.
pub const MAX_PATH: usize = 8 * 1024;
/// The longest cooldown an upstream's `Retry-After` can ask for (the report's bound).
const MAX_RETRY_AFTER_S: i64 = 86_400;

/// The body of `POST /v1/report/upstream` (see the module doc).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamBody {
    pub status: i64,
    #[serde(default)]
    pub api_format: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub head: String,
    #[serde(default)]
    pub tail: String,
    #[serde(default)]
    pub complete: bool,
    #[serde(default)]
    pub latency_ms: Option<i64>,
}

/// Why a body was refused (nothing is recorded then).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    /// Malformed: 400.
    #[error("{0}")]
    Bad(String),
    /// Over a bound: 413.
    #[error("{0}")]
    TooLarge(String),
}

/// What [`UpstreamBody::into_report`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// The upstream's usage.
    Parsed(Usage),
    /// No readable usage: a stream cut before it, an error body, no usage at all.
    NotFound,
    /// A compressed answer: its usage cannot be read from an excerpt.
    Compressed,
    /// The request's API format is not one keyward reads usage from (or none was given).
    UnknownFormat,
    /// A usage beyond what a report takes ([`MAX_REPORT_TOKENS`]): treated as unreadable.
    OutOfRange,
}

impl Read {
    /// The label of `keyward_upstream_usage_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Parsed(_) => "parsed",
            Self::NotFound => "not_found",
            Self::Compressed => "compressed",
            Self::UnknownFormat => "unknown_format",
            Self::OutOfRange => "out_of_range",
        }
    }
}

fn decode(field: &str, text: &str) -> Result<Vec<u8>, UpstreamError> {
    // base64 of MAX_PART_BYTES is at most this long; refuse before decoding.
    if text.len() > MAX_PART_BYTES.div_ceil(3) * 4 {
        return Err(UpstreamError::TooLarge(format!(
            "{field} must be at most {MAX_PART_BYTES} bytes once decoded"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| UpstreamError::Bad(format!("{field} must be base64 (standard alphabet)")))?;
    if bytes.len() > MAX_PART_BYTES {
        return Err(UpstreamError::TooLarge(format!(
            "{field} must be at most {MAX_PART_BYTES} bytes once decoded"
        )));
    }
    Ok(bytes)
}

/// Seconds from a `Retry-After` value: a number of seconds (rounded up) or an HTTP date
/// (from now). `None` when unreadable, so the default cooldown applies.
pub fn retry_after_s(value: &str, now_ms: i64) -> Option<i64> {
    let value = value.trim();
    let seconds = if let Ok(s) = value.parse::<f64>() {
        if !s.is_finite() || s < 0.0 {
            return None;
        }
        s.min(MAX_RETRY_AFTER_S as f64).ceil() as i64
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        let ms = at.timestamp_millis().saturating_sub(now_ms).max(0);
        (ms + 999) / 1000
    };
    Some(seconds.min(MAX_RETRY_AFTER_S))
}

impl UpstreamBody {
    /// The report to settle for `lease_id`, and what was read from the excerpt.
    pub fn into_report(
        self,
        lease_id: &str,
        now_ms: i64,
    ) -> Result<(ReportBody, Read), UpstreamError> {
        if !(100..=599).contains(&self.status) {
            return Err(UpstreamError::Bad(
                "status must be an HTTP status (100 to 599)".into(),
            ));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(UpstreamError::TooLarge(format!(
                "headers must hold at most {MAX_HEADERS} entries"
            )));
        }
        let mut headers = BTreeMap::new();
        for (name, value) in &self.headers {
            // An odd header is the upstream's doing, not the proxy's: it is ignored (as if
            // absent) rather than costing the whole report.
            if crate::names::printable(name).is_some()
                && value.len() <= MAX_HEADER_VALUE
                && !value.chars().any(|c| c.is_control() && c != '\t')
            {
                headers.insert(name.trim().to_ascii_lowercase(), value.as_str());
            }
        }
        let format = match (&self.api_format, &self.path) {
            (Some(_), Some(_)) => {
                return Err(UpstreamError::Bad(
                    "give api_format or path, not both".into(),
                ))
            }
            (Some(name), None) => {
                let name = crate::names::check("api_format", name)
                    .map_err(|e| UpstreamError::Bad(e.to_string()))?;
                Some(ApiFormat::from_name(name).ok_or_else(|| {
                    UpstreamError::Bad(
                        "api_format must be one keyward reads usage from (openai_chat, openai_responses, openai_completions, openai_embeddings, anthropic_messages, gemini_generate_content, gemini_embed_content)".into(),
                    )
                })?)
            }
            (None, Some(path)) => {
                if path.len() > MAX_PATH {
                    return Err(UpstreamError::TooLarge(format!(
                        "path must be at most {MAX_PATH} bytes"
                    )));
                }
                api_format::of_path(path).and_then(|(name, _)| ApiFormat::from_name(name))
            }
            (None, None) => None,
        };
        let latency_ms = match self.latency_ms {
            Some(ms) if !(0..=86_400_000).contains(&ms) => {
                return Err(UpstreamError::Bad(
                    "latency_ms must be a whole number from 0 to 86400000".into(),
                ))
            }
            other => other,
        };
        let head = decode("head", &self.head)?;
        let tail = decode("tail", &self.tail)?;
        let read = match format {
            None => Read::UnknownFormat,
            Some(format) => {
                let excerpt = Excerpt {
                    head: &head,
                    tail: &tail,
                    complete: self.complete,
                    content_encoding: headers.get("content-encoding").copied(),
                };
                match parse::parse(format, &excerpt) {
                    Outcome::Parsed(u)
                        if u.input_tokens > MAX_REPORT_TOKENS
                            || u.output_tokens > MAX_REPORT_TOKENS =>
                    {
                        Read::OutOfRange
                    }
                    Outcome::Parsed(u) => Read::Parsed(u),
                    Outcome::NotFound => Read::NotFound,
                    Outcome::Compressed => Read::Compressed,
                }
            }
        };
        let usage = match read {
            Read::Parsed(u) => Some(u),
            _ => None,
        };
        let retry_after_s = headers
            .get("retry-after")
            .and_then(|v| retry_after_s(v, now_ms));
        let body = ReportBody {
            lease_id: Some(lease_id.to_string()),
            prompt_tokens: usage.map(|u| u.input_tokens),
            completion_tokens: usage.map(|u| u.output_tokens),
            cached_tokens: usage.map(|u| u.cached_input_tokens),
            cache_write_tokens: usage.map(|u| u.cache_write_tokens),
            reasoning_tokens: usage.map(|u| u.reasoning_tokens),
            latency_ms,
            upstream_status: Some(self.status),
            retry_after_s,
            learned: LearnedLimits::from_headers(&headers, now_ms),
            ..ReportBody::default()
        };
        Ok((body, read))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> UpstreamBody {
        serde_json::from_value(json).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn a_json_answer_becomes_its_tokens() {
        let answer =
            br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        let (report, read) = body(serde_json::json!({
            "status": 200, "path": "/v1/chat/completions", "head": b64(answer), "complete": true,
            "latency_ms": 7,
        }))
        .into_report("lease", 0)
        .unwrap();
        assert!(matches!(read, Read::Parsed(_)), "{read:?}");
        assert_eq!(
            (report.prompt_tokens, report.completion_tokens),
            (Some(12), Some(30))
        );
        assert_eq!(report.upstream_status, Some(200));
        assert_eq!(report.latency_ms, Some(7));
        assert_eq!(report.lease_id.as_deref(), Some("lease"));
        assert_eq!(report.cost_usd, None, "pricing is not this module's");
    }

    #[test]
    fn unreadable_usage_reports_no_tokens() {
        let cut = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        for (json, expected) in [
            (
                serde_json::json!({"status": 200, "api_format": "openai_chat", "head": b64(cut), "complete": true}),
                Read::NotFound,
            ),
            (
                serde_json::json!({"status": 200, "api_format": "openai_chat", "head": b64(&[0x1f, 0x8b, 8, 0]), "headers": {"Content-Encoding": "gzip"}}),
                Read::Compressed,
            ),
            (
                serde_json::json!({"status": 200, "path": "/v1/models", "head": b64(b"{}")}),
                Read::UnknownFormat,
            ),
            (serde_json::json!({"status": 200}), Read::UnknownFormat),
        ] {
            let (report, read) = body(json).into_report("lease", 0).unwrap();
            assert_eq!(read, expected);
            assert_eq!(
                (report.prompt_tokens, report.completion_tokens),
                (None, None)
            );
        }
    }

    #[test]
    fn a_429_carries_its_retry_after() {
        let (report, _) =
            body(serde_json::json!({"status": 429, "headers": {"Retry-After": "2.5"}}))
                .into_report("lease", 0)
                .unwrap();
        assert_eq!(
            (report.upstream_status, report.retry_after_s),
            (Some(429), Some(3))
        );
        assert_eq!(retry_after_s("999999", 0), Some(86_400));
        assert_eq!(retry_after_s("-1", 0), None);
        assert_eq!(retry_after_s("soon", 0), None);
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(30)
        );
        assert_eq!(retry_after_s("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(0));
    }

    #[test]
    fn odd_header_values_are_ignored_not_refused() {
        let long = "9".repeat(MAX_HEADER_VALUE + 1);
        for value in [long.as_str(), "3\n0", "\u{0}"] {
            let (report, _) =
                body(serde_json::json!({"status": 429, "headers": {"retry-after": value}}))
                    .into_report("lease", 0)
                    .unwrap();
            assert_eq!(report.retry_after_s, None, "{value:?}");
        }
        let (report, _) =
            body(serde_json::json!({"status": 429, "headers": {"retry-after": "\t7"}}))
                .into_report("lease", 0)
                .unwrap();
        assert_eq!(report.retry_after_s, Some(7));
    }

    #[test]
    fn rate_limit_headers_are_learned_in_any_case() {
        let (report, _) = body(serde_json::json!({"status": 200, "headers": {
            "X-RateLimit-Remaining-Requests": "0", "x-ratelimit-reset-requests": "20s",
            "x-ratelimit-remaining-tokens": "garbage"}}))
        .into_report("lease", 0)
        .unwrap();
        let learned = report.learned.unwrap();
        assert_eq!(
            (
                learned.remaining_requests,
                learned.requests_reset_ms,
                learned.remaining_tokens
            ),
            (Some(0), Some(20_000), None)
        );
        let (report, _) = body(serde_json::json!({"status": 200}))
            .into_report("lease", 0)
            .unwrap();
        assert_eq!(report.learned, None);
    }

    #[test]
    fn bounds_and_malformed_fields_are_refused() {
        let big = b64(&vec![b'x'; MAX_PART_BYTES + 1]);
        let fits = b64(&vec![b'x'; MAX_PART_BYTES]);
        let refused = |json: serde_json::Value| body(json).into_report("lease", 0).unwrap_err();
        assert!(matches!(
            refused(serde_json::json!({"status": 200, "head": big})),
            UpstreamError::TooLarge(_)
        ));
        assert!(matches!(
            refused(serde_json::json!({"status": 200, "tail": big})),
            UpstreamError::TooLarge(_)
        ));
        assert!(
            body(serde_json::json!({"status": 200, "head": fits, "tail": fits}))
                .into_report("lease", 0)
                .is_ok()
        );
        let many: BTreeMap<String, String> = (0..=MAX_HEADERS)
            .map(|i| (format!("h{i}"), "v".into()))
            .collect();
        assert!(matches!(
            refused(serde_json::json!({"status": 200, "headers": many})),
            UpstreamError::TooLarge(_)
        ));
        for bad in [
            serde_json::json!({"status": 99}),
            serde_json::json!({"status": 600}),
            serde_json::json!({"status": 200, "head": "not base64!"}),
            serde_json::json!({"status": 200, "api_format": "carrier_pigeon"}),
            serde_json::json!({"status": 200, "api_format": "openai_chat", "path": "/v1/chat/completions"}),
            serde_json::json!({"status": 200, "latency_ms": -1}),
        ] {
            assert!(
                matches!(refused(bad.clone()), UpstreamError::Bad(_)),
                "{bad}"
            );
        }
    }
}
