//! An in-process cache of database records for the hot path.
//!
//! - An entry is served until its TTL ([`Loader::ttls`]), then still served while one
//!   background task reloads it, so the hot path waits on the database only for a key it
//!   has never seen. A negative entry ([`Loader::is_negative`]: "nothing there") is not
//!   served past its TTL and is dropped first when the cache is full.
//! - [`Cache::invalidate`] drops an entry at once (admin changes, here or, through
//!   [`crate::invalidation`], on another replica).
//!
//! Invariant: a load that started before an invalidation never stores its (possibly
//! stale) result. Every invalidation bumps an epoch that loads compare before storing.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::db::StoreError;

/// Beyond this many entries, negative ones ([`Loader::is_negative`]) are dropped at once.
const MAX_ENTRIES: usize = 500_000;

/// How a cache fills itself.
pub trait Loader: Send + Sync + 'static {
    type Value: Clone + Send + Sync + 'static;
    /// The `cache` label of its metrics.
    const NAME: &'static str;
    fn load(&self, key: &str) -> impl Future<Output = Result<Self::Value, StoreError>> + Send;
    /// Whether a value says "nothing there" (an unknown key, a provider without keys or
    /// prices). Callers choose how many such names they ask for, so a negative value
    /// lives for the negative TTL, is dropped first when the cache is full, and is never
    /// served past its TTL (what was created since must be found at once). Any other
    /// value is served past its TTL while one task reloads it.
    fn is_negative(&self, value: &Self::Value) -> bool;
    /// How long a freshly loaded value is served before it is reloaded: (positive,
    /// negative).
    fn ttls(&self) -> (Duration, Duration);
}

struct Entry<V> {
    value: V,
    expires: Instant,
    refreshing: Arc<AtomicBool>,
}

pub struct Cache<L: Loader> {
    loader: L,
    entries: DashMap<String, Entry<L::Value>>,
    epoch: AtomicU64,
    /// Beyond this many entries, negative ones are dropped at once.
    capacity: usize,
}

impl<L: Loader> Cache<L> {
    pub fn new(loader: L) -> Self {
        Self::with_capacity(loader, MAX_ENTRIES)
    }

    /// A cache that drops its negative entries whenever it holds `capacity` entries.
    pub fn with_capacity(loader: L, capacity: usize) -> Self {
        Self {
            loader,
            entries: DashMap::new(),
            epoch: AtomicU64::new(0),
            capacity,
        }
    }

    /// What loads the values (for a loader's own look-ups beside the cache).
    pub fn loader(&self) -> &L {
        &self.loader
    }

    /// How many entries are held (stale and negative ones included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub async fn get(self: &Arc<Self>, key: &str) -> Result<L::Value, StoreError> {
        let lookup = |result| crate::metrics::cache_lookup(L::NAME, result);
        if let Some(entry) = self.entries.get(key) {
            if Instant::now() < entry.expires {
                lookup("hit");
                return Ok(entry.value.clone());
            }
            if self.loader.is_negative(&entry.value) {
                drop(entry);
                lookup("miss");
                return self.load(key).await;
            }
            lookup("stale");
            // Stale: serve it, and let one background task reload it.
            if !entry.refreshing.swap(true, Ordering::AcqRel) {
                let (cache, key, flag) = (self.clone(), key.to_string(), entry.refreshing.clone());
                tokio::spawn(async move {
                    if let Err(e) = cache.load(&key).await {
                        tracing::warn!(error = %e, "cache: background reload failed; serving the old entry");
                        flag.store(false, Ordering::Release);
                    }
                });
            }
            return Ok(entry.value.clone());
        }
        lookup("miss");
        self.load(key).await
    }

    async fn load(&self, key: &str) -> Result<L::Value, StoreError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let value = self.loader.load(key).await?;
        if self.epoch.load(Ordering::Acquire) == epoch {
            if self.entries.len() >= self.capacity {
                self.entries
                    .retain(|_, e| !self.loader.is_negative(&e.value));
            }
            self.entries.insert(
                key.to_string(),
                Entry {
                    expires: Instant::now() + {
                        let (positive, negative) = self.loader.ttls();
                        if self.loader.is_negative(&value) {
                            negative
                        } else {
                            positive
                        }
                    },
                    value: value.clone(),
                    refreshing: Arc::default(),
                },
            );
        }
        Ok(value)
    }

    /// Loads `key` now, and holds the result (unless an invalidation raced the load).
    pub async fn reload(&self, key: &str) -> Result<L::Value, StoreError> {
        self.load(key).await
    }

    /// The first `Some` that `f` gives for a value held now (stale ones included); loads
    /// nothing.
    pub fn find_held<R>(&self, mut f: impl FnMut(&L::Value) -> Option<R>) -> Option<R> {
        self.entries.iter().find_map(|entry| f(&entry.value))
    }

    pub fn invalidate(&self, key: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(key);
    }

    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
    }
}
