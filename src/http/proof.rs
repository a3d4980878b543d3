//! Who may call the data plane (contract guarantee 9): select and reports without a
//! lease need the data-plane token; reports and renewals need a lease this deployment
//! signed. Every call refused for lack of proof is counted in
//! `keyward_data_plane_refusals_total` and logged, at most once a second.

use axum::http::HeaderMap;

use super::error::ApiError;
use super::state::AppState;
use crate::lease::SignedLease;

/// Counts a data-plane call refused for lack of proof, or a suspicious one, and logs it:
/// at most one warning a second, so that callers without a credential cannot flood the
/// log (the metric counts every one).
pub(super) fn refused(endpoint: &'static str, reason: &'static str, error: ApiError) -> ApiError {
    static LOG: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
    crate::metrics::get()
        .data_plane_refusals
        .with_label_values(&[endpoint, reason])
        .inc();
    if let Some(also) = LOG.ready() {
        tracing::warn!(
            endpoint,
            reason,
            also_refused_unlogged = also,
            "data-plane call refused"
        );
    }
    error
}

/// `/v1/select` and reports without a lease need `Authorization: Bearer
/// <KEYWARD_DATA_TOKEN>`.
pub(super) fn require_data_token(
    state: &AppState,
    headers: &HeaderMap,
    endpoint: &'static str,
) -> Result<(), ApiError> {
    let Some(expected) = &state.data_token_digest else {
        return Err(refused(
            endpoint,
            "token_not_configured",
            ApiError::data_token_not_configured(),
        ));
    };
    if super::bearer_matches(headers, expected) {
        return Ok(());
    }
    let reason = match headers.contains_key(axum::http::header::AUTHORIZATION) {
        true => "wrong_token",
        false => "no_token",
    };
    Err(refused(endpoint, reason, ApiError::data_token_missing()))
}

/// The lease a lease id proves, or the refusal.
pub(super) fn verified_lease(
    state: &AppState,
    text: &str,
    endpoint: &'static str,
) -> Result<SignedLease, ApiError> {
    state.admission.verify_lease(text).ok_or_else(|| {
        refused(
            endpoint,
            "lease_not_found",
            ApiError::lease_not_found("not a lease id this deployment issued"),
        )
    })
}
