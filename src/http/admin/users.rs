//! The admin routes of users (the limits shared by every key of one `user_id`) and the
//! quota views of users and keys.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock::{now_ms, to_rfc3339};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::extract::{AdminBody, IdPath, QueryArgs, TextPath};
use crate::http::state::AppState;
use crate::limits::Tenant;
use crate::quota_usage::ScopeView;
use crate::users::input::{PatchUserRequest, PutUserRequest};
use crate::users::{self, User, UserError};

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::NotFound(_) => ApiError::not_found(e.to_string()),
            UserError::Invalid(_) => ApiError::bad_request(e.to_string()),
            // Retrying helps: the same as a database that cannot answer now.
            UserError::Contended(_) => {
                tracing::warn!(error = %e, "user change gave up after concurrent changes");
                ApiError::new(ErrorCode::BackendUnavailable, e.to_string())
            }
            UserError::Store(inner) => inner.into(),
        }
    }
}

/// The `{user_id}` of the path, checked by the rule of names.
fn user_id(TextPath(text): TextPath) -> Result<String, ApiError> {
    users::user_id(&text)
        .map(str::to_string)
        .map_err(ApiError::bad_request)
}

fn user_json(user: &User) -> Json<Value> {
    Json(json!(user.view()))
}

pub(super) async fn put_user(
    State(state): State<AppState>,
    path: TextPath,
    AdminBody(body): AdminBody<PutUserRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let id = user_id(path)?;
    let input = body.validate().map_err(ApiError::bad_request)?;
    let (user, created) = state.users.put(&id, input).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, user_json(&user)))
}

pub(super) async fn patch_user(
    State(state): State<AppState>,
    path: TextPath,
    AdminBody(body): AdminBody<PatchUserRequest>,
) -> Result<Json<Value>, ApiError> {
    let id = user_id(path)?;
    Ok(user_json(&state.users.patch(&id, &body).await?))
}

pub(super) async fn get_user(
    State(state): State<AppState>,
    path: TextPath,
) -> Result<Json<Value>, ApiError> {
    let id = user_id(path)?;
    Ok(user_json(&state.users.get(&id).await?))
}

pub(super) async fn delete_user(
    State(state): State<AppState>,
    path: TextPath,
) -> Result<Json<Value>, ApiError> {
    let id = user_id(path)?;
    state.users.delete(&id).await?;
    Ok(Json(json!({ "user_id": id, "deleted": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UserListQuery {
    after: Option<String>,
    limit: Option<String>,
}

pub(super) async fn list_users(
    State(state): State<AppState>,
    QueryArgs(q): QueryArgs<UserListQuery>,
) -> Result<Json<Value>, ApiError> {
    // Out-of-range limits are clamped to 1..=1000; non-numbers are refused.
    let limit = match q.limit.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
        None => 100,
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request("limit must be a whole number"))?
            .clamp(1, 1000),
    };
    let after = match q.after.as_deref() {
        None => None,
        Some(text) => crate::names::optional("after", Some(text))
            .map_err(|e| ApiError::bad_request(e.to_string()))?
            .map(str::to_string),
    };
    let found = state.users.list(after.as_deref(), limit).await?;
    let next = (found.len() as i64 == limit)
        .then(|| found.last().map(|u| u.user_id.clone()))
        .flatten();
    let views: Vec<_> = found.iter().map(User::view).collect();
    Ok(Json(json!({ "users": views, "next_after": next })))
}

fn quota_json(field: &str, id: &str, user_id: Option<&str>, scopes: Vec<ScopeView>) -> Json<Value> {
    let mut body = json!({ field: id, "at": to_rfc3339(now_ms()), "scopes": scopes });
    if field == "key_id" {
        body["user_id"] = json!(user_id);
    }
    Json(body)
}

pub(super) async fn user_quota(
    State(state): State<AppState>,
    path: TextPath,
) -> Result<Json<Value>, ApiError> {
    let id = user_id(path)?;
    let (user, mut scopes) = state.users.quota(&id).await?;
    crate::quota_live::fill(
        &state.counters,
        Tenant::User(&user.user_id),
        None,
        &mut scopes,
    )
    .await;
    Ok(quota_json("user_id", &user.user_id, None, scopes))
}

pub(super) async fn key_quota(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let (key, mut scopes) = state.keys.quota(&id).await?;
    let tenant = Tenant::of(&key.id, key.user_id.as_deref());
    crate::quota_live::fill(&state.counters, tenant, Some(&key.id), &mut scopes).await;
    Ok(quota_json(
        "key_id",
        &key.id,
        key.user_id.as_deref(),
        scopes,
    ))
}
