//! The cost of a scope: saturation admits for keys with 1, 3 and 6 limits,
//! in both shapes, and the script's own cost with 0 and 5 quota entries.
//!
//! - 1 limit: the key's own RPM (today's single-scope admit, no quota entry);
//! - 3 limits: key RPM + key TPM + key requests per day (1 quota entry);
//! - 6 limits: the 3 + a user RPM, a user month spend limit and a key × model RPM
//!   (4 quota entries).
//!
//! Every limit is too high to be reached, and every request names a provider and a
//! model with a price, so every run computes the same hold. The three kinds of key are
//! alternated within each round (1, 3, 6, then 6, 3, 1, ...) so that a drift of the
//! machine's speed falls on all of them alike; `KEYWARD_BENCH_ROUNDS` (default 3).
//!
//! Per run: decisions/s, keyward's CPU per decision (`/proc/<pid>/stat`), Redis's CPU per
//! decision (`INFO cpu`, the whole server: run it on a Redis of its own,
//! `KEYWARD_BENCH_REDIS_PORT`, for a clean figure) and Redis's time per script call
//! (`CONFIG RESETSTAT` before the run, `cmdstat_evalsha` `usec_per_call` after).
//! RESETSTAT clears the server's statistics for every client of that Redis; it changes
//! no data and no behaviour, so sharing a Redis only blurs the numbers.

use keyward::limits::{QuotaEntry, QuotaKind};
use keyward::quota::Period;

use crate::measure::{redis_cli, redis_cpu_s};
use crate::support::{self, Keyward};
use crate::{saturate_with, start, Run, CONCURRENCY, SECONDS};

/// The hold of one request (micro-USD) in the redis-benchmark runs: what keyward holds
/// for the bench's requests (100 estimated tokens at 10 USD per million output tokens).
pub const HOLD: i64 = 1_000;

/// Too high to be reached by any run.
const HIGH: i64 = 1_000_000_000_000;

/// `KEYWARD_BENCH_ONLY=scopes`: only these runs (about 3 minutes with 3 rounds);
/// `scopes-script`: only the script's own cost (redis-benchmark, about a minute).
pub fn only() -> bool {
    std::env::var("KEYWARD_BENCH_ONLY").is_ok_and(|v| v.starts_with("scopes"))
}

fn script_only() -> bool {
    std::env::var("KEYWARD_BENCH_ONLY").is_ok_and(|v| v == "scopes-script")
}

fn rounds() -> usize {
    std::env::var("KEYWARD_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3)
}

/// The kinds of key measured: number of limits, quota entries, and the key's body.
fn kinds() -> [(usize, usize, serde_json::Value); 3] {
    [
        (
            1,
            0,
            serde_json::json!({"rate_limit": HIGH, "tpm_limit": null, "concurrent_limit": null}),
        ),
        (
            3,
            1,
            serde_json::json!({"rate_limit": HIGH, "tpm_limit": HIGH, "concurrent_limit": null,
                               "daily_request_limit": HIGH}),
        ),
        (
            6,
            4,
            serde_json::json!({"rate_limit": HIGH, "tpm_limit": HIGH, "concurrent_limit": null,
                               "daily_request_limit": HIGH, "user_id": "bench-user",
                               "model_limits": {"gpt-4o": {"rate_limit": HIGH}}}),
        ),
    ]
}

/// What one saturation run measured.
struct Measured {
    run: Run,
    keyward_cpu_us: f64,
    /// Redis shape only.
    redis: Option<RedisMeasured>,
}

struct RedisMeasured {
    cpu_us: f64,
    usec_per_call: f64,
    calls_per_decision: f64,
}

/// The price, the user, and one key of each kind; returns each kind's admit request.
async fn set_up(k: &Keyward) -> Vec<Vec<u8>> {
    let client = reqwest::Client::new();
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", k.admin);
    let price = serde_json::json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10});
    let user =
        serde_json::json!({"rate_limit": HIGH, "spend_limits": {"month": {"usd": 1_000_000_000}}});
    for (path, body) in [
        ("/admin/prices/bench/gpt-4o", price),
        ("/admin/users/bench-user", user),
    ] {
        let r = client
            .put(admin(path))
            .bearer_auth(support::TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }
    let mut requests = Vec::new();
    for (_, _, body) in kinds() {
        let secret = support::create_key(&client, k.admin, &body).await;
        let body = format!(
            r#"{{"key":"{secret}","provider":"bench","model":"gpt-4o","estimated_tokens":100}}"#
        );
        let request = format!(
            "POST /v1/admit HTTP/1.1\r\nhost: 127.0.0.1:{}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            k.data,
            body.len()
        )
        .into_bytes();
        // One admission first: it must be allowed (else every run would time refusals).
        let (status, answer) = support::Conn::open(k.data).await.call_body(&request).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        requests.push(request);
    }
    requests
}

/// One saturation run of `request` on every connection.
async fn measure(k: &Keyward, request: &[u8], redis_port: Option<u16>) -> Measured {
    let redis_before = redis_port.map(|p| {
        redis_cli(p, &["CONFIG", "RESETSTAT"]);
        redis_cpu_s(p)
    });
    let ticks = support::cpu_ticks(k.pid());
    let run = saturate_with(k.data, vec![request.to_vec(); CONCURRENCY], SECONDS).await;
    let ticks = support::cpu_ticks(k.pid()) - ticks;
    let decisions = run.latencies_us.len().max(1) as f64;
    let redis = redis_port.zip(redis_before).map(|(p, before)| {
        let cpu = redis_cpu_s(p) - before;
        let (calls, usec_per_call) = evalsha_stats(p);
        RedisMeasured {
            cpu_us: cpu * 1e6 / decisions,
            usec_per_call,
            calls_per_decision: calls as f64 / decisions,
        }
    });
    Measured {
        keyward_cpu_us: ticks as f64 * 1e6 / support::clock_ticks_per_s() as f64 / decisions,
        run,
        redis,
    }
}

/// Every round on one keyward; returns the runs of each kind (in [`kinds`] order).
async fn shape(label: &str, k: &Keyward, redis_port: Option<u16>) -> Vec<Vec<Measured>> {
    let requests = set_up(k).await;
    for r in &requests {
        saturate_with(k.data, vec![r.clone(); CONCURRENCY], 1).await; // warm-up
    }
    let mut by_kind: Vec<Vec<Measured>> = (0..requests.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds() {
        let mut order: Vec<usize> = (0..requests.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let m = measure(k, &requests[i], redis_port).await;
            row(label, i, round + 1, &m);
            by_kind[i].push(m);
        }
    }
    by_kind
}

fn row(label: &str, kind: usize, round: usize, m: &Measured) {
    let (limits, entries) = {
        let k = &kinds()[kind];
        (k.0, k.1)
    };
    let (cpu, call, calls) = match &m.redis {
        Some(r) => (
            format!("{:.1}", r.cpu_us),
            format!("{:.1}", r.usec_per_call),
            format!("{:.2}", r.calls_per_decision),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    println!(
        "| {label:<8} | {limits} ({entries}) | {round} | {:>11.0} | {:>6.3} | {:>6.3} | {:>10.1} | {cpu:>8} | {call:>10} | {calls:>11} | {:>6} |",
        m.run.rate,
        support::percentile(&m.run.latencies_us, 0.50),
        support::percentile(&m.run.latencies_us, 0.99),
        m.keyward_cpu_us,
        m.run.errors
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of `f` over each kind's runs (`None` when a run has no such figure).
fn medians(by_kind: &[Vec<Measured>], f: impl Fn(&Measured) -> Option<f64>) -> Option<[f64; 3]> {
    let mut out = [0.0; 3];
    for (i, runs) in by_kind.iter().enumerate() {
        out[i] = median(runs.iter().map(&f).collect::<Option<Vec<f64>>>()?);
    }
    Some(out)
}

/// Medians per kind, the ratios 3/1 and 6/1, and the cost per added limit and entry.
fn summary(label: &str, by_kind: &[Vec<Measured>]) {
    let metrics = [
        ("decisions/s", medians(by_kind, |m| Some(m.run.rate))),
        (
            "keyward CPU µs/decision",
            medians(by_kind, |m| Some(m.keyward_cpu_us)),
        ),
        (
            "Redis CPU µs/decision",
            medians(by_kind, |m| m.redis.as_ref().map(|r| r.cpu_us)),
        ),
        (
            "Redis µs/script call",
            medians(by_kind, |m| m.redis.as_ref().map(|r| r.usec_per_call)),
        ),
    ];
    for (name, values) in metrics {
        let Some([one, three, six]) = values else {
            continue;
        };
        // 1 → 3 adds the TPM window and one entry; 3 → 6 adds three entries.
        let per = if name == "decisions/s" {
            " - | - ".to_string()
        } else {
            format!(
                "{:+.1} µs | {:+.1} µs",
                (three - one) / 2.0,
                (six - three) / 3.0
            )
        };
        println!(
            "| {label:<8} | {name:<23} | {one:>8.1} | {three:>8.1} | {six:>8.1} | {:.2} | {:.2} | {per} |",
            three / one,
            six / one
        );
    }
}

/// The script alone: redis-benchmark with no quota entry, one of each kind the key
/// runs use (and a day's tokens), and five at once; calls/s, Redis's time in a call
/// (`usec_per_call`, wall time: it grows when the core is taken away mid-call) and
/// Redis's CPU per call (`INFO cpu`).
fn script_ceiling(redis_port: u16) {
    let entry = |n: u8, kind| QuotaEntry {
        counter: format!("{n:024x}"),
        kind,
        limit: HIGH,
        seed: None,
    };
    let five = [
        entry(1, QuotaKind::RequestsPerDay),
        entry(2, QuotaKind::RequestsPerMinute),
        entry(3, QuotaKind::Spend(Period::Month)),
        entry(4, QuotaKind::RequestsPerMinute),
        entry(5, QuotaKind::TokensPerDay),
    ];
    println!("| admit.lua (redis-benchmark, {CONCURRENCY} clients) | calls/s | Redis µs/call | Redis CPU µs/call |");
    println!("|---|---:|---:|---:|");
    let singles = [0, 1, 2, 4].map(|i| &five[i..=i]);
    for quotas in [&five[..0]].into_iter().chain(singles).chain([&five[..]]) {
        redis_cli(redis_port, &["CONFIG", "RESETSTAT"]);
        let cpu = redis_cpu_s(redis_port);
        let Some(rate) = crate::redis_benchmark_admit(redis_port, quotas, 100_000) else {
            println!("EVALSHA ceiling: redis-benchmark not available");
            return;
        };
        let cpu = redis_cpu_s(redis_port) - cpu;
        let (calls, usec) = evalsha_stats(redis_port);
        let kinds: Vec<&str> = quotas.iter().map(|q| q.kind.code()).collect();
        println!(
            "| {} quota entries ({}) | {rate:.0} | {usec:.1} | {:.1} |",
            quotas.len(),
            kinds.join(" "),
            cpu * 1e6 / calls.max(1) as f64
        );
    }
}

/// Both shapes, then the script alone.
pub async fn run(redis_port: u16) {
    if script_only() {
        script_ceiling(redis_port);
        return;
    }
    println!(
        "keyward: the cost of a scope ({CONCURRENCY} connections, {SECONDS} s a run, {} rounds, 1, 3 and 6 limits alternated)\n",
        rounds()
    );
    println!("| shape    | limits (entries) | round | decisions/s | p50 ms | p99 ms | keyward CPU µs/dec | Redis CPU µs/dec | Redis µs/call | calls/dec | errors |");
    println!("|----------|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let embedded = shape("embedded", &start(None).await, None).await;
    let url = format!("redis://127.0.0.1:{redis_port}");
    let prefix = format!("kw-bench-scopes-{}", std::process::id());
    let redis = shape(
        "redis",
        &start(Some((&url, &prefix))).await,
        Some(redis_port),
    )
    .await;
    // The quota entries were counted: key requests a day (3 and 6 limits), user RPM and
    // month spend, key × model RPM (more if a run crossed midnight UTC).
    let counters = redis_cli(
        redis_port,
        &["--scan", "--pattern", &format!("{{{prefix}*:q:*")],
    );
    let counters = counters.lines().count();
    assert!(
        counters >= 5,
        "{counters} quota counters in Redis, expected 5"
    );
    support::drop_redis_keys(redis_port, &prefix);

    println!("\nMedians of {} runs:\n", rounds());
    println!("| shape | median of | 1 limit | 3 limits | 6 limits | 3/1 | 6/1 | a limit, 1→3 | a quota entry, 3→6 |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    summary("embedded", &embedded);
    summary("redis", &redis);
    println!();
    script_ceiling(redis_port);
}

/// `cmdstat_evalsha` since the last RESETSTAT: calls and µs per call.
fn evalsha_stats(port: u16) -> (u64, f64) {
    let info = redis_cli(port, &["INFO", "commandstats"]);
    let Some(line) = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
    else {
        return (0, f64::NAN);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
            .unwrap_or("")
    };
    (
        field("calls").parse().unwrap_or(0),
        field("usec_per_call").parse().unwrap_or(f64::NAN),
    )
}
