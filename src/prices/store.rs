//! SQL for prices (one text for both backends, see [`crate::db`]).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{ModelPrice, Price};
use crate::db::{Db, StoreError};

macro_rules! columns {
    () => {
        "provider, model, input_micros, output_micros, cached_input_micros, \
         cache_write_micros, created_at, updated_at"
    };
}

fn from_row(row: &AnyRow) -> Result<ModelPrice, StoreError> {
    Ok(ModelPrice {
        provider: row.try_get("provider")?,
        model: row.try_get("model")?,
        price: Price {
            input: row.try_get("input_micros")?,
            output: row.try_get("output_micros")?,
            cached_input: row.try_get("cached_input_micros")?,
            cache_write: row.try_get("cache_write_micros")?,
        },
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn all(rows: Vec<AnyRow>) -> Result<Vec<ModelPrice>, StoreError> {
    rows.iter().map(from_row).collect()
}

/// Sets a model's price, keeping its creation time when it had one.
pub async fn upsert(
    db: &Db,
    provider: &str,
    model: &str,
    price: &Price,
    now: i64,
) -> Result<ModelPrice, StoreError> {
    let row = sqlx::query(concat!(
        "INSERT INTO model_prices (provider, model, input_micros, output_micros, \
         cached_input_micros, cache_write_micros, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
         ON CONFLICT (provider, model) DO UPDATE SET \
         input_micros = excluded.input_micros, output_micros = excluded.output_micros, \
         cached_input_micros = excluded.cached_input_micros, \
         cache_write_micros = excluded.cache_write_micros, updated_at = excluded.updated_at \
         RETURNING ",
        columns!()
    ))
    .bind(provider)
    .bind(model)
    .bind(price.input)
    .bind(price.output)
    .bind(price.cached_input)
    .bind(price.cache_write)
    .bind(now)
    .fetch_one(&db.sql)
    .await?;
    from_row(&row)
}

/// Every price, by provider then model.
pub async fn list_all(db: &Db) -> Result<Vec<ModelPrice>, StoreError> {
    all(sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM model_prices ORDER BY provider, model"
    ))
    .fetch_all(&db.sql)
    .await?)
}

/// One provider's prices.
pub async fn list(db: &Db, provider: &str) -> Result<Vec<ModelPrice>, StoreError> {
    all(sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM model_prices WHERE provider = $1"
    ))
    .bind(provider)
    .fetch_all(&db.sql)
    .await?)
}

pub async fn delete(
    db: &Db,
    provider: &str,
    model: &str,
) -> Result<Option<ModelPrice>, StoreError> {
    let row = sqlx::query(concat!(
        "DELETE FROM model_prices WHERE provider = $1 AND model = $2 RETURNING ",
        columns!()
    ))
    .bind(provider)
    .bind(model)
    .fetch_optional(&db.sql)
    .await?;
    row.as_ref().map(from_row).transpose()
}
