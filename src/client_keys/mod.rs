//! Client API keys: the keys a gateway's users present, their limits, allow-lists,
//! expiry and prepaid balance.
//!
//! - [`input`]: the admin API's request bodies and their validation.
//! - [`store`]: the SQL, one text for both backends.
//! - [`service`]: the operations the admin API offers (create, patch, balance, …).
//!
//! Invariants:
//! - The secret is stored only as its SHA-256 lookup hash and an `enc:v1:` ciphertext;
//!   it leaves the process only in the create answer and in `reveal`.
//! - An empty allow-list is stored as `NULL` and means "all".
//! - Quotas beyond the per-minute windows (`daily_*_limit`, `spend_limits`,
//!   `model_limits`, see [`crate::quota`]) are stored as columns (JSON text for the
//!   sets), `NULL` when none. The cache fills a key's `settled` spend from
//!   `quota_usage` when it loads the record ([`cache`]).
//! - Balances are integer micro-USD: `balance_micros` is what was credited (`NULL` =
//!   no balance limit), `balance_used_micros` what accounting debited; the remaining
//!   balance shown to people is never below zero.

pub mod cache;
pub mod input;
pub mod service;
pub mod store;

use serde::Serialize;

use crate::clock::to_rfc3339;
use crate::money::Usd;

pub use service::{ClientKeys, KeyError};

/// A client key as stored (minus nothing: this type holds the ciphertext and hash, so it
/// is never serialized directly; [`KeyView`] is the public shape).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientKey {
    pub id: String,
    pub user_id: Option<String>,
    pub name: String,
    pub key_hash: String,
    pub key_encrypted: String,
    pub prefix: String,
    pub allowed_providers: Option<Vec<String>>,
    pub allowed_api_formats: Option<Vec<String>>,
    pub allowed_models: Option<Vec<String>>,
    pub rate_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
    pub concurrent_limit: Option<i64>,
    /// The key's quotas beyond its per-minute windows: requests and tokens per UTC day
    /// and spend limits (its `rate_limit`/`tpm_limit` stay the fields above).
    pub daily_request_limit: Option<i64>,
    pub daily_token_limit: Option<i64>,
    pub spend_limits: crate::quota::SpendLimits,
    /// Limits of requests for one model (by longest listed prefix) within this key.
    pub model_limits: crate::quota::ModelLimits,
    /// The key's requests, tokens and spend already applied to the database, per period
    /// of its day count and spend limits, when it was loaded (the seeds its day and spend
    /// counters are raised to at admission). Not stored.
    pub settled: crate::quota::Settled,
    pub expires_at: Option<i64>,
    pub is_standalone: bool,
    pub balance_micros: Option<i64>,
    pub balance_used_micros: i64,
    /// Bumped by every admin balance change (see `limits`: applied once by version).
    pub balance_version: i64,
    pub auto_delete_on_expiry: Option<bool>,
    pub is_active: bool,
    pub total_requests: i64,
    pub total_tokens: i64,
    pub total_cost_micros: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_used_at: Option<i64>,
}

impl ClientKey {
    /// The key's own quotas as a limit set: its day counts and spend limits (its
    /// per-minute limits are its own windows, not quota entries, so they stay `None`).
    pub fn own_quotas(&self) -> crate::quota::LimitSet {
        crate::quota::LimitSet {
            rate_limit: None,
            tpm_limit: None,
            daily_request_limit: self.daily_request_limit,
            daily_token_limit: self.daily_token_limit,
            spend_limits: self.spend_limits.clone(),
        }
    }

    /// What is left to spend, for standalone keys with a balance; never below zero.
    pub fn remaining_micros(&self) -> Option<i64> {
        if !self.is_standalone {
            return None;
        }
        self.balance_micros
            .map(|credited| credited.saturating_sub(self.balance_used_micros).max(0))
    }

    pub fn is_expired_at(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now_ms)
    }

    pub fn view(&self) -> KeyView<'_> {
        KeyView {
            id: &self.id,
            user_id: self.user_id.as_deref(),
            name: &self.name,
            prefix: &self.prefix,
            allowed_providers: self.allowed_providers.as_deref(),
            allowed_api_formats: self.allowed_api_formats.as_deref(),
            allowed_models: self.allowed_models.as_deref(),
            rate_limit: self.rate_limit,
            tpm_limit: self.tpm_limit,
            concurrent_limit: self.concurrent_limit,
            daily_request_limit: self.daily_request_limit,
            daily_token_limit: self.daily_token_limit,
            spend_limits: (!self.spend_limits.is_empty()).then_some(&self.spend_limits),
            model_limits: (!self.model_limits.is_empty()).then_some(&self.model_limits),
            expires_at: self.expires_at.map(to_rfc3339),
            is_standalone: self.is_standalone,
            balance_usd: self
                .is_standalone
                .then_some(self.balance_micros)
                .flatten()
                .map(Usd),
            balance_used_usd: Usd(self.balance_used_micros),
            remaining_balance_usd: self.remaining_micros().map(Usd),
            auto_delete_on_expiry: self.auto_delete_on_expiry,
            is_active: self.is_active,
            total_requests: self.total_requests,
            total_tokens: self.total_tokens,
            total_cost_usd: Usd(self.total_cost_micros),
            created_at: to_rfc3339(self.created_at),
            updated_at: to_rfc3339(self.updated_at),
            last_used_at: self.last_used_at.map(to_rfc3339),
        }
    }
}

/// The `Key` object of the admin API. Holds no secret, hash or ciphertext.
#[derive(Debug, Serialize)]
pub struct KeyView<'a> {
    pub id: &'a str,
    pub user_id: Option<&'a str>,
    pub name: &'a str,
    pub prefix: &'a str,
    pub allowed_providers: Option<&'a [String]>,
    pub allowed_api_formats: Option<&'a [String]>,
    pub allowed_models: Option<&'a [String]>,
    pub rate_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
    pub concurrent_limit: Option<i64>,
    pub daily_request_limit: Option<i64>,
    pub daily_token_limit: Option<i64>,
    /// `null` when the key has none (spend in USD).
    pub spend_limits: Option<&'a crate::quota::SpendLimits>,
    /// `null` when the key has none.
    pub model_limits: Option<&'a crate::quota::ModelLimits>,
    pub expires_at: Option<String>,
    pub is_standalone: bool,
    pub balance_usd: Option<Usd>,
    pub balance_used_usd: Usd,
    pub remaining_balance_usd: Option<Usd>,
    pub auto_delete_on_expiry: Option<bool>,
    pub is_active: bool,
    pub total_requests: i64,
    pub total_tokens: i64,
    pub total_cost_usd: Usd,
    pub created_at: String,
    pub updated_at: String,
    pub last_used_at: Option<String>,
}
