//! The twin's provider key state: per provider, each key's windows, cooldown and
//! suspension, and the pick order (the twin of `lua/admit.lua`'s pool walk).

use std::collections::{BTreeSet, HashMap};

use crate::limits::window::Window;
use crate::limits::{effective_limit, Pick};
use crate::pool::cache::Roster as CandidatePool;
use crate::pool::learned::Learned;
use crate::pool::Cause;

/// One provider key's live state.
#[derive(Debug, Default)]
pub(super) struct ProviderKeyState {
    pub(super) requests: Window,
    pub(super) tokens: Window,
    pub(super) cooldown_until: i64,
    pub(super) suspended_until: i64,
    /// The reports behind them (shown while they last).
    pub(super) cooldown_cause: Option<Cause>,
    pub(super) suspension_cause: Option<Cause>,
    /// What the rate-limit headers said last, and until when it is shown.
    pub(super) learned: Option<(Learned, i64)>,
    pub(super) last_pick: Option<i64>,
}

/// One provider's keys' live state. A pick holds the provider's map-entry lock
/// throughout.
#[derive(Debug, Default)]
pub(super) struct ProviderKeyStates {
    pub(super) keys: HashMap<String, ProviderKeyState>,
    /// The version of the candidates `order` was built for (see `pool::cache::Roster`).
    version: String,
    /// The twin of the Redis `:order` zset: (priority, last pick, rank of the id, candidate
    /// index), so a pick walks from the front instead of sorting the pool. A key never
    /// picked sorts before every pick time and by its index (as `lua/pool_sync.lua`
    /// scores it); keys picked in the same millisecond sort by id, as the zset sorts
    /// members of equal score.
    order: BTreeSet<(i64, i64, usize, usize)>,
    /// Each candidate's rank in id order, by candidate index.
    id_rank: Vec<usize>,
}

impl ProviderKeyStates {
    /// Picks like `lua/admit.lua`: priority, then least recently picked (never first),
    /// skipping keys cooling down, suspended or without room. Takes nothing.
    pub(super) fn pick(&mut self, candidates: &CandidatePool, tokens: i64, now: i64) -> Pick {
        if self.version != candidates.version() {
            // The pool changed (or this is its first pick): rebuild the order, keeping
            // the pick history of the keys that stay, as `lua/pool_sync.lua` does.
            self.version = candidates.version().to_string();
            let mut by_id: Vec<usize> = (0..candidates.len()).collect();
            by_id.sort_unstable_by(|a, b| candidates[*a].id.cmp(&candidates[*b].id));
            self.id_rank = vec![0; candidates.len()];
            for (rank, i) in by_id.into_iter().enumerate() {
                self.id_rank[i] = rank;
            }
            let keys = &self.keys;
            self.order = candidates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let last = keys.get(&c.id).and_then(|k| k.last_pick);
                    self.slot(candidates, i, last)
                })
                .collect();
        }
        let b = now.div_euclid(1000);
        let mut earliest: Option<i64> = None;
        let mut unseen = ProviderKeyState::default();
        for &(_, _, _, i) in &self.order {
            let c = &candidates[i];
            // A key never picked nor reported has empty windows (nothing is stored for it).
            let key = self.keys.get_mut(&c.id).unwrap_or(&mut unseen);
            key.requests.prune(b);
            key.tokens.prune(b);
            let mut wait = (key.cooldown_until - now)
                .max(key.suspended_until - now)
                .max(0);
            if let Some(rpm) = effective_limit(c.max_rpm) {
                if key.requests.sum() + 1 > rpm {
                    wait = wait.max(key.requests.wait_ms(now, 1, rpm));
                }
            }
            if let Some(tpm) = effective_limit(c.max_tpm) {
                if tokens > tpm {
                    wait = wait.max(61_000);
                } else if key.tokens.sum() + tokens > tpm {
                    wait = wait.max(key.tokens.wait_ms(now, tokens, tpm));
                }
            }
            if wait == 0 {
                return Pick::Picked(i);
            }
            earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
        }
        Pick::Exhausted {
            retry_after_ms: earliest.unwrap_or(61_000),
        }
    }

    /// Candidate `i`'s place in `order`, picked last at `last`.
    fn slot(
        &self,
        candidates: &CandidatePool,
        i: usize,
        last: Option<i64>,
    ) -> (i64, i64, usize, usize) {
        // Never picked: below any time, in index order.
        let last = last.unwrap_or(i as i64 - candidates.len() as i64);
        (candidates[i].priority, last, self.id_rank[i], i)
    }

    /// Takes the picked key's request and tokens; returns the tokens reserved on it.
    pub(super) fn take(
        &mut self,
        candidates: &CandidatePool,
        i: usize,
        tokens: i64,
        now: i64,
    ) -> i64 {
        let (c, b) = (&candidates[i], now.div_euclid(1000));
        let last = self.keys.get(&c.id).and_then(|k| k.last_pick);
        let (old, new) = (
            self.slot(candidates, i, last),
            self.slot(candidates, i, Some(now)),
        );
        self.order.remove(&old);
        self.order.insert(new);
        let key = self.keys.entry(c.id.clone()).or_default();
        key.last_pick = Some(now);
        if effective_limit(c.max_rpm).is_some() {
            key.requests.add(b, 1);
        }
        let reserved = if effective_limit(c.max_tpm).is_some() {
            tokens
        } else {
            0
        };
        if reserved > 0 {
            key.tokens.add(b, reserved);
        }
        reserved
    }
}
