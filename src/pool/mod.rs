//! The provider key pool: upstream API keys per provider, picked per request.
//!
//! - [`input`]: the admin API's bodies and their validation.
//! - [`store`]: the SQL.
//! - [`cache`]: per provider, its roster: the active keys with their values decrypted once, in the
//!   order selection tries them.
//! - the admin operations over provider keys live in [`crate::provider_keys`]: they
//!   read the counter store, which itself takes this module's types.
//! - [`learned`]: what an upstream's rate-limit headers say about a key.
//!
//! Selection itself happens in the counter store, in the same atomic step as a client
//! admission (see `lua/admit.lua` and [`crate::limits`]): lowest priority first, then
//! least recently selected; keys cooling down after a 429, suspended after a 401/403, or
//! without room for the request in their 60-second RPM/TPM windows are skipped; the
//! chosen key's request and estimated tokens are reserved in the same step.
//!
//! Invariant: a provider key's value leaves the process only in a selection answer; no
//! admin answer, log line or error carries it.

pub mod cache;
pub mod input;
pub mod learned;
pub mod store;

use serde::Serialize;

use crate::clock::to_rfc3339;
use learned::{Learned, LearnedView};

/// A provider key as stored. Holds the ciphertext, so it is never serialized directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderKey {
    pub id: String,
    pub provider: String,
    pub label: String,
    pub key_encrypted: String,
    pub priority: i64,
    pub max_rpm: Option<i64>,
    pub max_tpm: Option<i64>,
    pub is_active: bool,
    pub total_requests: i64,
    pub total_tokens: i64,
    pub last_used_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What the counter store knows about a key right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveState {
    pub requests_last_60s: i64,
    pub tokens_last_60s: i64,
    pub cooldown_remaining_ms: i64,
    pub suspended_remaining_ms: i64,
    /// The report behind the current cooldown (`None` when the key is not cooling down).
    pub cooldown_cause: Option<Cause>,
    /// The report behind the current suspension (`None` when not suspended).
    pub suspension_cause: Option<Cause>,
    /// What the upstream's rate-limit headers said last (kept for a while, see
    /// [`learned::LearnedLimits::keep_ms`]).
    pub learned: Option<Learned>,
}

/// The report that cooled down or suspended a key, kept with the cooldown / suspension
/// (and expiring with it) so an operator can see who stopped a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// The upstream status reported (429, 401, 403); `None` if the report gave none.
    pub upstream_status: Option<i64>,
    /// When, on the counter store's clock (Unix ms).
    pub at_ms: i64,
    /// `lease <lease id>` or `data-token` (see [`crate::limits::Report::source`]), at most
    /// [`MAX_CAUSE_SOURCE`] characters.
    pub source: String,
    /// The cooldown was learned from the upstream's rate-limit headers (a limit used up),
    /// not set by an error status.
    pub from_headers: bool,
}

/// What starts the stored form of a cause learned from rate-limit headers.
const FROM_HEADERS: &str = "headers|";

/// The longest report source kept as a cause; a longer one is cut.
pub const MAX_CAUSE_SOURCE: usize = 200;

impl Cause {
    /// A cause from a report's fields, its source cut to [`MAX_CAUSE_SOURCE`] characters.
    pub fn new(upstream_status: Option<i64>, at_ms: i64, source: &str) -> Cause {
        Cause {
            upstream_status,
            at_ms,
            source: bounded_source(source).to_string(),
            from_headers: false,
        }
    }

    /// The same, learned from the upstream's rate-limit headers.
    pub fn learned(self) -> Cause {
        Cause {
            from_headers: true,
            ..self
        }
    }

    /// The stored form `status|at ms|source` (`status` empty when unknown), after
    /// `headers|` for a cause learned from rate-limit headers (as `lua/report.lua`
    /// writes them).
    pub fn encode(&self) -> String {
        let status = self.upstream_status.map(|s| s.to_string());
        format!(
            "{}{}|{}|{}",
            if self.from_headers { FROM_HEADERS } else { "" },
            status.unwrap_or_default(),
            self.at_ms,
            self.source
        )
    }

    /// Reads [`Cause::encode`]'s form; `None` for anything else (or an empty text).
    pub fn decode(text: &str) -> Option<Cause> {
        let (from_headers, text) = match text.strip_prefix(FROM_HEADERS) {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let mut parts = text.splitn(3, '|');
        let status = parts.next()?;
        let at_ms = parts.next()?.parse().ok()?;
        let source = parts.next()?;
        Some(Cause {
            upstream_status: if status.is_empty() {
                None
            } else {
                Some(status.parse().ok()?)
            },
            at_ms,
            source: bounded_source(source).to_string(),
            from_headers,
        })
    }
}

/// `source` cut to [`MAX_CAUSE_SOURCE`] characters (on a character boundary).
pub fn bounded_source(source: &str) -> &str {
    match source.char_indices().nth(MAX_CAUSE_SOURCE) {
        Some((end, _)) => &source[..end],
        None => source,
    }
}

#[derive(Debug, Serialize)]
pub struct CauseView {
    pub upstream_status: Option<i64>,
    pub at: String,
    pub source: String,
    /// Learned from the upstream's rate-limit headers (a limit used up), not an error.
    pub from_headers: bool,
}

impl From<&Cause> for CauseView {
    fn from(c: &Cause) -> CauseView {
        CauseView {
            upstream_status: c.upstream_status,
            at: to_rfc3339(c.at_ms),
            source: c.source.clone(),
            from_headers: c.from_headers,
        }
    }
}

/// The admin API's view of a provider key: everything but the value.
#[derive(Debug, Serialize)]
pub struct ProviderKeyView<'a> {
    pub id: &'a str,
    pub provider: &'a str,
    pub label: &'a str,
    pub priority: i64,
    pub max_rpm: Option<i64>,
    pub max_tpm: Option<i64>,
    pub is_active: bool,
    pub total_requests: i64,
    pub total_tokens: i64,
    pub last_used_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveView>,
}

#[derive(Debug, Serialize)]
pub struct LiveView {
    pub requests_last_60s: i64,
    pub tokens_last_60s: i64,
    pub cooldown_remaining_ms: i64,
    pub suspended: bool,
    pub suspended_remaining_ms: i64,
    /// Why the key is cooling down (null when it is not).
    pub cooldown_cause: Option<CauseView>,
    /// Why the key is suspended (null when it is not).
    pub suspension_cause: Option<CauseView>,
    /// What the upstream's rate-limit headers said last (null when nothing was learned
    /// lately).
    pub learned: Option<LearnedView>,
}

impl ProviderKey {
    pub fn view(&self, live: Option<LiveState>) -> ProviderKeyView<'_> {
        ProviderKeyView {
            id: &self.id,
            provider: &self.provider,
            label: &self.label,
            priority: self.priority,
            max_rpm: self.max_rpm,
            max_tpm: self.max_tpm,
            is_active: self.is_active,
            total_requests: self.total_requests,
            total_tokens: self.total_tokens,
            last_used_at: self.last_used_at.map(to_rfc3339),
            created_at: to_rfc3339(self.created_at),
            updated_at: to_rfc3339(self.updated_at),
            live: live.map(|l| LiveView {
                requests_last_60s: l.requests_last_60s,
                tokens_last_60s: l.tokens_last_60s,
                cooldown_remaining_ms: l.cooldown_remaining_ms,
                suspended: l.suspended_remaining_ms > 0,
                suspended_remaining_ms: l.suspended_remaining_ms,
                cooldown_cause: l.cooldown_cause.as_ref().map(CauseView::from),
                suspension_cause: l.suspension_cause.as_ref().map(CauseView::from),
                learned: l.learned.as_ref().map(LearnedView::from),
            }),
        }
    }
}

/// `true` for a provider name keyward accepts: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_provider(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_round_trip_and_sources_are_bounded() {
        let c = Cause::new(Some(429), 1_764_460_000_000, "lease a|b.c");
        assert_eq!(Cause::decode(&c.encode()), Some(c));
        let unknown = Cause::new(None, 5, "data-token");
        assert_eq!(Cause::decode(&unknown.encode()), Some(unknown));
        let learned = Cause::new(Some(200), 7, "lease a.b").learned();
        assert_eq!(learned.encode(), "headers|200|7|lease a.b");
        assert_eq!(Cause::decode(&learned.encode()), Some(learned));
        for bad in ["", "429", "429|x|s", "x|1|s"] {
            assert_eq!(Cause::decode(bad), None, "{bad}");
        }
        let long = "é".repeat(MAX_CAUSE_SOURCE + 50);
        assert_eq!(
            Cause::new(Some(401), 1, &long).source.chars().count(),
            MAX_CAUSE_SOURCE
        );
    }
}
