//! SQL for provider keys (one text for both backends, see [`crate::db`]).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::input::ProviderKeyPatch;
use super::ProviderKey;
use crate::client_keys::store::get_bool;
use crate::db::{Db, StoreError};

macro_rules! columns {
    () => {
        "id, provider, label, key_encrypted, priority, max_rpm, max_tpm, is_active, \
         total_requests, total_tokens, last_used_at, created_at, updated_at"
    };
}

fn from_row(row: &AnyRow) -> Result<ProviderKey, StoreError> {
    Ok(ProviderKey {
        id: row.try_get("id")?,
        provider: row.try_get("provider")?,
        label: row.try_get("label")?,
        key_encrypted: row.try_get("key_encrypted")?,
        priority: row.try_get("priority")?,
        max_rpm: row.try_get("max_rpm")?,
        max_tpm: row.try_get("max_tpm")?,
        is_active: get_bool(row, "is_active")?,
        total_requests: row.try_get("total_requests")?,
        total_tokens: row.try_get("total_tokens")?,
        last_used_at: row.try_get("last_used_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn all(rows: Vec<AnyRow>) -> Result<Vec<ProviderKey>, StoreError> {
    rows.iter().map(from_row).collect()
}

#[allow(clippy::too_many_arguments)]
pub async fn insert(
    db: &Db,
    id: &str,
    provider: &str,
    label: &str,
    key_encrypted: &str,
    priority: i64,
    max_rpm: Option<i64>,
    max_tpm: Option<i64>,
    now: i64,
) -> Result<ProviderKey, StoreError> {
    let row = sqlx::query(concat!(
        "INSERT INTO provider_keys (id, provider, label, key_encrypted, priority, max_rpm, max_tpm, \
         is_active, total_requests, total_tokens, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, TRUE, 0, 0, $8, $8) RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(provider)
    .bind(label)
    .bind(key_encrypted)
    .bind(priority)
    .bind(max_rpm)
    .bind(max_tpm)
    .bind(now)
    .fetch_one(&db.sql)
    .await?;
    from_row(&row)
}

pub async fn get(db: &Db, id: &str) -> Result<Option<ProviderKey>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM provider_keys WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&db.sql)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// A provider's keys in the order selection tries them; `active_only` leaves out the
/// disabled ones.
pub async fn list(
    db: &Db,
    provider: &str,
    active_only: bool,
) -> Result<Vec<ProviderKey>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM provider_keys WHERE provider = $1 AND ($2 = FALSE OR is_active = TRUE) \
         ORDER BY priority, created_at, id"
    ))
    .bind(provider)
    .bind(active_only)
    .fetch_all(&db.sql)
    .await?;
    all(rows)
}

/// Every provider key, for re-encryption.
pub async fn list_all(db: &Db) -> Result<Vec<ProviderKey>, StoreError> {
    all(sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM provider_keys ORDER BY id"
    ))
    .fetch_all(&db.sql)
    .await?)
}

pub async fn update(
    db: &Db,
    id: &str,
    p: &ProviderKeyPatch,
    now: i64,
) -> Result<Option<ProviderKey>, StoreError> {
    let row = sqlx::query(concat!(
        "UPDATE provider_keys SET \
         label = CASE WHEN $2 THEN $3 ELSE label END, \
         priority = CASE WHEN $4 THEN $5 ELSE priority END, \
         max_rpm = CASE WHEN $6 THEN $7 ELSE max_rpm END, \
         max_tpm = CASE WHEN $8 THEN $9 ELSE max_tpm END, \
         is_active = CASE WHEN $10 THEN $11 ELSE is_active END, \
         updated_at = $12 WHERE id = $1 RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(p.label.is_some())
    .bind(p.label.as_deref())
    .bind(p.priority.is_some())
    .bind(p.priority)
    .bind(p.max_rpm.is_some())
    .bind(p.max_rpm.flatten())
    .bind(p.max_tpm.is_some())
    .bind(p.max_tpm.flatten())
    .bind(p.is_active.is_some())
    .bind(p.is_active)
    .bind(now)
    .fetch_optional(&db.sql)
    .await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn delete(db: &Db, id: &str) -> Result<Option<ProviderKey>, StoreError> {
    let row = sqlx::query(concat!(
        "DELETE FROM provider_keys WHERE id = $1 RETURNING ",
        columns!()
    ))
    .bind(id)
    .fetch_optional(&db.sql)
    .await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn disable(db: &Db, id: &str, now: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE provider_keys SET is_active = FALSE, updated_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now)
        .execute(&db.sql)
        .await?;
    Ok(())
}

/// One minute of a provider key's reported usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MinuteUsage {
    /// Unix milliseconds of the minute's start.
    pub minute: i64,
    pub requests: i64,
    pub tokens: i64,
}

/// The newest `limit` minutes with reported usage, newest first.
pub async fn usage_by_minute(
    db: &Db,
    id: &str,
    limit: i64,
) -> Result<Vec<MinuteUsage>, StoreError> {
    let rows = sqlx::query(
        "SELECT created_at / 60000 AS minute, COUNT(*) AS requests, \
         CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) AS tokens \
         FROM usage_records WHERE provider_key_id = $1 GROUP BY minute ORDER BY minute DESC LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(&db.sql)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(MinuteUsage {
                minute: r.try_get::<i64, _>("minute")? * 60_000,
                requests: r.try_get("requests")?,
                tokens: r.try_get("tokens")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}
