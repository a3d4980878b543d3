//! The price operations: the admin API's, the start-up load of `KEYWARD_PRICES_FILE`,
//! and the lookup of a model's price (through the cache) that admissions and reports use.

use std::sync::Arc;

use super::cache::PriceCache;
use super::{lookup, store, ModelPrice, Price};
use crate::clock::now_ms;
use crate::db::{Db, StoreError};
use crate::invalidation::Invalidator;

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("no price for model `{model}` of provider `{provider}`")]
    NotFound { provider: String, model: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The price operations; cheap to clone.
#[derive(Clone)]
pub struct Prices {
    db: Db,
    cache: Arc<PriceCache>,
    invalidator: Invalidator,
}

impl Prices {
    pub fn new(db: Db, cache: Arc<PriceCache>, invalidator: Invalidator) -> Self {
        Self {
            db,
            cache,
            invalidator,
        }
    }

    /// Sets a model's price (replacing the whole price); every replica drops its copy.
    pub async fn put(
        &self,
        provider: &str,
        model: &str,
        price: Price,
    ) -> Result<ModelPrice, PriceError> {
        let stored = store::upsert(&self.db, provider, model, &price, now_ms()).await?;
        self.invalidator.prices_changed(provider).await;
        tracing::info!(provider, model, "price set");
        Ok(stored)
    }

    /// Every price, by provider then model.
    pub async fn list(&self) -> Result<Vec<ModelPrice>, PriceError> {
        Ok(store::list_all(&self.db).await?)
    }

    pub async fn delete(&self, provider: &str, model: &str) -> Result<ModelPrice, PriceError> {
        let deleted = store::delete(&self.db, provider, model).await?;
        let deleted = deleted.ok_or_else(|| PriceError::NotFound {
            provider: provider.to_string(),
            model: model.to_string(),
        })?;
        self.invalidator.prices_changed(provider).await;
        tracing::info!(provider, model, "price removed");
        Ok(deleted)
    }

    /// Stores the prices of `KEYWARD_PRICES_FILE` (each replaces what the database held
    /// for that model; models the file does not name keep their prices).
    pub async fn load(&self, entries: &[(String, String, Price)]) -> Result<(), PriceError> {
        let now = now_ms();
        for (provider, model, price) in entries {
            store::upsert(&self.db, provider, model, price, now).await?;
        }
        let providers: std::collections::BTreeSet<&str> =
            entries.iter().map(|(p, _, _)| p.as_str()).collect();
        for provider in providers {
            self.invalidator.prices_changed(provider).await;
        }
        if !entries.is_empty() {
            tracing::info!(
                prices = entries.len(),
                "prices loaded from KEYWARD_PRICES_FILE"
            );
        }
        Ok(())
    }

    /// The price a model of `provider` is charged at ([`lookup`]), from the cache.
    pub async fn price_of(&self, provider: &str, model: &str) -> Result<Option<Price>, StoreError> {
        let prices = self.cache.get(provider).await?;
        Ok(lookup(&prices, model).copied())
    }
}
