//! The Redis cost ladder (part of `scripts`): tiny scripts (`benches/ladder/`) from
//! `redis-benchmark` at the same concurrency as the ceiling, each adding one `redis.call`
//! of `lua/admit_window.lua`'s common path to the one before (`return 0` with its key and
//! arguments, TIME, the 6-field HMGET, the take's HSET; then a concurrency slot's ZCOUNT
//! and ZADD), each step's µs per call and its increment, beside admit_window.lua and
//! reference.lua: where a decision's Redis time goes.

use keyward::limits::scripts::admit::AdmitKeys;
use keyward::limits::scripts::KeySpace;

use crate::measure::{Probe, RedisCost, Summary};
use crate::yardsticks::SCRIPT_CALLS;
use crate::CONCURRENCY;

/// The ladder's steps (`benches/ladder/`): a name, the script, and its number of keys.
/// Each adds one `redis.call` of `lua/admit_window.lua`'s common path to the one before.
const LADDER: [(&str, &str, usize); 5] = [
    ("a: return 0", include_str!("../ladder/a_return.lua"), 1),
    ("b: + TIME", include_str!("../ladder/b_time.lua"), 1),
    (
        "c: + HMGET 6 fields",
        include_str!("../ladder/c_hmget.lua"),
        1,
    ),
    ("d: + HSET 8 args", include_str!("../ladder/d_hset.lua"), 1),
    ("e: + ZCOUNT, ZADD", include_str!("../ladder/e_zset.lua"), 2),
];

/// The ladder from `redis-benchmark` with `lua/admit_window.lua`'s key and arguments (step
/// e: and a sorted set), a table of each step's µs per call and increment, with
/// admit_window.lua and reference.lua beside them; a summary row per step and one line.
pub fn run(redis_port: u16, summary: &mut Summary) {
    let prefix = format!("bench-ladder-{}", std::process::id());
    let keys = AdmitKeys::new(&KeySpace::new(&prefix, 1), 0, "bench");
    let args = crate::window_args(0, "-");
    println!("\nRedis cost ladder, {CONCURRENCY} clients (µs per call: commandstats, then INFO cpu; + the step before):\n");
    println!("| step | calls/s | µs/call | + µs | CPU µs/call | + µs |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut before: Option<RedisCost> = None;
    let mut parts = Vec::new();
    let step = |name: &str, r: &RedisCost, before: &Option<RedisCost>, rate: f64| {
        let plus =
            |now: f64, then: Option<f64>| then.map_or("-".into(), |t| format!("{:+.1}", now - t));
        println!(
            "| {name} | {rate:.0} | {:.1} | {} | {:.1} | {} |",
            r.us_per_call,
            plus(r.us_per_call, before.as_ref().map(|b| b.us_per_call)),
            r.cpu_us,
            plus(r.cpu_us, before.as_ref().map(|b| b.cpu_us)),
        );
        format!(
            "{name} {:.1}{}",
            r.us_per_call,
            before.as_ref().map_or(String::new(), |b| format!(
                " ({:+.1})",
                r.us_per_call - b.us_per_call
            ))
        )
    };
    for (name, script, n) in LADDER {
        let probe = Probe::start(None, &[redis_port]);
        let step_keys = [keys.rpm.clone(), keys.leases.clone()];
        let Some(rate) = crate::redis_benchmark_evalsha(
            redis_port,
            script,
            (&step_keys[..n], &args),
            &prefix,
            SCRIPT_CALLS,
            crate::RANDOM_TOKENS,
        ) else {
            return;
        };
        let cost = probe.finish(SCRIPT_CALLS as usize);
        let r = cost.redis.clone().unwrap_or_default();
        parts.push(step(name, &r, &before, rate));
        summary.add(
            format!("ladder {name} via redis-benchmark"),
            rate,
            (None, None),
            cost,
        );
        before = Some(r);
    }
    // admit_window.lua is step d's next; reference.lua is printed without an increment.
    let d = summary
        .get("ladder d: + HSET 8 args via redis-benchmark")
        .and_then(|r| r.cost.redis.clone());
    for (name, row, after) in [
        (
            "admit_window.lua",
            "admit_window.lua via redis-benchmark",
            d,
        ),
        ("reference.lua", "reference.lua via redis-benchmark", None),
    ] {
        if let Some(found) = summary.get(row) {
            let r = found.cost.redis.clone().unwrap_or_default();
            parts.push(step(name, &r, &after, found.rate));
        }
    }
    summary.line(format!(
        "Redis cost ladder, µs per script call (commandstats; + over the step before, admit_window.lua over d): {}",
        parts.join("; ")
    ));
}
