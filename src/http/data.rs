//! The data plane (`KEYWARD_LISTEN`): admit, select, report, renew, health and readiness.
//!
//! Who may do what (contract guarantee 9): admit and `/authz` need a client key; report
//! and renew need a lease this deployment issued (verified by its signature, see
//! [`crate::lease`]); select and reports without a lease need the data-plane token.
//! Every call refused for lack of proof is counted in
//! `keyward_data_plane_refusals_total` and logged.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{JsonBody, TextPath};
use super::ratelimit;
use super::state::AppState;
use crate::admission::{AdmitBody, AdmitError, Admitted};
use crate::clock::to_rfc3339;
use crate::lease::SignedLease;
use crate::money::Usd;
use crate::reporting::body::ReportBody;
use crate::reporting::upstream::{UpstreamBody, UpstreamError};
use crate::reporting::{ReportError, Settled};
use crate::usage::UsageSource;

/// How long `/readyz` waits for a backend before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/admit", post(admit))
        .route("/v1/select", post(select))
        .route("/v1/report", post(report))
        .route("/v1/report/upstream", post(report_upstream))
        .route("/v1/leases/{lease_id}/renew", post(renew))
        .route("/authz", axum::routing::any(super::authz::authz))
        .route("/authz/{*path}", axum::routing::any(super::authz::authz))
        .layer(axum::extract::DefaultBodyLimit::max(
            super::authz::MAX_AUTHZ_BODY,
        ))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { Json(super::openapi::data_plane()) }),
        )
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .with_state(state)
}

/// The body of an admission (contract section 3), serialized straight from borrowed
/// fields: this is the hottest response, so no intermediate `serde_json::Value`.
#[derive(Serialize)]
struct AdmittedBody<'a> {
    allowed: bool,
    lease_id: String,
    lease_expires_at: String,
    key_id: &'a str,
    provider_key: Option<PickedKey<'a>>,
    limits: Limits,
    remaining_balance_usd: Option<Usd>,
}

#[derive(Serialize)]
struct PickedKey<'a> {
    id: &'a str,
    provider: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct Limits {
    requests: Option<WindowBody>,
    tokens: Option<WindowBody>,
    concurrency: Option<ConcurrencyBody>,
}

#[derive(Serialize)]
struct WindowBody {
    limit: i64,
    remaining: i64,
    reset_ms: i64,
}

#[derive(Serialize)]
struct ConcurrencyBody {
    limit: i64,
    in_flight: i64,
}

fn admitted_body(a: &Admitted) -> AdmittedBody<'_> {
    let key = &a.key;
    let u = &a.usage;
    let window = |limit: Option<i64>, used: i64, reset_ms: i64| {
        limit.map(|limit| WindowBody {
            limit,
            remaining: (limit - used).max(0),
            reset_ms,
        })
    };
    AdmittedBody {
        allowed: true,
        lease_id: a.lease_id.clone(),
        lease_expires_at: to_rfc3339(a.expires_at_ms),
        key_id: &key.id,
        provider_key: a.provider_key.as_ref().map(|k| PickedKey {
            id: &k.id,
            provider: &k.provider,
            value: &k.value,
        }),
        limits: Limits {
            requests: window(key.rate_limit, u.requests_used, u.requests_reset_ms),
            tokens: window(key.tpm_limit, u.tokens_used, u.tokens_reset_ms),
            concurrency: key.concurrent_limit.map(|limit| ConcurrencyBody {
                limit,
                in_flight: u.in_flight,
            }),
        },
        remaining_balance_usd: u.balance_remaining.map(|r| Usd(r.max(0))),
    }
}

/// Prometheus text format (see [`crate::metrics`]).
async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(),
    )
}

async fn admit(State(state): State<AppState>, JsonBody(body): JsonBody<AdmitBody>) -> Response {
    let started = std::time::Instant::now();
    match state.admission.admit(&body).await {
        Ok(admitted) => {
            crate::metrics::decision("admit", started, None);
            let mut response = Json(admitted_body(&admitted)).into_response();
            ratelimit::apply(response.headers_mut(), &admitted.key, &admitted.usage);
            ratelimit::degraded(response.headers_mut(), admitted.degraded);
            response
        }
        Err(e) => {
            let limits = match &e {
                AdmitError::Limited { key, usage, .. } => Some((key.clone(), *usage)),
                _ => None,
            };
            let error = ApiError::from(e);
            crate::metrics::decision("admit", started, Some((error.code.as_str(), error.limit)));
            let mut response = error.into_response();
            if let Some((key, usage)) = limits {
                ratelimit::apply(response.headers_mut(), &key, &usage);
            }
            response
        }
    }
}

/// The body of `POST /v1/select`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectBody {
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    estimated_tokens: Option<i64>,
}

async fn select(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<JsonBody<SelectBody>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    // The token first: a caller without it learns nothing, not even about its body.
    require_data_token(&state, &headers, "select")?;
    let JsonBody(body) = body?;
    let provider = body
        .provider
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty());
    let started = std::time::Instant::now();
    let key = match state
        .admission
        .select(provider, body.estimated_tokens)
        .await
    {
        Ok(key) => {
            crate::metrics::decision("select", started, None);
            key
        }
        Err(e) => {
            let error = ApiError::from(e);
            crate::metrics::decision("select", started, Some((error.code.as_str(), error.limit)));
            return Err(error);
        }
    };
    Ok(Json(json!({"provider_key": {
        "id": key.id,
        "provider": key.provider,
        "label": key.label,
        "priority": key.priority,
        "value": key.value,
    }})))
}

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

/// Counts a data-plane call refused for lack of proof, or a suspicious one, and logs it:
/// at most one warning a second, so that callers without a credential cannot flood the
/// log (the metric counts every one).
fn refused(endpoint: &'static str, reason: &'static str, error: ApiError) -> ApiError {
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
fn require_data_token(
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
fn verified_lease(
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

/// A report is authorized by its lease (it charges the lease's key, and an upstream
/// status acts only on the provider key picked for that lease), or, without a lease, by
/// the data-plane token. Settling it is [`crate::reporting`]'s.
async fn report(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ReportBody>,
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
async fn report_upstream(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<JsonBody<UpstreamBody>, ApiError>,
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
    let JsonBody(body) = body?;
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
async fn renew(
    State(state): State<AppState>,
    TextPath(lease_id): TextPath,
) -> Result<Json<Value>, ApiError> {
    let lease = verified_lease(&state, &lease_id, "renew")?;
    match state
        .counters
        .renew(&lease.lease, state.admission.lease_ttl_ms())
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

/// Alive: the process answers. Touches no backend, so a database outage does not get
/// the pod restarted.
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

fn check<E: std::fmt::Display>(
    name: &str,
    result: Result<Result<(), E>, tokio::time::error::Elapsed>,
) -> &'static str {
    match result {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: {name} check failed");
            "unreachable"
        }
        Err(_) => "timeout",
    }
}

/// Ready: every backend this replica needs answers (and Redis holds the scripts).
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (db, counters) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, state.db.ping()),
        tokio::time::timeout(READY_TIMEOUT, state.counters.ready()),
    );
    let mut checks = json!({"database": check("database", db)});
    if state.accounting.failing() {
        checks["accounting"] = json!("cannot_write");
    }
    if matches!(state.counters, crate::limits::Counters::Redis(_)) {
        checks["redis"] = json!(check("redis", counters));
    }
    let gauge = &crate::metrics::get().ready;
    gauge
        .with_label_values(&["accounting"])
        .set(i64::from(!state.accounting.failing()));
    if let Some(checks) = checks.as_object() {
        for (name, value) in checks.iter().filter(|(name, _)| *name != "accounting") {
            gauge
                .with_label_values(&[name.as_str()])
                .set(i64::from(value == "ok"));
        }
    }
    let ready = checks
        .as_object()
        .is_some_and(|c| c.values().all(|v| v == "ok"));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ready { "ready" } else { "not_ready" }, "checks": checks})),
    )
}
