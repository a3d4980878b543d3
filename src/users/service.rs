//! The user operations behind the admin API. Each change is told to the invalidation
//! interface after it is stored, so every replica's user cache drops its copy.

use super::input::{PatchUserRequest, UserLimitsInput};
use super::{store, User};
use crate::clock::now_ms;
use crate::db::{Db, StoreError};
use crate::invalidation::Invalidator;
use crate::quota::ScopeKind;
use crate::quota_usage::{self, ScopeView};

/// How often a patch retries when another change to the same user came in between its
/// read and its write.
const PATCH_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no user `{0}` has limits")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("user `{0}` changed concurrently too often; retry")]
    Contended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// User operations over the durable store.
#[derive(Clone)]
pub struct Users {
    db: Db,
    invalidator: Invalidator,
}

impl Users {
    pub fn new(db: Db, invalidator: Invalidator) -> Self {
        Self { db, invalidator }
    }

    pub async fn get(&self, user_id: &str) -> Result<User, UserError> {
        store::get(&self.db, user_id)
            .await?
            .ok_or_else(|| UserError::NotFound(user_id.to_string()))
    }

    pub async fn list(&self, after: Option<&str>, limit: i64) -> Result<Vec<User>, UserError> {
        Ok(store::list(&self.db, after, limit).await?)
    }

    /// Creates or replaces; `true` when it created.
    pub async fn put(
        &self,
        user_id: &str,
        input: UserLimitsInput,
    ) -> Result<(User, bool), UserError> {
        let now = now_ms();
        // Insert, else replace; a delete in between means the insert can be tried again.
        for _ in 0..PATCH_ATTEMPTS {
            if let Some(user) =
                store::insert(&self.db, user_id, &input.limits, &input.model_limits, now).await?
            {
                self.changed(user_id, "user limits created").await;
                return Ok((user, true));
            }
            if let Some(user) = store::replace_if(
                &self.db,
                user_id,
                None,
                &input.limits,
                &input.model_limits,
                now,
            )
            .await?
            {
                self.changed(user_id, "user limits replaced").await;
                return Ok((user, false));
            }
        }
        Err(UserError::Contended(user_id.to_string()))
    }

    /// Applies a merge patch to the stored limits (validated as a whole).
    pub async fn patch(&self, user_id: &str, patch: &PatchUserRequest) -> Result<User, UserError> {
        for _ in 0..PATCH_ATTEMPTS {
            let stored = self.get(user_id).await?;
            let merged = patch
                .apply(&UserLimitsInput {
                    limits: stored.limits.clone(),
                    model_limits: stored.model_limits.clone(),
                })
                .map_err(UserError::Invalid)?;
            if let Some(user) = store::replace_if(
                &self.db,
                user_id,
                Some(stored.updated_at),
                &merged.limits,
                &merged.model_limits,
                now_ms(),
            )
            .await?
            {
                self.changed(user_id, "user limits patched").await;
                return Ok(user);
            }
        }
        Err(UserError::Contended(user_id.to_string()))
    }

    /// Removes the user's limits; its keys keep working with their own.
    pub async fn delete(&self, user_id: &str) -> Result<(), UserError> {
        if !store::delete(&self.db, user_id).await? {
            return Err(UserError::NotFound(user_id.to_string()));
        }
        self.changed(user_id, "user limits deleted").await;
        Ok(())
    }

    /// The user's quota view: each scope's limits with the database's figures.
    pub async fn quota(&self, user_id: &str) -> Result<(User, Vec<ScopeView>), UserError> {
        let user = self.get(user_id).await?;
        let view = quota_usage::view(
            &self.db,
            ScopeKind::User,
            &user.user_id,
            &user.limits,
            &user.model_limits,
            now_ms(),
        )
        .await?;
        Ok((user, view))
    }

    async fn changed(&self, user_id: &str, what: &'static str) {
        self.invalidator.user_changed(user_id).await;
        // The id is a name the operator chose, not a secret.
        tracing::info!(user_id = %user_id, "{what}");
    }
}
