//! The twin's side of `lua/quota_read.lua`: the live figures of quota counters and of a
//! key's own minute windows, read from its state without changing it (a window is
//! pruned on a copy; expired holds are skipped, not dropped; nothing is created).

use super::Counters;
use crate::limits::live::{LiveCounter, LiveFigure, LiveFigures};
use crate::limits::memory::MemoryCounters;
use crate::limits::quota::period_at;
use crate::limits::window::Window;
use crate::limits::QuotaKind;
use crate::money::MAX_TOTAL;

/// A window's sum and reset as a decision at `now` would see them, on a copy.
fn window(w: Option<&Window>, now: i64) -> LiveFigure {
    let Some(w) = w else {
        return LiveFigure::default();
    };
    let mut w = w.clone();
    w.prune(now.div_euclid(1000));
    LiveFigure {
        used: w.sum(),
        held: 0,
        reset_ms: w.reset_ms(now),
    }
}

impl Counters {
    /// One quota counter (as `lua/quota_read.lua` reads it).
    fn peek(
        &self,
        counter: &str,
        kind: QuotaKind,
        seed: Option<(i64, i64)>,
        now: i64,
    ) -> LiveFigure {
        let Some((start, reset)) = period_at(kind, now) else {
            return window(self.windows.get(&format!("{counter}:{}", kind.code())), now);
        };
        let key = format!("{counter}:{}:{start}", kind.code());
        // As the next admission takes it: never below the database's figure of the
        // current period.
        let seeded = match seed {
            Some((day, n)) if day == start => n.clamp(0, MAX_TOTAL),
            _ => 0,
        };
        let (used, held) = match kind {
            QuotaKind::Spend(_) => match self.spend.get(&key) {
                Some(s) => {
                    // The holds whose lease expires after now (an expired one still
                    // listed is left for the next decision to drop).
                    let live = s
                        .holds
                        .ordered
                        .iter()
                        .filter(|(at, _)| *at > now)
                        .map(|(_, m)| {
                            m.rsplit_once(':')
                                .and_then(|(_, a)| a.parse::<i64>().ok())
                                .unwrap_or(0)
                        })
                        .fold(0i64, i64::saturating_add);
                    (s.spent.max(seeded), live)
                }
                None => (seeded, 0),
            },
            _ => (self.days.get(&key).map_or(0, |(v, _)| *v).max(seeded), 0),
        };
        LiveFigure {
            used,
            held,
            reset_ms: reset,
        }
    }
}

impl MemoryCounters {
    /// The live figures of `counters` (see [`crate::limits::live`]).
    pub fn read_quotas(&self, counters: &[LiveCounter]) -> LiveFigures {
        let now = self.now();
        // The key windows first, each under its key's entry lock alone, then the quota
        // counters under the quota lock alone: a decision takes a key's lock and then the
        // quota lock, so holding the quota lock while taking a key's could deadlock.
        let mut figures: Vec<LiveFigure> = counters
            .iter()
            .map(|c| match c {
                LiveCounter::KeyWindow { key_id, tokens } => {
                    // A lookup, not an entry: reading must not create state for the key.
                    let state = self.keys.get(key_id);
                    let w = state
                        .as_ref()
                        .map(|s| if *tokens { &s.tokens } else { &s.requests });
                    window(w, now)
                }
                LiveCounter::Quota { .. } => LiveFigure::default(),
            })
            .collect();
        if counters
            .iter()
            .any(|c| matches!(c, LiveCounter::Quota { .. }))
        {
            let quotas = self.quotas.lock();
            for (figure, c) in figures.iter_mut().zip(counters) {
                if let LiveCounter::Quota {
                    counter,
                    kind,
                    seed,
                } = c
                {
                    *figure = quotas.peek(counter, *kind, *seed, now);
                }
            }
        }
        LiveFigures {
            now_ms: now,
            figures,
        }
    }
}
