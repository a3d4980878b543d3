//! The twin's quota counters: the in-process mirror of the quota part of
//! `lua/admit.lua` and `lua/report.lua` (see [`crate::limits::quota`]).
//!
//! Counters are named as the Redis keys after the hash tag (`<counter>:rm`,
//! `<counter>:td:<day>`, `<counter>:sm:<start day>`), so a lease's corrections name them
//! the same way in both stores. A user's counters are shared by all its keys, whose
//! twin entries are locked apart: all quota counters sit behind one mutex, taken after a
//! key's entry lock (never the other way round), so a decision reads, checks and takes
//! every entry atomically.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::limits::quota::{period_at, QuotaEntry, QuotaKind, QuotaUse, PERIOD_MARGIN_MS};
use crate::limits::window::Window;
use crate::money::MAX_TOTAL;

/// What a lease's report (or, for a spend hold, its expiry) corrects in one counter.
#[derive(Debug, Clone)]
pub(super) struct Correction {
    pub(super) kind: QuotaKind,
    pub(super) key: String,
    /// Tokens reserved (tm, td) or micro-USD held (spend).
    pub(super) amount: i64,
}

#[derive(Debug)]
struct Spend {
    spent: i64,
    held: i64,
    /// When Redis would let it expire (a period's end plus the margin); never for a total.
    drop_at: Option<i64>,
}

#[derive(Debug, Default)]
pub(super) struct QuotaCounters(Mutex<Counters>);

#[derive(Debug, Default)]
pub(super) struct Counters {
    windows: HashMap<String, Window>,
    /// Day counters: value, and when Redis would let it expire.
    days: HashMap<String, (i64, i64)>,
    spend: HashMap<String, Spend>,
}

/// One entry as read before the checks.
#[derive(Debug)]
pub(super) struct Read {
    key: String,
    kind: QuotaKind,
    limit: i64,
    /// Window sum, day count, or spent + held (capped at `MAX_TOTAL`).
    used: i64,
    spent: i64,
    held: i64,
    /// When the calendar period ends (ms); `None` for a window or a total.
    ends: Option<i64>,
}

impl QuotaCounters {
    pub(super) fn lock(&self) -> MutexGuard<'_, Counters> {
        // A panic elsewhere while it was held leaves whole values only: go on.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Counters {
    /// An expired lease's spend holds leave the counters that still exist (admit.lua's
    /// purge).
    pub(super) fn release(&mut self, corrections: &[Correction]) {
        for c in corrections {
            if let (QuotaKind::Spend(_), Some(s)) = (c.kind, self.spend.get_mut(&c.key)) {
                if c.amount > 0 {
                    s.held = (s.held - c.amount).max(0);
                }
            }
        }
    }

    /// Reads every entry (pruning windows, as admit.lua's reads do).
    pub(super) fn read(&mut self, entries: &[QuotaEntry], now: i64) -> Vec<Read> {
        let b = now.div_euclid(1000);
        entries
            .iter()
            .map(|e| {
                let mut read = Read {
                    key: String::new(),
                    kind: e.kind,
                    limit: e.limit,
                    used: 0,
                    spent: 0,
                    held: 0,
                    ends: None,
                };
                match period_at(e.kind, now) {
                    None => {
                        read.key = format!("{}:{}", e.counter, e.kind.code());
                        if let Some(w) = self.windows.get_mut(&read.key) {
                            w.prune(b);
                            read.used = w.sum();
                        }
                    }
                    Some((start, reset)) => {
                        read.key = format!("{}:{}:{start}", e.counter, e.kind.code());
                        read.ends = (reset > 0).then_some(now + reset);
                        if let QuotaKind::Spend(_) = e.kind {
                            (read.spent, read.held) = match self.spend.get(&read.key) {
                                Some(s) => (s.spent, s.held),
                                // Missing: the database's figure when it is this period's.
                                None => match e.seed {
                                    Some((day, micros)) if day == start => {
                                        (micros.clamp(0, MAX_TOTAL), 0)
                                    }
                                    _ => (0, 0),
                                },
                            };
                            read.used = read.spent.saturating_add(read.held).min(MAX_TOTAL);
                        } else {
                            read.used = self.days.get(&read.key).map_or(0, |(v, _)| *v);
                        }
                    }
                }
                read
            })
            .collect()
    }

    /// The entries' usage as read (or after [`Counters::take`]).
    pub(super) fn uses(&self, reads: &[Read], now: i64) -> Vec<QuotaUse> {
        reads
            .iter()
            .map(|r| QuotaUse {
                used: r.used,
                reset_ms: match (r.kind.per_minute(), r.ends) {
                    (true, _) => self.windows.get(&r.key).map_or(0, |w| w.reset_ms(now)),
                    (false, Some(ends)) => ends - now,
                    (false, None) => 0,
                },
            })
            .collect()
    }

    /// The first entry that refuses: its index, whether it is full (else its spend is
    /// held in flight), and the retry time (0 = none).
    pub(super) fn refusal(
        &self,
        reads: &[Read],
        tokens: i64,
        hold: i64,
        now: i64,
    ) -> Option<(usize, bool, i64)> {
        reads.iter().enumerate().find_map(|(i, r)| {
            let full = |add: i64| r.used + add > r.limit;
            // A window that does not exist waits as an empty one (admit.lua's wait_for).
            let wait = |add: i64| {
                self.windows.get(&r.key).map_or_else(
                    || Window::default().wait_ms(now, add, r.limit),
                    |w| w.wait_ms(now, add, r.limit),
                )
            };
            let until_end = r.ends.map_or(0, |e| e - now);
            match r.kind {
                QuotaKind::RequestsPerMinute if full(1) => Some((i, true, wait(1))),
                QuotaKind::TokensPerMinute if full(tokens) => Some((i, true, wait(tokens))),
                QuotaKind::RequestsPerDay if full(1) => Some((i, true, until_end)),
                QuotaKind::TokensPerDay if full(tokens) => Some((i, true, until_end)),
                QuotaKind::Spend(_) if r.spent >= r.limit || r.spent + hold > r.limit => {
                    Some((i, true, until_end))
                }
                QuotaKind::Spend(_) if r.spent + r.held + hold > r.limit => Some((i, false, 1000)),
                _ => None,
            }
        })
    }

    /// Takes the request from every entry; returns what its report corrects.
    pub(super) fn take(
        &mut self,
        reads: &mut [Read],
        tokens: i64,
        hold: i64,
        now: i64,
    ) -> Vec<Correction> {
        let b = now.div_euclid(1000);
        let mut corrections = Vec::new();
        for r in reads.iter_mut() {
            let add = if r.kind.counts_requests() { 1 } else { tokens };
            let correct = |amount| Correction {
                kind: r.kind,
                key: r.key.clone(),
                amount,
            };
            match r.kind {
                QuotaKind::RequestsPerMinute | QuotaKind::TokensPerMinute => {
                    if add > 0 {
                        self.windows.entry(r.key.clone()).or_default().add(b, add);
                        r.used += add;
                    }
                    if r.kind == QuotaKind::TokensPerMinute {
                        corrections.push(correct(tokens));
                    }
                }
                QuotaKind::RequestsPerDay | QuotaKind::TokensPerDay => {
                    let drop_at = r.ends.unwrap_or(now) + PERIOD_MARGIN_MS;
                    let day = self.days.entry(r.key.clone()).or_insert((0, drop_at));
                    *day = (day.0 + add, drop_at);
                    r.used = day.0;
                    if r.kind == QuotaKind::TokensPerDay {
                        corrections.push(correct(tokens));
                    }
                }
                QuotaKind::Spend(_) => {
                    r.held += hold;
                    self.spend.insert(
                        r.key.clone(),
                        Spend {
                            spent: r.spent,
                            held: r.held,
                            drop_at: r.ends.map(|e| e + PERIOD_MARGIN_MS),
                        },
                    );
                    r.used = r.spent.saturating_add(r.held).min(MAX_TOTAL);
                    corrections.push(correct(hold));
                }
            }
        }
        corrections
    }

    /// A report's corrections (report.lua): tokens by actual − reserved when known, in
    /// the second / day they were reserved in; each spend counter that still exists
    /// releases the hold and adds the cost.
    pub(super) fn report(
        &mut self,
        corrections: &[Correction],
        bucket: i64,
        tokens: Option<(i64, i64)>,
        cost: i64,
        now: i64,
    ) {
        let actual = tokens.map(|(p, c)| p + c);
        for c in corrections {
            match (c.kind, actual) {
                (QuotaKind::TokensPerMinute, Some(actual)) => {
                    if let Some(w) = self.windows.get_mut(&c.key) {
                        w.prune(now.div_euclid(1000));
                        w.settle(bucket, actual - c.amount);
                    }
                }
                (QuotaKind::TokensPerDay, Some(actual)) => {
                    if let Some((v, _)) = self.days.get_mut(&c.key) {
                        *v = (*v + actual - c.amount).max(0);
                    }
                }
                (QuotaKind::Spend(_), _) => {
                    if let Some(s) = self.spend.get_mut(&c.key) {
                        s.spent = s.spent.saturating_add(cost).min(MAX_TOTAL);
                        s.held = (s.held - c.amount).max(0);
                    }
                }
                _ => {}
            }
        }
    }

    /// Drops what Redis would have dropped by now: empty windows and calendar counters
    /// past their period and margin (nothing reads those again).
    pub(super) fn sweep(&mut self, now: i64) {
        let b = now.div_euclid(1000);
        self.windows.retain(|_, w| {
            w.prune(b);
            !w.is_empty()
        });
        self.days.retain(|_, (_, drop_at)| *drop_at > now);
        self.spend
            .retain(|_, s| !matches!(s.drop_at, Some(at) if at <= now));
    }
}
