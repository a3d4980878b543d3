//! Every error code the product answers, each with its HTTP status: one closed list, so
//! an error body cannot carry a code that is not here, and `docs/api.md`'s table is
//! checked against [`ErrorCode::ALL`] (tests/docs.rs).

use axum::http::StatusCode;

/// Declares the enum, its wire text and its status from one table.
macro_rules! error_codes {
    ($($variant:ident = $text:literal, $status:ident;)*) => {
        /// The `code` of the contract's error body.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order of `docs/api.md`'s table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as the body and the `x-keyward-error` header carry it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)*
                }
            }

            /// The status every answer with this code has.
            pub const fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)*
                }
            }
        }
    };
}

error_codes! {
    BadRequest = "BAD_REQUEST", BAD_REQUEST;
    MissingKey = "MISSING_KEY", UNAUTHORIZED;
    InvalidKey = "INVALID_KEY", UNAUTHORIZED;
    Unauthorized = "UNAUTHORIZED", UNAUTHORIZED;
    InsufficientBalance = "INSUFFICIENT_BALANCE", PAYMENT_REQUIRED;
    BudgetExceeded = "BUDGET_EXCEEDED", PAYMENT_REQUIRED;
    KeyDisabled = "KEY_DISABLED", FORBIDDEN;
    KeyExpired = "KEY_EXPIRED", FORBIDDEN;
    ProviderNotAllowed = "PROVIDER_NOT_ALLOWED", FORBIDDEN;
    ModelNotAllowed = "MODEL_NOT_ALLOWED", FORBIDDEN;
    ApiFormatNotAllowed = "API_FORMAT_NOT_ALLOWED", FORBIDDEN;
    PriceUnknown = "PRICE_UNKNOWN", FORBIDDEN;
    DataTokenNotConfigured = "DATA_TOKEN_NOT_CONFIGURED", FORBIDDEN;
    AdminDisabled = "ADMIN_DISABLED", FORBIDDEN;
    NotFound = "NOT_FOUND", NOT_FOUND;
    LeaseNotFound = "LEASE_NOT_FOUND", NOT_FOUND;
    MethodNotAllowed = "METHOD_NOT_ALLOWED", METHOD_NOT_ALLOWED;
    LeaseReportTooLate = "LEASE_REPORT_TOO_LATE", CONFLICT;
    KeyringMismatch = "KEYRING_MISMATCH", CONFLICT;
    ReplayRefused = "REPLAY_REFUSED", CONFLICT;
    RequestTimeout = "REQUEST_TIMEOUT", REQUEST_TIMEOUT;
    PayloadTooLarge = "PAYLOAD_TOO_LARGE", PAYLOAD_TOO_LARGE;
    TokensExceedLimit = "TOKENS_EXCEED_LIMIT", PAYLOAD_TOO_LARGE;
    NotStandalone = "NOT_STANDALONE", UNPROCESSABLE_ENTITY;
    ZeroAmount = "ZERO_AMOUNT", UNPROCESSABLE_ENTITY;
    BalanceRefused = "BALANCE_REFUSED", UNPROCESSABLE_ENTITY;
    RateLimited = "RATE_LIMITED", TOO_MANY_REQUESTS;
    ConcurrencyLimited = "CONCURRENCY_LIMITED", TOO_MANY_REQUESTS;
    ProviderKeysExhausted = "PROVIDER_KEYS_EXHAUSTED", TOO_MANY_REQUESTS;
    HeadersTooLarge = "HEADERS_TOO_LARGE", REQUEST_HEADER_FIELDS_TOO_LARGE;
    Internal = "INTERNAL", INTERNAL_SERVER_ERROR;
    NoProviderKey = "NO_PROVIDER_KEY", SERVICE_UNAVAILABLE;
    BackendUnavailable = "BACKEND_UNAVAILABLE", SERVICE_UNAVAILABLE;
    Busy = "BUSY", SERVICE_UNAVAILABLE;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn codes_are_distinct_upper_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(
                text.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{text}"
            );
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
    }
}
