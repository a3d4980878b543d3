//! SQL for users. One text per statement serves Postgres and SQLite (see [`crate::db`]).
//! `limits` is a JSON [`LimitSet`], `model_limits` JSON or `NULL` (none).
//!
//! A patch reads, merges and writes back only if `updated_at` is still what it read
//! ([`replace_if`]); `updated_at` strictly grows with every write, so it is the row's
//! version and two concurrent patches cannot lose one another.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::User;
use crate::db::{Db, StoreError};
use crate::quota::{LimitSet, ModelLimits};

const COLUMNS: &str = "user_id, limits, model_limits, created_at, updated_at";

fn json<T: serde::de::DeserializeOwned + Default>(
    row: &AnyRow,
    col: &str,
) -> Result<T, StoreError> {
    let text: Option<String> = row.try_get(col)?;
    text.map_or(Ok(T::default()), |t| {
        serde_json::from_str(&t)
            .map_err(|_| StoreError::Corrupt(format!("users.{col} is not valid JSON")))
    })
}

fn from_row(row: &AnyRow) -> Result<User, StoreError> {
    Ok(User {
        user_id: row.try_get("user_id")?,
        limits: json(row, "limits")?,
        model_limits: json(row, "model_limits")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn limits_text(limits: &LimitSet) -> String {
    serde_json::to_string(limits).unwrap_or_else(|_| "{}".into())
}

fn models_text(models: &ModelLimits) -> Option<String> {
    (!models.is_empty()).then(|| serde_json::to_string(models).unwrap_or_else(|_| "{}".into()))
}

pub async fn get(db: &Db, user_id: &str) -> Result<Option<User>, StoreError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE user_id = $1"))
        .bind(user_id)
        .fetch_optional(&db.sql)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// By user id, those after `after` (exclusive), at most `limit`.
pub async fn list(db: &Db, after: Option<&str>, limit: i64) -> Result<Vec<User>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM users WHERE ($1 IS NULL OR user_id > $1) \
         ORDER BY user_id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(&db.sql)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Inserts a user; `None` when one with this id exists.
pub async fn insert(
    db: &Db,
    user_id: &str,
    limits: &LimitSet,
    models: &ModelLimits,
    now: i64,
) -> Result<Option<User>, StoreError> {
    let row = sqlx::query(&format!(
        "INSERT INTO users (user_id, limits, model_limits, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $4) ON CONFLICT (user_id) DO NOTHING RETURNING {COLUMNS}"
    ))
    .bind(user_id)
    .bind(limits_text(limits))
    .bind(models_text(models))
    .bind(now)
    .fetch_optional(&db.sql)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Replaces a user's limits when its `updated_at` is `version` (any, when `None`);
/// `None` when no row matched. The new `updated_at` is later than the old one even
/// within one millisecond.
pub async fn replace_if(
    db: &Db,
    user_id: &str,
    version: Option<i64>,
    limits: &LimitSet,
    models: &ModelLimits,
    now: i64,
) -> Result<Option<User>, StoreError> {
    let row = sqlx::query(&format!(
        "UPDATE users SET limits = $2, model_limits = $3, \
         updated_at = CASE WHEN updated_at >= $4 THEN updated_at + 1 ELSE $4 END \
         WHERE user_id = $1 AND ($5 IS NULL OR updated_at = $5) RETURNING {COLUMNS}"
    ))
    .bind(user_id)
    .bind(limits_text(limits))
    .bind(models_text(models))
    .bind(now)
    .bind(version)
    .fetch_optional(&db.sql)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// `false` when there was no such user.
pub async fn delete(db: &Db, user_id: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM users WHERE user_id = $1")
        .bind(user_id)
        .execute(&db.sql)
        .await?;
    Ok(done.rows_affected() > 0)
}
