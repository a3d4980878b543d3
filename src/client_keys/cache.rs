//! Key records cached in process, so an admission does not query the database.
//!
//! - Entries are keyed by the secret's lookup hash. A known key stays for
//!   `KEYWARD_KEY_CACHE_TTL_S`; after that it is still served while one background task
//!   reloads it (so the hot path never waits on the database for a key it has seen).
//! - An unknown key is remembered for `KEYWARD_NEGATIVE_CACHE_TTL_S`, so a flood of the
//!   same bad key does not reach the database.
//! - Every admin change calls [`KeyCache::changed`]: the entry is dropped here and, in the
//!   distributed shape, the key's hash is published on `<prefix>:invalidate`; every
//!   replica's [`subscribe`] task drops it too. If the subscription breaks, the whole
//!   cache is cleared on reconnect (messages may have been missed); the TTL is the last
//!   safety net.
//!
//! Invariant: a load that started before an invalidation never stores its (possibly
//! stale) result: loads compare an epoch that every invalidation bumps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::{store, ClientKey};
use crate::db::{Db, StoreError};

/// Beyond this many remembered unknown keys, they are forgotten all at once.
const MAX_NEGATIVE: usize = 100_000;

struct Entry {
    key: Option<Arc<ClientKey>>,
    loaded: Instant,
    refreshing: Arc<AtomicBool>,
}

pub struct KeyCache {
    db: Db,
    entries: DashMap<String, Entry>,
    negative: std::sync::atomic::AtomicUsize,
    epoch: AtomicU64,
    ttl: Duration,
    negative_ttl: Duration,
    publisher: Option<(deadpool_redis::Pool, String)>,
}

impl KeyCache {
    pub fn new(db: Db, ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            db,
            entries: DashMap::new(),
            negative: Default::default(),
            epoch: AtomicU64::new(0),
            ttl,
            negative_ttl,
            publisher: None,
        }
    }

    /// Publishes invalidations to the other replicas through Redis.
    pub fn with_publisher(mut self, pool: deadpool_redis::Pool, channel: String) -> Self {
        self.publisher = Some((pool, channel));
        self
    }

    /// The key whose secret hashes to `hash`, or `None` when there is none.
    pub async fn get(self: &Arc<Self>, hash: &str) -> Result<Option<Arc<ClientKey>>, StoreError> {
        if let Some(entry) = self.entries.get(hash) {
            let age = entry.loaded.elapsed();
            match &entry.key {
                Some(key) if age < self.ttl => return Ok(Some(key.clone())),
                Some(key) => {
                    if !entry.refreshing.swap(true, Ordering::AcqRel) {
                        let cache = self.clone();
                        let hash = hash.to_string();
                        tokio::spawn(async move {
                            if let Err(e) = cache.load(&hash).await {
                                tracing::warn!(error = %e, "key cache: background reload failed");
                                if let Some(entry) = cache.entries.get(&hash) {
                                    entry.refreshing.store(false, Ordering::Release);
                                }
                            }
                        });
                    }
                    return Ok(Some(key.clone()));
                }
                None if age < self.negative_ttl => return Ok(None),
                None => {}
            }
        }
        self.load(hash).await
    }

    async fn load(&self, hash: &str) -> Result<Option<Arc<ClientKey>>, StoreError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let key = store::get_by_hash(&self.db, hash).await?.map(Arc::new);
        if self.epoch.load(Ordering::Acquire) == epoch {
            if key.is_none() && self.negative.fetch_add(1, Ordering::Relaxed) >= MAX_NEGATIVE {
                self.entries.retain(|_, e| e.key.is_some());
                self.negative.store(0, Ordering::Relaxed);
            }
            self.entries.insert(
                hash.to_string(),
                Entry {
                    key: key.clone(),
                    loaded: Instant::now(),
                    refreshing: Arc::default(),
                },
            );
        }
        Ok(key)
    }

    /// Drops one key here (not on other replicas).
    pub fn invalidate(&self, hash: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(hash);
    }

    /// Drops everything here.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
        self.negative.store(0, Ordering::Relaxed);
    }

    /// A key changed: drop it here and on every other replica.
    pub async fn changed(&self, hash: &str) {
        self.invalidate(hash);
        let Some((pool, channel)) = &self.publisher else {
            return;
        };
        let published: Result<(), String> = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(hash)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = published {
            // Other replicas still drop it when their TTL runs out.
            tracing::warn!(error = %e, "key cache: could not publish an invalidation");
        }
    }
}

/// Listens for invalidations from other replicas until `stop` is set.
pub async fn subscribe(
    client: redis::Client,
    channel: String,
    cache: Arc<KeyCache>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    while !*stop.borrow() {
        let pubsub = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let pubsub = tokio::select! {
            p = pubsub => p,
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut messages = match pubsub {
            Ok(p) => p.into_on_message(),
            Err(e) => {
                tracing::warn!(error = %e, "key cache: cannot subscribe to invalidations; retrying");
                let wait = Duration::from_millis(200 * 2u64.pow(attempt.min(5)));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                attempt += 1;
                continue;
            }
        };
        // Anything may have changed while we were not listening.
        cache.clear();
        attempt = 0;
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(m) => match m.get_payload::<String>() {
                        Ok(hash) => cache.invalidate(&hash),
                        Err(_) => cache.clear(),
                    },
                    None => {
                        tracing::warn!("key cache: invalidation subscription lost; resubscribing");
                        break;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
