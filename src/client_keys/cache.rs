//! Client key records cached in process, by lookup hash, so an admission does not query
//! the database. A known key is served for `KEYWARD_KEY_CACHE_TTL_S` (then reloaded in
//! the background); an unknown key is remembered as unknown for
//! `KEYWARD_NEGATIVE_CACHE_TTL_S`, so a flood of the same bad key does not reach the
//! database.
//!
//! A load also fills the key's `settled` figures (the current periods of its day count and
//! spend limits, through `quota_usage::settled`: its own from `quota_usage`, its model
//! entries' from `usage_records`, queried only when it has such a limit), so
//! admission can raise a day or spend counter to what the database had settled without a
//! database query per admission.

use std::sync::Arc;
use std::time::Duration;

use super::{store, ClientKey};
use crate::cache::{Cache, Loader};
use crate::clock::now_ms;
use crate::db::{Db, StoreError};
use crate::quota::ScopeKind;

pub struct KeyLoader {
    db: Db,
    ttl: Duration,
    negative_ttl: Duration,
}

impl KeyLoader {
    /// The lookup hash of the key with this id (one query), `None` for no such key: how a
    /// report, which names its key by id, finds the key's cache entry on a replica that
    /// never admitted it.
    pub async fn hash_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(store::get(&self.db, id).await?.map(|k| k.key_hash))
    }
}

impl Loader for KeyLoader {
    type Value = Option<Arc<ClientKey>>;
    const NAME: &'static str = "client_keys";

    async fn load(&self, hash: &str) -> Result<Self::Value, StoreError> {
        let Some(mut key) = store::get_by_hash(&self.db, hash).await? else {
            return Ok(None);
        };
        key.settled = crate::quota_usage::settled(
            &self.db,
            ScopeKind::Key,
            &key.id,
            &key.own_quotas(),
            &key.model_limits,
            now_ms(),
        )
        .await?;
        Ok(Some(Arc::new(key)))
    }

    /// An unknown key: a key created since must work at once.
    fn is_negative(&self, value: &Self::Value) -> bool {
        value.is_none()
    }

    fn ttls(&self) -> (Duration, Duration) {
        (self.ttl, self.negative_ttl)
    }
}

pub type KeyCache = Cache<KeyLoader>;

pub fn new(db: Db, ttl: Duration, negative_ttl: Duration) -> KeyCache {
    Cache::new(KeyLoader {
        db,
        ttl,
        negative_ttl,
    })
}
