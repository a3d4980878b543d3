//! The provider key pool: upstream API keys per provider, picked per request.
//!
//! - [`input`]: the admin API's bodies and their validation.
//! - [`store`]: the SQL.
//! - [`cache`]: per provider, the active keys with their values decrypted once, in the
//!   order selection tries them.
//! - [`service`]: the admin operations.
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
pub mod service;
pub mod store;

use serde::Serialize;

use crate::clock::to_rfc3339;

pub use service::{PoolError, ProviderKeys};

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveState {
    pub requests_last_60s: i64,
    pub tokens_last_60s: i64,
    pub cooldown_remaining_ms: i64,
    pub suspended_remaining_ms: i64,
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
