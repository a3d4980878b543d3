//! What keyward is measured against, beside it in the same run:
//!
//! - **scripts**: `redis-benchmark` at the same concurrency running EVALSHA of
//!   `lua/admit.lua` (the ceiling: keyward's arguments, a fresh lease token per call), of
//!   `lua/admit_window.lua` (the common key's: its windows alone, then with a
//!   concurrency limit's slot) and of `benches/reference.lua` (a one-counter exact sliding window: the least a Redis
//!   rate limiter's decision can cost Redis); Redis's time per call from `INFO
//!   commandstats`, its CPU from `INFO cpu`. Then the Redis cost ladder (`ladder.rs`).
//! - **bare hyper**: this bench binary run again as `<bench> bare-hyper <port>`, a hyper
//!   HTTP/1.1 server that reads each request's body and answers a fixed small JSON, and
//!   nothing else: its CPU per request (its own process, `/proc`) under the same
//!   saturation as keyward's is the floor of any sidecar on this HTTP stack.
//! - **Limitador** (`limitador.rs`, when `LIMITADOR_BIN` is set).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::measure::{Cost, Probe, RedisCost, Summary};
use crate::support;
use crate::{saturate_with, CONCURRENCY, SECONDS};

/// The reference script's source (KEYS: the window; ARGV: the limit; its header).
const REFERENCE: &str = include_str!("../reference.lua");

/// redis-benchmark calls for each script (about 5 to 10 s on this machine).
pub const SCRIPT_CALLS: u64 = 150_000;

/// The ceiling and the reference script, one after the other at [`CONCURRENCY`] clients.
pub fn scripts(redis_port: u16, summary: &mut Summary) {
    let probe = Probe::start(None, &[redis_port]);
    match crate::redis_benchmark_admit(redis_port, &[], SCRIPT_CALLS) {
        Some(rate) => {
            let cost = probe.finish(SCRIPT_CALLS as usize);
            print_script("admit.lua (redis-benchmark)", rate, &cost);
            summary.add("admit.lua via redis-benchmark", rate, (None, None), cost);
        }
        None => {
            summary.line("scripts: redis-benchmark not available");
            return;
        }
    }
    for (slot, name) in [
        (false, "admit_window.lua via redis-benchmark"),
        (true, "admit_window.lua with a slot via redis-benchmark"),
    ] {
        let probe = Probe::start(None, &[redis_port]);
        if let Some(rate) = crate::redis_benchmark_window(redis_port, SCRIPT_CALLS, slot) {
            let cost = probe.finish(SCRIPT_CALLS as usize);
            print_script(name, rate, &cost);
            summary.add(name, rate, (None, None), cost);
        }
    }
    let probe = Probe::start(None, &[redis_port]);
    if let Some(rate) = reference_benchmark(redis_port, SCRIPT_CALLS) {
        let cost = probe.finish(SCRIPT_CALLS as usize);
        print_script("reference.lua (redis-benchmark)", rate, &cost);
        summary.add(
            "reference.lua via redis-benchmark",
            rate,
            (None, None),
            cost,
        );
    }
    crate::ladder::run(redis_port, summary);
}

fn print_script(name: &str, rate: f64, cost: &Cost) {
    let r = cost.redis.clone().unwrap_or_default();
    println!(
        "{name}, {CONCURRENCY} clients: {rate:.0} calls/s, Redis {:.1} µs/call (commandstats), {:.1} µs CPU/call (INFO cpu)",
        r.us_per_call, r.cpu_us
    );
}

/// `requests` EVALSHA calls of `benches/reference.lua` on one counter whose limit is too
/// high to be reached; calls per second.
fn reference_benchmark(redis_port: u16, requests: u64) -> Option<f64> {
    let port = redis_port.to_string();
    let out = Command::new("redis-cli")
        .args(["-p", &port, "SCRIPT", "LOAD", REFERENCE])
        .output()
        .ok()?;
    let sha = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let key = format!("{{bench-reference-{}}}:w", std::process::id());
    let out = Command::new("redis-benchmark")
        .args(["-p", &port, "-c", &CONCURRENCY.to_string()])
        .args(["-n", &requests.to_string(), "--csv", "EVALSHA", &sha, "1"])
        .args([key.as_str(), "1000000000000"])
        .output()
        .ok()?;
    let _ = Command::new("redis-cli")
        .args(["-p", &port, "DEL", &key])
        .output();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.split(',').nth(1))
        .filter_map(|v| v.trim_matches('"').parse::<f64>().ok())
        .next()
}

/// A child process killed on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `port` answers `request` with a 200 (at most 20 s).
pub async fn ready(port: u16, request: &[u8]) -> bool {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let mut conn = support::Conn::open(port).await;
            return conn.call(request).await == 200;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Saturates `port` with `request` for [`SECONDS`] and measures the process `pid` and
/// the Redis nodes `redis`; prints the running row, adds the summary row.
pub async fn saturate_measured(
    name: &str,
    port: u16,
    request: &[u8],
    pid: u32,
    redis: &[u16],
    summary: &mut Summary,
) -> Cost {
    saturate_with(port, vec![request.to_vec(); CONCURRENCY], 1).await; // warm-up
    let probe = Probe::start(Some(pid), redis);
    let run = saturate_with(port, vec![request.to_vec(); CONCURRENCY], SECONDS).await;
    let cost = probe.finish(run.latencies_us.len());
    crate::row(name, &run);
    let p99 = support::percentile(&run.latencies_us, 0.99);
    summary.add(name, run.rate, (Some(p99), None), cost.clone());
    cost
}

/// The bare hyper server as its own process, saturated like keyward.
pub async fn bare_hyper(summary: &mut Summary) {
    let port = support::free_port();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["bare-hyper", &port.to_string()])
        .stdout(Stdio::null());
    if let Ok(threads) = std::env::var("KEYWARD_BENCH_SERVER_THREADS") {
        cmd.env("KEYWARD_THREADS", threads);
    }
    let child = Process(cmd.spawn().unwrap());
    let request = crate::admit_request(port, "-", false);
    if !ready(port, &request).await {
        summary.line("bare hyper: did not start");
        return;
    }
    saturate_measured(
        "bare hyper, saturation",
        port,
        &request,
        child.0.id(),
        &[],
        summary,
    )
    .await;
}

/// `<bench> bare-hyper <port>`: a hyper server that reads each body and answers
/// `{"allowed":true}`, on the runtime `KEYWARD_THREADS` gives keyward (one thread
/// unless set), so that it differs from keyward by the work only.
pub fn serve_bare_hyper(port: u16) {
    let raw = std::env::var("KEYWARD_THREADS")
        .map(|t| ("KEYWARD_THREADS", t))
        .into_iter()
        .collect();
    let runtime = keyward::config::Config::from_raw(&raw)
        .unwrap()
        .runtime()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
}

async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<String>, hyper::Error> {
    use hyper::body::Body;
    let mut body = request.into_body();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        frame?;
    }
    Ok(hyper::Response::builder()
        .header("content-type", "application/json")
        .body(r#"{"allowed":true}"#.to_string())
        .unwrap())
}

/// keyward's Redis cost per decision against the reference script's per call,
/// keyward's CPU against the bare hyper server's, and keyward against Limitador.
pub fn ratios(summary: &mut Summary) {
    let redis_of = |name: &str| -> Option<RedisCost> { summary.get(name)?.cost.redis.clone() };
    let mut lines = Vec::new();
    if let Some(reference) = redis_of("reference.lua via redis-benchmark") {
        for name in [
            "redis, 1 key, saturation",
            "redis, 1 key, open loop 5000/s",
            "admit.lua via redis-benchmark",
            "admit_window.lua via redis-benchmark",
            "admit_window.lua with a slot via redis-benchmark",
        ] {
            if let Some(k) = redis_of(name) {
                lines.push(format!(
                    "keyward Redis per decision ({name}) / reference.lua per call: script time {:.1} / {:.1} µs = **{:.2}x**; Redis CPU {:.1} / {:.1} µs = {:.2}x",
                    k.scripts_us, reference.us_per_call, k.scripts_us / reference.us_per_call,
                    k.cpu_us, reference.cpu_us, k.cpu_us / reference.cpu_us,
                ));
            }
        }
    }
    let hyper = summary
        .get("bare hyper, saturation")
        .and_then(|r| r.cost.sidecar_us);
    if let Some(hyper) = hyper {
        for name in ["embedded, 1 key, saturation", "redis, 1 key, saturation"] {
            if let Some(k) = summary.get(name).and_then(|r| r.cost.sidecar_us) {
                lines.push(format!(
                    "keyward sidecar CPU µs/decision ({name}) / bare hyper µs/request: {k:.1} / {hyper:.1} = **{:.2}x**",
                    k / hyper
                ));
            }
        }
    }
    let rate = |name: &str| summary.get(name).map(|r| r.rate);
    if let (Some(k), Some(c)) = (
        rate("redis, 1 key, saturation"),
        rate("admit.lua via redis-benchmark"),
    ) {
        lines.push(format!(
            "redis shape / EVALSHA ceiling (admit.lua): {k:.0} / {c:.0} = {:.0}%",
            100.0 * k / c
        ));
    }
    if let (Some(e), Some(r)) = (
        rate("embedded, 1 key, saturation"),
        rate("redis, 1 key, saturation"),
    ) {
        lines.push(format!(
            "embedded / redis shape: {e:.0} / {r:.0} = {:.0}%",
            100.0 * e / r
        ));
    }
    crate::limitador::ratios(summary, &mut lines);
    for l in lines {
        summary.line(l);
    }
}
