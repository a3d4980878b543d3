//! What an admission is asked and what it answers: the body of `POST /v1/admit` (also
//! built by `/authz`), an admitted request, the refusals, and the defaults for what a
//! request does not say.

use std::sync::Arc;

use serde::Deserialize;

use crate::client_keys::ClientKey;
use crate::db::StoreError;
use crate::limits::{CounterError, Denial, LeaseId, Usage};
use crate::pool::cache::Candidate;
use crate::prices::Price;

use super::quotas::{describe, QuotaStatus};

/// The body of `POST /v1/admit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitBody {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub api_format: Option<String>,
    #[serde(default)]
    pub estimated_tokens: Option<i64>,
    #[serde(default)]
    pub select: bool,
    /// `/authz` only: pick a provider key when the provider has a pool, and admit
    /// without one when it has none (contract section 3). `select` is stricter: no
    /// active key there is `NO_PROVIDER_KEY`.
    #[serde(skip)]
    pub select_if_pooled: bool,
    /// `/authz` only: input tokens estimated from the request body it saw (a quarter of
    /// its bytes), priced into the balance hold.
    #[serde(skip)]
    pub input_estimate: i64,
    /// `/authz` only: a stream whose answer will not state its usage (an OpenAI stream
    /// without `stream_options.include_usage`, or a body cut short before `stream`) and
    /// whose body states no output limit. Charged its hold, so it is refused under a
    /// balance or a spend limit.
    #[serde(skip)]
    pub usage_unstated: bool,
}

/// An admitted request.
#[derive(Debug)]
pub struct Admitted {
    pub lease: LeaseId,
    /// The signed lease id the caller gets (see [`crate::lease`]).
    pub lease_id: String,
    pub key: Arc<ClientKey>,
    pub expires_at_ms: i64,
    pub usage: Usage,
    /// The provider key picked in the same step, when one was asked for.
    pub provider_key: Option<Candidate>,
    /// Admitted without Redis, by this `KEYWARD_ON_BACKEND_ERROR` mode.
    pub degraded: Option<&'static str>,
    /// The request's quota entries, with their usage after the admission.
    pub quotas: Vec<QuotaStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("no client key in the request")]
    MissingKey,
    #[error("unknown client key")]
    InvalidKey,
    #[error("the client key is disabled")]
    KeyDisabled,
    #[error("the client key has expired")]
    KeyExpired,
    /// The name refused ("" when the request names none).
    #[error("{}", not_allowed("provider", .0))]
    ProviderNotAllowed(String),
    #[error("{}", not_allowed("model", .0))]
    ModelNotAllowed(String),
    #[error("{}", not_allowed("API format", .0))]
    ApiFormatNotAllowed(String),
    #[error("the estimate of {estimate} tokens is larger than the key's limit of {limit} tokens per minute")]
    TokensExceedLimit { estimate: i64, limit: i64 },
    #[error("the estimate of {estimate} tokens is larger than {}", describe(.quota))]
    TokensExceedQuota {
        estimate: i64,
        quota: Box<QuotaStatus>,
    },
    #[error("this request's hold of {} USD is larger than {}", crate::money::format_usd(*.hold), describe(.quota))]
    HoldExceedsSpendLimit { hold: i64, quota: Box<QuotaStatus> },
    #[error("{}", limited_message(.reason, .quotas))]
    Limited {
        reason: Denial,
        retry_after_ms: Option<i64>,
        key: Arc<ClientKey>,
        usage: Usage,
        /// The request's quota entries as the refusal saw them (`Denial::Quota`'s index
        /// points here).
        quotas: Box<[QuotaStatus]>,
    },
    #[error("provider `{0}` has no active provider key")]
    NoProviderKey(String),
    #[error("{0} has no price: a key with a balance or a spend limit is charged at a model's price, so set one (PUT /admin/prices/<provider>/<model>) or KEYWARD_DEFAULT_PRICE")]
    PriceUnknown(String),
    #[error("every key of provider `{provider}` is cooling down, suspended or at its limits")]
    PoolExhausted {
        provider: String,
        retry_after_ms: i64,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Counters(#[from] CounterError),
}

fn limited_message(reason: &Denial, quotas: &[QuotaStatus]) -> String {
    if let Denial::Quota { index, exhausted } = reason {
        let Some(quota) = quotas.get(*index) else {
            return "a quota is used up".into();
        };
        let what = describe(quota);
        return match (quota.kind, exhausted) {
            (crate::limits::QuotaKind::Spend(_), false) => {
                format!("{what} is held by requests in flight")
            }
            (crate::limits::QuotaKind::Spend(_), true) => {
                format!("{what} is used up, or has less room left than this request's hold")
            }
            _ => format!("{what} is reached"),
        };
    }
    let text = match reason {
        Denial::Requests => "requests-per-minute limit reached",
        Denial::Tokens => "tokens-per-minute limit reached",
        Denial::Concurrency => "all concurrent-request slots of this key are in use",
        Denial::BalanceExhausted => {
            "the key's remaining balance is used up, or smaller than this request's hold"
        }
        Denial::BalanceCommitted => "the key's remaining balance is held by requests in flight",
        Denial::PoolExhausted => "every provider key is cooling down, suspended or at its limits",
        Denial::Quota { .. } => "",
    };
    text.to_string()
}

/// What an admission assumes where a request does not say.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub lease_ttl_ms: i64,
    /// `KEYWARD_DEFAULT_ESTIMATED_TOKENS`: the estimate of a request that names none.
    pub tokens: i64,
    /// `KEYWARD_DEFAULT_PRICE`: the price of a model without one.
    pub price: Option<Price>,
}

/// An allow-list's refusal of `name` ("" when the request names no `what`).
fn not_allowed(what: &str, name: &str) -> String {
    if name.is_empty() {
        format!("the request names no {what}, and this key allows only listed ones")
    } else {
        format!("{what} `{name}` is not allowed for this key")
    }
}
