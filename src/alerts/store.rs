//! SQL of the `alerts` table: queue (inside the accounting writer's transaction), claim,
//! settle an attempt, count and list.
//!
//! Claiming is one statement, so one short transaction: it picks due, undelivered
//! alerts and pushes their `next_attempt_at` past the delivery's timeout before anyone
//! sends them. On Postgres the pick is `FOR UPDATE SKIP LOCKED`, so replicas claiming at
//! once take different alerts; SQLite has one writer, which serialises claims anyway.

use sqlx::Row;

use crate::db::{Backend, Db, StoreError};

/// An alert claimed for one delivery attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: i64,
}

/// An alert as the admin API lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub payload: String,
    pub created_at: i64,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub last_error: Option<String>,
}

/// Queues an alert, once: an id already present (the threshold alerted before in this
/// period) changes nothing. Due at once.
pub async fn queue(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: &str,
    payload: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO alerts (id, payload, created_at, attempts, next_attempt_at) \
         VALUES ($1, $2, $3, 0, $3) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(payload)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Claims up to `limit` alerts due at `now`, each until `until` (no other claim takes it
/// before then, unless this one settles it first).
pub async fn claim(db: &Db, now: i64, until: i64, limit: i64) -> Result<Vec<Claimed>, StoreError> {
    let lock = match db.backend() {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let rows = sqlx::query(&format!(
        "UPDATE alerts SET next_attempt_at = $2 WHERE id IN (\
         SELECT id FROM alerts WHERE delivered_at IS NULL AND next_attempt_at <= $1 \
         ORDER BY next_attempt_at, id LIMIT $3{lock}) \
         RETURNING id, payload, attempts"
    ))
    .bind(now)
    .bind(until)
    .bind(limit)
    .fetch_all(&db.sql)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Claimed {
                id: row.try_get("id")?,
                payload: row.try_get("payload")?,
                attempts: row.try_get("attempts")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Records a delivery the receiver accepted.
pub async fn delivered(db: &Db, id: &str, now: i64) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE alerts SET delivered_at = $2, attempts = attempts + 1, last_error = NULL \
         WHERE id = $1 AND delivered_at IS NULL",
    )
    .bind(id)
    .bind(now)
    .execute(&db.sql)
    .await?;
    Ok(())
}

/// Records a failed attempt and when to try again.
pub async fn failed(db: &Db, id: &str, error: &str, next: i64) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE alerts SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3 \
         WHERE id = $1 AND delivered_at IS NULL",
    )
    .bind(id)
    .bind(error)
    .bind(next)
    .execute(&db.sql)
    .await?;
    Ok(())
}

/// Alerts not yet delivered.
pub async fn pending(db: &Db) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM alerts WHERE delivered_at IS NULL")
        .fetch_one(&db.sql)
        .await?;
    Ok(row.try_get("n")?)
}

/// Newest first, after the cursor `(created_at, id)` of the last alert of the previous
/// page; `pending`: only undelivered (`Some(true)`) or only delivered (`Some(false)`).
pub async fn list(
    db: &Db,
    pending: Option<bool>,
    after: Option<(i64, String)>,
    limit: i64,
) -> Result<Vec<Listed>, StoreError> {
    let (at, id) = match after {
        Some((at, id)) => (Some(at), Some(id)),
        None => (None, None),
    };
    let rows = sqlx::query(
        "SELECT id, payload, created_at, attempts, next_attempt_at, delivered_at, last_error \
         FROM alerts WHERE ($1 IS NULL OR (CASE WHEN delivered_at IS NULL THEN 1 ELSE 0 END) = $2) \
         AND ($3 IS NULL OR created_at < $3 OR (created_at = $3 AND id < $4)) \
         ORDER BY created_at DESC, id DESC LIMIT $5",
    )
    .bind(pending)
    .bind(pending.map(i64::from))
    .bind(at)
    .bind(id)
    .bind(limit)
    .fetch_all(&db.sql)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Listed {
                id: row.try_get("id")?,
                payload: row.try_get("payload")?,
                created_at: row.try_get("created_at")?,
                attempts: row.try_get("attempts")?,
                next_attempt_at: row.try_get("next_attempt_at")?,
                delivered_at: row.try_get("delivered_at")?,
                last_error: row.try_get("last_error")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}
