//! The body of `POST /v1/report`, validated into what the counter store settles, and
//! what an upstream's answer does to the provider key that served it.

use serde::Deserialize;

/// The most tokens of either kind one report may carry: a billion, far above any model's
/// context or output, and low enough that no key's totals can be filled by lying
/// reports in any practical time (a key's totals would need ~4.5 million of them).
pub const MAX_REPORT_TOKENS: i64 = 1_000_000_000;

use crate::lease::SignedLease;
use crate::limits::{Report, TokenClasses};
use crate::money::{format_usd, Usd, MAX_REPORT_MICROS};
use crate::pool::learned::LearnedLimits;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBody {
    #[serde(default)]
    pub lease_id: Option<String>,
    /// A report without a lease named by its caller: a repeat of the name is answered
    /// as a duplicate and records nothing (a lease's report is named by its lease).
    #[serde(default)]
    pub report_id: Option<String>,
    #[serde(default)]
    pub provider_key_id: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt_tokens: Option<i64>,
    #[serde(default)]
    pub completion_tokens: Option<i64>,
    /// Within `prompt_tokens`: read from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: Option<i64>,
    /// Within `prompt_tokens`: written to the prompt cache.
    #[serde(default)]
    pub cache_write_tokens: Option<i64>,
    /// Within `completion_tokens`: reasoning.
    #[serde(default)]
    pub reasoning_tokens: Option<i64>,
    #[serde(default)]
    pub cost_usd: Option<Usd>,
    #[serde(default)]
    pub latency_ms: Option<i64>,
    #[serde(default)]
    pub upstream_status: Option<i64>,
    #[serde(default)]
    pub retry_after_s: Option<i64>,
    /// What the upstream's rate-limit headers said (`/v1/report/upstream` only: a
    /// `/v1/report` body cannot state it).
    #[serde(skip)]
    pub learned: Option<LearnedLimits>,
}

/// The longest `report_id`.
pub const MAX_REPORT_ID: usize = 128;

/// The record id of a report without a lease: `report:<report_id>` when its caller named
/// it (the counters then guard it like a lease's report; the prefix keeps it apart from
/// lease ids, `<key id>.<token>`), else a fresh UUID.
fn lease_less_id(report_id: Option<String>) -> Result<String, String> {
    let Some(name) = report_id else {
        return Ok(uuid::Uuid::new_v4().to_string());
    };
    let valid = !name.is_empty()
        && name.len() <= MAX_REPORT_ID
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if !valid {
        return Err(format!(
            "report_id must be 1 to {MAX_REPORT_ID} characters of A-Z, a-z, 0-9, '-', '_', '.' and ':'"
        ));
    }
    Ok(format!("{}{name}", crate::limits::NAMED_REPORT))
}

/// What an upstream answer does to the provider key that served it.
#[derive(Debug, Clone, Copy)]
pub struct ProviderKeyPolicy {
    /// Cooldown after a 429 that named no `retry_after_s`.
    pub default_cooldown_ms: i64,
    /// Suspension after a 401 or 403.
    pub suspend_ms: i64,
    /// The longest cooldown or suspension a report authorized by a lease sets, whatever
    /// its `retry_after_s`: a client key must not be able to take a pool out for a day.
    /// Reports with the data-plane token are trusted up to a day.
    pub lease_cooldown_max_ms: i64,
}

fn range(name: &str, value: Option<i64>, max: i64) -> Result<Option<i64>, String> {
    match value {
        Some(v) if !(0..=max).contains(&v) => {
            Err(format!("{name} must be a whole number from 0 to {max}"))
        }
        other => Ok(other),
    }
}

impl ReportBody {
    /// The report to settle. `lease` is the lease that `lease_id` proved (the caller
    /// verified its signature); `None` for a report without a lease.
    pub fn validate(
        self,
        policy: ProviderKeyPolicy,
        lease: Option<SignedLease>,
    ) -> Result<Report, String> {
        let lease_expires_at_ms = lease.as_ref().map_or(0, |l| l.expires_at_ms);
        let lease = lease.map(|l| l.lease);
        let id = match &lease {
            Some(_) if self.report_id.is_some() => {
                return Err("report_id names a report without a lease_id: a lease's report is named by its lease".into())
            }
            Some(l) => l.to_string(),
            None => lease_less_id(self.report_id)?,
        };
        let provider_key_id = match self.provider_key_id {
            None => None,
            Some(id) => Some(
                uuid::Uuid::try_parse(&id)
                    .map_err(|_| "provider_key_id is not a UUID")?
                    .hyphenated()
                    .to_string(),
            ),
        };
        let model = crate::names::optional("model", self.model.as_deref())
            .map_err(|e| e.to_string())?
            .map(str::to_string);
        let prompt = range("prompt_tokens", self.prompt_tokens, MAX_REPORT_TOKENS)?;
        let completion = range(
            "completion_tokens",
            self.completion_tokens,
            MAX_REPORT_TOKENS,
        )?;
        let tokens = (prompt.is_some() || completion.is_some())
            .then(|| (prompt.unwrap_or(0), completion.unwrap_or(0)));
        let token_classes = TokenClasses {
            cached: range("cached_tokens", self.cached_tokens, MAX_REPORT_TOKENS)?.unwrap_or(0),
            cache_write: range(
                "cache_write_tokens",
                self.cache_write_tokens,
                MAX_REPORT_TOKENS,
            )?
            .unwrap_or(0),
            reasoning: range("reasoning_tokens", self.reasoning_tokens, MAX_REPORT_TOKENS)?
                .unwrap_or(0),
        };
        let (p, c) = tokens.unwrap_or((0, 0));
        if token_classes.cached + token_classes.cache_write > p {
            return Err(
                "cached_tokens and cache_write_tokens are counted within prompt_tokens: together at most prompt_tokens".into(),
            );
        }
        if token_classes.reasoning > c {
            return Err(
                "reasoning_tokens are counted within completion_tokens: at most completion_tokens"
                    .into(),
            );
        }
        let cost_micros = match self.cost_usd {
            Some(Usd(m)) if m < 0 => return Err("cost_usd must not be negative".into()),
            Some(Usd(m)) if m > MAX_REPORT_MICROS => {
                return Err(format!(
                    "cost_usd must be at most {} (USD, for one request)",
                    format_usd(MAX_REPORT_MICROS)
                ))
            }
            Some(Usd(m)) => m,
            None => 0,
        };
        let latency_ms = range("latency_ms", self.latency_ms, 86_400_000)?;
        let upstream_status = match self.upstream_status {
            Some(s) if !(100..=599).contains(&s) => {
                return Err("upstream_status must be an HTTP status (100 to 599)".into())
            }
            other => other,
        };
        let retry_after_s = range("retry_after_s", self.retry_after_s, 86_400)?;
        // A lease's report (which a client may make itself where it reaches the data
        // plane) stops its provider key for at most the configured maximum, a cooldown
        // and a suspension alike.
        let cap = match lease {
            Some(_) => policy.lease_cooldown_max_ms,
            None => i64::MAX,
        };
        let (cooldown_ms, suspend_ms) = match upstream_status {
            Some(429) => {
                let asked = retry_after_s.map_or(policy.default_cooldown_ms, |s| (s * 1000).max(1));
                (asked.min(cap), 0)
            }
            Some(401 | 403) => (0, policy.suspend_ms.min(cap)),
            _ => (0, 0),
        };
        let source = lease
            .as_ref()
            .map_or_else(|| "data-token".to_string(), |l| format!("lease {l}"));
        Ok(Report {
            lease_expires_at_ms,
            id,
            lease,
            tokens,
            token_classes,
            cost_micros,
            usage_source: crate::usage::UsageSource::Reported,
            model,
            provider_key_id,
            provider: None,
            latency_ms,
            upstream_status,
            cooldown_ms,
            suspend_ms,
            source,
            // A learned reset is a cooldown like any other: capped alike.
            learned: self.learned.map(|l| l.capped(cap)),
            spend_now: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LeaseId;

    const POLICY: ProviderKeyPolicy = ProviderKeyPolicy {
        default_cooldown_ms: 60_000,
        suspend_ms: 3_600_000,
        lease_cooldown_max_ms: 10_000,
    };

    fn learned(reset_ms: i64) -> Option<LearnedLimits> {
        Some(LearnedLimits {
            remaining_requests: Some(0),
            requests_reset_ms: Some(reset_ms),
            ..LearnedLimits::default()
        })
    }

    fn lease() -> SignedLease {
        SignedLease {
            lease: LeaseId::new("6f1c2f7e-3a55-4c2e-9a55-2f0d5c1e9b10"),
            provider_key_id: None,
            expires_at_ms: 1,
            hold_micros: 0,
            price: None,
        }
    }

    #[test]
    fn a_learned_reset_is_capped_like_a_leases_cooldown() {
        let body = |status, reset_ms| ReportBody {
            upstream_status: Some(status),
            learned: learned(reset_ms),
            ..ReportBody::default()
        };
        let report = body(200, 20_000).validate(POLICY, Some(lease())).unwrap();
        assert_eq!(
            report.learned_cooldown_ms(),
            10_000,
            "capped by the lease maximum"
        );
        let report = body(200, 5_000).validate(POLICY, Some(lease())).unwrap();
        assert_eq!(report.learned_cooldown_ms(), 5_000);
        // An error status keeps its own cooldown or suspension.
        for status in [429, 401, 403] {
            let report = body(status, 5_000).validate(POLICY, Some(lease())).unwrap();
            assert_eq!(report.learned_cooldown_ms(), 0, "{status}");
            assert!(report.learned.is_some(), "still kept for the listing");
        }
    }

    #[test]
    fn a_report_body_cannot_state_learned_limits() {
        let parsed: Result<ReportBody, _> =
            serde_json::from_str(r#"{"learned": {"remaining_requests": 0}}"#);
        assert!(parsed.is_err());
    }
}
