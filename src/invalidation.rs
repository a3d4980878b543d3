//! The narrow interface a service is given to say "this record changed", so that no
//! replica admits or selects with a stale copy of it.
//!
//! The services that change records ([`crate::client_keys::ClientKeys`],
//! [`crate::provider_keys::ProviderKeys`], [`crate::prices::Prices`],
//! [`crate::users::Users`], the key rotation)
//! hold an [`Invalidator`] and know nothing about the caches or about Redis. The one
//! implementation that drops this replica's cache entries and tells the other replicas
//! is [`crate::bus::Bus`], built at start-up; keeping it out of this module keeps the
//! services below the caches and the counter store in the import graph.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// What an invalidation call returns: it may publish to Redis, so it is awaited.
pub type Done<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Told about every change a service makes. A failure to tell other replicas is the
/// implementation's to log: the caches' TTL is the last safety net, so the change
/// itself never fails because of it.
pub trait Invalidate: Send + Sync {
    /// A client key changed (by its lookup hash).
    fn key_changed<'a>(&'a self, hash: &'a str) -> Done<'a>;
    /// A provider's roster of keys changed (a key added, edited, deleted, rotated).
    fn roster_changed<'a>(&'a self, provider: &'a str) -> Done<'a>;
    /// A provider's prices changed.
    fn prices_changed<'a>(&'a self, provider: &'a str) -> Done<'a>;
    /// A user's limits changed (created, replaced, patched or deleted), by user id.
    fn user_changed<'a>(&'a self, user_id: &'a str) -> Done<'a>;
}

/// How services hold the interface; cheap to clone.
pub type Invalidator = Arc<dyn Invalidate>;
