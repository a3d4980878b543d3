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
//! caches' TTL is the last safety net. A replica starts serving once it listens (or after
//! [`LISTEN_WAIT`]), so that clear does not empty caches it has already filled.
//!
//! A replica hears its own messages too. It has dropped the entry already, so the first
//! arrival of each message it published is skipped ([`Bus::heard`]): otherwise the echo
//! would drop the entry a request reloaded in the meantime, and the next request would
//! load it again (or fail, with the database down). Skipping the first arrival is safe
//! whichever replica's copy it is: every later arrival of the same message is applied,
//! and this replica's own copy is among them or before them. An echo is awaited
//! [`ECHO_WAIT`] at most: one lost (a cluster's PUBLISH is best effort) must not make
//! the replica skip another replica's message much later, a key's revocation say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
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
    /// Messages published here whose echo has not been heard yet: their count, and when
    /// the last of them was published.
    echoes: DashMap<String, (u32, Instant)>,
}

/// How long an echo is awaited: one heard later is applied like any message (a drop too
/// many, which is harmless), and one that never comes stops being awaited.
pub const ECHO_WAIT: Duration = Duration::from_secs(2);

/// How long start-up waits for the invalidation subscription before serving anyway.
pub const LISTEN_WAIT: Duration = Duration::from_secs(2);

impl Bus {
    pub fn new(keys: Arc<KeyCache>, rosters: Arc<RosterCache>) -> Self {
        Self {
            keys,
            rosters,
            prices: None,
            users: None,
            publisher: None,
            echoes: DashMap::new(),
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

    /// A message heard on the channel: applied, unless it is the first arrival of one
    /// this replica published (see the module's doc).
    fn heard(&self, message: &str) {
        if let Some(mut echo) = self.echoes.get_mut(message) {
            let (n, published) = &mut *echo;
            if published.elapsed() < ECHO_WAIT {
                *n -= 1;
                if *n == 0 {
                    drop(echo);
                    self.echoes.remove_if(message, |_, (n, _)| *n == 0);
                }
                return;
            }
            drop(echo);
            self.echoes.remove(message);
        }
        self.apply(message);
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
        // Echoes that were in flight may be lost with the subscription.
        self.echoes.clear();
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
        // Counted before the PUBLISH: its echo may be heard before its reply.
        {
            let mut echo = self
                .echoes
                .entry(message.clone())
                .or_insert((0, Instant::now()));
            echo.0 += 1;
            echo.1 = Instant::now();
        }
        let published: Result<(), String> = async {
            let message = &message;
            redis
                .on_lane(|mut conn| async move {
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(message)
                        .query_async::<i64>(&mut conn)
                        .await?;
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = published {
            // No echo will come: an arrival of another replica's must not be skipped.
            if let Some(mut echo) = self.echoes.get_mut(&message) {
                echo.0 = echo.0.saturating_sub(1);
            }
            self.echoes.remove_if(&message, |_, (n, _)| *n == 0);
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

/// Applies other replicas' invalidations until `stop` is set; `listening` is told when
/// the first subscription is up.
pub async fn subscribe(
    client: redis::Client,
    channel: String,
    bus: Arc<Bus>,
    mut stop: watch::Receiver<bool>,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut listening = Some(listening);
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
        if let Some(listening) = listening.take() {
            let _ = listening.send(());
        }
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(m) => match m.get_payload::<String>() {
                        Ok(text) => bus.heard(&text),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;
    use crate::db::Db;

    /// The first arrival of a message this replica published is its echo: skipped, so
    /// an entry reloaded after the change stays; the next arrival is applied.
    #[tokio::test]
    async fn the_echo_of_an_own_message_is_skipped_once() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        let keyring = Arc::new(Keyring::new(&[7; 32], &[]));
        let keys = Arc::new(crate::client_keys::cache::new(
            db.clone(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        let rosters = Arc::new(crate::pool::cache::new(
            db,
            keyring,
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        let bus = Bus::new(keys, rosters.clone());
        rosters.get("openai").await.unwrap();
        bus.echoes.insert("p:openai".into(), (1, Instant::now()));
        bus.heard("p:openai");
        assert_eq!(rosters.len(), 1, "the echo dropped the reloaded pool");
        assert!(bus.echoes.is_empty());
        bus.heard("p:openai");
        assert_eq!(rosters.len(), 0, "another replica's message is applied");

        // An echo awaited longer than ECHO_WAIT (lost) skips nothing.
        rosters.get("openai").await.unwrap();
        let long_ago = Instant::now().checked_sub(ECHO_WAIT * 2).unwrap();
        bus.echoes.insert("p:openai".into(), (1, long_ago));
        bus.heard("p:openai");
        assert_eq!(rosters.len(), 0, "a lost echo swallowed a message");
        assert!(bus.echoes.is_empty());
    }
}
