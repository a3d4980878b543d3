//! The one place where errors become HTTP responses.
//!
//! Policy: every error a client sees is the contract's body
//! `{"error": {"code", "message", "retry_after_ms"?, "limit"?}}` (a quota's refusal adds
//! `scope`, `model`, `period` and `reset_at`). 4xx messages say what
//! was wrong with the request and are not logged above debug. 5xx causes are logged here
//! with their full chain and never sent: the client gets a generic message. No message
//! carries a secret: domain errors are built from ids and field names only. Every code
//! is an [`ErrorCode`], whose status it carries: no body is built from a bare string.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub use super::error_code::ErrorCode;
use crate::admission::quotas::QuotaStatus;
use crate::admission::AdmitError;
use crate::client_keys::KeyError;
use crate::db::StoreError;
use crate::limits::{CounterError, Denial, QuotaKind};
use crate::prices::PriceError;
use crate::provider_keys::ProviderKeyError;
use crate::quota::ScopeKind;
use crate::reporting::ReportError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    pub limit: Option<&'static str>,
    /// A quota's refusal: which one, and when it resets.
    pub quota: Option<Box<QuotaFields>>,
}

/// The body fields naming the quota that refused: `scope` (`key` | `user`), `model`
/// (the listed model entry, for a per-model limit), `period` (`minute` | `day` | `week`
/// | `month` | `total`) and `reset_at` (RFC 3339; none for a total).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaFields {
    pub scope: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub period: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_at: Option<String>,
}

impl QuotaFields {
    /// `reset_at` is `now_ms` plus the entry's reset time (when it has one).
    fn of(quota: &QuotaStatus, now_ms: Option<i64>) -> QuotaFields {
        QuotaFields {
            scope: match quota.scope {
                ScopeKind::Key => "key",
                ScopeKind::User => "user",
            },
            model: quota.model.clone(),
            period: quota.kind.period().map_or("minute", |p| p.as_str()),
            reset_at: now_ms
                .filter(|_| quota.used.reset_ms > 0)
                .map(|now| crate::clock::to_rfc3339(now + quota.used.reset_ms)),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<&'a str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    quota: Option<&'a QuotaFields>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
            limit: None,
            quota: None,
        }
    }

    /// The status of the answer: always the code's.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// A lease id that keyward did not issue, that was altered, or (on renewal) whose
    /// lease is over.
    pub fn lease_not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::LeaseNotFound, message)
    }

    /// A call that needs the data-plane token came without it or with a wrong one.
    pub fn data_token_missing() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "missing or wrong data-plane token (Authorization: Bearer <KEYWARD_DATA_TOKEN>)",
        )
    }

    /// A call that needs the data-plane token, while none is configured.
    pub fn data_token_not_configured() -> Self {
        Self::new(
            ErrorCode::DataTokenNotConfigured,
            "this call needs the data-plane token, and KEYWARD_DATA_TOKEN is not set",
        )
    }

    /// A 5xx whose cause is logged here and replaced by a generic message.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %ErrorChain(cause), "internal error");
        Self::new(ErrorCode::Internal, "internal error")
    }

    pub fn unavailable(cause: &dyn std::error::Error) -> Self {
        tracing::warn!(error = %ErrorChain(cause), "backend unavailable");
        Self::new(
            ErrorCode::BackendUnavailable,
            "the database cannot answer right now; retry later",
        )
    }
}

/// Formats an error with its sources: `outer: inner: root`.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Many errors (sqlx's among them) already print their source; skip repeats.
        let mut shown = self.0.to_string();
        let mut source = self.0.source();
        while let Some(e) = source {
            let text = e.to_string();
            if !shown.contains(&text) {
                shown = format!("{shown}: {text}");
            }
            source = e.source();
        }
        f.write_str(&shown)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code.as_str(),
                message: &self.message,
                retry_after_ms: self.retry_after_ms,
                limit: self.limit,
                quota: self.quota.as_deref(),
            },
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status(), json).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(ms) = self.retry_after_ms {
            // Whole seconds, rounded up, at least 1.
            let secs = ms.div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Unavailable(_) => ApiError::unavailable(&e),
            _ => ApiError::internal(&e),
        }
    }
}

impl From<crate::rotation::RotateError> for ApiError {
    fn from(e: crate::rotation::RotateError) -> Self {
        use crate::rotation::RotateError;
        match e {
            RotateError::KeyringMismatch { .. } => {
                ApiError::new(ErrorCode::KeyringMismatch, e.to_string())
            }
            RotateError::Store(inner) => inner.into(),
        }
    }
}

impl From<crate::accounting::embedded::WriterFailing> for ApiError {
    fn from(e: crate::accounting::embedded::WriterFailing) -> Self {
        ApiError::unavailable(&e)
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        let with = |code| ApiError::new(code, e.to_string());
        match e {
            KeyError::NotFound(_) => ApiError::not_found(e.to_string()),
            KeyError::NotStandalone(_) => with(ErrorCode::NotStandalone),
            KeyError::ZeroAmount => with(ErrorCode::ZeroAmount),
            KeyError::BalanceRefused(_) => with(ErrorCode::BalanceRefused),
            KeyError::Invalid(_) => ApiError::bad_request(e.to_string()),
            KeyError::Undecryptable(_) => ApiError::internal(&e),
            KeyError::Store(inner) => inner.into(),
        }
    }
}

impl From<CounterError> for ApiError {
    fn from(e: CounterError) -> Self {
        tracing::warn!(error = %ErrorChain(&e), "counter store unavailable");
        ApiError::new(
            ErrorCode::BackendUnavailable,
            "the counter store cannot answer right now; retry later",
        )
    }
}

impl From<AdmitError> for ApiError {
    fn from(e: AdmitError) -> Self {
        let message = e.to_string();
        let status = |code| ApiError::new(code, message.clone());
        let retry = |mut err: ApiError, ms: Option<i64>| {
            err.retry_after_ms = ms.map(|ms| ms.max(1) as u64);
            err
        };
        match e {
            AdmitError::MissingKey => status(ErrorCode::MissingKey),
            AdmitError::InvalidKey => status(ErrorCode::InvalidKey),
            AdmitError::KeyDisabled => status(ErrorCode::KeyDisabled),
            AdmitError::KeyExpired => status(ErrorCode::KeyExpired),
            AdmitError::ProviderNotAllowed(_) => status(ErrorCode::ProviderNotAllowed),
            AdmitError::ModelNotAllowed(_) => status(ErrorCode::ModelNotAllowed),
            AdmitError::ApiFormatNotAllowed(_) => status(ErrorCode::ApiFormatNotAllowed),
            AdmitError::TokensExceedLimit { .. } => {
                let mut err = status(ErrorCode::TokensExceedLimit);
                err.limit = Some("tokens");
                err
            }
            // Could never pass: no retry, no reset.
            AdmitError::TokensExceedQuota { quota, .. } => {
                let mut err = status(ErrorCode::TokensExceedLimit);
                err.limit = Some("tokens");
                err.quota = Some(Box::new(QuotaFields::of(&quota, None)));
                err
            }
            AdmitError::HoldExceedsSpendLimit { quota, .. } => {
                let mut err = status(ErrorCode::BudgetExceeded);
                err.limit = Some("spend");
                err.quota = Some(Box::new(QuotaFields::of(&quota, None)));
                err
            }
            AdmitError::Limited {
                reason: Denial::Quota { index, exhausted },
                retry_after_ms,
                usage,
                quotas,
                ..
            } => {
                let Some(quota) = quotas.get(index) else {
                    return ApiError::internal(&std::io::Error::other(
                        "a quota refusal names no entry of the request",
                    ));
                };
                let (code, limit) = match (quota.kind, exhausted) {
                    (QuotaKind::Spend(_), true) => (ErrorCode::BudgetExceeded, "spend"),
                    // Like a balance held in flight: a report or an expiry frees it.
                    (QuotaKind::Spend(_), false) => {
                        let mut err = retry(status(ErrorCode::ConcurrencyLimited), Some(1_000));
                        err.limit = Some("spend");
                        err.quota = Some(Box::new(QuotaFields::of(quota, Some(usage.now_ms))));
                        return err;
                    }
                    (kind, _) if kind.counts_requests() => (ErrorCode::RateLimited, "requests"),
                    _ => (ErrorCode::RateLimited, "tokens"),
                };
                let mut err = retry(status(code), retry_after_ms);
                err.limit = Some(limit);
                err.quota = Some(Box::new(QuotaFields::of(quota, Some(usage.now_ms))));
                err
            }
            AdmitError::Limited {
                reason,
                retry_after_ms,
                ..
            } => {
                let (code, limit) = match reason {
                    Denial::Requests => (ErrorCode::RateLimited, "requests"),
                    Denial::Tokens => (ErrorCode::RateLimited, "tokens"),
                    Denial::Concurrency => (ErrorCode::ConcurrencyLimited, "concurrency"),
                    Denial::BalanceCommitted => (ErrorCode::ConcurrencyLimited, "balance"),
                    Denial::PoolExhausted => {
                        return retry(status(ErrorCode::ProviderKeysExhausted), retry_after_ms);
                    }
                    Denial::BalanceExhausted => {
                        return status(ErrorCode::InsufficientBalance);
                    }
                    // Matched above; kept total without a panic path.
                    Denial::Quota { .. } => (ErrorCode::RateLimited, "requests"),
                };
                let mut err = retry(status(code), retry_after_ms);
                err.limit = Some(limit);
                err
            }
            AdmitError::NoProviderKey(_) => status(ErrorCode::NoProviderKey),
            AdmitError::PriceUnknown(_) => status(ErrorCode::PriceUnknown),
            AdmitError::PoolExhausted { retry_after_ms, .. } => retry(
                status(ErrorCode::ProviderKeysExhausted),
                Some(retry_after_ms),
            ),
            AdmitError::BadRequest(_) => status(ErrorCode::BadRequest),
            AdmitError::Store(inner) => inner.into(),
            AdmitError::Counters(inner) => inner.into(),
        }
    }
}

impl From<ProviderKeyError> for ApiError {
    fn from(e: ProviderKeyError) -> Self {
        match e {
            ProviderKeyError::NotFound(_) => ApiError::not_found(e.to_string()),
            ProviderKeyError::Store(inner) => inner.into(),
            ProviderKeyError::Counters(inner) => inner.into(),
        }
    }
}

impl From<ReportError> for ApiError {
    fn from(e: ReportError) -> Self {
        match e {
            ReportError::Invalid(message) => ApiError::bad_request(message),
            ReportError::NotTheLeasePick => ApiError::bad_request(e.to_string()),
            ReportError::TooLate => ApiError::new(ErrorCode::LeaseReportTooLate, e.to_string()),
            ReportError::Counters(inner) => inner.into(),
            ReportError::Accounting(inner) => inner.into(),
        }
    }
}

impl From<PriceError> for ApiError {
    fn from(e: PriceError) -> Self {
        match e {
            PriceError::NotFound { .. } => ApiError::not_found(e.to_string()),
            PriceError::Store(inner) => inner.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_and_retry_after() {
        let mut e = ApiError::new(ErrorCode::RateLimited, "slow down");
        e.retry_after_ms = Some(1001);
        e.limit = Some("requests");
        let response = e.into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let bytes = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "RATE_LIMITED", "message": "slow down",
                "retry_after_ms": 1001, "limit": "requests"}})
        );
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let mut e = ApiError::bad_request("x");
        e.retry_after_ms = Some(0);
        assert_eq!(e.into_response().headers()[header::RETRY_AFTER], "1");
    }
}
