//! The admin API (`KEYWARD_ADMIN_LISTEN`): client keys, users' limits, provider keys,
//! model prices and encryption-key rotation, behind a bearer token.
//!
//! Also the accounting dead letters: usage records the database refused, listed and
//! replayed here (see `usage::dead_letters`). The routes of client keys are in
//! `client_keys`, those of users and the quota views in `users`, those of providers
//! (their keys and prices) in `providers`, the spend alerts' listing in `alerts`.
//!
//! Invariants:
//! - Every route sits behind `require_admin`; with no token configured every call is
//!   refused (403 `ADMIN_DISABLED`).
//! - The token is compared as SHA-256 digests in constant time, so neither its content
//!   nor its length leaks through timing.
//! - No answer but create and reveal carries a secret.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::QueryArgs;
use super::state::AppState;
use crate::clock::now_ms;
use crate::usage::dead_letters::{self, Replay};

mod alerts;
mod client_keys;
mod providers;
mod users;

use client_keys::{
    adjust_balance, create_key, delete_key, expire_keys, get_key, key_stats, list_standalone_keys,
    list_user_keys, patch_key, reveal_key,
};
use providers::{
    add_provider_key, delete_price, delete_provider_key, list_prices, list_provider_keys,
    patch_provider_key, provider_key_usage, put_price, reset_provider_key,
};
use users::{delete_user, get_user, key_quota, list_users, patch_user, put_user, user_quota};

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
        .route("/admin/keys/{id}/quota", get(key_quota))
        .route("/admin/users", get(list_users))
        .route(
            "/admin/users/{user_id}",
            axum::routing::put(put_user)
                .patch(patch_user)
                .get(get_user)
                .delete(delete_user),
        )
        .route("/admin/users/{user_id}/quota", get(user_quota))
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
        .route("/admin/alerts", get(alerts::list_alerts))
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
