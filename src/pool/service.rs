//! Provider-key admin operations.

use std::sync::Arc;

use super::input::{NewProviderKey, ProviderKeyPatch};
use super::store::{self, MinuteUsage};
use super::{LiveState, ProviderKey};
use crate::clock::now_ms;
use crate::crypto::Keyring;
use crate::db::{Db, StoreError};
use crate::invalidation::Bus;
use crate::limits::{CounterError, Counters};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no provider key with id `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Counters(#[from] CounterError),
}

#[derive(Clone)]
pub struct ProviderKeys {
    db: Db,
    keyring: Arc<Keyring>,
    bus: Arc<Bus>,
    counters: Counters,
}

impl ProviderKeys {
    pub fn new(db: Db, keyring: Arc<Keyring>, bus: Arc<Bus>, counters: Counters) -> Self {
        Self {
            db,
            keyring,
            bus,
            counters,
        }
    }

    /// Adds a key; its value is encrypted before it is stored and never returned.
    pub async fn add(&self, provider: &str, key: NewProviderKey) -> Result<ProviderKey, PoolError> {
        let id = uuid::Uuid::new_v4().to_string();
        let stored = store::insert(
            &self.db,
            &id,
            provider,
            &key.label,
            &self.keyring.encrypt(&key.value),
            key.priority,
            key.max_rpm,
            key.max_tpm,
            now_ms(),
        )
        .await?;
        self.bus.pool_changed(provider).await;
        tracing::info!(provider, provider_key_id = %id, "provider key added");
        Ok(stored)
    }

    /// A provider's keys by priority, each with its live state.
    pub async fn list(&self, provider: &str) -> Result<Vec<(ProviderKey, LiveState)>, PoolError> {
        let keys = store::list(&self.db, provider, false).await?;
        let ids: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
        let live = self.counters.pool_state(provider, &ids).await?;
        Ok(keys.into_iter().zip(live).collect())
    }

    pub async fn get(&self, id: &str) -> Result<ProviderKey, PoolError> {
        store::get(&self.db, id)
            .await?
            .ok_or_else(|| PoolError::NotFound(id.to_string()))
    }

    pub async fn update(
        &self,
        id: &str,
        patch: &ProviderKeyPatch,
    ) -> Result<ProviderKey, PoolError> {
        let key = store::update(&self.db, id, patch, now_ms())
            .await?
            .ok_or_else(|| PoolError::NotFound(id.to_string()))?;
        self.bus.pool_changed(&key.provider).await;
        tracing::info!(provider_key_id = %id, "provider key updated");
        Ok(key)
    }

    pub async fn delete(&self, id: &str) -> Result<ProviderKey, PoolError> {
        let key = store::delete(&self.db, id)
            .await?
            .ok_or_else(|| PoolError::NotFound(id.to_string()))?;
        self.bus.pool_changed(&key.provider).await;
        tracing::info!(provider_key_id = %id, "provider key deleted");
        Ok(key)
    }

    /// Ends the key's cooldown and suspension at once (they would otherwise end by
    /// themselves); its windows and pick history stay. Answers the key's live state after.
    pub async fn reset(&self, id: &str) -> Result<(ProviderKey, LiveState), PoolError> {
        let key = self.get(id).await?;
        self.counters
            .reset_provider_key(&key.provider, &key.id)
            .await?;
        let live = self
            .counters
            .pool_state(&key.provider, std::slice::from_ref(&key.id))
            .await?
            .pop()
            .unwrap_or_default();
        tracing::info!(provider = %key.provider, provider_key_id = %id, "provider key cooldown and suspension cleared");
        Ok((key, live))
    }

    /// Reported usage per minute, newest first, at most `limit` minutes.
    pub async fn usage(&self, id: &str, limit: i64) -> Result<Vec<MinuteUsage>, PoolError> {
        self.get(id).await?;
        Ok(store::usage_by_minute(&self.db, id, limit).await?)
    }
}
