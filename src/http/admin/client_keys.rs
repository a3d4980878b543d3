//! The admin routes of client keys: create, list, read, change, delete, reveal, balance,
//! statistics and the expiry pass.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client_keys::input::{BalanceRequest, CreateKeyRequest, ExpireRequest, PatchKeyRequest};
use crate::client_keys::store::ListFilter;
use crate::client_keys::ClientKey;
use crate::clock::{now_ms, parse_instant, to_rfc3339, DateEdge};
use crate::http::error::ApiError;
use crate::http::extract::{optional_bool, AdminBody, IdPath, QueryArgs};
use crate::http::state::AppState;

use crate::money::Usd;

fn key_json(key: &ClientKey) -> Json<Value> {
    Json(json!(key.view()))
}

pub(super) async fn create_key(
    State(state): State<AppState>,
    AdminBody(body): AdminBody<CreateKeyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let new_key = body.validate(now_ms()).map_err(ApiError::bad_request)?;
    let (key, secret) = state.keys.create(new_key).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": key.view(), "secret": secret})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    user_id: Option<String>,
    active: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ActiveQuery {
    active: Option<String>,
}

async fn list(state: &AppState, filter: ListFilter) -> Result<Json<Value>, ApiError> {
    let keys = state.keys.list(&filter).await?;
    let views: Vec<_> = keys.iter().map(ClientKey::view).collect();
    Ok(Json(json!({ "keys": views })))
}

pub(super) async fn list_user_keys(
    State(state): State<AppState>,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = ListFilter {
        standalone: false,
        user_id: q.user_id.filter(|u| !u.is_empty()),
        active: optional_bool("active", q.active.as_deref())?,
    };
    list(&state, filter).await
}

pub(super) async fn list_standalone_keys(
    State(state): State<AppState>,
    QueryArgs(q): QueryArgs<ActiveQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = ListFilter {
        standalone: true,
        user_id: None,
        active: optional_bool("active", q.active.as_deref())?,
    };
    list(&state, filter).await
}

pub(super) async fn get_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    Ok(key_json(&state.keys.get(&id).await?))
}

pub(super) async fn patch_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    AdminBody(body): AdminBody<PatchKeyRequest>,
) -> Result<Json<Value>, ApiError> {
    let patch = body.validate().map_err(ApiError::bad_request)?;
    Ok(key_json(&state.keys.update(&id, &patch).await?))
}

pub(super) async fn delete_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    state.keys.disable(&id).await?;
    Ok(key_json(&state.keys.get(&id).await?))
}

pub(super) async fn reveal_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let secret = state.keys.reveal(&id).await?;
    Ok(Json(json!({ "secret": secret })))
}

pub(super) async fn adjust_balance(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    AdminBody(body): AdminBody<BalanceRequest>,
) -> Result<Json<Value>, ApiError> {
    Ok(key_json(
        &state
            .keys
            .adjust_balance(&id, body.amount_usd.micros())
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatsQuery {
    start: Option<String>,
    end: Option<String>,
}

pub(super) async fn key_stats(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    QueryArgs(q): QueryArgs<StatsQuery>,
) -> Result<Json<Value>, ApiError> {
    let bound = |name: &str, value: Option<String>, edge| -> Result<Option<i64>, ApiError> {
        value
            .filter(|v| !v.is_empty())
            .map(|v| {
                parse_instant(&v, edge)
                    .map_err(|why| ApiError::bad_request(format!("{name}: {why}")))
            })
            .transpose()
    };
    let start = bound("start", q.start, DateEdge::Start)?;
    let end = bound("end", q.end, DateEdge::End)?;
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(ApiError::bad_request("start is after end"));
        }
    }
    let (key, stats) = state
        .keys
        .stats(&id, start.unwrap_or(i64::MIN), end.unwrap_or(i64::MAX))
        .await?;
    Ok(Json(json!({
        "key_id": key.id,
        "key_name": key.name,
        "start": start.map(to_rfc3339),
        "end": end.map(to_rfc3339),
        "total_requests": stats.requests,
        "total_tokens": stats.tokens,
        "total_cost_usd": Usd(stats.cost_micros),
        "total_cached_tokens": stats.classes.cached_tokens,
        "total_cache_write_tokens": stats.classes.cache_write_tokens,
        "total_reasoning_tokens": stats.classes.reasoning_tokens,
        "estimated_requests": stats.classes.estimated_requests,
        "avg_response_time_ms": stats.avg_latency_ms.unwrap_or(0.0),
        "daily_stats": stats.daily,
    })))
}

pub(super) async fn expire_keys(
    State(state): State<AppState>,
    AdminBody(body): AdminBody<ExpireRequest>,
) -> Result<Json<Value>, ApiError> {
    let auto_delete = body.auto_delete.unwrap_or(state.expiry_auto_delete);
    let expired = state.keys.expire(auto_delete).await?;
    Ok(Json(json!({
        "processed": expired.deleted.len() + expired.disabled.len(),
        "deleted": expired.deleted.len(),
        "disabled": expired.disabled.len(),
    })))
}
