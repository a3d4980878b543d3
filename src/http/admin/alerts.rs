//! `GET /admin/alerts`: the spend alerts, newest first, with their webhook delivery
//! state (queued by the accounting writer, sent by `alerts::run`).
//!
//! Paged by a cursor: `next_cursor` of one page is the `cursor` of the next (opaque to
//! callers; it is the last alert's `created_at` and id), `null` on the last page.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::alerts::store::{self, Listed};
use crate::clock::to_rfc3339;
use crate::http::error::ApiError;
use crate::http::extract::{optional_bool, QueryArgs};
use crate::http::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertQuery {
    pending: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn view(a: &Listed) -> Value {
    // The payload was written by keyward as JSON; shown as text only if that changed.
    let payload: Value =
        serde_json::from_str(&a.payload).unwrap_or_else(|_| Value::String(a.payload.clone()));
    json!({
        "id": a.id,
        "payload": payload,
        "created_at": to_rfc3339(a.created_at),
        "pending": a.delivered_at.is_none(),
        "attempts": a.attempts,
        "delivered_at": a.delivered_at.map(to_rfc3339),
        "next_attempt_at": a.delivered_at.is_none().then(|| to_rfc3339(a.next_attempt_at)),
        "last_error": a.last_error,
    })
}

/// `<created_at>.<id>` of an alert.
fn parse_cursor(text: &str) -> Option<(i64, String)> {
    let (at, id) = text.split_once('.')?;
    let at = at.parse().ok()?;
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (at, id.to_string()))
}

pub(super) async fn list_alerts(
    State(state): State<AppState>,
    QueryArgs(q): QueryArgs<AlertQuery>,
) -> Result<Json<Value>, ApiError> {
    let pending = optional_bool("pending", q.pending.as_deref())?;
    // Out-of-range limits are clamped to 1..=1000, like the dead letters'; non-numbers
    // are refused.
    let limit = match q.limit.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
        None => 100,
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request("limit must be a whole number"))?
            .clamp(1, 1000),
    };
    let after = match q.cursor.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
        None => None,
        Some(text) => Some(parse_cursor(text).ok_or_else(|| {
            ApiError::bad_request("cursor must be the next_cursor of a previous page")
        })?),
    };
    let alerts = store::list(&state.db, pending, after, limit).await?;
    let next_cursor = (alerts.len() as i64 == limit)
        .then(|| alerts.last().map(|a| format!("{}.{}", a.created_at, a.id)))
        .flatten();
    let views: Vec<Value> = alerts.iter().map(view).collect();
    Ok(Json(json!({ "alerts": views, "next_cursor": next_cursor })))
}
