//! The admin routes of providers: their keys (with live state, usage and reset) and
//! model prices.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock::to_rfc3339;
use crate::http::error::ApiError;
use crate::http::extract::{AdminBody, IdPath, QueryArgs};
use crate::http::state::AppState;

use crate::pool::input::{AddKeyRequest, PatchProviderKeyRequest};
use crate::pool::valid_provider;
use crate::prices::{self, PriceInput};

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

pub(super) async fn add_provider_key(
    State(state): State<AppState>,
    provider: Result<Path<String>, axum::extract::rejection::PathRejection>,
    AdminBody(body): AdminBody<AddKeyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let provider = provider_path(provider)?;
    let key = body.validate().map_err(ApiError::bad_request)?;
    let stored = state.provider_keys.add(&provider, key).await?;
    Ok((StatusCode::CREATED, Json(json!(stored.view(None)))))
}

pub(super) async fn list_provider_keys(
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

pub(super) async fn patch_provider_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    AdminBody(body): AdminBody<PatchProviderKeyRequest>,
) -> Result<Json<Value>, ApiError> {
    let patch = body.validate().map_err(ApiError::bad_request)?;
    Ok(Json(json!(state
        .provider_keys
        .update(&id, &patch)
        .await?
        .view(None))))
}

pub(super) async fn delete_provider_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let key = state.provider_keys.delete(&id).await?;
    Ok(Json(json!({"id": key.id, "deleted": true})))
}

/// Clears the key's cooldown and suspension at once; answers the key with its live state.
pub(super) async fn reset_provider_key(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let (key, live) = state.provider_keys.reset(&id).await?;
    Ok(Json(json!(key.view(Some(live)))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageQuery {
    limit: Option<String>,
}

pub(super) async fn provider_key_usage(
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

pub(super) async fn put_price(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    AdminBody(body): AdminBody<PriceInput>,
) -> Result<Json<Value>, ApiError> {
    let (provider, model) = price_path(path)?;
    let price = body.validate().map_err(ApiError::bad_request)?;
    let stored = state.prices.put(&provider, &model, price).await?;
    Ok(Json(json!(stored.view())))
}

pub(super) async fn list_prices(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let prices = state.prices.list().await?;
    let views: Vec<_> = prices.iter().map(prices::ModelPrice::view).collect();
    Ok(Json(json!({ "prices": views })))
}

pub(super) async fn delete_price(
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
