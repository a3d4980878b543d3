//! Users: the limits shared by every client key with one `user_id` (a key's owner), and
//! within them per model. A user record is optional: a key whose `user_id` has none is
//! limited by its own limits only, and deleting a user removes the shared limits while
//! its keys keep working.
//!
//! - [`input`]: the admin API's bodies (`PUT`, `PATCH`) and their validation.
//! - [`store`]: the SQL of the `users` table, one text for both backends.
//! - [`service`]: the operations the admin API offers; every change is told to the
//!   [`crate::invalidation::Invalidate`] interface, so every replica drops its copy.
//! - [`cache`]: the records as admission reads them ([`crate::quota::UserLimits`],
//!   with the current periods' settled spend), by user id, negative entries included.
//!
//! Invariants:
//! - A user id is a name by [`crate::names`]' rule (trimmed, 1 to 200 printable
//!   characters), checked before anything is read or written.
//! - A stored limit set passed [`crate::quota::LimitSet::validate`] and its model
//!   entries [`crate::quota::validate_models`]; a change that does not is refused whole.

pub mod cache;
pub mod input;
pub mod service;
pub mod store;

use serde::Serialize;

use crate::clock::to_rfc3339;
use crate::quota::{LimitSet, ModelLimits, SpendLimits};

pub use service::{UserError, Users};

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub user_id: String,
    pub limits: LimitSet,
    pub model_limits: ModelLimits,
    pub created_at: i64,
    pub updated_at: i64,
}

impl User {
    pub fn view(&self) -> UserView<'_> {
        UserView {
            user_id: &self.user_id,
            rate_limit: self.limits.rate_limit,
            tpm_limit: self.limits.tpm_limit,
            daily_request_limit: self.limits.daily_request_limit,
            daily_token_limit: self.limits.daily_token_limit,
            spend_limits: (!self.limits.spend_limits.is_empty())
                .then_some(&self.limits.spend_limits),
            model_limits: (!self.model_limits.is_empty()).then_some(&self.model_limits),
            created_at: to_rfc3339(self.created_at),
            updated_at: to_rfc3339(self.updated_at),
        }
    }
}

/// The `User` object of the admin API.
#[derive(Debug, Serialize)]
pub struct UserView<'a> {
    pub user_id: &'a str,
    pub rate_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
    pub daily_request_limit: Option<i64>,
    pub daily_token_limit: Option<i64>,
    /// `null` when none (spend in USD).
    pub spend_limits: Option<&'a SpendLimits>,
    /// `null` when none.
    pub model_limits: Option<&'a ModelLimits>,
    pub created_at: String,
    pub updated_at: String,
}

/// Checks a user id (from a path or a key's body): trimmed, 1 to 200 printable
/// characters. The message names the field, never the value.
pub fn user_id(value: &str) -> Result<&str, String> {
    match crate::names::printable(value) {
        Some(id) if !id.is_empty() => Ok(id),
        _ => Err(format!(
            "user_id must be 1 to {} printable characters (no control or invisible formatting characters)",
            crate::names::MAX_NAME_CHARS
        )),
    }
}
