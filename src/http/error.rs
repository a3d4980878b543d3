//! The one place where errors become HTTP responses.
//!
//! Policy: every error a client sees is the contract's body
//! `{"error": {"code", "message", "retry_after_ms"?, "limit"?}}`. 4xx messages say what
//! was wrong with the request and are not logged above debug. 5xx causes are logged here
//! with their full chain and never sent: the client gets a generic message. No message
//! carries a secret: domain errors are built from ids and field names only.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::admission::AdmitError;
use crate::client_keys::KeyError;
use crate::db::StoreError;
use crate::limits::{CounterError, Denial};
use crate::pool::PoolError;
use crate::prices::PriceError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    pub limit: Option<&'static str>,
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
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_ms: None,
            limit: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    /// A lease id that keyward did not issue, that was altered, or (on renewal) whose
    /// lease is over.
    pub fn lease_not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "LEASE_NOT_FOUND", message)
    }

    /// A call that needs the data-plane token came without it or with a wrong one.
    pub fn data_token_missing() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong data-plane token (Authorization: Bearer <KEYWARD_DATA_TOKEN>)",
        )
    }

    /// A call that needs the data-plane token, while none is configured.
    pub fn data_token_not_configured() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "DATA_TOKEN_NOT_CONFIGURED",
            "this call needs the data-plane token, and KEYWARD_DATA_TOKEN is not set",
        )
    }

    /// A 5xx whose cause is logged here and replaced by a generic message.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %ErrorChain(cause), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "internal error",
        )
    }

    pub fn unavailable(cause: &dyn std::error::Error) -> Self {
        tracing::warn!(error = %ErrorChain(cause), "backend unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "BACKEND_UNAVAILABLE",
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
                code: self.code,
                message: &self.message,
                retry_after_ms: self.retry_after_ms,
                limit: self.limit,
            },
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
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
                ApiError::new(StatusCode::CONFLICT, "KEYRING_MISMATCH", e.to_string())
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
        let unprocessable =
            |code| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, e.to_string());
        match e {
            KeyError::NotFound(_) => ApiError::not_found(e.to_string()),
            KeyError::NotStandalone(_) => unprocessable("NOT_STANDALONE"),
            KeyError::ZeroAmount => unprocessable("ZERO_AMOUNT"),
            KeyError::BalanceRefused(_) => unprocessable("BALANCE_REFUSED"),
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
            StatusCode::SERVICE_UNAVAILABLE,
            "BACKEND_UNAVAILABLE",
            "the counter store cannot answer right now; retry later",
        )
    }
}

impl From<AdmitError> for ApiError {
    fn from(e: AdmitError) -> Self {
        let message = e.to_string();
        let status = |status, code| ApiError::new(status, code, message.clone());
        let retry = |mut err: ApiError, ms: Option<i64>| {
            err.retry_after_ms = ms.map(|ms| ms.max(1) as u64);
            err
        };
        match e {
            AdmitError::MissingKey => status(StatusCode::UNAUTHORIZED, "MISSING_KEY"),
            AdmitError::InvalidKey => status(StatusCode::UNAUTHORIZED, "INVALID_KEY"),
            AdmitError::KeyDisabled => status(StatusCode::FORBIDDEN, "KEY_DISABLED"),
            AdmitError::KeyExpired => status(StatusCode::FORBIDDEN, "KEY_EXPIRED"),
            AdmitError::ProviderNotAllowed(_) => {
                status(StatusCode::FORBIDDEN, "PROVIDER_NOT_ALLOWED")
            }
            AdmitError::ModelNotAllowed(_) => status(StatusCode::FORBIDDEN, "MODEL_NOT_ALLOWED"),
            AdmitError::ApiFormatNotAllowed(_) => {
                status(StatusCode::FORBIDDEN, "API_FORMAT_NOT_ALLOWED")
            }
            AdmitError::TokensExceedLimit { .. } => {
                let mut err = status(StatusCode::PAYLOAD_TOO_LARGE, "TOKENS_EXCEED_LIMIT");
                err.limit = Some("tokens");
                err
            }
            AdmitError::Limited {
                reason,
                retry_after_ms,
                ..
            } => {
                let (code, limit) = match reason {
                    Denial::Requests => ("RATE_LIMITED", "requests"),
                    Denial::Tokens => ("RATE_LIMITED", "tokens"),
                    Denial::Concurrency => ("CONCURRENCY_LIMITED", "concurrency"),
                    Denial::BalanceCommitted => ("CONCURRENCY_LIMITED", "balance"),
                    Denial::PoolExhausted => {
                        return retry(
                            status(StatusCode::TOO_MANY_REQUESTS, "PROVIDER_KEYS_EXHAUSTED"),
                            retry_after_ms,
                        );
                    }
                    Denial::BalanceExhausted => {
                        return status(StatusCode::PAYMENT_REQUIRED, "INSUFFICIENT_BALANCE");
                    }
                };
                let mut err = retry(status(StatusCode::TOO_MANY_REQUESTS, code), retry_after_ms);
                err.limit = Some(limit);
                err
            }
            AdmitError::NoProviderKey(_) => {
                status(StatusCode::SERVICE_UNAVAILABLE, "NO_PROVIDER_KEY")
            }
            AdmitError::PriceUnknown(_) => status(StatusCode::FORBIDDEN, "PRICE_UNKNOWN"),
            AdmitError::PoolExhausted { retry_after_ms, .. } => retry(
                status(StatusCode::TOO_MANY_REQUESTS, "PROVIDER_KEYS_EXHAUSTED"),
                Some(retry_after_ms),
            ),
            AdmitError::BadRequest(_) => status(StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            AdmitError::Store(inner) => inner.into(),
            AdmitError::Counters(inner) => inner.into(),
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::NotFound(_) => ApiError::not_found(e.to_string()),
            PoolError::Store(inner) => inner.into(),
            PoolError::Counters(inner) => inner.into(),
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
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "slow down");
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
