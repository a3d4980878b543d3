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

/// A provider's candidates, with a fingerprint of them (ids, limits, priorities, order)
/// computed once per load: the Redis shape sends it so the admit script can tell whether
/// Redis holds the same pool (see `lua/pool_sync.lua`).
#[derive(Debug)]
pub struct Pool {
    keys: Vec<Candidate>,
    version: String,
}

impl Pool {
    pub fn new(keys: Vec<Candidate>) -> Pool {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        // Fixed-width numbers after each id, so no two pools hash the same bytes.
        for c in &keys {
            hash.update(c.id.as_bytes());
            hash.update([0]);
            for n in [c.max_rpm.unwrap_or(-1), c.max_tpm.unwrap_or(-1), c.priority] {
                hash.update(n.to_le_bytes());
            }
        }
        let version = hex::encode(&hash.finalize()[..8]);
        Pool { keys, version }
    }

    pub fn version(&self) -> &str {
        &self.version
    }
}

impl std::ops::Deref for Pool {
    type Target = [Candidate];

    fn deref(&self) -> &[Candidate] {
        &self.keys
    }
}

pub struct PoolLoader {
    db: Db,
    keyring: Arc<Keyring>,
    ttl: Duration,
}

impl Loader for PoolLoader {
    type Value = Arc<Pool>;
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
        Ok(Arc::new(Pool::new(candidates)))
    }

    fn ttl(&self, _value: &Self::Value) -> Duration {
        self.ttl
    }
}

pub type PoolCache = Cache<PoolLoader>;

pub fn new(db: Db, keyring: Arc<Keyring>, ttl: Duration) -> PoolCache {
    Cache::new(PoolLoader { db, keyring, ttl })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, priority: i64) -> Candidate {
        Candidate {
            id: id.into(),
            provider: "openai".into(),
            label: "l".into(),
            priority,
            max_rpm: None,
            max_tpm: Some(100),
            value: "sk-x".into(),
        }
    }

    #[test]
    fn the_version_follows_ids_limits_priorities_and_order_only() {
        let v = |keys: Vec<Candidate>| Pool::new(keys).version().to_string();
        let base = v(vec![key("a", 0), key("b", 1)]);
        assert_eq!(base, v(vec![key("a", 0), key("b", 1)]));
        let relabelled = Candidate {
            label: "other".into(),
            value: "sk-y".into(),
            ..key("a", 0)
        };
        assert_eq!(base, v(vec![relabelled, key("b", 1)]));
        assert_ne!(base, v(vec![key("b", 1), key("a", 0)]));
        assert_ne!(base, v(vec![key("a", 0), key("b", 2)]));
        assert_ne!(base, v(vec![key("a", 0)]));
        let limited = Candidate {
            max_rpm: Some(5),
            ..key("a", 0)
        };
        assert_ne!(base, v(vec![limited, key("b", 1)]));
    }
}
