//! What every request handler can reach: the HTTP layer owns the type of the state it
//! serves, and [`crate::app`] builds one at start-up from the services below.

use std::sync::Arc;

use crate::accounting::embedded::WriterHealth;
use crate::admission::Admission;
use crate::client_keys::cache::KeyCache;
use crate::client_keys::ClientKeys;
use crate::crypto::Keyring;
use crate::db::Db;
use crate::invalidation::Invalidator;
use crate::limits::Counters;
use crate::prices::Prices;
use crate::provider_keys::ProviderKeys;
use crate::reporting::Reports;
use crate::users::cache::UserCache;
use crate::users::Users;

/// One `Arc`: axum clones the state for every extractor and middleware of every request,
/// so a clone is one atomic increment rather than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    pub db: Db,
    pub keys: ClientKeys,
    /// This replica's client-key records (the one admission reads; for tests and views).
    pub key_cache: Arc<KeyCache>,
    /// The admin operations over users' limits.
    pub users: Users,
    /// Users' limits as admission reads them: `get(user_id)` →
    /// `Result<Option<Arc<quota::UserLimits>>, StoreError>`, no query on a hit,
    /// invalidated on every replica by each change.
    pub user_cache: Arc<UserCache>,
    /// The admin operations over provider keys.
    pub provider_keys: ProviderKeys,
    /// Model prices (admin API, `KEYWARD_PRICES_FILE`, and pricing of reported tokens).
    pub prices: Prices,
    pub admission: Arc<Admission>,
    /// Settles reports (`/v1/report`, `/v1/report/upstream`).
    pub reports: Reports,
    pub counters: Counters,
    pub keyring: Arc<Keyring>,
    /// Cache invalidation, here and on every other replica (for the key rotation).
    pub invalidator: Invalidator,
    /// SHA-256 of `KEYWARD_ADMIN_TOKEN`; `None` disables the admin API.
    pub admin_token_digest: Option<[u8; 32]>,
    /// SHA-256 of `KEYWARD_DATA_TOKEN`; `None` refuses the calls that need it.
    pub data_token_digest: Option<[u8; 32]>,
    /// The expiry pass deletes (rather than disables) keys without a flag of their own.
    pub expiry_auto_delete: bool,
    /// Whether the in-process accounting writer can write (reports are refused if not).
    pub accounting: WriterHealth,
}
