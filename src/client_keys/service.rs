//! The client-key operations behind the admin API.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::input::{KeyPatch, NewKey};
use super::store::{self, Expired, ListFilter, Secrets};
use super::ClientKey;
use crate::clock::now_ms;
use crate::crypto::{self, Keyring};
use crate::db::{Db, StoreError};
use crate::invalidation::Invalidator;
use crate::money::{format_usd, MAX_MICROS, MAX_TOTAL};
use crate::usage::{self, KeyStats};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no client key with id `{0}`")]
    NotFound(String),
    #[error("key `{0}` is not a standalone key; only standalone keys have a balance")]
    NotStandalone(String),
    #[error("amount_usd must not be 0")]
    ZeroAmount,
    #[error("{0}")]
    BalanceRefused(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the stored secret of key `{0}` cannot be decrypted with the configured encryption keys"
    )]
    Undecryptable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Client-key operations over the durable store.
#[derive(Clone)]
pub struct ClientKeys {
    db: Db,
    keyring: Arc<Keyring>,
    prefix: String,
    /// Told about every change, so no replica admits with a stale record.
    invalidator: Invalidator,
    /// Last `created_at` handed out, so keys created in one millisecond still sort
    /// newest-first in the order they were created.
    last_created: Arc<AtomicI64>,
}

impl ClientKeys {
    pub fn new(db: Db, keyring: Arc<Keyring>, prefix: String, invalidator: Invalidator) -> Self {
        Self {
            db,
            keyring,
            prefix,
            invalidator,
            last_created: Arc::new(AtomicI64::new(0)),
        }
    }

    fn creation_stamp(&self) -> i64 {
        let now = now_ms();
        let previous = self
            .last_created
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(previous + 1)
    }

    /// Creates a key and returns it with its secret, which is never shown again.
    pub async fn create(&self, key: NewKey) -> Result<(ClientKey, String), KeyError> {
        let now = self.creation_stamp();
        let secret = crypto::generate_client_key(&self.prefix);
        let id = uuid::Uuid::new_v4().to_string();
        let default_name;
        let name = match &key.name {
            Some(n) => n.as_str(),
            None => {
                default_name = format!("API Key {}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
                default_name.as_str()
            }
        };
        let secrets = Secrets {
            id: &id,
            key_hash: &crypto::lookup_hash(&secret),
            key_encrypted: &self.keyring.encrypt(&secret),
            prefix: &crypto::display_prefix(&secret, &self.prefix),
            name,
        };
        let stored = store::insert(&self.db, &key, &secrets, now).await?;
        tracing::info!(key_id = %stored.id, standalone = stored.is_standalone, "client key created");
        Ok((stored, secret))
    }

    pub async fn get(&self, id: &str) -> Result<ClientKey, KeyError> {
        store::get(&self.db, id)
            .await?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))
    }

    /// The key a secret belongs to, if any.
    pub async fn find_by_secret(&self, secret: &str) -> Result<Option<ClientKey>, KeyError> {
        Ok(store::get_by_hash(&self.db, &crypto::lookup_hash(secret)).await?)
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<ClientKey>, KeyError> {
        Ok(store::list(&self.db, filter).await?)
    }

    pub async fn update(&self, id: &str, patch: &KeyPatch) -> Result<ClientKey, KeyError> {
        let key = store::update(&self.db, id, patch, now_ms())
            .await?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
        self.invalidator.key_changed(&key.key_hash).await;
        tracing::info!(key_id = %id, "client key updated");
        Ok(key)
    }

    /// Disables the key; its record and usage history stay.
    pub async fn disable(&self, id: &str) -> Result<(), KeyError> {
        let key = self.get(id).await?;
        store::disable(&self.db, id, now_ms()).await?;
        self.invalidator.key_changed(&key.key_hash).await;
        tracing::info!(key_id = %id, "client key disabled");
        Ok(())
    }

    /// Decrypts and returns a key's secret. Logged as an event, without the secret.
    pub async fn reveal(&self, id: &str) -> Result<String, KeyError> {
        let key = self.get(id).await?;
        let secret = self
            .keyring
            .decrypt(&key.key_encrypted)
            .map_err(|_| KeyError::Undecryptable(id.to_string()))?;
        tracing::info!(key_id = %id, event = "client_key_revealed", "client key secret revealed");
        Ok(secret)
    }

    /// Credits (positive) or deducts (negative) a standalone key's balance.
    pub async fn adjust_balance(
        &self,
        id: &str,
        amount_micros: i64,
    ) -> Result<ClientKey, KeyError> {
        if amount_micros == 0 {
            return Err(KeyError::ZeroAmount);
        }
        if let Some(key) =
            store::adjust_balance(&self.db, id, amount_micros, MAX_MICROS, now_ms()).await?
        {
            self.invalidator.key_changed(&key.key_hash).await;
            tracing::info!(key_id = %id, amount_usd = %format_usd(amount_micros), "balance adjusted");
            return Ok(key);
        }
        // The single-statement update refused; find out why to say so.
        let key = self.get(id).await?;
        if !key.is_standalone {
            return Err(KeyError::NotStandalone(id.to_string()));
        }
        let remaining = key
            .balance_micros
            .map(|b| b.saturating_sub(key.balance_used_micros));
        let credited = key.balance_micros.unwrap_or(key.balance_used_micros);
        Err(KeyError::BalanceRefused(match remaining {
            _ if amount_micros > 0 && credited > MAX_TOTAL - amount_micros => format!(
                "crediting {} USD would take the key's credited total above {} USD",
                format_usd(amount_micros),
                format_usd(MAX_TOTAL)
            ),
            _ if amount_micros > 0 => format!(
                "crediting {} USD would take the balance above {} USD",
                format_usd(amount_micros),
                format_usd(MAX_MICROS)
            ),
            None => "the key has no balance limit, so there is nothing to deduct".to_string(),
            Some(r) => format!(
                "cannot deduct {} USD: the remaining balance is {} USD",
                format_usd(-amount_micros),
                format_usd(r.max(0))
            ),
        }))
    }

    /// Disables or deletes every expired active key; returns what it changed.
    pub async fn expire(&self, default_delete: bool) -> Result<Expired, KeyError> {
        let expired = store::expire(&self.db, now_ms(), default_delete).await?;
        for (id, hash) in &expired.deleted {
            self.invalidator.key_changed(hash).await;
            tracing::info!(key_id = %id, "expired client key deleted");
        }
        for (id, hash) in &expired.disabled {
            self.invalidator.key_changed(hash).await;
            tracing::info!(key_id = %id, "expired client key disabled");
        }
        Ok(expired)
    }

    /// The key's quota view: its own limits (per-minute windows and quotas) and each
    /// model entry's, with the database's figures for the current periods.
    pub async fn quota(
        &self,
        id: &str,
    ) -> Result<(ClientKey, Vec<crate::quota_usage::ScopeView>), KeyError> {
        let key = self.get(id).await?;
        let own = crate::quota::LimitSet {
            rate_limit: key.rate_limit,
            tpm_limit: key.tpm_limit,
            daily_request_limit: key.daily_request_limit,
            daily_token_limit: key.daily_token_limit,
            spend_limits: key.spend_limits.clone(),
        };
        let view = crate::quota_usage::view(
            &self.db,
            crate::quota::ScopeKind::Key,
            &key.id,
            &own,
            &key.model_limits,
            now_ms(),
        )
        .await?;
        Ok((key, view))
    }

    pub async fn stats(
        &self,
        id: &str,
        start: i64,
        end: i64,
    ) -> Result<(ClientKey, KeyStats), KeyError> {
        let key = self.get(id).await?;
        let stats = usage::store::stats(&self.db, id, start, end).await?;
        Ok((key, stats))
    }
}
