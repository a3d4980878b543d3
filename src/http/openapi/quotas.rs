//! The admin document's parts for quotas: the limit-set schemas the key and user bodies
//! share, the users' operations and the quota views (kept beside [`super`], whose
//! `ADMIN_ROUTES` lists these operations too).

use serde_json::{json, Value};

use super::{answer, object, op, path_param, query, reference, s};

fn count() -> Value {
    json!({"type": "integer", "nullable": true, "minimum": 1, "maximum": 1_000_000_000_000_i64})
}

/// `{"usd": number, "alert_at_pct": [integer]}`.
fn spend_limit() -> Value {
    json!({"type": "object", "nullable": true, "additionalProperties": false, "required": ["usd"], "properties": {
        "usd": {"type": "number", "exclusiveMinimum": true, "minimum": 0, "maximum": 1_000_000_000},
        "alert_at_pct": {"type": "array", "maxItems": 10, "uniqueItems": true,
            "items": {"type": "integer", "minimum": 1, "maximum": 100}},
    }})
}

/// One optional spend limit per period (USD).
pub(super) fn spend_limits() -> Value {
    json!({"type": "object", "nullable": true, "additionalProperties": false, "properties": {
        "day": spend_limit(), "week": spend_limit(), "month": spend_limit(), "total": spend_limit(),
    }})
}

/// The fields of a limit set (`quota::LimitSet`).
fn limit_fields() -> Value {
    json!({
        "rate_limit": count(), "tpm_limit": count(),
        "daily_request_limit": count(), "daily_token_limit": count(),
        "spend_limits": spend_limits(),
    })
}

/// Model name (or prefix) → limit set, at most 100.
pub(super) fn model_limits() -> Value {
    json!({"type": "object", "nullable": true, "maxProperties": 100,
        "additionalProperties": {"type": "object", "additionalProperties": false, "properties": limit_fields()}})
}

/// The quota fields a key's create and patch bodies, and its `Key` object, add.
pub(super) fn key_fields() -> Value {
    json!({
        "daily_request_limit": count(), "daily_token_limit": count(),
        "spend_limits": spend_limits(), "model_limits": model_limits(),
    })
}

fn user_body() -> Value {
    let mut props = limit_fields();
    props["model_limits"] = model_limits();
    object(props, &[])
}

/// The `User` object.
pub(super) fn user() -> Value {
    let mut props = limit_fields();
    props["user_id"] = s("string");
    props["model_limits"] = model_limits();
    props["created_at"] = s("string");
    props["updated_at"] = s("string");
    answer(props, &["user_id", "created_at", "updated_at"])
}

/// A limit's figures in the counter store (`quota_live`): counts as integers, spend in
/// USD; `null` when the store did not answer.
fn live() -> Value {
    let mut live = answer(
        json!({
            "used": s("number"),
            "held": s("number"),
            "remaining": s("number"),
            "reset_at": {"type": "string", "nullable": true},
        }),
        &["used", "remaining", "reset_at"],
    );
    live["nullable"] = json!(true);
    live
}

/// The answer of both quota views; `owner` is `key_id` or `user_id`.
fn quota_view(owner: &str) -> Value {
    let nullable_string = || json!({"type": "string", "nullable": true});
    let limit = answer(
        json!({
            "kind": {"type": "string", "enum": ["requests", "tokens", "spend"]},
            "period": {"type": "string", "enum": ["minute", "day", "week", "month", "total"]},
            "limit": s("number"),
            "alert_at_pct": {"type": "array", "items": s("integer")},
            "settled": {"type": "number", "nullable": true},
            "period_start": nullable_string(), "reset_at": nullable_string(),
            "live": live(),
        }),
        &[
            "kind",
            "period",
            "limit",
            "settled",
            "period_start",
            "reset_at",
            "live",
        ],
    );
    let scope = answer(
        json!({
            "scope": {"type": "string", "enum": ["key", "user"]}, "id": s("string"),
            "model": nullable_string(), "counter": s("string"),
            "limits": {"type": "array", "items": limit},
        }),
        &["scope", "id", "model", "counter", "limits"],
    );
    let mut props = json!({"at": s("string"), "scopes": {"type": "array", "items": scope}});
    props[owner] = s("string");
    if owner == "key_id" {
        props["user_id"] = nullable_string();
    }
    answer(props, &[owner, "at", "scopes"])
}

/// The paths of users and quota views.
pub(super) fn paths() -> Value {
    let user_param = || vec![path_param("user_id")];
    let users = answer(
        json!({"users": {"type": "array", "items": reference("User")},
               "next_after": {"type": "string", "nullable": true}}),
        &["users", "next_after"],
    );
    let deleted = answer(
        json!({"user_id": s("string"), "deleted": s("boolean")}),
        &["user_id", "deleted"],
    );
    let mut put = op(
        "Create (201) or replace (200) a user's limits, shared by every key with this user_id",
        Some(user_body()),
        "200",
        reference("User"),
        user_param(),
    );
    put["responses"]["201"] = json!({"description": "created", "content": {"application/json": {"schema": reference("User")}}});
    json!({
        "/admin/keys/{id}/quota": {"get": op("A key's limits with this period's settled figures", None, "200",
            quota_view("key_id"), vec![path_param("id")])},
        "/admin/users": {"get": op("Users with limits, by user id", None, "200", users,
            vec![query("after", s("string")), query("limit", s("integer"))])},
        "/admin/users/{user_id}": {
            "put": put,
            "patch": op("Change a user's limits (absent = kept, null = cleared)", Some(user_body()), "200", reference("User"), user_param()),
            "get": op("A user's limits", None, "200", reference("User"), user_param()),
            "delete": op("Remove a user's limits (its keys keep working)", None, "200", deleted, user_param()),
        },
        "/admin/users/{user_id}/quota": {"get": op("A user's limits with this period's settled figures", None, "200",
            quota_view("user_id"), user_param())},
    })
}
