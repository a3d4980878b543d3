//! Per provider, all its prices (model → price), loaded from the database once and
//! served from memory; [`crate::invalidation`] drops a provider's entry when one of its
//! prices changes, here or on another replica.
//!
//! The whole provider is one entry because the lookup needs every priced prefix of a
//! model id, not one row.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{store, Price};
use crate::cache::{Cache, Loader};
use crate::db::{Db, StoreError};

pub type ProviderPrices = Arc<BTreeMap<String, Price>>;

pub struct PriceLoader {
    db: Db,
    ttl: Duration,
    /// For a provider without any price (any provider name a pool has becomes one).
    negative_ttl: Duration,
}

impl Loader for PriceLoader {
    type Value = ProviderPrices;
    const NAME: &'static str = "model_prices";

    async fn load(&self, provider: &str) -> Result<Self::Value, StoreError> {
        let rows = store::list(&self.db, provider).await?;
        Ok(Arc::new(
            rows.into_iter().map(|p| (p.model, p.price)).collect(),
        ))
    }

    /// A provider without prices: a price set while an invalidation was lost is used
    /// within the negative TTL.
    fn is_negative(&self, value: &Self::Value) -> bool {
        value.is_empty()
    }

    fn ttls(&self) -> (Duration, Duration) {
        (self.ttl, self.negative_ttl)
    }
}

pub type PriceCache = Cache<PriceLoader>;

pub fn new(db: Db, ttl: Duration, negative_ttl: Duration) -> PriceCache {
    Cache::new(PriceLoader {
        db,
        ttl,
        negative_ttl,
    })
}
