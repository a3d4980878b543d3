//! Telling every replica that a record changed, so none admits or selects with a stale one.
//!
//! [`Bus`] is the implementation of [`crate::invalidation::Invalidate`] that the services
//! are given at start-up. An admin change calls `key_changed`, `roster_changed`,
//! `prices_changed` or `user_changed`: the entry is dropped from this replica's cache at
//! once and, in the distributed shape, published on `<prefix>:invalidate` as
//! `k:<lookup hash>`, `p:<provider>`, `r:<provider>` (a provider's prices) or
//! `u:<user id>` (a user's limits; the id is everything after the first `:`). Every
//! replica's [`subscribe`] task applies those messages; a message it does not know (from
//! a newer release) clears every cache, which is always safe. When the subscription
//! breaks, messages may have been missed, so every cache is cleared on reconnect; the
//! caches' TTL is the last safety net.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

use crate::client_keys::cache::KeyCache;
use crate::invalidation::{Done, Invalidate};
use crate::limits::redis::RedisCounters;
use crate::pool::cache::RosterCache;
use crate::prices::PriceCache;
use crate::users::cache::UserCache;

pub struct Bus {
    pub keys: Arc<KeyCache>,
    pub rosters: Arc<RosterCache>,
    /// Prices by provider (`None` only where no price is ever looked up).
    pub prices: Option<Arc<PriceCache>>,
    /// Users' limits by user id (`None` only where no user is ever looked up).
    pub users: Option<Arc<UserCache>>,
    publisher: Option<(Arc<RedisCounters>, String)>,
}

impl Bus {
    pub fn new(keys: Arc<KeyCache>, rosters: Arc<RosterCache>) -> Self {
        Self {
            keys,
            rosters,
            prices: None,
            users: None,
            publisher: None,
        }
    }

    /// Also invalidates this price cache.
    pub fn with_prices(mut self, prices: Arc<PriceCache>) -> Self {
        self.prices = Some(prices);
        self
    }

    /// Also invalidates this user cache.
    pub fn with_users(mut self, users: Arc<UserCache>) -> Self {
        self.users = Some(users);
        self
    }

    /// Publishes to the other replicas through Redis.
    pub fn with_publisher(mut self, redis: Arc<RedisCounters>, channel: String) -> Self {
        self.publisher = Some((redis, channel));
        self
    }

    fn apply(&self, message: &str) {
        match message.split_once(':') {
            Some(("k", hash)) => self.keys.invalidate(hash),
            Some(("p", provider)) => self.rosters.invalidate(provider),
            Some(("r", provider)) => {
                if let Some(prices) = &self.prices {
                    prices.invalidate(provider);
                }
            }
            Some(("u", user_id)) => {
                if let Some(users) = &self.users {
                    users.invalidate(user_id);
                }
            }
            _ => self.clear(),
        }
    }

    fn clear(&self) {
        self.keys.clear();
        self.rosters.clear();
        if let Some(prices) = &self.prices {
            prices.clear();
        }
        if let Some(users) = &self.users {
            users.clear();
        }
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

impl Invalidate for Bus {
    fn key_changed<'a>(&'a self, hash: &'a str) -> Done<'a> {
        Box::pin(async move {
            self.keys.invalidate(hash);
            self.publish(format!("k:{hash}")).await;
        })
    }

    fn roster_changed<'a>(&'a self, provider: &'a str) -> Done<'a> {
        Box::pin(async move {
            self.rosters.invalidate(provider);
            self.publish(format!("p:{provider}")).await;
        })
    }

    fn prices_changed<'a>(&'a self, provider: &'a str) -> Done<'a> {
        Box::pin(async move {
            if let Some(prices) = &self.prices {
                prices.invalidate(provider);
            }
            self.publish(format!("r:{provider}")).await;
        })
    }

    fn user_changed<'a>(&'a self, user_id: &'a str) -> Done<'a> {
        Box::pin(async move {
            if let Some(users) = &self.users {
                users.invalidate(user_id);
            }
            self.publish(format!("u:{user_id}")).await;
        })
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
