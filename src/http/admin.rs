//! The admin API (`KEYWARD_ADMIN_LISTEN`): client keys, provider keys, model prices and
//! encryption-key rotation, behind a bearer token.
//!
//! Also the accounting dead letters: usage records the database refused, listed and
//! replayed here (see `usage::dead_letters`).
//!
//! Invariants:
//! - Every route sits behind [`require_admin`]; with no token configured every call is
//!   refused (403 `ADMIN_DISABLED`).
//! - The token is compared as SHA-256 digests in constant time, so neither its content
//!   nor its length leaks through timing.
//! - No answer but create and reveal carries a secret.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{optional_bool, IdPath, JsonBody, QueryArgs};
use super::state::AppState;
use crate::client_keys::input::{BalanceRequest, CreateKeyRequest, ExpireRequest, PatchKeyRequest};
use crate::client_keys::store::ListFilter;
use crate::client_keys::ClientKey;
use crate::clock::{now_ms, parse_instant, to_rfc3339, DateEdge};

use crate::money::Usd;
use crate::pool::input::{AddKeyRequest, PatchProviderKeyRequest};
use crate::pool::valid_provider;
use crate::prices::{self, PriceInput};
use crate::usage::dead_letters::{self, Replay};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/admin/keys", post(create_key).get(list_user_keys))
        .route("/admin/keys/standalone", get(list_standalone_keys))
        .route("/admin/keys/expire", post(expire_keys))
        .route(
            "/admin/keys/{id}",
            get(get_key).patch(patch_key).delete(delete_key),
        )
        .route("/admin/keys/{id}/reveal", post(reveal_key))
        .route("/admin/keys/{id}/balance", post(adjust_balance))
        .route("/admin/keys/{id}/stats", get(key_stats))
        .route(
            "/admin/providers/{provider}/keys",
            post(add_provider_key).get(list_provider_keys),
        )
        .route(
            "/admin/provider-keys/{id}",
            axum::routing::patch(patch_provider_key).delete(delete_provider_key),
        )
        .route("/admin/provider-keys/{id}/usage", get(provider_key_usage))
        .route("/admin/provider-keys/{id}/reset", post(reset_provider_key))
        .route("/admin/prices", get(list_prices))
        .route(
            "/admin/prices/{provider}/{*model}",
            axum::routing::put(put_price).delete(delete_price),
        )
        .route("/admin/encryption/rotate", post(rotate_encryption))
        .route("/admin/accounting/dead-letters", get(list_dead_letters))
        .route(
            "/admin/accounting/dead-letters/{id}/replay",
            post(replay_dead_letter),
        )
        .route(
            "/openapi.json",
            get(|| async { Json(super::openapi::admin()) }),
        )
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ))
        .with_state(state)
}

async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.admin_token_digest else {
        return ApiError::new(
            ErrorCode::AdminDisabled,
            "the admin API is disabled: set KEYWARD_ADMIN_TOKEN to enable it",
        )
        .into_response();
    };
    if super::bearer_matches(request.headers(), &expected) {
        return next.run(request).await;
    }
    let mut response = ApiError::new(
        ErrorCode::Unauthorized,
        "missing or wrong admin token (Authorization: Bearer <KEYWARD_ADMIN_TOKEN>)",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn key_json(key: &ClientKey) -> Json<Value> {
    Json(json!(key.view()))
}

async fn create_key(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateKeyRequest>,
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
struct ListQuery {
    user_id: Option<String>,
    active: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActiveQuery {
    active: Option<String>,
}

async fn list(state: &AppState, filter: ListFilter) -> Result<Json<Value>, ApiError> {
    let keys = state.keys.list(&filter).await?;
    let views: Vec<_> = keys.iter().map(ClientKey::view).collect();
    Ok(Json(json!({ "keys": views })))
}

async fn list_user_keys(
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

async fn list_standalone_keys(
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

async fn get_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    Ok(key_json(&state.keys.get(&id).await?))
}

async fn patch_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<PatchKeyRequest>,
) -> Result<Json<Value>, ApiError> {
    let patch = body.validate().map_err(ApiError::bad_request)?;
    Ok(key_json(&state.keys.update(&id, &patch).await?))
}

async fn delete_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    state.keys.disable(&id).await?;
    Ok(key_json(&state.keys.get(&id).await?))
}

async fn reveal_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let secret = state.keys.reveal(&id).await?;
    Ok(Json(json!({ "secret": secret })))
}

async fn adjust_balance(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<BalanceRequest>,
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
struct StatsQuery {
    start: Option<String>,
    end: Option<String>,
}

async fn key_stats(
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

async fn expire_keys(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<ExpireRequest>,
) -> Result<Json<Value>, ApiError> {
    let auto_delete = body.auto_delete.unwrap_or(state.expiry_auto_delete);
    let expired = state.keys.expire(auto_delete).await?;
    Ok(Json(json!({
        "processed": expired.deleted.len() + expired.disabled.len(),
        "deleted": expired.deleted.len(),
        "disabled": expired.disabled.len(),
    })))
}

fn provider_path(
    provider: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<String, ApiError> {
    match provider {
        Ok(Path(p)) if valid_provider(&p) => Ok(p),
        _ => Err(ApiError::bad_request(
            "the provider in the path must be 1 to 64 of A-Z, a-z, 0-9, ., _ and -",
        )),
    }
}

async fn add_provider_key(
    State(state): State<AppState>,
    provider: Result<Path<String>, axum::extract::rejection::PathRejection>,
    JsonBody(body): JsonBody<AddKeyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let provider = provider_path(provider)?;
    let key = body.validate().map_err(ApiError::bad_request)?;
    let stored = state.provider_keys.add(&provider, key).await?;
    Ok((StatusCode::CREATED, Json(json!(stored.view(None)))))
}

async fn list_provider_keys(
    State(state): State<AppState>,
    provider: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let provider = provider_path(provider)?;
    let keys = state.provider_keys.list(&provider).await?;
    let views: Vec<_> = keys
        .iter()
        .map(|(k, live)| k.view(Some(live.clone())))
        .collect();
    Ok(Json(json!({ "provider": provider, "keys": views })))
}

async fn patch_provider_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<PatchProviderKeyRequest>,
) -> Result<Json<Value>, ApiError> {
    let patch = body.validate().map_err(ApiError::bad_request)?;
    Ok(Json(json!(state
        .provider_keys
        .update(&id, &patch)
        .await?
        .view(None))))
}

async fn delete_provider_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let key = state.provider_keys.delete(&id).await?;
    Ok(Json(json!({"id": key.id, "deleted": true})))
}

/// Clears the key's cooldown and suspension at once; answers the key with its live state.
async fn reset_provider_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let (key, live) = state.provider_keys.reset(&id).await?;
    Ok(Json(json!(key.view(Some(live)))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    limit: Option<String>,
}

async fn provider_key_usage(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    QueryArgs(q): QueryArgs<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    // Out-of-range limits are clamped to 1..=60 (as the seed did); non-numbers are refused.
    let limit = match q.limit.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
        None => 60,
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request("limit must be a whole number"))?
            .clamp(1, 60),
    };
    let windows = state.provider_keys.usage(&id, limit).await?;
    let windows: Vec<Value> = windows
        .iter()
        .map(
            |w| json!({"minute": to_rfc3339(w.minute), "requests": w.requests, "tokens": w.tokens}),
        )
        .collect();
    Ok(Json(json!({ "provider_key_id": id, "windows": windows })))
}

/// `{provider}/{*model}`: the provider in the pool's alphabet, the model the rest of the
/// path (it may hold `/`) under the names rule.
fn price_path(
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<(String, String), ApiError> {
    let Ok(Path((provider, model))) = path else {
        return Err(ApiError::bad_request("the path is not valid UTF-8"));
    };
    let provider = prices::check_provider(&provider).map_err(ApiError::bad_request)?;
    let model = prices::check_model(&model).map_err(ApiError::bad_request)?;
    Ok((provider.to_string(), model.to_string()))
}

async fn put_price(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    JsonBody(body): JsonBody<PriceInput>,
) -> Result<Json<Value>, ApiError> {
    let (provider, model) = price_path(path)?;
    let price = body.validate().map_err(ApiError::bad_request)?;
    let stored = state.prices.put(&provider, &model, price).await?;
    Ok(Json(json!(stored.view())))
}

async fn list_prices(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let prices = state.prices.list().await?;
    let views: Vec<_> = prices.iter().map(prices::ModelPrice::view).collect();
    Ok(Json(json!({ "prices": views })))
}

async fn delete_price(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (provider, model) = price_path(path)?;
    let deleted = state.prices.delete(&provider, &model).await?;
    Ok(Json(json!({
        "provider": deleted.provider,
        "model": deleted.model,
        "deleted": true,
    })))
}

async fn rotate_encryption(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let rotated = crate::rotation::rotate(&state.db, &state.keyring, &*state.invalidator).await?;
    Ok(Json(json!(rotated)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    limit: Option<String>,
}

async fn list_dead_letters(
    State(state): State<AppState>,
    QueryArgs(q): QueryArgs<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    // Out-of-range limits are clamped to 1..=1000; non-numbers are refused.
    let limit = match q.limit.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
        None => 100,
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request("limit must be a whole number"))?
            .clamp(1, 1000),
    };
    let letters = dead_letters::list(&state.db, limit).await?;
    let total = dead_letters::count(&state.db).await?;
    let views: Vec<Value> = letters.iter().map(|l| l.view()).collect();
    Ok(Json(json!({ "dead_letters": views, "total": total })))
}

async fn replay_dead_letter(
    State(state): State<AppState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = match id {
        Ok(Path(text)) => text.parse::<i64>().ok().filter(|id| *id > 0),
        Err(_) => None,
    }
    .ok_or_else(|| {
        ApiError::bad_request("the dead letter id in the path must be a whole number")
    })?;
    match dead_letters::replay(&state.db, id, now_ms()).await? {
        Replay::NotFound => Err(ApiError::not_found(format!("no dead letter {id}"))),
        Replay::Applied { inserted } => {
            tracing::info!(
                dead_letter = id,
                inserted,
                "accounting: dead letter replayed"
            );
            Ok(Json(
                json!({ "id": id, "replayed": true, "applied": inserted }),
            ))
        }
        Replay::Refused(error) => Err(ApiError::new(
            ErrorCode::ReplayRefused,
            format!("the database refused the record again; it stays a dead letter: {error}"),
        )),
    }
}
