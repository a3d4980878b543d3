//! SQL for client keys. One text per statement serves Postgres and SQLite (see
//! [`crate::db`]). Every write is a single statement, so concurrent admins and replicas
//! cannot interleave inside one change (a balance deduction checks and writes at once).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::input::{KeyPatch, NewKey};
use super::ClientKey;
use crate::db::{Db, StoreError};
use crate::money::MAX_TOTAL;

macro_rules! columns {
    () => {
        "id, user_id, name, key_hash, key_encrypted, prefix, allowed_providers, \
         allowed_api_formats, allowed_models, rate_limit, tpm_limit, concurrent_limit, \
         daily_request_limit, daily_token_limit, spend_limits, model_limits, expires_at, \
         is_standalone, balance_micros, balance_used_micros, balance_version, auto_delete_on_expiry, \
         is_active, total_requests, total_tokens, total_cost_micros, \
         created_at, updated_at, last_used_at"
    };
}

/// What [`list`] returns: standalone keys, or user keys (optionally of one user).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub standalone: bool,
    pub user_id: Option<String>,
    pub active: Option<bool>,
}

/// Keys the expiry pass changed, as `(id, lookup hash)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    pub deleted: Vec<(String, String)>,
    pub disabled: Vec<(String, String)>,
}

// SQLite reports booleans of expressions and RETURNING columns as integers; accept both.
pub(crate) fn get_bool(row: &AnyRow, col: &str) -> Result<bool, sqlx::Error> {
    row.try_get::<bool, _>(col)
        .or_else(|_| row.try_get::<i64, _>(col).map(|v| v != 0))
}

pub(crate) fn get_opt_bool(row: &AnyRow, col: &str) -> Result<Option<bool>, sqlx::Error> {
    row.try_get::<Option<bool>, _>(col).or_else(|_| {
        row.try_get::<Option<i64>, _>(col)
            .map(|v| v.map(|v| v != 0))
    })
}

fn list_column(row: &AnyRow, col: &str) -> Result<Option<Vec<String>>, StoreError> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|_| StoreError::Corrupt(format!("client_keys.{col} is not a JSON list")))
    })
    .transpose()
}

/// A JSON column whose NULL is the type's default (no limits).
fn json_column<T: serde::de::DeserializeOwned + Default>(
    row: &AnyRow,
    col: &str,
) -> Result<T, StoreError> {
    let text: Option<String> = row.try_get(col)?;
    text.map_or(Ok(T::default()), |t| {
        serde_json::from_str(&t)
            .map_err(|_| StoreError::Corrupt(format!("client_keys.{col} is not valid JSON")))
    })
}

fn list_text(list: &Option<Vec<String>>) -> Option<String> {
    list.as_ref()
        .map(|l| serde_json::to_string(l).unwrap_or_else(|_| "[]".into()))
}

/// A limits column: `NULL` when there is none (the column's default reads back as none).
fn limits_text<T: serde::Serialize>(value: &T, empty: bool) -> Option<String> {
    (!empty).then(|| serde_json::to_string(value).unwrap_or_else(|_| "{}".into()))
}

fn spend_text(spend: &crate::quota::SpendLimits) -> Option<String> {
    limits_text(spend, spend.is_empty())
}

fn models_text(models: &crate::quota::ModelLimits) -> Option<String> {
    limits_text(models, models.is_empty())
}

fn from_row(row: &AnyRow) -> Result<ClientKey, StoreError> {
    Ok(ClientKey {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        name: row.try_get("name")?,
        key_hash: row.try_get("key_hash")?,
        key_encrypted: row.try_get("key_encrypted")?,
        prefix: row.try_get("prefix")?,
        allowed_providers: list_column(row, "allowed_providers")?,
        allowed_api_formats: list_column(row, "allowed_api_formats")?,
        allowed_models: list_column(row, "allowed_models")?,
        rate_limit: row.try_get("rate_limit")?,
        tpm_limit: row.try_get("tpm_limit")?,
        concurrent_limit: row.try_get("concurrent_limit")?,
        daily_request_limit: row.try_get("daily_request_limit")?,
        daily_token_limit: row.try_get("daily_token_limit")?,
        spend_limits: json_column(row, "spend_limits")?,
        model_limits: json_column(row, "model_limits")?,
        settled: Default::default(),
        expires_at: row.try_get("expires_at")?,
        is_standalone: get_bool(row, "is_standalone")?,
        balance_micros: row.try_get("balance_micros")?,
        balance_used_micros: row.try_get("balance_used_micros")?,
        balance_version: row.try_get("balance_version")?,
        auto_delete_on_expiry: get_opt_bool(row, "auto_delete_on_expiry")?,
        is_active: get_bool(row, "is_active")?,
        total_requests: row.try_get("total_requests")?,
        total_tokens: row.try_get("total_tokens")?,
        total_cost_micros: row.try_get("total_cost_micros")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

fn one(row: Option<AnyRow>) -> Result<Option<ClientKey>, StoreError> {
    row.as_ref().map(from_row).transpose()
}

/// The secret-derived parts of a new key, produced by the service.
pub struct Secrets<'a> {
    pub id: &'a str,
    pub key_hash: &'a str,
    pub key_encrypted: &'a str,
    pub prefix: &'a str,
    pub name: &'a str,
}

pub async fn insert(
    db: &Db,
    key: &NewKey,
    s: &Secrets<'_>,
    now: i64,
) -> Result<ClientKey, StoreError> {
    let row = sqlx::query(concat!(
        "INSERT INTO client_keys (id, user_id, name, key_hash, key_encrypted, prefix, \
         allowed_providers, allowed_api_formats, allowed_models, rate_limit, tpm_limit, \
         concurrent_limit, expires_at, is_standalone, balance_micros, balance_used_micros, balance_version, \
         auto_delete_on_expiry, is_active, total_requests, total_tokens, total_cost_micros, \
         created_at, updated_at, daily_request_limit, daily_token_limit, spend_limits, model_limits) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 0, 0, $16, TRUE, \
         0, 0, 0, $17, $17, $18, $19, $20, $21) RETURNING ",
        columns!()
    ))
    .bind(s.id)
    .bind(key.user_id.as_deref())
    .bind(s.name)
    .bind(s.key_hash)
    .bind(s.key_encrypted)
    .bind(s.prefix)
    .bind(list_text(&key.allowed_providers))
    .bind(list_text(&key.allowed_api_formats))
    .bind(list_text(&key.allowed_models))
    .bind(key.rate_limit)
    .bind(key.tpm_limit)
    .bind(key.concurrent_limit)
    .bind(key.expires_at)
    .bind(key.is_standalone)
    .bind(key.balance_micros)
    .bind(key.auto_delete_on_expiry)
    .bind(now)
    .bind(key.daily_request_limit)
    .bind(key.daily_token_limit)
    .bind(spend_text(&key.spend_limits))
    .bind(models_text(&key.model_limits))
    .fetch_one(&db.sql)
    .await?;
    from_row(&row)
}

pub async fn get(db: &Db, id: &str) -> Result<Option<ClientKey>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM client_keys WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&db.sql)
    .await?;
    one(row)
}

pub async fn get_by_hash(db: &Db, key_hash: &str) -> Result<Option<ClientKey>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM client_keys WHERE key_hash = $1"
    ))
    .bind(key_hash)
    .fetch_optional(&db.sql)
    .await?;
    one(row)
}

/// Newest first.
pub async fn list(db: &Db, filter: &ListFilter) -> Result<Vec<ClientKey>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM client_keys WHERE is_standalone = $1 \
         AND ($2 IS NULL OR user_id = $2) AND ($3 IS NULL OR is_active = $3) \
         ORDER BY created_at DESC, id DESC"
    ))
    .bind(filter.standalone)
    .bind(filter.user_id.as_deref())
    .bind(filter.active)
    .fetch_all(&db.sql)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Applies a patch in one statement: each field has a "given" flag and a value.
pub async fn update(
    db: &Db,
    id: &str,
    p: &KeyPatch,
    now: i64,
) -> Result<Option<ClientKey>, StoreError> {
    let row = sqlx::query(concat!(
        "UPDATE client_keys SET \
         name = CASE WHEN $2 THEN $3 ELSE name END, \
         allowed_providers = CASE WHEN $4 THEN $5 ELSE allowed_providers END, \
         allowed_api_formats = CASE WHEN $6 THEN $7 ELSE allowed_api_formats END, \
         allowed_models = CASE WHEN $8 THEN $9 ELSE allowed_models END, \
         rate_limit = CASE WHEN $10 THEN $11 ELSE rate_limit END, \
         tpm_limit = CASE WHEN $12 THEN $13 ELSE tpm_limit END, \
         concurrent_limit = CASE WHEN $14 THEN $15 ELSE concurrent_limit END, \
         is_active = CASE WHEN $16 THEN $17 ELSE is_active END, \
         expires_at = CASE WHEN $18 THEN $19 ELSE expires_at END, \
         auto_delete_on_expiry = CASE WHEN $20 THEN $21 ELSE auto_delete_on_expiry END, \
         updated_at = $22, \
         daily_request_limit = CASE WHEN $23 THEN $24 ELSE daily_request_limit END, \
         daily_token_limit = CASE WHEN $25 THEN $26 ELSE daily_token_limit END, \
         spend_limits = CASE WHEN $27 THEN $28 ELSE spend_limits END, \
         model_limits = CASE WHEN $29 THEN $30 ELSE model_limits END \
         WHERE id = $1 RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(p.name.is_some())
    .bind(p.name.as_deref())
    .bind(p.allowed_providers.is_some())
    .bind(p.allowed_providers.as_ref().and_then(list_text))
    .bind(p.allowed_api_formats.is_some())
    .bind(p.allowed_api_formats.as_ref().and_then(list_text))
    .bind(p.allowed_models.is_some())
    .bind(p.allowed_models.as_ref().and_then(list_text))
    .bind(p.rate_limit.is_some())
    .bind(p.rate_limit.flatten())
    .bind(p.tpm_limit.is_some())
    .bind(p.tpm_limit.flatten())
    .bind(p.concurrent_limit.is_some())
    .bind(p.concurrent_limit.flatten())
    .bind(p.is_active.is_some())
    .bind(p.is_active)
    .bind(p.expires_at.is_some())
    .bind(p.expires_at.flatten())
    .bind(p.auto_delete_on_expiry.is_some())
    .bind(p.auto_delete_on_expiry.flatten())
    .bind(now)
    .bind(p.daily_request_limit.is_some())
    .bind(p.daily_request_limit.flatten())
    .bind(p.daily_token_limit.is_some())
    .bind(p.daily_token_limit.flatten())
    .bind(p.spend_limits.is_some())
    .bind(p.spend_limits.as_ref().and_then(spend_text))
    .bind(p.model_limits.is_some())
    .bind(p.model_limits.as_ref().and_then(models_text))
    .fetch_optional(&db.sql)
    .await?;
    one(row)
}

/// Disables a key (the admin API's DELETE). `false` when there is no such key.
pub async fn disable(db: &Db, id: &str, now: i64) -> Result<bool, StoreError> {
    let done =
        sqlx::query("UPDATE client_keys SET is_active = FALSE, updated_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&db.sql)
            .await?;
    Ok(done.rows_affected() > 0)
}

/// Adds `amount` micro-USD to a standalone key's credited balance, in one statement that
/// also checks the rules: a deduction may not take the remaining balance below zero, the
/// remaining balance stays within `max_balance`, and the credited total within
/// [`MAX_TOTAL`]. The checks are written so that no intermediate sum can overflow
/// (Postgres would fail the statement, SQLite would turn the sum into a REAL). A key without a balance limit that is
/// credited starts with exactly `amount` remaining. `None` when any rule (or the key's
/// existence) fails; the caller asks [`get`] which.
pub async fn adjust_balance(
    db: &Db,
    id: &str,
    amount: i64,
    max_balance: i64,
    now: i64,
) -> Result<Option<ClientKey>, StoreError> {
    let row = sqlx::query(concat!(
        "UPDATE client_keys SET \
         balance_micros = COALESCE(balance_micros, balance_used_micros) + $2, \
         balance_version = balance_version + 1, updated_at = $3 \
         WHERE id = $1 AND is_standalone = TRUE \
         AND ($2 > 0 OR (balance_micros IS NOT NULL AND balance_micros - balance_used_micros >= 0 - $2)) \
         AND COALESCE(balance_micros, balance_used_micros) - balance_used_micros <= $4 - $2 \
         AND COALESCE(balance_micros, balance_used_micros) <= $5 - $2 \
         RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(amount)
    .bind(now)
    .bind(max_balance)
    .bind(MAX_TOTAL)
    .fetch_optional(&db.sql)
    .await?;
    one(row)
}

/// Disables or deletes active keys whose expiry has passed. Each key's
/// `auto_delete_on_expiry` wins over `default_delete`. Usage rows are not touched.
pub async fn expire(db: &Db, now: i64, default_delete: bool) -> Result<Expired, StoreError> {
    let mut tx = db.sql.begin().await?;
    let deleted = sqlx::query(
        "DELETE FROM client_keys WHERE is_active = TRUE AND expires_at IS NOT NULL \
         AND expires_at <= $1 AND COALESCE(auto_delete_on_expiry, $2) = TRUE RETURNING id, key_hash",
    )
    .bind(now)
    .bind(default_delete)
    .fetch_all(&mut *tx)
    .await?;
    let disabled = sqlx::query(
        "UPDATE client_keys SET is_active = FALSE, updated_at = $1 WHERE is_active = TRUE \
         AND expires_at IS NOT NULL AND expires_at <= $1 RETURNING id, key_hash",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let ids = |rows: Vec<AnyRow>| -> Result<Vec<(String, String)>, StoreError> {
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("key_hash")?)))
            .collect()
    };
    Ok(Expired {
        deleted: ids(deleted)?,
        disabled: ids(disabled)?,
    })
}

/// Every key's `(id, lookup hash, ciphertext)`, for re-encryption.
pub async fn secrets(db: &Db) -> Result<Vec<(String, String, String)>, StoreError> {
    let rows = sqlx::query("SELECT id, key_hash, key_encrypted FROM client_keys ORDER BY id")
        .fetch_all(&db.sql)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                r.try_get("key_hash")?,
                r.try_get("key_encrypted")?,
            ))
        })
        .collect()
}
