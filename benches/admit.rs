//! `cargo bench --bench admit`: how fast `/v1/admit` decides, in both shapes, beside the
//! ceiling Redis itself sets for the same script.
//!
//! - Saturation: `CONCURRENCY` keep-alive connections send admits back to back for
//!   `SECONDS`; decisions/s, p50 and p99 latency.
//! - 10,000 keys: the same runs rotating over 10,000 client keys (every key loaded into
//!   the cache first), to show that the cost per decision does not grow with the number
//!   of keys.
//! - With select: the same admits with `"select": true` on a pool of 50 provider keys
//!   of equal priority (so every pick reads the least-recently-used order of all 50).
//! - Ceiling: `redis-benchmark` runs EVALSHA of `lua/admit.lua` with the same keys and
//!   arguments at the same concurrency (a fresh lease token per call).
//! - Open loop: a fixed offered load (`OPEN_LOOP_RPS`) from a pacing thread, once evenly
//!   spaced and once with Poisson arrivals; p50, p99, p99.9 of each request from its due
//!   instant (so a stall anywhere counts), and beside them the p99 lag of sends behind
//!   the schedule. Beside keyward's Redis shape, two floors on the same schedule: a bare
//!   axum server that makes the same EVALSHA per request, and EVALSHA straight to Redis.
//!
//! keyward runs as its own process (the release binary); the load generator is a minimal
//! HTTP/1.1 client so it takes as little of the shared CPU as it can. Everything shares
//! the machine: compare ratios, not absolute numbers. The key has RPM and TPM limits
//! too high to be reached, so every window is read and written on every decision.
//!
//! - Scopes (`scopes.rs`, also alone with `KEYWARD_BENCH_ONLY=scopes`): the cost of 1,
//!   3 and 6 limits on a request, in keyward's CPU and in Redis's.
//!
//! Under `cargo test` (no `--bench` argument) it does nothing. (Over 400 lines: each
//! generator sits beside the runs that use it; the scope runs have their own file.)
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use keyward::limits::scripts::admit::{AdmitArgs, AdmitKeys, AdmitQuotaArgs, AdmitQuotaKey};
use keyward::limits::scripts::{source, KeySpace};
use keyward::limits::QuotaEntry;
use support::Keyward;

#[path = "admit/scopes.rs"]
mod scopes;

const CONCURRENCY: usize = 32;
const SECONDS: u64 = 8;
const OPEN_LOOP_RPS: u64 = 5_000;

/// keyward with short leases (so the lease set stays a few seconds deep), and Redis when given.
async fn start(redis: Option<(&str, &str)>) -> Keyward {
    let mut env = vec![("KEYWARD_LEASE_TTL_S", "5".to_string())];
    if let Ok(threads) = std::env::var("KEYWARD_BENCH_SERVER_THREADS") {
        env.push(("TOKIO_WORKER_THREADS", threads));
    }
    if let Some((url, prefix)) = redis {
        env.push(("KEYWARD_REDIS_URL", url.to_string()));
        env.push(("KEYWARD_REDIS_PREFIX", prefix.to_string()));
    }
    support::start(&env).await
}

/// The pool size for the select runs (`KEYWARD_BENCH_POOL`, default 50).
fn pool_size() -> usize {
    std::env::var("KEYWARD_BENCH_POOL")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50)
}

/// Creates `n` keys like [`create_key`], 16 at a time.
async fn create_keys(k: &Keyward, n: usize) -> Vec<String> {
    let admin = k.admin;
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut secrets = Vec::new();
                for _ in (t..n).step_by(16) {
                    secrets.push(support::unlimited_key(&client, admin).await);
                }
                secrets
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

async fn create_key(k: &Keyward) -> String {
    support::unlimited_key(&reqwest::Client::new(), k.admin).await
}

fn admit_request(port: u16, secret: &str, select: bool) -> Vec<u8> {
    let body = if select {
        format!(
            r#"{{"key":"{secret}","model":"gpt-4o","estimated_tokens":100,"provider":"bench","select":true}}"#
        )
    } else {
        format!(r#"{{"key":"{secret}","model":"gpt-4o","estimated_tokens":100}}"#)
    };
    format!(
        "POST /v1/admit HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Run {
    rate: f64,
    latencies_us: Vec<u64>,
    /// Open loop only: how late each send was against its schedule.
    lag_us: Vec<u64>,
    errors: usize,
}

/// Closed loop: every connection sends as fast as answers come back, rotating over
/// the keys (connection `w` starts at key `w`).
async fn saturate(port: u16, secrets: &[String], select: bool, seconds: u64) -> Run {
    let requests = secrets
        .iter()
        .map(|s| admit_request(port, s, select))
        .collect();
    saturate_with(port, requests, seconds).await
}

/// [`saturate`] with ready-made requests (connection `w` starts at request `w`).
async fn saturate_with(port: u16, requests: Vec<Vec<u8>>, seconds: u64) -> Run {
    let requests = std::sync::Arc::new(requests);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut conn = support::Conn::open(port).await;
                let (mut lat, mut errors) = (Vec::with_capacity(200_000), 0);
                let mut i = w;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if conn.call(&requests[i % requests.len()]).await != 200 {
                        errors += 1;
                    }
                    lat.push(t.elapsed().as_micros() as u64);
                    i += CONCURRENCY;
                }
                (lat, Vec::new(), errors)
            })
        })
        .collect();
    collect(workers, seconds).await
}

/// Sends one admission per key, so that every key record is in the cache.
async fn warm(port: u16, secrets: &[String]) {
    let chunks: Vec<Vec<Vec<u8>>> = secrets
        .chunks(secrets.len().div_ceil(CONCURRENCY))
        .map(|c| c.iter().map(|s| admit_request(port, s, false)).collect())
        .collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|requests| {
            tokio::spawn(async move {
                let mut conn = support::Conn::open(port).await;
                for r in &requests {
                    conn.call(r).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// The number of keys for the many-keys runs (`KEYWARD_BENCH_KEYS`, default 10,000).
fn many_keys() -> usize {
    std::env::var("KEYWARD_BENCH_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// Open loop at `rps` against keyward: admits due on the `arrivals` schedule, whatever
/// the answers do (see [`pace`]).
async fn open_loop(arrivals: Arrivals, port: u16, secret: &str, rps: u64, seconds: u64) -> Run {
    let request = admit_request(port, secret, false);
    let (senders, workers): (Vec<_>, Vec<_>) = (0..CONCURRENCY)
        .map(|_| {
            let (tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let request = request.clone();
            let worker = tokio::spawn(async move {
                let mut conn = support::Conn::open(port).await;
                let mut timed = Timed::default();
                while let Some(due) = due_rx.recv().await {
                    let sent = Instant::now();
                    let ok = conn.call(&request).await == 200;
                    timed.record(due, sent, ok);
                }
                timed.into_parts()
            });
            (tx, worker)
        })
        .unzip();
    pace(arrivals, rps, seconds, senders).await;
    collect(workers, seconds).await
}

/// The floor beside [`open_loop`]: the same schedule sending `EVALSHA` of
/// `lua/admit.lua` (same arguments as the ceiling) straight to Redis through the client
/// library keyward uses, on one multiplexed connection. keyward's open-loop latency
/// minus this is what its HTTP hop and its own work add.
async fn open_loop_evalsha(arrivals: Arrivals, url: &str, rps: u64, seconds: u64) -> Run {
    let conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let script = std::sync::Arc::new(redis::Script::new(source::ADMIT));
    let prefix = format!("bench-floor-{}", std::process::id());
    let (senders, workers): (Vec<_>, Vec<_>) = (0..CONCURRENCY)
        .map(|w| {
            let (tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let (mut conn, script, prefix) = (conn.clone(), script.clone(), prefix.clone());
            let worker = tokio::spawn(async move {
                let mut timed = Timed::default();
                let mut i = 0u64;
                while let Some(due) = due_rx.recv().await {
                    i += 1;
                    let call = admit_call(&script, &prefix, format!("floor-{w}-{i}"));
                    let sent = Instant::now();
                    let ok = call.invoke_async::<redis::Value>(&mut conn).await.is_ok();
                    timed.record(due, sent, ok);
                }
                timed.into_parts()
            });
            (tx, worker)
        })
        .unzip();
    pace(arrivals, rps, seconds, senders).await;
    let run = collect(workers, seconds).await;
    let keys = script_keys(&prefix);
    let _ = Command::new("redis-cli")
        .args(["-u", url, "DEL"])
        .args(&keys)
        .output();
    run
}

/// The floor for the Redis shape: a bare axum server (the HTTP stack keyward uses) on a
/// runtime of its own with as many workers as keyward's, that answers every POST with
/// one `EVALSHA` of `lua/admit.lua` (the ceiling's arguments) and nothing else: no key
/// lookup, no JSON, no headers. Returns its port.
fn bare_server(url: &str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = redis::Client::open(url).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let conn = client.get_multiplexed_async_connection().await.unwrap();
            let script = std::sync::Arc::new(redis::Script::new(source::ADMIT));
            let prefix = format!("bench-bare-{}", std::process::id());
            let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let handler = move |_body: axum::body::Bytes| {
                let (mut conn, script, prefix, counter) = (
                    conn.clone(),
                    script.clone(),
                    prefix.clone(),
                    counter.clone(),
                );
                async move {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let call = admit_call(&script, &prefix, format!("bare-{n}"));
                    match call.invoke_async::<redis::Value>(&mut conn).await {
                        Ok(_) => axum::http::StatusCode::OK,
                        Err(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    }
                }
            };
            let app = axum::Router::new().route("/v1/admit", axum::routing::post(handler));
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    port
}

/// Hands request `i` of `rps · seconds` to worker `i % workers` at its due instant
/// `start + i/rps`, from a thread of its own: Tokio's timer ticks once per millisecond
/// and would send the requests in bursts of `rps/1000`, which is not the load asked for.
/// Workers time each request from its due instant, so the pacer's own wake-up, any wait
/// for a busy connection and the send all count (no coordinated omission).
async fn pace(
    arrivals: Arrivals,
    rps: u64,
    seconds: u64,
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>,
) {
    tokio::time::sleep(Duration::from_millis(100)).await; // connections open
    let mean_ns = 1e9 / rps as f64;
    std::thread::spawn(move || {
        let mut due = Instant::now();
        for i in 0..rps * seconds {
            due += Duration::from_nanos(match arrivals {
                Arrivals::Even => mean_ns,
                // Exponential gaps: -ln(U) · mean, U in (0, 1].
                Arrivals::Poisson => -(1.0 - rand::random::<f64>()).ln() * mean_ns,
            } as u64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = senders[i as usize % senders.len()].send(due);
        }
    });
}

/// How an open loop spaces its requests.
#[derive(Clone, Copy)]
enum Arrivals {
    /// One every `1/rps` (as wrk2 paces).
    Even,
    /// Independent arrivals at a mean rate of `rps` (exponential gaps), which bunch up
    /// now and then the way unrelated clients do.
    Poisson,
}

impl Arrivals {
    fn name(self) -> &'static str {
        match self {
            Arrivals::Even => "open loop",
            Arrivals::Poisson => "Poisson",
        }
    }
}

/// One open-loop worker's measurements.
#[derive(Default)]
struct Timed {
    latencies_us: Vec<u64>,
    lag_us: Vec<u64>,
    errors: usize,
}

impl Timed {
    fn record(&mut self, due: Instant, sent: Instant, ok: bool) {
        self.latencies_us.push(due.elapsed().as_micros() as u64);
        self.lag_us
            .push(sent.saturating_duration_since(due).as_micros() as u64);
        self.errors += usize::from(!ok);
    }

    fn into_parts(self) -> (Vec<u64>, Vec<u64>, usize) {
        (self.latencies_us, self.lag_us, self.errors)
    }
}

type Worker = tokio::task::JoinHandle<(Vec<u64>, Vec<u64>, usize)>;

async fn collect(workers: Vec<Worker>, seconds: u64) -> Run {
    let (mut all, mut lags, mut errors) = (Vec::new(), Vec::new(), 0);
    for w in workers {
        let (lat, lag, e) = w.await.unwrap();
        all.extend(lat);
        lags.extend(lag);
        errors += e;
    }
    all.sort_unstable();
    lags.sort_unstable();
    Run {
        rate: all.len() as f64 / seconds as f64,
        latencies_us: all,
        lag_us: lags,
        errors,
    }
}

/// The keys `lua/admit.lua` is called with, for the bench key under a prefix of the
/// caller's (no pool).
fn script_keys(prefix: &str) -> Vec<String> {
    let keys = AdmitKeys::new(&KeySpace::new(prefix, 1), 0, "bench");
    keys.all().map(String::from).to_vec()
}

/// The arguments of one admission like the bench key's (no pool), with lease `token`.
fn admit_args(token: &str) -> AdmitArgs<'_> {
    AdmitArgs {
        rpm_limit: 1_000_000_000_000,
        tpm_limit: 1_000_000_000_000,
        concurrency_limit: 0,
        tokens: 100,
        lease_token: token,
        lease_ttl_ms: 5000,
        lease_meta: "||gpt-4o|".into(),
        balance_tracked: false,
        credited: 0,
        used: 0,
        balance_version: 0,
        time_shift_ms: 0,
        hold: 0,
        now_ms: 0,
        guard_ttl_ms: 60_000,
    }
}

/// One admission call like the ceiling's, under `prefix`, with its own lease `token`.
fn admit_call<'a>(
    script: &'a redis::Script,
    prefix: &str,
    token: String,
) -> redis::ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    AdmitKeys::new(&KeySpace::new(prefix, 1), 0, "bench").push(&mut call);
    admit_args(&token).push(&mut call);
    call
}

/// EVALSHA of the admission script straight from redis-benchmark, same concurrency.
fn evalsha_ceiling(url_port: u16, seconds: u64) -> Option<f64> {
    // About as many calls as keyward would make in `seconds` at this rate.
    redis_benchmark_admit(url_port, &[], 80_000 * seconds)
}

/// `requests` EVALSHA calls of `lua/admit.lua` from redis-benchmark at [`CONCURRENCY`]
/// clients, with the bench key's keys and arguments and `quotas` after them (each
/// request's spend entries hold [`scopes::HOLD`] then); calls per second.
fn redis_benchmark_admit(url_port: u16, quotas: &[QuotaEntry], requests: u64) -> Option<f64> {
    let script = source::ADMIT;
    let sha = {
        let out = Command::new("redis-cli")
            .args(["-p", &url_port.to_string(), "SCRIPT", "LOAD", script])
            .output()
            .ok()?;
        String::from_utf8(out.stdout).ok()?.trim().to_string()
    };
    let prefix = format!("bench-ceiling-{}", std::process::id());
    let mut keys = script_keys(&prefix);
    let space = KeySpace::new(&prefix, 1);
    keys.extend(
        quotas
            .iter()
            .map(|q| AdmitQuotaKey::new(&space, 0, q).quota),
    );
    let requests = requests.to_string();
    let mut args: Vec<String> = vec![
        "-p".into(),
        url_port.to_string(),
        "-c".into(),
        CONCURRENCY.to_string(),
        "-n".into(),
        requests,
        "-r".into(),
        "1000000000000".into(),
        "--csv".into(),
        "EVALSHA".into(),
        sha,
        keys.len().to_string(),
    ];
    args.extend(keys.iter().cloned());
    // redis-benchmark replaces `__rand_int__` by a random number on every call.
    let mut admit = admit_args("__rand_int__");
    if !quotas.is_empty() {
        admit.hold = scopes::HOLD;
    }
    args.extend(admit.to_strings());
    for q in quotas {
        args.extend(AdmitQuotaArgs::new(q).to_strings());
    }
    let out = Command::new("redis-benchmark").args(&args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The script names the quota counters itself: drop everything under the prefix.
    support::drop_redis_keys(url_port, &prefix);
    // CSV: "test","rps",...
    text.lines()
        .filter_map(|l| l.split(',').nth(1))
        .filter_map(|v| v.trim_matches('"').parse::<f64>().ok())
        .next()
}

/// `KEYWARD_BENCH_ONLY=open` runs only the open-loop rows (and no ceiling): the
/// quick way to compare latency changes.
fn open_loop_only() -> bool {
    std::env::var("KEYWARD_BENCH_ONLY").is_ok_and(|v| v == "open")
}

/// `KEYWARD_BENCH_ONLY=redis-open` runs only the Redis shape's open loops: the quickest
/// A/B of two builds (`KEYWARD_BENCH_BIN`), alternated many times on a noisy machine.
fn redis_open_loop_only() -> bool {
    std::env::var("KEYWARD_BENCH_ONLY").is_ok_and(|v| v == "redis-open")
}

/// Both open loops on one server; returns the evenly paced one.
async fn open_loops(label: &str, port: u16, secret: &str) -> Run {
    let mut even = None;
    for arrivals in [Arrivals::Even, Arrivals::Poisson] {
        let run = open_loop(arrivals, port, secret, OPEN_LOOP_RPS, SECONDS).await;
        row(
            &format!("{label}, {} {OPEN_LOOP_RPS}/s", arrivals.name()),
            &run,
        );
        even.get_or_insert(run);
    }
    even.unwrap()
}

/// Every run on one keyward; returns the plain single-key saturation run.
async fn runs(shape: &str, k: &Keyward) -> Run {
    let one = vec![create_key(k).await];
    saturate(k.data, &one, false, 1).await; // warm-up
    if open_loop_only() {
        return open_loops(shape, k.data, &one[0]).await;
    }
    support::create_pool(k, "bench", pool_size()).await;
    let sat = saturate(k.data, &one, false, SECONDS).await;
    row(&format!("{shape}, 1 key, saturation"), &sat);
    open_loops(shape, k.data, &one[0]).await;
    saturate(k.data, &one, true, 1).await;
    let select = saturate(k.data, &one, true, SECONDS).await;
    row(
        &format!("{shape}, 1 key, select of {}", pool_size()),
        &select,
    );

    let many = create_keys(k, many_keys()).await;
    warm(k.data, &many).await;
    let n = many.len();
    row(
        &format!("{shape}, {n} keys, saturation"),
        &saturate(k.data, &many, false, SECONDS).await,
    );
    row(
        &format!("{shape}, {n} keys, select of {}", pool_size()),
        &saturate(k.data, &many, true, SECONDS).await,
    );
    sat
}

fn row(name: &str, run: &Run) {
    let lag = if run.lag_us.is_empty() {
        "-".to_string()
    } else {
        format!("{:.3}", support::percentile(&run.lag_us, 0.99))
    };
    println!(
        "| {name:<36} | {:>11.0} | {:>6.3} | {:>6.3} | {:>8.3} | {lag:>10} | {:>6} |",
        run.rate,
        support::percentile(&run.latencies_us, 0.50),
        support::percentile(&run.latencies_us, 0.99),
        support::percentile(&run.latencies_us, 0.999),
        run.errors
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("admit bench: skipped (run it with `cargo bench --bench admit`)");
        return;
    }
    let redis_port: u16 = std::env::var("KEYWARD_BENCH_REDIS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let prefix = format!("kw-bench-{}", std::process::id());
    if scopes::only() {
        scopes::run(redis_port).await;
        return;
    }
    println!(
        "keyward admit benchmark: {CONCURRENCY} connections, {SECONDS} s per run, 2 shared cores\n"
    );
    println!("| run                                  | decisions/s | p50 ms | p99 ms | p99.9 ms | lag p99 ms | errors |");
    println!("|--------------------------------------|------------:|-------:|-------:|---------:|-----------:|-------:|");

    if redis_open_loop_only() {
        let k = start(Some((&redis_url, &prefix))).await;
        let one = vec![create_key(&k).await];
        saturate(k.data, &one, false, 1).await; // warm-up
        open_loops("redis", k.data, &one[0]).await;
        return;
    }
    let emb_sat = runs("embedded", &start(None).await).await;
    let red_sat = runs("redis", &start(Some((&redis_url, &prefix))).await).await;
    open_loops("bare HTTP+EVALSHA", bare_server(&redis_url), "-").await;
    for arrivals in [Arrivals::Even, Arrivals::Poisson] {
        row(
            &format!("EVALSHA, {} {OPEN_LOOP_RPS}/s", arrivals.name()),
            &open_loop_evalsha(arrivals, &redis_url, OPEN_LOOP_RPS, SECONDS).await,
        );
    }
    support::drop_redis_keys(redis_port, &prefix);

    if open_loop_only() {
        return;
    }
    let ceiling = evalsha_ceiling(redis_port, SECONDS);
    println!();
    match ceiling {
        Some(c) => {
            println!(
                "EVALSHA ceiling (redis-benchmark, admit.lua, {CONCURRENCY} clients): {c:.0}/s"
            );
            println!("redis shape / ceiling:    {:.0}%", 100.0 * red_sat.rate / c);
        }
        None => println!("EVALSHA ceiling: redis-benchmark not available"),
    }
    println!(
        "embedded / redis shape:   {:.0}%",
        100.0 * emb_sat.rate / red_sat.rate
    );
    println!();
    scopes::run(redis_port).await;
}
