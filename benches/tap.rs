//! `cargo bench --bench tap`: what the usage tap costs.
//!
//! - **report**: keyward's CPU time per report, read from `/proc/<pid>/stat` (user +
//!   system) around 5,000 reports (`KEYWARD_BENCH_REPORTS`) sent over [`CONNECTIONS`]
//!   keep-alive connections, for a plain `/v1/report` with tokens, a
//!   `/v1/report/upstream` carrying a 4 KiB OpenAI chat answer (head only, complete),
//!   one carrying a 200 KiB OpenAI stream (64 KiB head and 64 KiB tail, not complete),
//!   and the same on a path whose usage keyward does not read (so the parser's share
//!   shows). Each report settles a lease admitted beforehand (admissions are not
//!   measured). keyward's writer (SQLite) runs in the same process, so its work for
//!   each report counts: the CPU is read once keyward is quiet again. Embedded shape,
//!   then Redis shape (127.0.0.1:6379, `KEYWARD_BENCH_REDIS_PORT`).
//! - **proxy**: time to the first and to the last byte of the answer through Envoy and
//!   nginx running the shipped files, with and without the tap (see
//!   [`support::shipped`]), and straight from the stub upstream, for a 4 KiB JSON answer
//!   and a stream of [`SSE_CHUNKS`] chunks [`SSE_GAP_MS`] apart (usage last). Requests go
//!   one at a time, round robin over the paths, so a machine whose speed drifts slows
//!   every path alike.
//!
//! `KEYWARD_BENCH_ONLY=report` (or `proxy`) runs one part; `KEYWARD_BENCH_REPORTS`,
//! `KEYWARD_BENCH_JSON_REQUESTS` and `KEYWARD_BENCH_SSE_REQUESTS` change the counts.
//! Under `cargo test` (no `--bench` argument) it does nothing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::{shipped, Keyward};

const CONNECTIONS: usize = 4;
const SSE_CHUNKS: usize = 20;
const SSE_GAP_MS: u64 = 5;
/// The bound of each of `head` and `tail` (`src/reporting/upstream.rs`).
const PART: usize = 64 * 1024;
/// Prose for the answers' text (a stream sends it a word or two per event, as the APIs do).
const PROSE: &str = "The quarterly figures show steady growth in every region, with the \
strongest gains in subscription revenue and a modest decline in hardware sales. Operating \
costs rose less than expected, largely because of lower logistics spending, and the team \
expects the trend to continue into the next period. ";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `part` runs: every part, or those `KEYWARD_BENCH_ONLY` names (comma-separated).
fn selected(part: &str) -> bool {
    std::env::var("KEYWARD_BENCH_ONLY").map_or(true, |only| only.split(',').any(|p| p == part))
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/usage/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path).unwrap()
}

fn prose(len: usize) -> String {
    PROSE.chars().cycle().take(len).collect()
}

/// The OpenAI chat fixture with its message padded with prose to `bytes` in all.
fn json_answer(bytes: usize) -> Vec<u8> {
    let mut answer: Value = serde_json::from_str(&fixture("openai_chat.json")).unwrap();
    answer["choices"][0]["message"]["content"] = json!("");
    let bare = serde_json::to_vec(&answer).unwrap().len();
    answer["choices"][0]["message"]["content"] = json!(prose(bytes.saturating_sub(bare)));
    serde_json::to_vec(&answer).unwrap()
}

/// An OpenAI chat stream as its events: the fixture's first event, `text_events` events
/// of a few words each, then the fixture's last three (finish, usage, `[DONE]`).
fn sse_events(text_events: usize) -> Vec<Vec<u8>> {
    let fixture = fixture("openai_chat.sse");
    let events: Vec<&str> = fixture
        .split_inclusive("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    let mut out = vec![events[0].as_bytes().to_vec()];
    let mut words = PROSE.split_inclusive(' ').cycle();
    for _ in 0..text_events {
        let delta = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                           "model": "gpt-4o-mini",
                           "choices": [{"index": 0, "delta": {"content": words.next().unwrap()},
                                        "finish_reason": null}],
                           "usage": null});
        out.push(format!("data: {delta}\n\n").into_bytes());
    }
    out.extend(
        events[events.len() - 3..]
            .iter()
            .map(|e| e.as_bytes().to_vec()),
    );
    out
}

/// An OpenAI chat stream of at least `bytes`.
fn sse_answer(bytes: usize) -> Vec<u8> {
    let per_event = sse_events(1)[1].len();
    sse_events(bytes / per_event).concat()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const CHAT: &str = "/v1/chat/completions";

/// The body of `/v1/report/upstream` for `answer`, cut as a proxy cuts it: the whole
/// answer as head when it fits, else its first and last [`PART`] bytes.
fn upstream_report(answer: &[u8], path: &str) -> Vec<u8> {
    let complete = answer.len() <= PART;
    let (head, tail) = match complete {
        true => (answer, &answer[..0]),
        false => (&answer[..PART], &answer[answer.len() - PART..]),
    };
    serde_json::to_vec(&json!({
        "status": 200, "path": path,
        "headers": {"x-ratelimit-remaining-requests": "9999", "x-ratelimit-remaining-tokens": "1999000",
                    "x-ratelimit-reset-requests": "6ms", "x-ratelimit-reset-tokens": "30ms"},
        "head": b64(head), "tail": b64(tail), "complete": complete, "latency_ms": 812,
    }))
    .unwrap()
}

// ---------------------------------------------------------------------------------
// Report CPU

/// One kind of report: how its request is built from a lease.
enum Report {
    /// `/v1/report` with tokens, the lease in the body.
    Plain,
    /// `/v1/report/upstream` with this body, the lease in `x-keyward-lease`.
    Upstream { name: &'static str, body: Vec<u8> },
}

impl Report {
    fn name(&self) -> &'static str {
        match self {
            Self::Plain => "/v1/report, tokens",
            Self::Upstream { name, .. } => name,
        }
    }

    fn request(&self, port: u16, lease: &str, out: &mut Vec<u8>) {
        out.clear();
        let (path, lease_header, body) = match self {
            Self::Plain => (
                "/v1/report",
                String::new(),
                std::borrow::Cow::Owned(
                    format!(
                        r#"{{"lease_id":"{lease}","prompt_tokens":1117,"completion_tokens":46,"upstream_status":200,"latency_ms":812}}"#
                    )
                    .into_bytes(),
                ),
            ),
            Self::Upstream { body, .. } => (
                "/v1/report/upstream",
                format!("x-keyward-lease: {lease}\r\n"),
                std::borrow::Cow::Borrowed(body),
            ),
        };
        out.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n{lease_header}content-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&body);
    }
}

/// keyward's CPU ticks once it has been idle (no tick) for 300 ms, at most 5 s: its
/// writer settles reports after answering them.
async fn ticks_when_quiet(pid: u32) -> u64 {
    let mut last = support::cpu_ticks(pid);
    let mut still = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = support::cpu_ticks(pid);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still == 3 {
            break;
        }
    }
    last
}

/// The value of `keyward_upstream_usage_total{outcome="parsed"}`.
async fn parsed_so_far(k: &Keyward) -> u64 {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", k.data))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("keyward_upstream_usage_total{outcome=\"parsed\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// `n` leases of `secret`, each with a provider key picked from the `openai` pool.
async fn admit(port: u16, secret: &str, n: usize) -> Vec<String> {
    let body = format!(
        r#"{{"key":"{secret}","model":"gpt-4o","estimated_tokens":100,"provider":"openai","select":true}}"#
    );
    let request = format!(
        "POST /v1/admit HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut conn = support::Conn::open(port).await;
                let mut leases = Vec::new();
                for _ in (c..n).step_by(CONNECTIONS) {
                    let (status, body) = conn.call_body(&request).await;
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    leases.push(body["lease_id"].as_str().unwrap().to_string());
                }
                leases
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

struct Measured {
    /// The size of one request, head and body.
    request_bytes: usize,
    cpu_us: f64,
    rate: f64,
    latencies_us: Vec<u64>,
    errors: usize,
    parsed: u64,
}

/// Sends one `report` per lease over [`CONNECTIONS`] connections; keyward's CPU for them.
async fn reports(k: &Keyward, leases: Vec<String>, report: &std::sync::Arc<Report>) -> Measured {
    let (port, pid) = (k.data, k.pid());
    let parsed_before = parsed_so_far(k).await;
    let n = leases.len();
    let mut shares: Vec<Vec<String>> = vec![Vec::new(); CONNECTIONS];
    for (i, lease) in leases.into_iter().enumerate() {
        shares[i % CONNECTIONS].push(lease);
    }
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(support::Conn::open(port).await);
    }
    let mut request = Vec::new();
    report.request(port, &shares[0][0], &mut request);
    let request_bytes = request.len();
    let before = ticks_when_quiet(pid).await;
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(shares)
        .map(|(mut conn, share)| {
            let report = report.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let (mut latencies, mut errors) = (Vec::with_capacity(share.len()), 0);
                for lease in share {
                    report.request(port, &lease, &mut request);
                    let sent = Instant::now();
                    if conn.call(&request).await != 200 {
                        errors += 1;
                    }
                    latencies.push(sent.elapsed().as_micros() as u64);
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies_us, mut errors) = (Vec::with_capacity(n), 0);
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies_us.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    let after = ticks_when_quiet(pid).await;
    latencies_us.sort_unstable();
    Measured {
        request_bytes,
        cpu_us: (after - before) as f64 * 1e6 / support::clock_ticks_per_s() as f64 / n as f64,
        rate: n as f64 / elapsed.as_secs_f64(),
        latencies_us,
        errors,
        parsed: parsed_so_far(k).await - parsed_before,
    }
}

async fn report_cpu(shape: &str, k: &Keyward) {
    let n = setting("KEYWARD_BENCH_REPORTS", 5_000);
    let client = reqwest::Client::new();
    let secret = support::unlimited_key(&client, k.admin).await;
    support::create_pool(k, "openai", 1).await;
    let json = json_answer(4 * 1024);
    let sse = sse_answer(200 * 1024);
    let kinds = [
        Report::Plain,
        Report::Upstream {
            name: "/v1/report/upstream, 4 KiB JSON",
            body: upstream_report(&json, CHAT),
        },
        Report::Upstream {
            name: "/v1/report/upstream, 200 KiB SSE",
            body: upstream_report(&sse, CHAT),
        },
        // The same excerpt on a path whose usage keyward does not read: what decoding
        // costs without the parser.
        Report::Upstream {
            name: "/v1/report/upstream, 200 KiB, no parse",
            body: upstream_report(&sse, "/v1/models"),
        },
    ]
    .map(std::sync::Arc::new);
    // A warm-up of each kind (the first reports open the writer's statements).
    for report in &kinds {
        let leases = admit(k.data, &secret, 200).await;
        reports(k, leases, report).await;
    }
    let mut plain_cpu = f64::NAN;
    for report in &kinds {
        let name = report.name();
        let leases = admit(k.data, &secret, n).await;
        let m = reports(k, leases, report).await;
        if matches!(**report, Report::Plain) {
            plain_cpu = m.cpu_us;
        }
        let parsed = match **report {
            Report::Plain => "-".to_string(),
            Report::Upstream { .. } => format!("{}/{n}", m.parsed),
        };
        println!(
            "| {shape:<8} | {name:<38} | {:>7.1} | {:>9.0} | {:>6.3} | {:>6.3} | {:>10.0} | {:>8.2} | {parsed:>11} | {:>6} |",
            m.request_bytes as f64 / 1024.0,
            m.rate,
            support::percentile(&m.latencies_us, 0.50),
            support::percentile(&m.latencies_us, 0.99),
            m.cpu_us,
            m.cpu_us / plain_cpu,
            m.errors,
        );
    }
}

// ---------------------------------------------------------------------------------
// Proxy latency

/// The stub upstream: a 4 KiB OpenAI chat answer, or with `x-bench-stream` an OpenAI
/// stream of [`SSE_CHUNKS`] chunks [`SSE_GAP_MS`] apart, its usage in the last.
async fn stub() -> u16 {
    let json = json_answer(4 * 1024);
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let json = json.clone();
        async move {
            if headers.get("x-bench-stream").is_none() {
                return axum::response::Response::builder()
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(json))
                    .unwrap();
            }
            let mut chunks = sse_events(SSE_CHUNKS - 3);
            // The usage and `[DONE]` travel in one chunk, the last.
            let done = chunks.pop().unwrap();
            chunks.last_mut().unwrap().extend(done);
            let stream = futures_util::stream::unfold(
                (chunks.into_iter(), true),
                |(mut it, first)| async move {
                    let chunk = it.next()?;
                    if !first {
                        tokio::time::sleep(Duration::from_millis(SSE_GAP_MS)).await;
                    }
                    Some((Ok::<_, std::io::Error>(chunk), (it, false)))
                },
            );
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(stream))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// Microseconds to the answer's first body byte and to its last, or `None` on an error.
async fn timed(
    client: &reqwest::Client,
    port: u16,
    secret: &str,
    stream: bool,
) -> Option<(u64, u64)> {
    let body = format!(
        r#"{{"model": "gpt-4o", "max_tokens": 50, "stream": {stream}, "messages": [{{"role": "user", "content": "Summarize the quarter."}}]}}"#
    );
    let mut request = client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("authorization", format!("Bearer {secret}"))
        .header("content-type", "application/json")
        .body(body);
    if stream {
        request = request.header("x-bench-stream", "1");
    }
    let started = Instant::now();
    let mut answer = request.send().await.ok()?;
    if answer.status() != 200 {
        return None;
    }
    let mut first = None;
    while let Some(chunk) = answer.chunk().await.ok()? {
        if !chunk.is_empty() && first.is_none() {
            first = Some(started.elapsed().as_micros() as u64);
        }
    }
    Some((first?, started.elapsed().as_micros() as u64))
}

struct Target {
    name: String,
    port: u16,
    json: Timings,
    sse: Timings,
}

#[derive(Default)]
struct Timings {
    first_us: Vec<u64>,
    last_us: Vec<u64>,
    errors: usize,
}

impl Timings {
    fn record(&mut self, t: Option<(u64, u64)>) {
        match t {
            Some((first, last)) => {
                self.first_us.push(first);
                self.last_us.push(last);
            }
            None => self.errors += 1,
        }
    }

    fn sort(&mut self) {
        self.first_us.sort_unstable();
        self.last_us.sort_unstable();
    }

    /// (first p50, first p99, last p50, last p99) in ms.
    fn quantiles(&self) -> [f64; 4] {
        [
            support::percentile(&self.first_us, 0.5),
            support::percentile(&self.first_us, 0.99),
            support::percentile(&self.last_us, 0.5),
            support::percentile(&self.last_us, 0.99),
        ]
    }
}

async fn proxy_latency() {
    let upstream = stub().await;
    let k = support::start(&[]).await;
    let client = reqwest::Client::new();
    let secret = support::unlimited_key(&client, k.admin).await;
    support::create_pool(&k, "openai", 1).await;

    let envoy_port = support::free_port();
    let envoy_tap = shipped::envoy_file(envoy_port, k.data, upstream);
    let envoy_bare_port = support::free_port();
    let envoy_bare =
        shipped::envoy_without_tap(&shipped::envoy_file(envoy_bare_port, k.data, upstream));
    let (nginx_port, nginx_bare_port) = (support::free_port(), support::free_port());
    let nginx_has_tap = shipped::nginx_has_tap();

    let mut running = vec![
        shipped::envoy(&envoy_tap, envoy_port).await,
        shipped::envoy(&envoy_bare, envoy_bare_port).await,
    ];
    let mut paths = vec![
        ("stub direct".to_string(), upstream),
        ("Envoy, tap".to_string(), envoy_port),
        ("Envoy, no tap".to_string(), envoy_bare_port),
    ];
    if nginx_has_tap {
        running.push(shipped::nginx(nginx_port, k.data, upstream, true).await);
        paths.push(("nginx, tap".to_string(), nginx_port));
    }
    running.push(shipped::nginx(nginx_bare_port, k.data, upstream, false).await);
    paths.push(("nginx, no tap".to_string(), nginx_bare_port));
    let mut paths: Vec<Target> = paths
        .into_iter()
        .map(|(name, port)| Target {
            name,
            port,
            json: Timings::default(),
            sse: Timings::default(),
        })
        .collect();

    // Warm-up: connections opened, Lua loaded, keyward's caches filled.
    for path in &paths {
        for stream in [false, true] {
            for _ in 0..5 {
                let t = timed(&client, path.port, &secret, stream).await;
                assert!(t.is_some(), "{} refused the warm-up", path.name);
            }
        }
    }
    let parsed_before = parsed_so_far(&k).await;
    let (json_n, sse_n) = (
        setting("KEYWARD_BENCH_JSON_REQUESTS", 300),
        setting("KEYWARD_BENCH_SSE_REQUESTS", 100),
    );
    for i in 0..json_n.max(sse_n) {
        for path in paths.iter_mut() {
            if i < json_n {
                let t = timed(&client, path.port, &secret, false).await;
                path.json.record(t);
            }
            if i < sse_n {
                let t = timed(&client, path.port, &secret, true).await;
                path.sse.record(t);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parsed = parsed_so_far(&k).await - parsed_before;

    println!("| path           | answer          | first p50 ms | first p99 ms | last p50 ms | last p99 ms | errors |");
    println!("|----------------|-----------------|-------------:|-------------:|------------:|------------:|-------:|");
    let sse_label = format!("SSE {SSE_CHUNKS}×{SSE_GAP_MS} ms");
    for path in paths.iter_mut() {
        for (label, t) in [
            ("JSON 4 KiB", &mut path.json),
            (sse_label.as_str(), &mut path.sse),
        ] {
            t.sort();
            let [f50, f99, l50, l99] = t.quantiles();
            println!(
                "| {:<14} | {label:<15} | {f50:>12.3} | {f99:>12.3} | {l50:>11.3} | {l99:>11.3} | {:>6} |",
                path.name, t.errors
            );
        }
    }
    println!();
    println!("with tap − without (ms):\n");
    println!("| proxy | answer          | first p50 | first p99 | last p50 | last p99 |");
    println!("|-------|-----------------|----------:|----------:|---------:|---------:|");
    let find = |name: &str| paths.iter().find(|p| p.name == name);
    for proxy in ["Envoy", "nginx"] {
        let (Some(tap), Some(bare)) = (
            find(&format!("{proxy}, tap")),
            find(&format!("{proxy}, no tap")),
        ) else {
            println!("| {proxy} | (the shipped file has no tap) | | | | |");
            continue;
        };
        for (label, with, without) in [
            ("JSON 4 KiB", &tap.json, &bare.json),
            (sse_label.as_str(), &tap.sse, &bare.sse),
        ] {
            let (w, wo) = (with.quantiles(), without.quantiles());
            println!(
                "| {proxy:<5} | {label:<15} | {:>+9.3} | {:>+9.3} | {:>+8.3} | {:>+8.3} |",
                w[0] - wo[0],
                w[1] - wo[1],
                w[2] - wo[2],
                w[3] - wo[3]
            );
        }
    }
    let tapped = paths.iter().filter(|p| p.name.ends_with(", tap")).count();
    println!(
        "\nreports keyward read usage from during the run: {parsed} (expected {})",
        tapped * (json_n + sse_n)
    );
    drop(running);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("tap bench: skipped (run it with `cargo bench --bench tap`)");
        return;
    }
    if selected("report") {
        let n = setting("KEYWARD_BENCH_REPORTS", 5_000);
        println!(
            "keyward report CPU: {n} reports per kind over {CONNECTIONS} connections, CPU from /proc (clock ticks of 1/{} s)\n",
            support::clock_ticks_per_s()
        );
        println!("| shape    | report                                 | req KiB | reports/s | p50 ms | p99 ms | CPU µs/rep | × plain | usage read | errors |");
        println!("|----------|----------------------------------------|--------:|----------:|-------:|-------:|-----------:|--------:|-----------:|-------:|");
        let env = [(
            "KEYWARD_DATA_TOKEN",
            "bench-data-token-0123456789".to_string(),
        )];
        report_cpu("embedded", &support::start(&env).await).await;
        let redis_port: u16 = setting("KEYWARD_BENCH_REDIS_PORT", 6379) as u16;
        let prefix = format!("kw-bench-tap-{}", std::process::id());
        let redis_env = [
            env[0].clone(),
            (
                "KEYWARD_REDIS_URL",
                format!("redis://127.0.0.1:{redis_port}"),
            ),
            ("KEYWARD_REDIS_PREFIX", prefix.clone()),
        ];
        report_cpu("redis", &support::start(&redis_env).await).await;
        support::drop_redis_keys(redis_port, &prefix);
        println!();
    }
    if selected("proxy") {
        let (json_n, sse_n) = (
            setting("KEYWARD_BENCH_JSON_REQUESTS", 300),
            setting("KEYWARD_BENCH_SSE_REQUESTS", 100),
        );
        println!(
            "proxy latency: {json_n} JSON and {sse_n} SSE requests per path, one at a time, round robin over the paths\n"
        );
        proxy_latency().await;
    }
}
