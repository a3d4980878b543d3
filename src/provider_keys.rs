//! The admin operations over provider keys: the durable store of [`crate::pool`], the
//! rosters every replica caches (told through the [`Invalidator`] it is given), and the
//! live state the counter store keeps for each key.
//!
//! It sits above both `pool` and `limits` because it reads the counter store, and the
//! counter store takes `pool`'s types (a roster of candidates, learned limits).

use std::sync::Arc;

use crate::clock::now_ms;
use crate::crypto::Keyring;
use crate::db::{Db, StoreError};
use crate::invalidation::Invalidator;
use crate::limits::{CounterError, Counters};
use crate::pool::input::{NewProviderKey, ProviderKeyPatch};
use crate::pool::store::{self, MinuteUsage};
use crate::pool::{LiveState, ProviderKey};

#[derive(Debug, thiserror::Error)]
pub enum ProviderKeyError {
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
    invalidator: Invalidator,
    counters: Counters,
}

impl ProviderKeys {
    pub fn new(
        db: Db,
        keyring: Arc<Keyring>,
        invalidator: Invalidator,
        counters: Counters,
    ) -> Self {
        Self {
            db,
            keyring,
            invalidator,
            counters,
        }
    }

    /// Adds a key; its value is encrypted before it is stored and never returned.
    pub async fn add(
        &self,
        provider: &str,
        key: NewProviderKey,
    ) -> Result<ProviderKey, ProviderKeyError> {
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
        self.invalidator.roster_changed(provider).await;
        tracing::info!(provider, provider_key_id = %id, "provider key added");
        Ok(stored)
    }

    /// A provider's keys by priority, each with its live state.
    pub async fn list(
        &self,
        provider: &str,
    ) -> Result<Vec<(ProviderKey, LiveState)>, ProviderKeyError> {
        let keys = store::list(&self.db, provider, false).await?;
        let ids: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
        let live = self.counters.pool_state(provider, &ids).await?;
        Ok(keys.into_iter().zip(live).collect())
    }

    pub async fn get(&self, id: &str) -> Result<ProviderKey, ProviderKeyError> {
        store::get(&self.db, id)
            .await?
            .ok_or_else(|| ProviderKeyError::NotFound(id.to_string()))
    }

    pub async fn update(
        &self,
        id: &str,
        patch: &ProviderKeyPatch,
    ) -> Result<ProviderKey, ProviderKeyError> {
        let key = store::update(&self.db, id, patch, now_ms())
            .await?
            .ok_or_else(|| ProviderKeyError::NotFound(id.to_string()))?;
        self.invalidator.roster_changed(&key.provider).await;
        tracing::info!(provider_key_id = %id, "provider key updated");
        Ok(key)
    }

    pub async fn delete(&self, id: &str) -> Result<ProviderKey, ProviderKeyError> {
        let key = store::delete(&self.db, id)
            .await?
            .ok_or_else(|| ProviderKeyError::NotFound(id.to_string()))?;
        self.invalidator.roster_changed(&key.provider).await;
        tracing::info!(provider_key_id = %id, "provider key deleted");
        Ok(key)
    }

    /// Ends the key's cooldown and suspension at once (they would otherwise end by
    /// themselves); its windows and pick history stay. Answers the key's live state after.
    pub async fn reset(&self, id: &str) -> Result<(ProviderKey, LiveState), ProviderKeyError> {
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
    pub async fn usage(&self, id: &str, limit: i64) -> Result<Vec<MinuteUsage>, ProviderKeyError> {
        self.get(id).await?;
        Ok(store::usage_by_minute(&self.db, id, limit).await?)
    }
}
