//! Usage history: one row per reported request, key totals and balances, and the
//! per-key statistics the admin API shows.
//!
//! Invariant: a usage record is applied at most once, keyed by its id (the lease id).
//! [`store::apply`] inserts the row and moves the key's totals and balance in the same
//! transaction, and only when the insert actually added a row; re-applying a batch
//! changes nothing. This is the database half of exactly-once accounting.

pub mod api_format;
pub mod dead_letters;
pub mod ledger;
pub mod parse;
pub mod store;

use serde::{Deserialize, Serialize};

use crate::money::Usd;

/// What one finished request cost; becomes one `usage_records` row. Serialized as JSON
/// only for a dead letter (`usage_dead_letters.record`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The lease id, or a fresh id for a report that had none.
    pub id: String,
    pub key_id: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub api_format: Option<String>,
    pub provider_key_id: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
    pub latency_ms: Option<i64>,
    pub upstream_status: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Cached input tokens, within `prompt_tokens`.
    #[serde(default)]
    pub cached_tokens: i64,
    /// Cache-write tokens, within `prompt_tokens`.
    #[serde(default)]
    pub cache_write_tokens: i64,
    /// Reasoning tokens, within `completion_tokens`.
    #[serde(default)]
    pub reasoning_tokens: i64,
    /// Where the numbers came from. A record set aside by an older release has none:
    /// it was reported.
    #[serde(default, deserialize_with = "source_from_text")]
    pub source: UsageSource,
}

/// Where a record's numbers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// Stated by the caller of `/v1/report`.
    #[default]
    Reported,
    /// Read from the upstream's answer by keyward.
    Parsed,
    /// The admission's estimate (no usage could be read): the hold is charged.
    Estimated,
}
impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reported => "reported",
            Self::Parsed => "parsed",
            Self::Estimated => "estimated",
        }
    }
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "reported" => Some(Self::Reported),
            "parsed" => Some(Self::Parsed),
            "estimated" => Some(Self::Estimated),
            _ => None,
        }
    }
}

/// Reads a [`UsageSource`] through [`UsageSource::parse`], the one place its text is read.
fn source_from_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<UsageSource, D::Error> {
    let text = String::deserialize(d)?;
    UsageSource::parse(&text)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown usage source `{text}`")))
}

impl UsageRecord {
    /// Prompt plus completion tokens, saturating (the writer checks the range itself
    /// before it stores a record).
    pub fn total_tokens(&self) -> i64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Totals over a time range, and the same per UTC day.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyStats {
    pub requests: i64,
    pub tokens: i64,
    pub cost_micros: i64,
    pub avg_latency_ms: Option<f64>,
    pub classes: ClassTotals,
    pub daily: Vec<DayStats>,
}

/// Sums of the token classes over some rows, and how many of them were charged the
/// admission's estimate (their numbers are not the upstream's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ClassTotals {
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub estimated_requests: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayStats {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    pub requests: i64,
    pub tokens: i64,
    pub cost_usd: Usd,
    #[serde(flatten)]
    pub classes: ClassTotals,
}
