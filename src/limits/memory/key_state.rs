//! The twin's state of one client key: its windows, its leases (by token and by
//! expiry) and its live balance.
//!
//! Leases are keyed by their token as a number ([`Token`]), not as its text: every
//! admission inserts one lease and purges another, in maps of as many leases as a key
//! has in flight, and comparing and copying 128-bit numbers costs a fraction of heap
//! strings (a third of the embedded shape's CPU per decision went to these maps). The
//! leases themselves are boxed: an insert shifts a node's values, and a pointer shifts
//! for a twentieth of a lease's bytes; moving a lease to `purged` moves the pointer.

use std::collections::{BTreeMap, BTreeSet};

use super::quota::Correction;
use crate::limits::window::Window;

/// A lease token as the twin keys it: the 128 bits its 32 lowercase hex digits spell
/// (what [`crate::limits::LeaseId`] makes and accepts), so [`token_text`] gives the
/// text back exactly. A token that is not such hex (no code path makes one) is folded
/// into 128 bits by FNV-1a instead, so it still names one lease.
pub(super) type Token = u128;

pub(super) fn token(text: &str) -> Token {
    let hex = text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match u128::from_str_radix(text, 16) {
        Ok(n) if hex => n,
        _ => text
            .bytes()
            .fold(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d, |h, b| {
                (h ^ u128::from(b)).wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b)
            }),
    }
}

/// The text of a token: the lease token it was made from.
pub(super) fn token_text(token: Token) -> String {
    format!("{token:032x}")
}

#[derive(Debug)]
pub(super) struct Lease {
    pub(super) expires_at: i64,
    pub(super) bucket: i64,
    /// The tokens it reserved in the key's token window; `None` when the key had no TPM
    /// limit then (as admit.lua lists no `kt` correction): its report settles nothing there.
    pub(super) reserved: Option<i64>,
    pub(super) provider: String,
    pub(super) model: String,
    pub(super) api_format: String,
    /// The provider key picked with it, and the tokens reserved on that key.
    pub(super) provider_key: Option<(String, i64)>,
    /// Micro-USD it holds on the key's tracked balance.
    pub(super) hold: i64,
    /// What its report corrects in the quota counters (its spend holds also leave them
    /// when it expires: with its purge here, or by their counters' own purge).
    pub(super) quotas: Vec<Correction>,
    /// A light lease in the lease set with no data in ld (admitted under a concurrency
    /// limit, or renewed: renew.lua puts it there): its report settles from its signed
    /// lease, and its purge keeps nothing for it.
    pub(super) light: bool,
}

impl Lease {
    /// A light lease as the lease set holds it: its expiry, nothing else.
    pub(super) fn light(light: &crate::limits::LightLease) -> Lease {
        Lease {
            expires_at: light.expires_at_ms,
            bucket: light.second,
            reserved: None,
            provider: String::new(),
            model: String::new(),
            api_format: String::new(),
            provider_key: None,
            hold: 0,
            quotas: Vec::new(),
            light: true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Balance {
    pub(super) remaining: i64,
    pub(super) credited: i64,
    pub(super) version: i64,
    /// The holds of the leases in flight.
    pub(super) held: i64,
}

#[derive(Debug, Default)]
pub(super) struct KeyState {
    pub(super) requests: Window,
    pub(super) tokens: Window,
    /// A B-tree, not a hash map: it grows a node at a time, where a hash map would
    /// rehash every lease at once while the key's shard is locked (a 15–20 ms stall for
    /// every admission of the key at 60,000 leases, measured by the open-loop bench).
    pub(super) leases: BTreeMap<Token, Box<Lease>>,
    /// The leases ordered by expiry (the twin of the Redis zset), so expiring them costs
    /// O(expired · log n), not a scan of every lease.
    pub(super) by_expiry: BTreeSet<(i64, Token)>,
    /// When Redis would let the lease set and its data expire: a second after the
    /// latest expiry any lease of the key has had (admit.lua and renew.lua extend them to
    /// that). Until then an expired lease keeps its data for its report, as in Redis.
    pub(super) leases_lapse_at: i64,
    /// Leases an admission purged after their expiry (admit.lua's `lx`): their data,
    /// slot and holds released, kept for a late report until their guard lapses.
    pub(super) purged: BTreeMap<Token, Box<Lease>>,
    /// When Redis would let `lx` expire: a millisecond after the latest guard lapse of
    /// the leases moved there since it last emptied.
    pub(super) purged_lapse_at: i64,
    pub(super) balance: Option<Balance>,
}

impl KeyState {
    /// Expired leases free their slot and their hold (as admit.lua's purge); returns
    /// each one's token with its quota corrections (when it has any), whose spend holds
    /// the caller releases. With `guard_ttl_ms` (an admission's purge) their data moves
    /// to `purged` until their duplicate guard lapses; without (Redis let the whole lease
    /// set expire) it is lost.
    pub(super) fn expire_leases(
        &mut self,
        now: i64,
        guard_ttl_ms: Option<i64>,
    ) -> Vec<(String, Vec<Correction>)> {
        let mut released = Vec::new();
        while self.by_expiry.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, token)) = self.by_expiry.pop_first() {
                if let Some(lease) = self.leases.remove(&token) {
                    if lease.light {
                        // No data in ld: admit.lua's purge moves nothing to lx.
                        continue;
                    }
                    self.release(lease.hold);
                    if !lease.quotas.is_empty() {
                        released.push((token_text(token), lease.quotas.clone()));
                    }
                    if let Some(guard) = guard_ttl_ms {
                        self.keep_purged(token, lease, now, guard);
                    }
                }
            }
        }
        released
    }

    /// Expired light leases leave (admit_window.lua's purge: the members without a
    /// record); the others stay, counted nowhere, for admit.lua's purge or their report.
    pub(super) fn expire_light_leases(&mut self, now: i64) {
        let expired: Vec<(i64, Token)> = self
            .by_expiry
            .range(..=(now, Token::MAX))
            .filter(|(_, token)| self.leases.get(token).is_some_and(|l| l.light))
            .copied()
            .collect();
        for (at, token) in expired {
            self.by_expiry.remove(&(at, token));
            self.leases.remove(&token);
        }
    }

    /// The live leases (expiring after `now`): every lease after admit.lua's purge;
    /// after admit_window.lua's, expired ones with a record may remain.
    pub(super) fn live_leases(&self, now: i64) -> i64 {
        let expired = self.by_expiry.range(..=(now, Token::MAX)).count();
        (self.leases.len() - expired) as i64
    }

    /// As admit.lua: `lx` takes the lease and lives until its guard lapses (a hash that
    /// expired starts again).
    fn keep_purged(&mut self, token: Token, lease: Box<Lease>, now: i64, guard_ttl_ms: i64) {
        self.drop_lapsed_purged(now);
        let lapse = lease
            .expires_at
            .saturating_add(guard_ttl_ms)
            .saturating_add(1);
        self.purged_lapse_at = self.purged_lapse_at.max(lapse);
        self.purged.insert(token, lease);
    }

    /// Forgets `purged` once Redis would have let `lx` expire.
    pub(super) fn drop_lapsed_purged(&mut self, now: i64) {
        if self.purged_lapse_at <= now {
            self.purged.clear();
            self.purged_lapse_at = 0;
        }
    }

    /// Purged leases whose guard lapsed before `now` leave (admit.lua drops them from
    /// `lx` by `<lx>:e`, a batch per decision; no report can reach them, so the twin
    /// drops them at its sweep).
    pub(super) fn forget_lapsed_purged(&mut self, now: i64, guard_ttl_ms: i64) {
        self.purged
            .retain(|_, lease| lease.expires_at.saturating_add(guard_ttl_ms) >= now);
        if self.purged.is_empty() {
            self.purged_lapse_at = 0;
        }
    }

    /// A purged lease's data, taken for its late report (report.lua's `lx`).
    pub(super) fn take_purged(&mut self, token: Token, now: i64) -> Option<Box<Lease>> {
        self.drop_lapsed_purged(now);
        let lease = self.purged.remove(&token)?;
        if self.purged.is_empty() {
            // Its last field gone, Redis deletes the hash with its expiry.
            self.purged_lapse_at = 0;
        }
        Some(lease)
    }

    pub(super) fn release(&mut self, hold: i64) {
        if let Some(balance) = self.balance.as_mut() {
            balance.held = (balance.held - hold).max(0);
        }
    }

    /// Until the first live lease expires (1000 when none is live), as admit.lua's
    /// earliest_lease_expiry.
    pub(super) fn earliest_expiry_ms(&self, now: i64) -> i64 {
        self.by_expiry
            .range((now.saturating_add(1), 0)..)
            .next()
            .map_or(1000, |(at, _)| (at - now).max(1))
    }

    pub(super) fn add_lease(&mut self, token: Token, lease: Box<Lease>) {
        self.leases_lapse_at = self.leases_lapse_at.max(lease.expires_at + 1000);
        self.by_expiry.insert((lease.expires_at, token));
        self.leases.insert(token, lease);
    }

    pub(super) fn remove_lease(&mut self, token: Token) -> Option<Box<Lease>> {
        let lease = self.leases.remove(&token)?;
        self.by_expiry.remove(&(lease.expires_at, token));
        Some(lease)
    }

    pub(super) fn is_idle(&self) -> bool {
        self.requests.is_empty()
            && self.tokens.is_empty()
            && self.leases.is_empty()
            && self.purged.is_empty()
            && self.balance.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_other_texts_stay_apart() {
        let text = "0123456789abcdef0123456789abcdef";
        assert_eq!(token_text(token(text)), text);
        assert_eq!(token_text(token(&"0".repeat(32))), "0".repeat(32));
        // Not the hex LeaseId makes: still one token each, never the hex one's.
        let upper = text.to_uppercase();
        assert_ne!(token(&upper), token(text));
        assert_ne!(token("x"), token("y"));
        assert_ne!(token("abc"), token(&format!("{:0>32}", "abc")));
    }
}
