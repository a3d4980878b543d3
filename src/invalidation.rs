//! Telling every replica that a record changed, so none admits or selects with a stale one.
//!
//! An admin change calls [`Bus::key_changed`] or [`Bus::pool_changed`]: the entry is
//! dropped from this replica's cache at once and, in the distributed shape, published on
//! `<prefix>:invalidate` as `k:<lookup hash>` or `p:<provider>`. Every replica's
//! [`subscribe`] task applies those messages. When the subscription breaks, messages may
//! have been missed, so both caches are cleared on reconnect; the caches' TTL is the
//! last safety net.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

use crate::client_keys::cache::KeyCache;
use crate::limits::redis::RedisCounters;
use crate::pool::cache::PoolCache;

pub struct Bus {
    pub keys: Arc<KeyCache>,
    pub pools: Arc<PoolCache>,
    publisher: Option<(Arc<RedisCounters>, String)>,
}

impl Bus {
    pub fn new(keys: Arc<KeyCache>, pools: Arc<PoolCache>) -> Self {
        Self {
            keys,
            pools,
            publisher: None,
        }
    }

    /// Publishes to the other replicas through Redis.
    pub fn with_publisher(mut self, redis: Arc<RedisCounters>, channel: String) -> Self {
        self.publisher = Some((redis, channel));
        self
    }

    pub async fn key_changed(&self, hash: &str) {
        self.keys.invalidate(hash);
        self.publish(format!("k:{hash}")).await;
    }

    pub async fn pool_changed(&self, provider: &str) {
        self.pools.invalidate(provider);
        self.publish(format!("p:{provider}")).await;
    }

    fn apply(&self, message: &str) {
        match message.split_once(':') {
            Some(("k", hash)) => self.keys.invalidate(hash),
            Some(("p", provider)) => self.pools.invalidate(provider),
            _ => self.clear(),
        }
    }

    fn clear(&self) {
        self.keys.clear();
        self.pools.clear();
    }

    async fn publish(&self, message: String) {
        let Some((redis, channel)) = &self.publisher else {
            return;
        };
        let published: Result<(), String> = async {
            let mut conn = redis.conn().await.map_err(|e| e.to_string())?;
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(&message)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = published {
            // The other replicas still reload when their cache TTL runs out.
            tracing::warn!(error = %e, "could not publish a cache invalidation");
        }
    }
}

/// Applies other replicas' invalidations until `stop` is set.
pub async fn subscribe(
    client: redis::Client,
    channel: String,
    bus: Arc<Bus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    while !*stop.borrow() {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let subscribed = tokio::select! {
            s = subscribed => s,
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut messages = match subscribed {
            Ok(pubsub) => pubsub.into_on_message(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to cache invalidations; retrying");
                let wait = Duration::from_millis(200 * 2u64.pow(attempt.min(5)));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                attempt += 1;
                continue;
            }
        };
        // Anything may have changed while nobody was listening.
        bus.clear();
        attempt = 0;
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(m) => match m.get_payload::<String>() {
                        Ok(text) => bus.apply(&text),
                        Err(_) => bus.clear(),
                    },
                    None => {
                        tracing::warn!("cache invalidation subscription lost; resubscribing");
                        break;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
