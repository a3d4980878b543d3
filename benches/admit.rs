//! `cargo bench --bench admit`: how fast `/v1/admit` decides and what a decision costs,
//! in both shapes, beside its yardsticks, in one run ending with one summary
//! table (markdown) and its ratios.
//!
//! - Saturation: `CONCURRENCY` keep-alive connections send admits back to back for
//!   `SECONDS`; decisions/s, p50 and p99 latency, and for every run (`measure.rs`)
//!   keyward's CPU per decision (`/proc`) and Redis's (`INFO cpu`; `INFO commandstats`:
//!   the script calls' time, every command's time, µs per script call).
//! - 10,000 keys: the same runs rotating over 10,000 client keys (every key loaded into
//!   the cache first), to show that the cost per decision does not grow with the number
//!   of keys.
//! - With select: the same admits with `"select": true` on a pool of 50 provider keys
//!   of equal priority (so every pick reads the least-recently-used order of all 50).
//! - Open loop: a fixed offered load (`OPEN_LOOP_RPS`) from a pacing thread, once evenly
//!   spaced and once with Poisson arrivals; p50, p99, p99.9 of each request from its due
//!   instant (so a stall anywhere counts), and beside them the p99 lag of sends behind
//!   the schedule. Beside keyward's Redis shape, two floors on the same schedule: a bare
//!   axum server that makes the same EVALSHA per request, and EVALSHA straight to Redis;
//!   keyward's p99 minus the bare server's is printed against a 0.3 ms target.
//! - Yardsticks (`yardsticks.rs`): redis-benchmark running `lua/admit.lua` (the ceiling),
//!   `lua/admit_window.lua` and `benches/reference.lua` (a one-counter sliding window),
//!   then the Redis cost ladder (`ladder.rs`, `benches/ladder/`: admit_window.lua's
//!   common path one `redis.call` at a time); a bare hyper server's CPU per request;
//!   Limitador's two modes when `LIMITADOR_BIN` is set (`limitador.rs`;
//!   `LIMITADOR_BIN=$(scripts/limitador.sh)`: the `limitador` library 0.14 behind a
//!   minimal HTTP server, `benches/limitador/`), with keyward's Redis CPU per decision
//!   over Limitador's per check and the embedded shape against its in-memory mode.
//! - Cluster (`cluster.rs`): a three-master Redis Cluster of its own, 1,000 keys, each
//!   master's share of the script calls.
//! - Lifecycle (`lifecycle.rs`): admit then `/v1/report` of the lease, with and without
//!   selection, the cost per request and per script; then the fleet model (`fleet.rs`):
//!   requests/s per master and masters needed for 10k/50k/200k requests/s.
//! - Hot (`hot.rs`): on the cluster, all load on one key, and one pool under 1,000 keys:
//!   the busiest master's share, CPU and decisions/s, one tag's ceiling.
//! - Scopes (`scopes.rs`): the cost of 1, 3 and 6 limits on a request, in keyward's CPU
//!   and in Redis's.
//!
//! keyward runs as its own process (the release binary); the load generator is a minimal
//! HTTP/1.1 client so it takes as little of the shared CPU as it can. Redis is a private
//! `redis-server` started by the bench (`KEYWARD_BENCH_REDIS_PORT` names another), so its
//! statistics hold the bench's commands only. Everything shares the machine: compare
//! ratios, not absolute numbers. The key has RPM and TPM limits too high to be reached,
//! so every window is read and written on every decision. `KEYWARD_BENCH_ONLY` selects
//! parts (see [`part`]).
//!
//! Under `cargo test` (no `--bench` argument) it does nothing. (Over 400 lines: each
//! generator sits beside the runs that use it; the other parts have their own files.)
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use keyward::limits::scripts::admit::{AdmitArgs, AdmitKeys, AdmitQuotaArgs, AdmitQuotaKey};
use keyward::limits::scripts::admit_window::{AdmitWindowArgs, AdmitWindowKeys};
use keyward::limits::scripts::{source, KeySpace};
use keyward::limits::{QuotaEntry, QuotaKind};
use support::Keyward;

#[path = "admit/cluster.rs"]
mod cluster;
#[path = "admit/fleet.rs"]
mod fleet;
#[path = "admit/hot.rs"]
mod hot;
#[path = "admit/ladder.rs"]
mod ladder;
#[path = "admit/lifecycle.rs"]
mod lifecycle;
#[path = "admit/limitador.rs"]
mod limitador;
#[path = "admit/measure.rs"]
mod measure;
#[path = "admit/scopes.rs"]
mod scopes;
#[path = "admit/yardsticks.rs"]
mod yardsticks;

use measure::{Probe, Summary};

const CONCURRENCY: usize = 32;
const SECONDS: u64 = 8;
const OPEN_LOOP_RPS: u64 = 5_000;

/// keyward with short leases (so the lease set stays a few seconds deep), and Redis when given.
async fn start(redis: Option<(&str, &str)>) -> Keyward {
    let mut env = vec![("KEYWARD_LEASE_TTL_S", "5".to_string())];
    if let Ok(threads) = std::env::var("KEYWARD_BENCH_SERVER_THREADS") {
        env.push(("KEYWARD_THREADS", threads));
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

/// The arguments of one admission like the bench key's (no pool), with lease `token`:
/// light, as keyward admits a key without a concurrency limit, balance or quota.
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
        light: true,
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

/// `requests` EVALSHA calls of `lua/admit.lua` from redis-benchmark at [`CONCURRENCY`]
/// clients, with the bench key's keys and arguments and `quotas` after them (each
/// request's spend entries hold [`scopes::HOLD`] then); calls per second.
fn redis_benchmark_admit(url_port: u16, quotas: &[QuotaEntry], requests: u64) -> Option<f64> {
    let prefix = format!("bench-ceiling-{}", std::process::id());
    let mut keys = script_keys(&prefix);
    let space = KeySpace::new(&prefix, 1);
    keys.extend(
        quotas
            .iter()
            .map(|q| AdmitQuotaKey::new(&space, 0, q).quota),
    );
    // redis-benchmark replaces `__rand_int__` by a random number on every call.
    let mut admit = admit_args("__rand_int__");
    if !quotas.is_empty() {
        admit.hold = scopes::HOLD;
    }
    // Light only when no entry is one a report corrects (as `AdmitRequest::light_meta`).
    admit.light = quotas.iter().all(|q| {
        matches!(
            q.kind,
            QuotaKind::RequestsPerMinute | QuotaKind::RequestsPerDay
        )
    });
    let mut args = admit.to_strings();
    for q in quotas {
        args.extend(AdmitQuotaArgs::new(q).to_strings());
    }
    redis_benchmark_evalsha(
        url_port,
        source::ADMIT,
        (&keys, &args),
        &prefix,
        requests,
        RANDOM_TOKENS,
    )
}

/// `-r` of redis-benchmark for a fresh lease token per call (`__rand_int__`).
const RANDOM_TOKENS: u64 = 1_000_000_000_000;

/// The concurrency limit of the window script's bench with a slot: its calls' lease
/// tokens are `SLOT_LIMIT - 1` values (`__rand_int__` under `-r`), so the lease set holds
/// that many live leases, as a key with that many requests in flight whose reports free
/// their slots: every call counts them and adds one (here: moves one's expiry), and none
/// is refused.
const SLOT_LIMIT: i64 = 5;

/// `lua/admit_window.lua`'s arguments as keyward passes them for the bench key, under a
/// concurrency limit `concurrency` (0: none) with lease token `token`.
fn window_args(concurrency: i64, token: &str) -> Vec<String> {
    let admit = admit_args(token);
    AdmitWindowArgs {
        rpm_limit: admit.rpm_limit,
        tpm_limit: admit.tpm_limit,
        tokens: admit.tokens,
        lease_ttl_ms: admit.lease_ttl_ms,
        time_shift_ms: 0,
        now_ms: 0,
        concurrency_limit: concurrency,
        lease_token: admit.lease_token,
    }
    .to_strings()
}

/// `lua/admit_window.lua` as keyward calls it for the bench key (light, no quota entry):
/// its calls per second from `redis-benchmark`. With `slot`, under a concurrency limit
/// ([`SLOT_LIMIT`]).
fn redis_benchmark_window(url_port: u16, requests: u64, slot: bool) -> Option<f64> {
    let prefix = format!("bench-window-{}", std::process::id());
    let keys = AdmitWindowKeys::new(&KeySpace::new(&prefix, 1), 0, "bench");
    let args = window_args(if slot { SLOT_LIMIT } else { 0 }, "__rand_int__");
    redis_benchmark_evalsha(
        url_port,
        source::ADMIT_WINDOW,
        (&keys.to_strings(), &args),
        &prefix,
        requests,
        if slot {
            SLOT_LIMIT as u64 - 1
        } else {
            RANDOM_TOKENS
        },
    )
}

/// `requests` EVALSHA calls of `script` from `redis-benchmark` (CONCURRENCY clients), with
/// its keys and arguments (`__rand_int__` in them: a number below `random`); then every
/// key under `prefix` is dropped. Its calls per second.
fn redis_benchmark_evalsha(
    url_port: u16,
    script: &str,
    (keys, args): (&[String], &[String]),
    prefix: &str,
    requests: u64,
    random: u64,
) -> Option<f64> {
    let sha = {
        let out = Command::new("redis-cli")
            .args(["-p", &url_port.to_string(), "SCRIPT", "LOAD", script])
            .output()
            .ok()?;
        String::from_utf8(out.stdout).ok()?.trim().to_string()
    };
    let mut line: Vec<String> = vec![
        "-p".into(),
        url_port.to_string(),
        "-c".into(),
        CONCURRENCY.to_string(),
        "-n".into(),
        requests.to_string(),
        "-r".into(),
        random.to_string(),
        "--csv".into(),
        "EVALSHA".into(),
        sha,
        keys.len().to_string(),
    ];
    line.extend(keys.iter().cloned());
    line.extend(args.iter().cloned());
    let out = Command::new("redis-benchmark").args(&line).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The script names some counters itself: drop everything under the prefix.
    support::drop_redis_keys(url_port, prefix);
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

/// Both open loops on one server, measuring the process `pid` (if it is one of its own)
/// and the Redis nodes `redis`; returns the evenly paced one.
async fn open_loops(
    label: &str,
    port: u16,
    secret: &str,
    pid: Option<u32>,
    redis: &[u16],
    summary: &mut Summary,
) -> Run {
    let mut even = None;
    for arrivals in [Arrivals::Even, Arrivals::Poisson] {
        let probe = Probe::start(pid, redis);
        let run = open_loop(arrivals, port, secret, OPEN_LOOP_RPS, SECONDS).await;
        let name = format!("{label}, {} {OPEN_LOOP_RPS}/s", arrivals.name());
        add(summary, &name, &run, probe);
        even.get_or_insert(run);
    }
    even.unwrap()
}

/// Prints the running row of `run` and adds it, with what `probe` measured, to `summary`.
fn add(summary: &mut Summary, name: &str, run: &Run, probe: Probe) {
    let cost = probe.finish(run.latencies_us.len());
    row(name, run);
    let lag = (!run.lag_us.is_empty()).then(|| support::percentile(&run.lag_us, 0.99));
    let p99 = support::percentile(&run.latencies_us, 0.99);
    summary.add(name, run.rate, (Some(p99), lag), cost);
}

/// A saturation run measured by a [`Probe`] on keyward and `redis`.
async fn measured(
    name: &str,
    k: &Keyward,
    redis: &[u16],
    summary: &mut Summary,
    secrets: &[String],
    select: bool,
) -> Run {
    saturate(k.data, secrets, select, 1).await; // warm-up
    let probe = Probe::start(Some(k.pid()), redis);
    let run = saturate(k.data, secrets, select, SECONDS).await;
    add(summary, name, &run, probe);
    run
}

/// Every run on one keyward whose Redis nodes are `redis` (none: embedded); returns the
/// plain single-key saturation run.
async fn runs(shape: &str, k: &Keyward, redis: &[u16], summary: &mut Summary) -> Run {
    let one = vec![create_key(k).await];
    saturate(k.data, &one, false, 1).await; // warm-up
    let pid = Some(k.pid());
    if open_loop_only() {
        return open_loops(
            &format!("{shape}, 1 key"),
            k.data,
            &one[0],
            pid,
            redis,
            summary,
        )
        .await;
    }
    support::create_pool(k, "bench", pool_size()).await;
    let label = format!("{shape}, 1 key, saturation");
    let sat = measured(&label, k, redis, summary, &one, false).await;
    open_loops(
        &format!("{shape}, 1 key"),
        k.data,
        &one[0],
        pid,
        redis,
        summary,
    )
    .await;
    let label = format!("{shape}, 1 key, select of {}", pool_size());
    measured(&label, k, redis, summary, &one, true).await;

    let many = create_keys(k, many_keys()).await;
    warm(k.data, &many).await;
    let n = many.len();
    let label = format!("{shape}, {n} keys, saturation");
    measured(&label, k, redis, summary, &many, false).await;
    let label = format!("{shape}, {n} keys, select of {}", pool_size());
    measured(&label, k, redis, summary, &many, true).await;
    sat
}

/// The floors of the open loop beside keyward's Redis shape (already run), and keyward's
/// p99 over the bare HTTP+EVALSHA floor's (target: at most 0.3 ms).
async fn floors(redis_url: &str, redis_port: u16, summary: &mut Summary) {
    let redis = [redis_port];
    open_loops(
        "bare HTTP+EVALSHA",
        bare_server(redis_url),
        "-",
        None,
        &redis,
        summary,
    )
    .await;
    for arrivals in [Arrivals::Even, Arrivals::Poisson] {
        let probe = Probe::start(None, &redis);
        let run = open_loop_evalsha(arrivals, redis_url, OPEN_LOOP_RPS, SECONDS).await;
        let name = format!("EVALSHA, {} {OPEN_LOOP_RPS}/s", arrivals.name());
        add(summary, &name, &run, probe);
    }
    for arrivals in [Arrivals::Even, Arrivals::Poisson] {
        let suffix = format!("{} {OPEN_LOOP_RPS}/s", arrivals.name());
        let p99 = |name: String| {
            let r = summary.get(&name)?;
            Some((r.p99_ms?, r.lag_p99_ms.unwrap_or(0.0)))
        };
        let (Some((k, k_lag)), Some((floor, floor_lag))) = (
            p99(format!("redis, 1 key, {suffix}")),
            p99(format!("bare HTTP+EVALSHA, {suffix}")),
        ) else {
            continue;
        };
        // A pacer more than a millisecond late at p99 did not offer the load asked for:
        // the machine was too busy, and the difference says nothing about keyward.
        let verdict = if k_lag.max(floor_lag) > 1.0 {
            format!("not measured: the pacer's p99 lag was {k_lag:.1} / {floor_lag:.1} ms, the machine could not keep the schedule")
        } else if k - floor <= 0.3 {
            "met".to_string()
        } else {
            "not met".to_string()
        };
        summary.line(format!(
            "p99 over its floor, {suffix}: keyward {k:.3} ms - bare HTTP+EVALSHA {floor:.3} ms = **{:.3} ms** (target <= 0.3 ms: {verdict})",
            k - floor
        ));
    }
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

/// `KEYWARD_BENCH_ONLY`: a comma-separated list of the parts to run (unset: all of them):
/// `embedded`, `redis` (each shape's runs, with their open loops; `redis` also runs the
/// floors), `floor` (only the Redis shape's open loops and the floors: keyward's p99
/// over its floor), `scripts` (admit.lua, admit_window.lua, reference.lua and the cost
/// ladder from redis-benchmark),
/// `hyper` (the embedded shape beside a bare hyper server), `limitador`, `lifecycle`
/// (admit+report, per script, and the fleet model), `cluster`, `hot` (one key, one pool
/// on the cluster), `scopes`. Alone, `open`, `redis-open`, `scopes` and `scopes-script` keep their meaning.
fn part(name: &str) -> bool {
    std::env::var("KEYWARD_BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p.trim() == name))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("bare-hyper") {
        yardsticks::serve_bare_hyper(args[2].parse().unwrap());
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("admit bench: skipped (run it with `cargo bench --bench admit`)");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

async fn bench() {
    // A Redis of the bench's own unless one is named: RESETSTAT and INFO then see only
    // the bench's own commands.
    let private;
    let redis_port: u16 = match std::env::var("KEYWARD_BENCH_REDIS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        Some(port) => port,
        None => {
            private = support::private_redis::PrivateRedis::start().await;
            private.port
        }
    };
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
    let mut summary = Summary::default();
    let redis = [redis_port];

    let open = open_loop_only();
    if redis_open_loop_only() || (part("floor") && !part("redis") && !open) {
        let k = start(Some((&redis_url, &prefix))).await;
        let one = vec![create_key(&k).await];
        saturate(k.data, &one, false, 1).await; // warm-up
        open_loops(
            "redis, 1 key",
            k.data,
            &one[0],
            Some(k.pid()),
            &redis,
            &mut summary,
        )
        .await;
        if redis_open_loop_only() {
            return;
        }
    }
    if open || part("embedded") {
        runs("embedded", &start(None).await, &[], &mut summary).await;
    }
    if open || part("redis") {
        let k = start(Some((&redis_url, &prefix))).await;
        runs("redis", &k, &redis, &mut summary).await;
    }
    if open || part("redis") || part("floor") {
        floors(&redis_url, redis_port, &mut summary).await;
    }
    support::drop_redis_keys(redis_port, &prefix);
    if open {
        summary.print();
        return;
    }
    if part("scripts") {
        println!();
        yardsticks::scripts(redis_port, &mut summary);
    }
    if part("hyper") {
        if summary.get("embedded, 1 key, saturation").is_none() {
            let k = start(None).await;
            let one = vec![create_key(&k).await];
            let name = "embedded, 1 key, saturation";
            measured(name, &k, &[], &mut summary, &one, false).await;
        }
        yardsticks::bare_hyper(&mut summary).await;
    }
    if part("limitador") {
        limitador::run(redis_port, &mut summary).await;
    }
    if part("lifecycle") {
        let prefix = format!("{prefix}-lifecycle");
        let k = start(Some((&redis_url, &prefix))).await;
        lifecycle::run(&k, redis_port, &mut summary).await;
        drop(k);
        support::drop_redis_keys(redis_port, &prefix);
        fleet::model(&mut summary);
    }
    if part("cluster") {
        cluster::run(&mut summary).await;
    }
    if part("hot") {
        hot::run(&mut summary).await;
    }
    if part("scopes") {
        println!();
        scopes::run(redis_port).await;
    }
    println!();
    yardsticks::ratios(&mut summary);
    summary.print();
}
