//! The twin's housekeeping and listings, beside its decisions in `mod.rs`: the live
//! state of provider keys (as `lua/pool_state.lua`), their reset, and the periodic
//! sweep that drops what Redis would have expired.

use super::MemoryCounters;
use crate::pool::LiveState;

impl MemoryCounters {
    pub fn pool_state(&self, provider: &str, ids: &[String]) -> Vec<LiveState> {
        let now = self.now();
        let b = now.div_euclid(1000);
        // A lookup, not an entry: listing a provider must not create state for it.
        let Some(mut keys) = self.providers.get_mut(provider) else {
            return vec![LiveState::default(); ids.len()];
        };
        ids.iter()
            .map(|id| match keys.keys.get_mut(id) {
                None => LiveState::default(),
                Some(key) => {
                    key.requests.prune(b);
                    key.tokens.prune(b);
                    let cooling = key.cooldown_until > now;
                    let suspended = key.suspended_until > now;
                    LiveState {
                        requests_last_60s: key.requests.sum(),
                        tokens_last_60s: key.tokens.sum(),
                        cooldown_remaining_ms: (key.cooldown_until - now).max(0),
                        suspended_remaining_ms: (key.suspended_until - now).max(0),
                        cooldown_cause: key.cooldown_cause.clone().filter(|_| cooling),
                        suspension_cause: key.suspension_cause.clone().filter(|_| suspended),
                        learned: key
                            .learned
                            .filter(|(_, until)| *until > now)
                            .map(|(l, _)| l),
                    }
                }
            })
            .collect()
    }

    /// Ends a provider key's cooldown and suspension now (`POST
    /// /admin/provider-keys/{id}/reset`). Its windows and pick time stay.
    pub fn reset_provider_key(&self, provider: &str, id: &str) {
        if let Some(mut keys) = self.providers.get_mut(provider) {
            if let Some(key) = keys.keys.get_mut(id) {
                key.cooldown_until = 0;
                key.suspended_until = 0;
                key.cooldown_cause = None;
                key.suspension_cause = None;
                key.learned = None;
            }
        }
    }

    /// Forgets every live balance; each key's next admission starts again from its
    /// database snapshot. For the Redis shape's outage twin only: in the embedded shape
    /// the live balance is ahead of the database.
    pub fn forget_balances(&self) {
        for mut state in self.keys.iter_mut() {
            state.balance = None;
        }
    }

    /// How many client keys have state here (for tests and diagnostics).
    pub fn held_keys(&self) -> usize {
        self.keys.len()
    }

    /// Drops idle keys and lapsed duplicate guards; run periodically.
    pub fn sweep(&self) {
        let now = self.now();
        let b = now.div_euclid(1000);
        self.keys.retain(|_, state| {
            // Expired leases go with the next admission (as admit.lua purges them), or
            // here once Redis would have expired the whole set.
            if state.leases_lapse_at <= now {
                // Redis loses their data with the lease set: their quota corrections go
                // with it, here as there (their spend holds stay listed in their
                // counters, which drop them when they next read them).
                let _lost = state.expire_leases(now, None);
            }
            state.drop_lapsed_purged(now);
            state.forget_lapsed_purged(now, self.guard_ttl_ms);
            state.requests.prune(b);
            state.tokens.prune(b);
            !state.is_idle()
        });
        self.reported.retain(|_, lapses| *lapses > now);
        self.quotas.lock().sweep(now);
        for mut keys in self.providers.iter_mut() {
            keys.keys.retain(|_, key| {
                key.requests.prune(b);
                key.tokens.prune(b);
                if key.cooldown_until <= now {
                    key.cooldown_cause = None;
                }
                if key.suspended_until <= now {
                    key.suspension_cause = None;
                }
                if key.learned.is_some_and(|(_, until)| until <= now) {
                    key.learned = None;
                }
                // Keep the pick time (least-recently-used order must survive quiet
                // periods), and a cooldown or suspension until it ends: a key reported
                // revoked but never picked here has nothing else to keep it by.
                key.last_pick.is_some()
                    || !key.requests.is_empty()
                    || !key.tokens.is_empty()
                    || key.cooldown_until > now
                    || key.suspended_until > now
                    || key.learned.is_some()
            });
        }
    }
}
