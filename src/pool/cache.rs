//! Per provider, its active keys in the order selection tries them (priority, then
//! creation), with their values decrypted once here, not per request.

use std::sync::Arc;
use std::time::Duration;

use super::store;
use crate::cache::{Cache, Loader};
use crate::crypto::Keyring;
use crate::db::{Db, StoreError};

/// A key selection may pick. The value is the upstream secret: its `Debug` hides it.
#[derive(Clone)]
pub struct Candidate {
    pub id: String,
    pub provider: String,
    pub label: String,
    pub priority: i64,
    pub max_rpm: Option<i64>,
    pub max_tpm: Option<i64>,
    pub value: String,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("id", &self.id)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

pub struct PoolLoader {
    db: Db,
    keyring: Arc<Keyring>,
    ttl: Duration,
}

impl Loader for PoolLoader {
    type Value = Arc<Vec<Candidate>>;
    const NAME: &'static str = "provider_pools";

    async fn load(&self, provider: &str) -> Result<Self::Value, StoreError> {
        let keys = store::list(&self.db, provider, true).await?;
        let mut candidates = Vec::with_capacity(keys.len());
        for key in keys {
            match self.keyring.decrypt(&key.key_encrypted) {
                Ok(value) => candidates.push(Candidate {
                    id: key.id,
                    provider: key.provider,
                    label: key.label,
                    priority: key.priority,
                    max_rpm: key.max_rpm,
                    max_tpm: key.max_tpm,
                    value,
                }),
                // Left out, not fatal; POST /admin/encryption/rotate disables such keys.
                Err(_) => tracing::warn!(
                    provider_key_id = %key.id,
                    "provider key cannot be decrypted with the configured keys; skipped"
                ),
            }
        }
        Ok(Arc::new(candidates))
    }

    fn ttl(&self, _value: &Self::Value) -> Duration {
        self.ttl
    }
}

pub type PoolCache = Cache<PoolLoader>;

pub fn new(db: Db, keyring: Arc<Keyring>, ttl: Duration) -> PoolCache {
    Cache::new(PoolLoader { db, keyring, ttl })
}
