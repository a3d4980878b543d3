//! The exact sliding window in Rust: the embedded twin of the bucket logic in
//! `lua/admit.lua` and `lua/report.lua`.
//!
//! Time is cut into 1-second buckets. A decision at second `b` counts buckets
//! `b-60..=b`. Why that is exact: take any 60-second interval and the last request
//! admitted in it, at time `t` in bucket `b`. Every other request in the interval came
//! after `t - 60`, so in bucket `b - 60` or later, and was admitted before it; all of
//! them were counted when it was admitted, and the check kept the total within the limit.

use std::collections::VecDeque;

/// Buckets counted by a decision: the current second and the 60 before it.
pub const SPAN: i64 = 61;

/// Amounts per second, oldest first, at most [`SPAN`] of them.
#[derive(Debug, Default, Clone)]
pub struct Window {
    buckets: VecDeque<(i64, i64)>,
}

impl Window {
    /// Forgets buckets that left the window as of second `b`.
    pub fn prune(&mut self, b: i64) {
        while self
            .buckets
            .front()
            .is_some_and(|(s, _)| *s < b - (SPAN - 1))
        {
            self.buckets.pop_front();
        }
    }

    pub fn sum(&self) -> i64 {
        self.buckets.iter().map(|(_, v)| v).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn add(&mut self, b: i64, amount: i64) {
        match self.buckets.back_mut() {
            Some((s, v)) if *s == b => *v += amount,
            _ => self.buckets.push_back((b, amount)),
        }
    }

    /// Replaces part of a reservation made at second `bucket`, if it is still counted.
    pub fn settle(&mut self, bucket: i64, delta: i64) {
        if let Some((_, v)) = self.buckets.iter_mut().find(|(s, _)| *s == bucket) {
            *v = (*v + delta).max(0);
        }
    }

    /// Milliseconds from `now_ms` until `add` more fits under `limit` (buckets pruned to
    /// the second of `now_ms`).
    pub fn wait_ms(&self, now_ms: i64, add: i64, limit: i64) -> i64 {
        let b = now_ms.div_euclid(1000);
        let mut sum = self.sum();
        for k in 1..=SPAN {
            let leaving = b - (SPAN - 1) + k - 1;
            sum -= self
                .buckets
                .iter()
                .find(|(s, _)| *s == leaving)
                .map_or(0, |(_, v)| *v);
            if sum + add <= limit {
                return (b + k) * 1000 - now_ms;
            }
        }
        SPAN * 1000
    }

    /// Milliseconds until the oldest counted bucket leaves the window; 0 when empty.
    pub fn reset_ms(&self, now_ms: i64) -> i64 {
        self.buckets
            .front()
            .map_or(0, |(s, _)| (s + SPAN) * 1000 - now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sixty_one_buckets() {
        let mut w = Window::default();
        w.add(100, 1);
        w.prune(160);
        assert_eq!(w.sum(), 1, "bucket b-60 still counts");
        w.prune(161);
        assert_eq!(w.sum(), 0);
        assert!(w.is_empty());
    }

    #[test]
    fn wait_is_the_time_until_enough_leaves() {
        let mut w = Window::default();
        w.add(100, 3);
        w.add(130, 2);
        // At 140.250 s with limit 5: one more fits once bucket 100 leaves, at second 161.
        assert_eq!(w.wait_ms(140_250, 1, 5), 161_000 - 140_250);
        // Three more need bucket 130 gone too (second 191).
        assert_eq!(w.wait_ms(140_250, 4, 5), 191_000 - 140_250);
        assert_eq!(w.reset_ms(140_250), 161_000 - 140_250);
    }

    #[test]
    fn settle_adjusts_only_counted_buckets() {
        let mut w = Window::default();
        w.add(10, 100);
        w.settle(10, -60);
        assert_eq!(w.sum(), 40);
        w.settle(9, 1_000);
        assert_eq!(w.sum(), 40);
        w.settle(10, -1_000);
        assert_eq!(w.sum(), 0);
    }
}
