//! The end of a lease on the data plane: `/v1/report`, `/v1/report/upstream` and
//! `/v1/leases/{lease_id}/renew`. These handlers check the proof and parse; settling a
//! report is [`crate::reporting`]'s.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{DataBody, TextPath, UnreadBody};
use super::proof::{refused, require_data_token, verified_lease};
use super::state::AppState;
use crate::clock::to_rfc3339;
use crate::reporting::body::ReportBody;
use crate::reporting::upstream::{UpstreamBody, UpstreamError};
use crate::reporting::{ReportError, Settled};
use crate::usage::UsageSource;

/// Fields a proxy can only send as headers (nginx `post_action`) fill what the JSON body
/// leaves out: `x-keyward-lease`, `x-keyward-provider-key-id`, `x-keyward-upstream-status`
/// (the last of nginx's list), `x-keyward-upstream-retry-after` (seconds) and
/// `x-keyward-upstream-time` (nginx's seconds, e.g. `0.123`).
fn report_from_headers(mut body: ReportBody, headers: &axum::http::HeaderMap) -> ReportBody {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.rsplit(',').next().unwrap_or(v).trim().to_string())
            .filter(|v| !v.is_empty() && v != "-")
    };
    body.lease_id = body.lease_id.or_else(|| get("x-keyward-lease"));
    body.provider_key_id = body
        .provider_key_id
        .or_else(|| get("x-keyward-provider-key-id"));
    body.upstream_status = body
        .upstream_status
        .or_else(|| get("x-keyward-upstream-status").and_then(|s| s.parse().ok()));
    body.retry_after_s = body
        .retry_after_s
        .or_else(|| get("x-keyward-upstream-retry-after").and_then(|s| s.parse().ok()));
    body.latency_ms = body.latency_ms.or_else(|| {
        get("x-keyward-upstream-time")
            .and_then(|s| s.parse::<f64>().ok())
            .map(|secs| (secs * 1000.0).round() as i64)
    });
    body
}

/// A report is authorized by its lease (it charges the lease's key, and an upstream
/// status acts only on the provider key picked for that lease), or, without a lease, by
/// the data-plane token. The lease may be in the body, so the body is read first: what
/// that lets a caller make keyward hold is bounded by its peer's budget
/// ([`super::extract::MAX_BODIES_HELD_PER_PEER`] for a remote peer). Settling it is [`crate::reporting`]'s.
pub(super) async fn report(
    State(state): State<AppState>,
    headers: HeaderMap,
    DataBody(body): DataBody<ReportBody>,
) -> Result<Json<Value>, ApiError> {
    let body = report_from_headers(body, &headers);
    let lease = match body.lease_id.as_deref() {
        Some(text) => Some(verified_lease(&state, text, "report")?),
        None => {
            require_data_token(&state, &headers, "report")?;
            None
        }
    };
    settled(
        state
            .reports
            .settle(body, lease, UsageSource::Reported)
            .await,
        "report",
    )
}

/// The answer to a settled report, or its refusal (one naming another provider key than
/// the lease's pick is counted as a refusal for lack of proof).
fn settled(
    result: Result<Settled, ReportError>,
    endpoint: &'static str,
) -> Result<Json<Value>, ApiError> {
    match result {
        Ok(Settled::Recorded) => Ok(Json(json!({"recorded": true}))),
        Ok(Settled::Duplicate) => Ok(Json(json!({"recorded": false, "duplicate": true}))),
        Err(e @ ReportError::NotTheLeasePick) => Err(refused(
            endpoint,
            "not_the_lease_provider_key",
            ApiError::from(e),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The proxies' report: the upstream's status, headers and an excerpt of its answer
/// ([`crate::reporting::upstream`]). Authorized by the lease in `x-keyward-lease` alone,
/// checked before the body is read; the report then acts only on that lease's key and
/// its pick, and settles like `/v1/report` with the tokens keyward read.
pub(super) async fn report_upstream(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: UnreadBody,
) -> Result<Json<Value>, ApiError> {
    const ENDPOINT: &str = "report_upstream";
    let text = headers
        .get("x-keyward-lease")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            refused(
                ENDPOINT,
                "no_lease",
                ApiError::bad_request("the x-keyward-lease header is required"),
            )
        })?;
    let lease = verified_lease(&state, text, ENDPOINT)?;
    // The body counts in its peer's budget: the proxy's, on loopback, which a tenant
    // sending bodies of its own from elsewhere cannot spend.
    let body: UpstreamBody = body.json().await?;
    let (report, read) = body
        .into_report(text, crate::clock::now_ms())
        .map_err(|e| match e {
            UpstreamError::Bad(m) => ApiError::bad_request(m),
            UpstreamError::TooLarge(m) => ApiError::new(ErrorCode::PayloadTooLarge, m),
        })?;
    crate::metrics::get()
        .upstream_usage
        .with_label_values(&[read.label()])
        .inc();
    settled(
        state
            .reports
            .settle(report, Some(lease), UsageSource::Parsed)
            .await,
        ENDPOINT,
    )
}

/// A renewal is authorized by the lease itself; its id does not change.
pub(super) async fn renew(
    State(state): State<AppState>,
    TextPath(lease_id): TextPath,
) -> Result<Json<Value>, ApiError> {
    let lease = verified_lease(&state, &lease_id, "renew")?;
    if !state.admission.may_renew(&lease.lease.key_id).await {
        return Err(ApiError::lease_not_found(
            "the lease's key is disabled, expired or deleted: its leases are not renewed",
        ));
    }
    let lease = state.admission.on_its_shard(lease.lease).await;
    match state
        .counters
        .renew(&lease, state.admission.lease_ttl_ms())
        .await?
    {
        Some(expires_at) => Ok(Json(
            json!({"lease_id": lease_id, "lease_expires_at": to_rfc3339(expires_at)}),
        )),
        None => Err(ApiError::lease_not_found(
            "the lease has expired or was already reported",
        )),
    }
}
