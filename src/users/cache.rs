//! Users' limits cached in process, by user id, as admission reads them: a
//! [`UserLimits`] with the settled figures of its current periods (`quota_usage::settled`
//! at load, only when it has a day count or spend limit). A user without a record
//! is remembered as such for `KEYWARD_NEGATIVE_CACHE_TTL_S`, so the keys of users
//! without limits (most) cost no query per admission; one with a record is served for
//! `KEYWARD_KEY_CACHE_TTL_S` and reloaded in the background. Every change drops the
//! entry on every replica (`bus`, message `u:<user id>`).

use std::sync::Arc;
use std::time::Duration;

use super::store;
use crate::cache::{Cache, Loader};
use crate::clock::now_ms;
use crate::db::{Db, StoreError};
use crate::quota::{ScopeKind, UserLimits};

pub struct UserLoader {
    db: Db,
    ttl: Duration,
    negative_ttl: Duration,
}

impl Loader for UserLoader {
    type Value = Option<Arc<UserLimits>>;
    const NAME: &'static str = "users";

    async fn load(&self, user_id: &str) -> Result<Self::Value, StoreError> {
        let Some(user) = store::get(&self.db, user_id).await? else {
            return Ok(None);
        };
        let settled = crate::quota_usage::settled(
            &self.db,
            ScopeKind::User,
            &user.user_id,
            &user.limits,
            &user.model_limits,
            now_ms(),
        )
        .await?;
        Ok(Some(Arc::new(UserLimits {
            user_id: user.user_id,
            limits: user.limits,
            model_limits: user.model_limits,
            settled,
        })))
    }

    /// A user without limits: limits set since must apply at once.
    fn is_negative(&self, value: &Self::Value) -> bool {
        value.is_none()
    }

    fn ttls(&self) -> (Duration, Duration) {
        (self.ttl, self.negative_ttl)
    }
}

/// `get(user_id) -> Result<Option<Arc<UserLimits>>, StoreError>`: no query on a hit.
pub type UserCache = Cache<UserLoader>;

pub fn new(db: Db, ttl: Duration, negative_ttl: Duration) -> UserCache {
    Cache::new(UserLoader {
        db,
        ttl,
        negative_ttl,
    })
}
