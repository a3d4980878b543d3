//! The fleet model (printed after the `lifecycle` part): from the Redis CPU per request
//! measured there (the whole server's, `INFO cpu`), the requests per second one master
//! carries at 100% and at 60% of one core (Redis runs commands on one thread), and the
//! masters needed for 10k, 50k and 200k requests per second at 60%, for an admit alone
//! and for admit+report, without and with selection.
//!
//! Assumes the load spreads evenly over the masters, which tenant shards give for many
//! tenants; a single tenant shard or a single pool is one tag on one master whatever
//! the number of masters (see the `hot` part), so the model also prints one pool's
//! ceiling from the pick's and pool report's CPU. Measured at saturation on a shared
//! machine: a less loaded Redis pipelines less and spends somewhat more per command.

use crate::lifecycle;
use crate::measure::Summary;

/// The target utilisation the masters are sized for.
const TARGET: f64 = 0.6;
const LOADS: [f64; 3] = [10_000.0, 50_000.0, 200_000.0];

pub fn model(summary: &mut Summary) {
    let n = lifecycle::keys();
    let names = lifecycle::names(n);
    let cpu: Vec<Option<f64>> = names
        .iter()
        .map(|name| {
            summary
                .get(name)
                .and_then(|r| r.cost.redis.as_ref())
                .map(|c| c.cpu_us)
                .filter(|&us| us > 0.0)
        })
        .collect();
    let mut lines = vec![format!(
        "fleet model (Redis CPU per request from the lifecycle runs, {n} keys; masters at {:.0}% of one core, load spread evenly):",
        100.0 * TARGET
    )];
    for (name, us) in names.iter().zip(&cpu) {
        let Some(us) = us else { continue };
        let full = 1e6 / us;
        let masters: Vec<String> = LOADS
            .iter()
            .map(|load| {
                format!(
                    "{}k/s: {}",
                    load / 1000.0,
                    (load / (full * TARGET)).ceil().max(1.0)
                )
            })
            .collect();
        lines.push(format!(
            "- {}: {us:.1} µs Redis CPU/request → {full:.0}/s per master at 100%, {:.0}/s at 60%; masters needed: {}",
            name.trim_start_matches(&format!("lifecycle, {n} keys, ")),
            full * TARGET,
            masters.join(", ")
        ));
    }
    // One pool is one tag: its picks and pool reports all run on one master.
    if let (Some(a), Some(a_s), Some(a_r), Some(a_s_r)) = (cpu[0], cpu[1], cpu[2], cpu[3]) {
        let pool_us = (a_s - a) + (a_s_r - a_s - (a_r - a));
        if pool_us > 0.0 {
            lines.push(format!(
                "- one pool (one tag, one master): pick + pool_report ≈ {pool_us:.1} µs Redis CPU/request (by difference) → at most about {:.0} selected requests/s per pool at 100%, {:.0}/s at 60%, whatever the number of masters",
                1e6 / pool_us,
                TARGET * 1e6 / pool_us
            ));
        }
    }
    if lines.len() > 1 {
        for l in lines {
            summary.line(l);
        }
    }
}
