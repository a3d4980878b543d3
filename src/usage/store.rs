//! SQL for usage rows: idempotent batch apply and range statistics.

use std::collections::HashMap;

use sqlx::Row;

use super::{ClassTotals, DayStats, KeyStats, UsageRecord};
use crate::clock::{day_to_date, MS_PER_DAY};
use crate::db::{Db, StoreError};
use crate::money::{Usd, MAX_TOTAL};

/// How a batch went: rows newly applied, rows that had been applied before, and (from
/// `accounting::apply_batch`) records set aside as dead letters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub inserted: usize,
    pub duplicates: usize,
    pub dead_lettered: usize,
}

/// What a batch adds to one key's totals.
#[derive(Default)]
struct KeyDelta {
    requests: i64,
    tokens: i64,
    cost: i64,
    last_used: i64,
}

/// A record's refusal: a value out of the range every total is kept in.
fn out_of_range(r: &UsageRecord, what: &str) -> StoreError {
    StoreError::OutOfRange(format!(
        "usage record {}: {what} (every count and amount is from 0 to {MAX_TOTAL})",
        r.id
    ))
}

impl KeyDelta {
    /// Adds one record; refuses a sum that would pass [`MAX_TOTAL`] (never wraps).
    fn add(&mut self, r: &UsageRecord) -> Result<(), StoreError> {
        let sum = |a: i64, b: i64| a.checked_add(b).filter(|s| *s <= MAX_TOTAL);
        let tokens = total_tokens(r)?;
        self.requests = sum(self.requests, 1).ok_or_else(|| out_of_range(r, "requests"))?;
        self.tokens = sum(self.tokens, tokens).ok_or_else(|| out_of_range(r, "tokens"))?;
        self.cost = sum(self.cost, r.cost_micros).ok_or_else(|| out_of_range(r, "cost"))?;
        self.last_used = self.last_used.max(r.created_at);
        Ok(())
    }
}

/// The record's tokens, after checking every amount in it is within range.
fn total_tokens(r: &UsageRecord) -> Result<i64, StoreError> {
    let in_range = |v: i64| (0..=MAX_TOTAL).contains(&v);
    if !in_range(r.prompt_tokens) || !in_range(r.completion_tokens) {
        return Err(out_of_range(r, "tokens"));
    }
    if !in_range(r.cost_micros) {
        return Err(out_of_range(r, "cost"));
    }
    if ![r.cached_tokens, r.cache_write_tokens, r.reasoning_tokens]
        .into_iter()
        .all(in_range)
    {
        return Err(out_of_range(r, "token classes"));
    }
    r.prompt_tokens
        .checked_add(r.completion_tokens)
        .filter(|t| *t <= MAX_TOTAL)
        .ok_or_else(|| out_of_range(r, "tokens"))
}

/// Applies a batch in one transaction: each record is inserted unless its id exists, and
/// the totals, balance and last use of its key, and its quota scopes' ledger rows and
/// spend alerts ([`super::ledger`]), move only for records newly inserted.
///
/// A total that would pass [`MAX_TOTAL`] is refused ([`StoreError::OutOfRange`]), not
/// wrapped, nor (in SQLite) turned into a REAL: the accounting writer then sets the
/// record aside as a dead letter.
pub async fn apply(db: &Db, records: &[UsageRecord]) -> Result<Applied, StoreError> {
    let mut tx = db.sql.begin().await?;
    let applied = apply_in(&mut tx, records).await?;
    tx.commit().await?;
    Ok(applied)
}

/// [`apply`] inside a transaction the caller commits (a dead letter's replay also
/// removes the dead letter in it).
pub async fn apply_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    records: &[UsageRecord],
) -> Result<Applied, StoreError> {
    let mut applied = Applied::default();
    let mut deltas: HashMap<&str, KeyDelta> = HashMap::new();
    let mut provider_deltas: HashMap<&str, KeyDelta> = HashMap::new();
    let mut inserted: Vec<&UsageRecord> = Vec::new();
    let totals = records
        .iter()
        .map(total_tokens)
        .collect::<Result<Vec<_>, _>>()?;
    let mut new = Vec::with_capacity(records.len());
    for (chunk, totals) in chunked(records).zip(chunked(&totals)) {
        new.extend(insert_new(tx, chunk, totals).await?);
    }
    for (r, new) in records.iter().zip(new) {
        if !new {
            applied.duplicates += 1;
            continue;
        }
        applied.inserted += 1;
        inserted.push(r);
        if let Some(pk) = r.provider_key_id.as_deref() {
            provider_deltas.entry(pk).or_default().add(r)?;
        }
        if let Some(key_id) = r.key_id.as_deref() {
            deltas.entry(key_id).or_default().add(r)?;
        }
    }
    for (provider_key_id, d) in provider_deltas {
        // A provider key serves every tenant: its totals (shown to operators, billed to
        // nobody) stop at MAX_TOTAL ($5) rather than refuse the record, so no tenant's
        // reports, true or not, can fill them and set everyone's usage aside.
        sqlx::query(
            "UPDATE provider_keys SET \
             total_requests = CASE WHEN total_requests > $5 - $2 THEN $5 ELSE total_requests + $2 END, \
             total_tokens = CASE WHEN total_tokens > $5 - $3 THEN $5 ELSE total_tokens + $3 END, \
             last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $4 THEN $4 ELSE last_used_at END \
             WHERE id = $1",
        )
        .bind(provider_key_id)
        .bind(d.requests)
        .bind(d.tokens)
        .bind(d.last_used)
        .bind(MAX_TOTAL)
        .execute(&mut **tx)
        .await?;
    }
    for (key_id, d) in deltas {
        // A key deleted meanwhile matches no row: its history is kept, its totals are gone.
        let done = sqlx::query(
            "UPDATE client_keys SET total_requests = total_requests + $2, \
             total_tokens = total_tokens + $3, total_cost_micros = total_cost_micros + $4, \
             balance_used_micros = balance_used_micros + $4, \
             last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $5 THEN $5 ELSE last_used_at END \
             WHERE id = $1 AND total_requests <= $6 - $2 AND total_tokens <= $6 - $3 \
             AND total_cost_micros <= $6 - $4 AND balance_used_micros <= $6 - $4",
        )
        .bind(key_id)
        .bind(d.requests)
        .bind(d.tokens)
        .bind(d.cost)
        .bind(d.last_used)
        .bind(MAX_TOTAL)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 0
            && exists(tx, "SELECT 1 AS one FROM client_keys WHERE id = $1", key_id).await?
        {
            return Err(StoreError::OutOfRange(format!(
                "client key {key_id}: its totals would pass {MAX_TOTAL}"
            )));
        }
    }
    super::ledger::apply(tx, &inserted, crate::clock::now_ms()).await?;
    Ok(applied)
}

/// The most rows one multi-row statement takes (17 parameters each at most: well within
/// what a statement may bind, SQLite 32,766, Postgres 65,535).
const MAX_ROWS: usize = 128;

/// A batch cut into multi-row statements: [`MAX_ROWS`] at a time, then the rest by its
/// binary digits, largest first. So a statement's text takes one of eight forms, each
/// prepared once per connection and cached (a text per batch size would be parsed and
/// planned again on nearly every batch), at most eight statements for the rest.
pub(super) fn chunked<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let rest = items.len() % MAX_ROWS;
    let sizes = std::iter::repeat(MAX_ROWS)
        .take(items.len() / MAX_ROWS)
        .chain(
            (0..MAX_ROWS.trailing_zeros())
                .rev()
                .map(|bit| 1 << bit)
                .filter(move |size| rest & size != 0),
        );
    let mut left = items;
    sizes.map(move |n| {
        let (chunk, after) = left.split_at(n.min(left.len()));
        left = after;
        chunk
    })
}

/// `(…), (…)`: `rows` groups of `cols` parameters. SQLite's are anonymous (`?`): it finds
/// a numbered one by a scan of the statement's names, which made binding a 100-row
/// statement quadratic (a third of the writer's CPU); Postgres's are numbered (`$n`).
pub(super) fn values(rows: usize, cols: usize, sqlite: bool) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(rows * cols * 6);
    for row in 0..rows {
        out.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..cols {
            if col > 0 {
                out.push_str(", ");
            }
            if sqlite {
                out.push('?');
            } else {
                let _ = write!(out, "${}", row * cols + col + 1);
            }
        }
        out.push(')');
    }
    out
}

/// Whether the transaction is SQLite's (see [`values`]).
pub(super) fn is_sqlite(tx: &mut sqlx::Transaction<'static, sqlx::Any>) -> bool {
    (**tx).backend_name() == "SQLite"
}

/// The usage columns, in the order [`insert_new`] binds them.
const RECORD_COLUMNS: usize = 17;

/// Inserts `records` (with their `totals`) in one statement, each unless its id exists;
/// says which were inserted. One statement per chunk, not one per record: the writer's
/// database round trips (and their CPU) per batch, not per record. A record repeated in
/// the chunk is inserted once, as its first occurrence.
async fn insert_new(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    records: &[UsageRecord],
    totals: &[i64],
) -> Result<Vec<bool>, StoreError> {
    let sql = format!(
        "INSERT INTO usage_records (id, key_id, provider, model, api_format, provider_key_id, \
         prompt_tokens, completion_tokens, total_tokens, cost_micros, latency_ms, upstream_status, \
         created_at, cached_tokens, cache_write_tokens, reasoning_tokens, source) VALUES {} \
         ON CONFLICT (id) DO NOTHING RETURNING id",
        values(records.len(), RECORD_COLUMNS, is_sqlite(tx))
    );
    let mut query = sqlx::query(&sql);
    for (r, total) in records.iter().zip(totals) {
        query = query
            .bind(&r.id)
            .bind(r.key_id.as_deref())
            .bind(r.provider.as_deref())
            .bind(r.model.as_deref())
            .bind(r.api_format.as_deref())
            .bind(r.provider_key_id.as_deref())
            .bind(r.prompt_tokens)
            .bind(r.completion_tokens)
            .bind(*total)
            .bind(r.cost_micros)
            .bind(r.latency_ms)
            .bind(r.upstream_status)
            .bind(r.created_at)
            .bind(r.cached_tokens)
            .bind(r.cache_write_tokens)
            .bind(r.reasoning_tokens)
            .bind(r.source.as_str());
    }
    let mut new = std::collections::HashSet::new();
    for row in query.fetch_all(&mut **tx).await? {
        new.insert(row.try_get::<String, _>("id")?);
    }
    Ok(records.iter().map(|r| new.remove(r.id.as_str())).collect())
}

/// Whether `sql` (a `SELECT … WHERE id = $1`) finds a row.
async fn exists(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    sql: &'static str,
    id: &str,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(sql)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .is_some())
}

/// The sums of [`ClassTotals`] as select-list items (one text for the totals and the
/// days).
const CLASS_SUMS: &str = "CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached, \
     CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT) AS cache_write, \
     CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT) AS reasoning, \
     CAST(COALESCE(SUM(CASE WHEN source = 'estimated' THEN 1 ELSE 0 END), 0) AS BIGINT) AS estimated";

fn classes(row: &sqlx::any::AnyRow) -> Result<ClassTotals, sqlx::Error> {
    Ok(ClassTotals {
        cached_tokens: row.try_get("cached")?,
        cache_write_tokens: row.try_get("cache_write")?,
        reasoning_tokens: row.try_get("reasoning")?,
        estimated_requests: row.try_get("estimated")?,
    })
}

/// Totals and the per-day breakdown of one key's usage with `start <= created_at <= end`.
pub async fn stats(db: &Db, key_id: &str, start: i64, end: i64) -> Result<KeyStats, StoreError> {
    let totals = sqlx::query(&format!(
        "SELECT COUNT(*) AS requests, CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) AS tokens, \
         CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS cost, \
         CAST(AVG(latency_ms) AS DOUBLE PRECISION) AS avg_latency, {CLASS_SUMS} \
         FROM usage_records WHERE key_id = $1 AND created_at >= $2 AND created_at <= $3",
    ))
    .bind(key_id)
    .bind(start)
    .bind(end)
    .fetch_one(&db.sql)
    .await?;
    let days = sqlx::query(&format!(
        "SELECT created_at / $4 AS day, COUNT(*) AS requests, \
         CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) AS tokens, \
         CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS cost, {CLASS_SUMS} \
         FROM usage_records WHERE key_id = $1 AND created_at >= $2 AND created_at <= $3 \
         GROUP BY day ORDER BY day",
    ))
    .bind(key_id)
    .bind(start)
    .bind(end)
    .bind(MS_PER_DAY)
    .fetch_all(&db.sql)
    .await?;
    let daily = days
        .iter()
        .map(|row| {
            Ok(DayStats {
                date: day_to_date(row.try_get("day")?),
                requests: row.try_get("requests")?,
                tokens: row.try_get("tokens")?,
                cost_usd: Usd(row.try_get("cost")?),
                classes: classes(row)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(KeyStats {
        requests: totals.try_get("requests")?,
        tokens: totals.try_get("tokens")?,
        cost_micros: totals.try_get("cost")?,
        avg_latency_ms: totals.try_get("avg_latency")?,
        classes: classes(&totals)?,
        daily,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item once, in order, in pieces of the few sizes statements are prepared for.
    #[test]
    fn batches_are_cut_into_a_few_forms() {
        for n in 0..=600 {
            let items: Vec<usize> = (0..n).collect();
            let pieces: Vec<&[usize]> = chunked(&items).collect();
            assert_eq!(pieces.concat(), items, "{n}");
            assert!(pieces.len() <= n / MAX_ROWS + 7, "{n}: {}", pieces.len());
            for p in &pieces {
                assert!(p.len().is_power_of_two() && p.len() <= MAX_ROWS, "{n}");
            }
        }
        assert_eq!(values(2, 2, true), "(?, ?), (?, ?)");
        assert_eq!(values(2, 2, false), "($1, $2), ($3, $4)");
    }
}
