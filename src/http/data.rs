//! The data plane (`KEYWARD_LISTEN`): admit, select, report, renew, health and readiness.
//!
//! Who may do what (contract guarantee 9): admit and `/authz` need a client key; report
//! and renew need a lease this deployment issued (verified by its signature, see
//! [`crate::lease`]); select and reports without a lease need the data-plane token
//! (`http::proof` checks both). Reports and renewals are `http::report`'s.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{DataBody, UnreadBody};
use super::proof::require_data_token;
use super::ratelimit;
use super::state::AppState;
use crate::admission::{AdmitBody, AdmitError, Admitted};
use crate::clock::to_rfc3339;
use crate::money::Usd;

/// How long `/readyz` waits for a backend before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/admit", post(admit))
        .route("/v1/select", post(select))
        .route("/v1/report", post(super::report::report))
        .route("/v1/report/upstream", post(super::report::report_upstream))
        .route("/v1/leases/{lease_id}/renew", post(super::report::renew))
        .route("/authz", axum::routing::any(super::authz::authz))
        .route("/authz/{*path}", axum::routing::any(super::authz::authz))
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
    lease_id: &'a str,
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
        lease_id: &a.lease_id,
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

/// The 200 answer of an admission: what `Json(body).into_response()` answers, written
/// into one buffer of its usual size (axum's starts at 128 bytes and grows twice).
fn admitted_response(body: &AdmittedBody<'_>) -> Response {
    let mut buf = Vec::with_capacity(768);
    match serde_json::to_writer(&mut buf, body) {
        Ok(()) => {
            let mut response = Response::new(axum::body::Body::from(buf));
            // Room for the rate-limit headers too (`ratelimit::apply`): the map is then
            // allocated once, not grown and rehashed when they arrive.
            *response.headers_mut() = axum::http::HeaderMap::with_capacity(12);
            response.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            response
        }
        // As `Json` does: a body that cannot be serialized is a 500 (never for this one).
        Err(_) => Json(body).into_response(),
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

async fn admit(State(state): State<AppState>, DataBody(body): DataBody<AdmitBody>) -> Response {
    let started = std::time::Instant::now();
    match state.admission.admit(&body).await {
        Ok(admitted) => {
            crate::metrics::decision("admit", started, None);
            let mut response = admitted_response(&admitted_body(&admitted));
            ratelimit::apply(
                response.headers_mut(),
                &admitted.key,
                &admitted.usage,
                &admitted.quotas,
            );
            ratelimit::degraded(response.headers_mut(), admitted.degraded);
            response
        }
        Err(e) => {
            let limits = match &e {
                AdmitError::Limited {
                    key, usage, quotas, ..
                } => Some((key.clone(), *usage, quotas.to_vec())),
                _ => None,
            };
            let error = ApiError::from(e);
            crate::metrics::decision("admit", started, Some((error.code.as_str(), error.limit)));
            let mut response = error.into_response();
            if let Some((key, usage, quotas)) = limits {
                ratelimit::apply(response.headers_mut(), &key, &usage, &quotas);
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
    body: UnreadBody,
) -> Result<Json<Value>, ApiError> {
    // The token first: a caller without it learns nothing, not even about its body, and
    // makes keyward hold none of it.
    require_data_token(&state, &headers, "select")?;
    let body: SelectBody = body.json().await?;
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
    if let crate::limits::Counters::Redis(redis) = &state.counters {
        checks["redis"] = json!(check("redis", counters));
        // Another replica's shard count is recorded in Redis: out of the rotation.
        if redis.layout_mismatch() {
            checks["redis"] = json!("layout_mismatch");
        }
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
