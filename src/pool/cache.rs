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

/// A provider's roster: its candidates, with a fingerprint of them (ids, limits, priorities, order)
/// computed once per load: the Redis shape sends it so the admit script can tell whether
/// Redis holds the same pool (see `lua/pool_sync.lua`).
///
/// The stamp orders pools: when it was loaded (this replica's clock, Unix ms). A replica
/// that finds a pool in Redis stamped later than its own reloads from the database
/// instead of writing its own back (see `admission`), so two replicas holding different
/// pools (a lost invalidation) cannot rewrite the pool in turn on every request.
#[derive(Debug)]
pub struct Roster {
    keys: Vec<Candidate>,
    version: String,
    stamp: i64,
}

impl Roster {
    /// A roster loaded now.
    pub fn new(keys: Vec<Candidate>) -> Roster {
        Self::stamped(keys, crate::clock::now_ms())
    }

    /// A roster with the given stamp.
    pub fn stamped(keys: Vec<Candidate>, stamp: i64) -> Roster {
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
        Roster {
            keys,
            version,
            stamp,
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn stamp(&self) -> i64 {
        self.stamp
    }

    /// This roster, stamped later than `stamp` (a copy when it is not already).
    pub fn stamped_after(self: &Arc<Self>, stamp: i64) -> Arc<Roster> {
        if self.stamp > stamp {
            return self.clone();
        }
        Arc::new(Roster {
            keys: self.keys.clone(),
            version: self.version.clone(),
            stamp: stamp + 1,
        })
    }
}

impl std::ops::Deref for Roster {
    type Target = [Candidate];

    fn deref(&self) -> &[Candidate] {
        &self.keys
    }
}

pub struct RosterLoader {
    db: Db,
    keyring: Arc<Keyring>,
    ttl: Duration,
    /// For a provider without an active key (any name a caller sends becomes one).
    negative_ttl: Duration,
}

impl Loader for RosterLoader {
    type Value = Arc<Roster>;
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
        Ok(Arc::new(Roster::new(candidates)))
    }

    /// An empty roster is what any unknown provider name loads.
    fn is_negative(&self, value: &Self::Value) -> bool {
        value.is_empty()
    }

    fn ttls(&self) -> (Duration, Duration) {
        (self.ttl, self.negative_ttl)
    }
}

pub type RosterCache = Cache<RosterLoader>;

pub fn new(db: Db, keyring: Arc<Keyring>, ttl: Duration, negative_ttl: Duration) -> RosterCache {
    Cache::new(RosterLoader {
        db,
        keyring,
        ttl,
        negative_ttl,
    })
}

/// [`new`] with a smaller bound, for tests.
pub fn with_capacity(
    db: Db,
    keyring: Arc<Keyring>,
    ttl: Duration,
    negative_ttl: Duration,
    capacity: usize,
) -> RosterCache {
    Cache::with_capacity(
        RosterLoader {
            db,
            keyring,
            ttl,
            negative_ttl,
        },
        capacity,
    )
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

    #[tokio::test]
    async fn unknown_providers_expire_and_cannot_grow_the_cache() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        let keyring = Arc::new(Keyring::new(&[7; 32], &[]));
        let cache = Arc::new(with_capacity(
            db.clone(),
            keyring.clone(),
            Duration::from_secs(3600),
            Duration::from_millis(200),
            100,
        ));
        // Any name a caller sends loads an empty roster; they never pile up.
        for i in 0..1_000 {
            assert!(cache.get(&format!("made-up-{i}")).await.unwrap().is_empty());
            assert!(cache.len() <= 100, "{} entries", cache.len());
        }
        // An empty roster is not served past its (negative) TTL, even when the key that
        // fills it came without an invalidation.
        assert!(cache.get("late").await.unwrap().is_empty());
        super::store::insert(
            &db,
            &uuid::Uuid::new_v4().to_string(),
            "late",
            "l",
            &keyring.encrypt("sk-late"),
            0,
            None,
            None,
            1,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(cache.get("late").await.unwrap().len(), 1);
    }

    #[test]
    fn the_version_follows_ids_limits_priorities_and_order_only() {
        let v = |keys: Vec<Candidate>| Roster::new(keys).version().to_string();
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
