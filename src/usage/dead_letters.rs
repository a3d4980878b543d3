//! Dead letters: usage records the database refused, set aside so that the queue goes on.
//!
//! A record lands here when applying it fails with an error that retrying cannot cure
//! ([`StoreError::refused_data`]: a constraint or trigger, a value the database cannot
//! store, a total that would pass its range). The row keeps the record as JSON, the
//! error text and when it was first and last seen. An operator lists them and replays
//! one after fixing the cause; a replay goes through the same idempotent
//! [`store::apply_in`] and removes the dead letter in the same transaction.
//!
//! Records carry no secret (ids, names, counts, amounts), so neither does this table.

use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::store::{self, Applied};
use super::UsageRecord;
use crate::clock::to_rfc3339;
use crate::db::{Db, StoreError};

/// The longest error text kept.
const MAX_ERROR_CHARS: usize = 1_000;

/// One set-aside record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub record_id: String,
    /// The record as JSON text.
    pub record: String,
    pub error: String,
    pub attempts: i64,
    pub first_seen_at: i64,
    pub last_seen_at: i64,
}

impl DeadLetter {
    /// The admin API's shape: the record as a JSON object, times as RFC 3339.
    pub fn view(&self) -> Value {
        let record = serde_json::from_str::<Value>(&self.record)
            .unwrap_or_else(|_| Value::String(self.record.clone()));
        json!({
            "id": self.id,
            "record_id": self.record_id,
            "record": record,
            "error": self.error,
            "attempts": self.attempts,
            "first_seen_at": to_rfc3339(self.first_seen_at),
            "last_seen_at": to_rfc3339(self.last_seen_at),
        })
    }
}

/// Text that any database stores: no NUL or other control character, bounded length.
fn storable(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .take(max)
        .collect()
}

/// The error text kept with a dead letter.
pub fn error_text(e: &StoreError) -> String {
    storable(&e.to_string(), MAX_ERROR_CHARS)
}

/// Sets a record aside, or notes one more refusal of a record already set aside (the
/// writer crashed before acknowledging it). `true` when the dead letter is new.
pub async fn put(db: &Db, record: &UsageRecord, error: &str, now: i64) -> Result<bool, StoreError> {
    // serde_json escapes control characters, so a NUL in the record is storable text.
    let text = serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt(format!("usage record as JSON: {e}")))?;
    put_raw(db, &record.id, &text, error, now).await
}

/// [`put`] for an entry that is not even a usage record: `raw` is its JSON text.
pub async fn put_raw(
    db: &Db,
    record_id: &str,
    raw: &str,
    error: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "INSERT INTO usage_dead_letters (record_id, record, error, attempts, first_seen_at, last_seen_at) \
         VALUES ($1, $2, $3, 1, $4, $4) \
         ON CONFLICT (record_id) DO UPDATE SET attempts = usage_dead_letters.attempts + 1, \
         error = $3, last_seen_at = $4 RETURNING attempts",
    )
    .bind(storable(record_id, 500))
    .bind(raw)
    .bind(storable(error, MAX_ERROR_CHARS))
    .bind(now)
    .fetch_one(&db.sql)
    .await?;
    Ok(row.try_get::<i64, _>("attempts")? == 1)
}

fn from_row(row: &AnyRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        record_id: row.try_get("record_id")?,
        record: row.try_get("record")?,
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        first_seen_at: row.try_get("first_seen_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

const COLUMNS: &str = "id, record_id, record, error, attempts, first_seen_at, last_seen_at";

/// The newest `limit` dead letters, newest first.
pub async fn list(db: &Db, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM usage_dead_letters ORDER BY id DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(&db.sql)
    .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// How many dead letters there are.
pub async fn count(db: &Db) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM usage_dead_letters")
        .fetch_one(&db.sql)
        .await?;
    Ok(row.try_get("n")?)
}

pub async fn get(db: &Db, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM usage_dead_letters WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&db.sql)
    .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    NotFound,
    /// Applied (or found applied already: `inserted` false) and removed.
    Applied {
        inserted: bool,
    },
    /// Refused again; the dead letter stays, with this error and one more attempt.
    Refused(String),
}

/// Applies a dead letter's record again through the normal idempotent apply; on success
/// the dead letter is removed in the same transaction.
pub async fn replay(db: &Db, id: i64, now: i64) -> Result<Replay, StoreError> {
    let Some(letter) = get(db, id).await? else {
        return Ok(Replay::NotFound);
    };
    let refused = |error: String| async move {
        sqlx::query(
            "UPDATE usage_dead_letters SET attempts = attempts + 1, error = $2, last_seen_at = $3 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(&error)
        .bind(now)
        .execute(&db.sql)
        .await?;
        Ok::<_, StoreError>(Replay::Refused(error))
    };
    let record: UsageRecord = match serde_json::from_str(&letter.record) {
        Ok(record) => record,
        Err(e) => return refused(storable(&format!("not a usage record: {e}"), 500)).await,
    };
    let mut tx = db.sql.begin().await?;
    match store::apply_in(&mut tx, std::slice::from_ref(&record)).await {
        Ok(Applied { inserted, .. }) => {
            sqlx::query("DELETE FROM usage_dead_letters WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Replay::Applied {
                inserted: inserted > 0,
            })
        }
        Err(e) if e.refused_data() => {
            // Nothing of the failed attempt stays; a failing rollback is the pool's to
            // clean up (the connection is then closed, which rolls back too).
            let _ = tx.rollback().await;
            refused(error_text(&e)).await
        }
        Err(e) => Err(e),
    }
}
