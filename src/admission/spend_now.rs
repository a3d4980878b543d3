//! The spend entries a report is counted under now: what `lua/report.lua` (and the
//! twin) add a late report's cost to when its lease's data is gone (the store lost it: a
//! lease purged after its expiry keeps its data in `lx` until its guard lapses, and
//! settles with that), so a report accepted late still reaches the spend counters that
//! admission checks (found by an attacker review).
//!
//! A report names its key by id; the key cache is by lookup hash. Each key this process
//! checked at admission leaves its id → hash here, so the record comes from the same
//! caches as admission's (no database query on a hit); a key this process never checked
//! costs one query for its hash, once. When a record cannot be loaded the report goes on
//! without entries (its cost then reaches the counters through the seeds, at the next
//! load of the record: see `quota::Settled`). The same record tells whether a lease's key
//! may still renew it (`may_renew`).

use dashmap::DashMap;

use super::{quotas, Admission};
use crate::client_keys::ClientKey;
use crate::limits::{Counters, LeaseId, QuotaEntry, Tenant};

/// Beyond this many remembered keys the map starts over (it refills as keys admit).
const MAX_REMEMBERED: usize = 100_000;

pub(super) fn remember(hashes: &DashMap<String, String>, key_id: &str, hash: String) {
    if hashes.get(key_id).is_some_and(|h| *h == hash) {
        return;
    }
    if hashes.len() >= MAX_REMEMBERED {
        hashes.clear();
    }
    hashes.insert(key_id.to_string(), hash);
}

impl Admission {
    /// The spend entries a request of `key_id` for `model` counts under now
    /// ([`quotas::spend_now`], from the key's record and its user's limits in the
    /// caches). Empty for a key that is gone, or when a record cannot be loaded (a
    /// report must settle while the database is away: its cost then reaches the
    /// counters through the seeds).
    pub async fn spend_now(&self, key_id: &str, model: Option<&str>) -> Vec<QuotaEntry> {
        let key = match self.key_by_id(key_id).await {
            Ok(Some(key)) => key,
            Ok(None) => return Vec::new(),
            Err(e) => return unloaded(&*e),
        };
        let user = match self.user_limits(&key).await {
            Ok(user) => user,
            Err(e) => return unloaded(&e),
        };
        quotas::spend_now(&key, user.as_deref(), model)
    }
}

impl Admission {
    /// A key's record by id, from the caches (see the module's doc).
    async fn key_by_id(
        &self,
        key_id: &str,
    ) -> Result<Option<std::sync::Arc<ClientKey>>, Box<dyn std::error::Error + Send + Sync>> {
        let hash = match self.hashes.get(key_id).map(|h| h.clone()) {
            Some(hash) => hash,
            // A key this replica never checked: its hash from the database, once.
            None => match self.cache.loader().hash_of(key_id).await? {
                Some(hash) => {
                    remember(&self.hashes, key_id, hash.clone());
                    hash
                }
                None => return Ok(None),
            },
        };
        Ok(self.cache.get(&hash).await?.filter(|key| key.id == key_id))
    }

    /// Whether a lease of `key_id` may be renewed: not when its key was disabled, has
    /// expired or is gone (someone whose key was revoked must not keep leases alive to
    /// report on later). When the record cannot be loaded (the database is away) the
    /// renewal goes on: a lease must not lapse for that.
    pub async fn may_renew(&self, key_id: &str) -> bool {
        match self.key_by_id(key_id).await {
            Ok(Some(key)) => key.is_active && !key.is_expired_at(crate::clock::now_ms()),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// `lease` on its tenant shard: the one it carries, else (a lease of the release
    /// before) its key's current tenant's (the key's own when it cannot be loaded).
    pub async fn on_its_shard(&self, lease: LeaseId) -> LeaseId {
        if lease.shard.is_some() || matches!(self.counters, Counters::Memory(_)) {
            return lease;
        }
        let shard = match self.key_by_id(&lease.key_id).await {
            Ok(Some(key)) => self
                .counters
                .shard_of(Tenant::of(&key.id, key.user_id.as_deref())),
            _ => None,
        };
        lease.on_shard(shard)
    }
}

/// No entries when a record cannot be loaded, logged at most once a second.
fn unloaded(error: &dyn std::error::Error) -> Vec<QuotaEntry> {
    static LOG: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
    if LOG.ready().is_some() {
        tracing::warn!(error = %error, "cannot load a key's record for a report's spend counters; its cost reaches them through the database");
    }
    Vec::new()
}
