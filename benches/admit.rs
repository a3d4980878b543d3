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
//! - Open loop: a fixed offered load (`OPEN_LOOP_RPS`) paced by a schedule; p50, p99,
//!   p99.9 of each request from its send, and beside them the p99 lag of sends behind the
//!   schedule. Tokio's timer has 1 ms resolution, so timing from the due instant would add
//!   up to 1 ms of timer slack to every request; a server stall instead shows up as lag
//!   (the generator cannot send while it waits), so the two columns together hide
//!   nothing.
//!
//! keyward runs as its own process (the release binary); the load generator is a minimal
//! HTTP/1.1 client so it takes as little of the shared CPU as it can. Everything shares
//! the machine: compare ratios, not absolute numbers. The key has RPM and TPM limits
//! too high to be reached, so every window is read and written on every decision.
//!
//! Under `cargo test` (no `--bench` argument) it does nothing.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Keyward, TOKEN};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Adds `n` provider keys of equal priority (limits too high to be reached) for `bench`.
async fn create_pool(k: &Keyward, n: usize) {
    let client = reqwest::Client::new();
    for i in 0..n {
        let body = serde_json::json!({"label": format!("k{i}"), "value": format!("sk-bench-{i:04}"),
                                      "max_rpm": 1_000_000_000i64, "max_tpm": 1_000_000_000_000i64});
        let status = client
            .post(format!(
                "http://127.0.0.1:{}/admin/providers/bench/keys",
                k.admin
            ))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
    }
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
                    secrets.push(create_key_at(&client, admin).await);
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
    create_key_at(&reqwest::Client::new(), k.admin).await
}

/// A key whose limits are too high to be reached, so every window is read and written.
async fn create_key_at(client: &reqwest::Client, admin: u16) -> String {
    let body = serde_json::json!({"rate_limit": 1_000_000_000_000i64, "tpm_limit": 1_000_000_000_000i64,
                                  "concurrent_limit": null});
    support::create_key(client, admin, &body).await
}

/// One keep-alive HTTP/1.1 connection that sends a fixed request.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Sends `request`, reads the whole answer, returns its status.
    async fn call(&mut self, request: &[u8]) -> u16 {
        self.stream.write_all(request).await.unwrap();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap();
                let status: u16 = head[9..12].parse().unwrap();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                let total = end + 4 + length;
                while self.buf.len() < total {
                    self.read().await;
                }
                self.buf.drain(..total);
                return status;
            }
            self.read().await;
        }
    }

    async fn read(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&chunk[..n]);
    }
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

/// The `p` quantile of sorted microseconds, in milliseconds.
fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

/// Closed loop: every connection sends as fast as answers come back, rotating over
/// the keys (connection `w` starts at key `w`).
async fn saturate(port: u16, secrets: &[String], select: bool, seconds: u64) -> Run {
    let requests: std::sync::Arc<Vec<Vec<u8>>> = std::sync::Arc::new(
        secrets
            .iter()
            .map(|s| admit_request(port, s, select))
            .collect(),
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut conn = Conn::open(port).await;
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
                let mut conn = Conn::open(port).await;
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

/// Open loop at `rps`: requests sent on a fixed schedule.
async fn open_loop(port: u16, secret: &str, rps: u64, seconds: u64) -> Run {
    let request = admit_request(port, secret, false);
    let start = Instant::now() + Duration::from_millis(100);
    let per_worker = Duration::from_nanos(1_000_000_000 * CONCURRENCY as u64 / rps);
    let total = rps * seconds / CONCURRENCY as u64;
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut conn = Conn::open(port).await;
                let offset = per_worker * w as u32 / CONCURRENCY as u32;
                let (mut lat, mut lag, mut errors) = (
                    Vec::with_capacity(total as usize),
                    Vec::with_capacity(total as usize),
                    0,
                );
                for i in 0..total {
                    let due = start + offset + per_worker * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                    let sent = Instant::now();
                    if conn.call(&request).await != 200 {
                        errors += 1;
                    }
                    lat.push(sent.elapsed().as_micros() as u64);
                    lag.push(sent.saturating_duration_since(due).as_micros() as u64);
                }
                (lat, lag, errors)
            })
        })
        .collect();
    collect(workers, seconds).await
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

/// EVALSHA of the admission script straight from redis-benchmark, same concurrency.
fn evalsha_ceiling(url_port: u16, seconds: u64) -> Option<f64> {
    let script = include_str!("../lua/admit.lua");
    let sha = {
        let out = Command::new("redis-cli")
            .args(["-p", &url_port.to_string(), "SCRIPT", "LOAD", script])
            .output()
            .ok()?;
        String::from_utf8(out.stdout).ok()?.trim().to_string()
    };
    let prefix = format!("{{bench-ceiling-{}}}", std::process::id());
    let keys: Vec<String> = ["rpm", "tpm", "leases", "ld", "bal", "def", "order"]
        .iter()
        .map(|k| format!("{prefix}:{k}"))
        .collect();
    // About as many calls as keyward would make in `seconds` at this rate.
    let requests = (80_000 * seconds).to_string();
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
        "7".into(),
    ];
    args.extend(keys.iter().cloned());
    args.extend(
        [
            "1000000000000",
            "1000000000000",
            "0",
            "100",
            "__rand_int__",
            "5000",
            "||gpt-4o|",
            "0",
            "0",
            "0",
            "0",
            "0",
            "1",
            "",
        ]
        .map(String::from),
    );
    let out = Command::new("redis-benchmark").args(&args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = Command::new("redis-cli")
        .args(["-p", &url_port.to_string(), "DEL"])
        .args(&keys)
        .output();
    // CSV: "test","rps",...
    text.lines()
        .filter_map(|l| l.split(',').nth(1))
        .filter_map(|v| v.trim_matches('"').parse::<f64>().ok())
        .next()
}

/// Every run on one keyward; returns the plain single-key saturation run.
async fn runs(shape: &str, k: &Keyward) -> Run {
    let one = vec![create_key(k).await];
    create_pool(k, pool_size()).await;
    saturate(k.data, &one, false, 1).await; // warm-up
    let sat = saturate(k.data, &one, false, SECONDS).await;
    row(&format!("{shape}, 1 key, saturation"), &sat);
    let open = open_loop(k.data, &one[0], OPEN_LOOP_RPS, SECONDS).await;
    row(
        &format!("{shape}, 1 key, open loop {OPEN_LOOP_RPS}/s"),
        &open,
    );
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
        format!("{:.3}", percentile(&run.lag_us, 0.99))
    };
    println!(
        "| {name:<32} | {:>11.0} | {:>6.3} | {:>6.3} | {:>8.3} | {lag:>10} | {:>6} |",
        run.rate,
        percentile(&run.latencies_us, 0.50),
        percentile(&run.latencies_us, 0.99),
        percentile(&run.latencies_us, 0.999),
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
    println!(
        "keyward admit benchmark: {CONCURRENCY} connections, {SECONDS} s per run, 2 shared cores\n"
    );
    println!("| run                              | decisions/s | p50 ms | p99 ms | p99.9 ms | lag p99 ms | errors |");
    println!("|----------------------------------|------------:|-------:|-------:|---------:|-----------:|-------:|");

    let emb_sat = runs("embedded", &start(None).await).await;
    let red_sat = runs("redis", &start(Some((&redis_url, &prefix))).await).await;
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -p {redis_port} --scan --pattern '{{{prefix}}}*' | xargs -r redis-cli -p {redis_port} DEL > /dev/null"
        ))
        .status();

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
}
