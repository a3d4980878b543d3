//! The twin's quota counters: the in-process mirror of the quota part of
//! `lua/admit.lua` and `lua/report.lua` (see [`crate::limits::quota`]).
//!
//! Counters are named as the Redis keys after the hash tag (`<counter>:rm`,
//! `<counter>:td:<day>`, `<counter>:sm:<start day>`), so a lease's corrections name them
//! the same way in both stores. A user's counters are shared by all its keys, whose
//! twin entries are locked apart: all quota counters sit behind one mutex, taken after a
//! key's entry lock (never the other way round), so a decision reads, checks and takes
//! every entry atomically.
//!
//! A spend counter lists its holds as `lua/admit.lua`'s `:hx` does (member
//! `<lease token>:<hold>` → the lease's expiry), so a hold leaves `held` once, by its
//! report, its lease's purge or the counter's own purge of expired holds, whichever
//! comes first, and in the same order as in Redis (a batch of at most
//! [`PURGE_BATCH`] by expiry, then member).

mod read;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::limits::quota::{period_at, QuotaEntry, QuotaKind, QuotaUse, PERIOD_MARGIN_MS};
use crate::limits::window::Window;
use crate::limits::AdmitRequest;
use crate::money::MAX_TOTAL;

/// At most this many expired holds leave one spend counter per decision (admit.lua's
/// `PURGE_BATCH`, as for a key's expired leases).
pub(super) const PURGE_BATCH: usize = 100;

/// What a lease's report (or, for a spend hold, its expiry) corrects in one counter.
#[derive(Debug, Clone)]
pub(super) struct Correction {
    pub(super) kind: QuotaKind,
    pub(super) key: String,
    /// Tokens reserved (tm, td) or micro-USD held (spend).
    pub(super) amount: i64,
}

#[derive(Debug, Default)]
struct Spend {
    spent: i64,
    /// The sum of the holds listed in `holds`.
    held: i64,
    holds: Holds,
    /// When Redis would let it expire (a period's end plus the margin); never for a total.
    drop_at: Option<i64>,
}

/// A spend counter's holds in flight: the twin of its `:hx` zset.
#[derive(Debug, Default)]
struct Holds {
    /// Member (`<lease token>:<hold>`) → its lease's expiry.
    expiry: HashMap<String, i64>,
    /// The same, in the zset's order (score, then member).
    ordered: BTreeSet<(i64, String)>,
}

impl Holds {
    /// ZADD (XX: only a member already listed).
    fn set(&mut self, member: String, at: i64, only_existing: bool) {
        match self.expiry.get(&member) {
            Some(old) => {
                self.ordered.remove(&(*old, member.clone()));
            }
            None if only_existing => return,
            None => {}
        }
        self.expiry.insert(member.clone(), at);
        self.ordered.insert((at, member));
    }

    /// ZREM: whether it was listed.
    fn remove(&mut self, member: &str) -> bool {
        match self.expiry.remove(member) {
            Some(at) => self.ordered.remove(&(at, member.to_string())),
            None => false,
        }
    }
}

/// A spend hold as its counter lists it.
fn member(token: &str, amount: i64) -> String {
    format!("{token}:{amount}")
}

impl Spend {
    /// Releases a lease's hold if it is still listed (never twice).
    fn release(&mut self, token: &str, amount: i64) {
        if amount > 0 && self.holds.remove(&member(token, amount)) {
            self.held = (self.held - amount).max(0);
        }
    }

    /// Drops up to [`PURGE_BATCH`] expired holds (admit.lua's `expire_holds`).
    fn expire_holds(&mut self, now: i64) {
        for _ in 0..PURGE_BATCH {
            let Some((at, m)) = self.holds.ordered.first().cloned() else {
                break;
            };
            if at > now {
                break;
            }
            self.holds.remove(&m);
            let amount = m
                .rsplit_once(':')
                .and_then(|(_, a)| a.parse::<i64>().ok())
                .unwrap_or(0);
            self.held -= amount;
        }
        self.held = self.held.max(0);
        // Nothing listed holds nothing.
        if self.holds.expiry.is_empty() {
            self.held = 0;
        }
    }
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
    /// Expired leases' spend holds leave the counters that still list them (admit.lua's
    /// purge of a key's leases): `(lease token, its corrections)` each.
    pub(super) fn release(&mut self, leases: &[(String, Vec<Correction>)]) {
        for (token, corrections) in leases {
            for c in corrections {
                if let (QuotaKind::Spend(_), Some(s)) = (c.kind, self.spend.get_mut(&c.key)) {
                    s.release(token, c.amount);
                }
            }
        }
    }

    /// A renewed lease's spend holds take its new expiry (renew.lua).
    pub(super) fn renew(&mut self, token: &str, corrections: &[Correction], expiry: i64) {
        for c in corrections {
            if let (QuotaKind::Spend(_), Some(s)) = (c.kind, self.spend.get_mut(&c.key)) {
                if c.amount > 0 {
                    s.holds.set(member(token, c.amount), expiry, true);
                }
            }
        }
    }

    /// Reads every entry (pruning windows and dropping spend counters' expired holds, as
    /// admit.lua's reads do).
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
                        // Never below the database's figure when it is this period's
                        // (admit.lua's max; written only if admitted).
                        let seed = match e.seed {
                            Some((day, value)) if day == start => value.clamp(0, MAX_TOTAL),
                            _ => 0,
                        };
                        if let QuotaKind::Spend(_) = e.kind {
                            (read.spent, read.held) = match self.spend.get_mut(&read.key) {
                                Some(s) => {
                                    s.expire_holds(now);
                                    (s.spent, s.held)
                                }
                                None => (0, 0),
                            };
                            read.spent = read.spent.max(seed);
                            read.used = read.spent.saturating_add(read.held).min(MAX_TOTAL);
                        } else {
                            read.used = self.days.get(&read.key).map_or(0, |(v, _)| *v);
                            read.used = read.used.max(seed);
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

    /// Takes the request from every entry (its spend holds listed until `expiry`, its
    /// lease's); returns what its report corrects.
    pub(super) fn take(
        &mut self,
        reads: &mut [Read],
        request: &AdmitRequest<'_>,
        now: i64,
        expiry: i64,
    ) -> Vec<Correction> {
        let (tokens, hold) = (request.tokens, request.hold_micros);
        let token = &request.lease.token;
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
                    // `r.used` may be the seed (admit.lua's SET).
                    r.used += add;
                    self.days.insert(r.key.clone(), (r.used, drop_at));
                    if r.kind == QuotaKind::TokensPerDay {
                        corrections.push(correct(tokens));
                    }
                }
                QuotaKind::Spend(_) => {
                    r.held += hold;
                    let s = self.spend.entry(r.key.clone()).or_default();
                    (s.spent, s.held) = (r.spent, r.held);
                    s.drop_at = r.ends.map(|e| e + PERIOD_MARGIN_MS);
                    if hold > 0 {
                        s.holds.set(member(token, hold), expiry, false);
                    }
                    r.used = r.spent.saturating_add(r.held).min(MAX_TOTAL);
                    corrections.push(correct(hold));
                }
            }
        }
        corrections
    }

    /// A report's corrections (report.lua): tokens by actual − reserved when known, in
    /// the second / day they were reserved in; each spend counter that still exists adds
    /// the cost, and releases the hold if it still lists it.
    pub(super) fn report(
        &mut self,
        token: &str,
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
                        s.release(token, c.amount);
                    }
                }
                _ => {}
            }
        }
    }

    /// A report whose lease's data is gone (report.lua): its cost is added to `spent` of
    /// the current period of each spend entry given, where that counter exists.
    pub(super) fn late(&mut self, entries: &[QuotaEntry], cost: i64, now: i64) {
        for e in entries {
            let (QuotaKind::Spend(_), Some((start, _))) = (e.kind, period_at(e.kind, now)) else {
                continue;
            };
            let key = format!("{}:{}:{start}", e.counter, e.kind.code());
            if let Some(s) = self.spend.get_mut(&key) {
                s.spent = s.spent.saturating_add(cost).min(MAX_TOTAL);
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
