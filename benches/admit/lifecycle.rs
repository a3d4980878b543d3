//! `lifecycle`: a request's whole life in Redis, admit then `/v1/report` of its lease
//! (with tokens), on the bench's single Redis, over `KEYWARD_BENCH_LIFECYCLE_KEYS` client
//! keys (default 1,000: many tenant shards, as a fleet has), without and with selection.
//!
//! Four saturation runs, each measured per request (an admit alone, or an admit and its
//! report): admit alone, admit+select alone, admit+report, admit+select+report. Redis
//! runs every script as `EVALSHA`, so `cmdstat_evalsha` gives only their sum; each
//! script's share is estimated by difference between the runs (admit = admit alone;
//! pick = admit+select − admit; report = admit+report − admit; pool_report =
//! admit+select+report − admit+select − report), for the script time and for the whole
//! server's CPU alike. The runs happen one after the other on a shared machine, so a
//! difference carries both runs' noise: small differences are not significant.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::measure::{Probe, Summary};
use crate::support::{self, Keyward};
use crate::{admit_request, collect, create_keys, pool_size, row, saturate, warm, CONCURRENCY};
use crate::{Run, SECONDS};

/// The four runs' names, in the order [`run`] adds them to the summary.
pub fn names(n: usize) -> [String; 4] {
    let pool = pool_size();
    [
        format!("lifecycle, {n} keys, admit"),
        format!("lifecycle, {n} keys, admit+select of {pool}"),
        format!("lifecycle, {n} keys, admit+report"),
        format!("lifecycle, {n} keys, admit+select+report"),
    ]
}

pub fn keys() -> usize {
    std::env::var("KEYWARD_BENCH_LIFECYCLE_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000)
}

/// Every run of the part against keyward `k` on the Redis node `redis`.
pub async fn run(k: &Keyward, redis: u16, summary: &mut Summary) {
    let n = keys();
    let secrets = create_keys(k, n).await;
    support::create_pool(k, "bench", pool_size()).await;
    warm(k.data, &secrets).await;
    let [admit, admit_select, report, select_report] = names(n);
    for (name, select, with_report) in [
        (&admit, false, false),
        (&admit_select, true, false),
        (&report, false, true),
        (&select_report, true, true),
    ] {
        one(k.data, &secrets, select, with_report, 1).await; // warm-up
        let probe = Probe::start(Some(k.pid()), &[redis]);
        let run = one(k.data, &secrets, select, with_report, SECONDS).await;
        let cost = probe.finish(run.latencies_us.len());
        row(name, &run);
        let p99 = support::percentile(&run.latencies_us, 0.99);
        summary.add(name.as_str(), run.rate, (Some(p99), None), cost);
    }
    split(summary, n);
}

/// One closed-loop run: admits alone, or admit-then-report pairs.
async fn one(port: u16, secrets: &[String], select: bool, with_report: bool, seconds: u64) -> Run {
    if with_report {
        lifecycle(port, secrets, select, seconds).await
    } else {
        saturate(port, secrets, select, seconds).await
    }
}

/// Each script's time and Redis CPU per request, by difference between the runs.
fn split(summary: &mut Summary, n: usize) {
    let [a, a_s, a_r, a_s_r] = names(n).map(|name| {
        summary
            .get(&name)
            .and_then(|r| r.cost.redis.clone())
            .map(|c| (c.scripts_us, c.cpu_us, c.calls_per_decision))
    });
    let (Some(a), Some(a_s), Some(a_r), Some(a_s_r)) = (a, a_s, a_r, a_s_r) else {
        return;
    };
    let report = (a_r.0 - a.0, a_r.1 - a.1);
    let est = [
        ("admit", a.0, a.1),
        ("pick", a_s.0 - a.0, a_s.1 - a.1),
        ("report", report.0, report.1),
        (
            "pool_report",
            a_s_r.0 - a_s.0 - report.0,
            a_s_r.1 - a_s.1 - report.1,
        ),
    ];
    let parts: Vec<String> = est
        .iter()
        .map(|(s, t, c)| format!("{s} {t:.1} µs script / {c:.1} µs CPU"))
        .collect();
    summary.line(format!(
        "lifecycle, {n} keys, per script (by difference between the four runs; script time from commandstats / Redis CPU from INFO cpu, per request): {}",
        parts.join("; ")
    ));
    summary.line(format!(
        "lifecycle, {n} keys, script calls per request: admit {:.2}, admit+select {:.2}, admit+report {:.2}, admit+select+report {:.2}",
        a.2, a_s.2, a_r.2, a_s_r.2
    ));
}

/// The lease id in an admission's answer (`"lease_id":"…"`; lease ids hold no quotes).
fn lease_id(body: &[u8]) -> Option<&str> {
    let body = std::str::from_utf8(body).ok()?;
    let start = body.find(r#""lease_id":""#)? + r#""lease_id":""#.len();
    let len = body[start..].find('"')?;
    Some(&body[start..start + len])
}

fn report_request(port: u16, lease: &str) -> Vec<u8> {
    let body = format!(r#"{{"lease_id":"{lease}","prompt_tokens":80,"completion_tokens":40}}"#);
    format!(
        "POST /v1/report HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Closed loop of admit-then-report pairs on [`CONCURRENCY`] connections, rotating over
/// the keys; a latency is the pair's, an error either call's non-200.
async fn lifecycle(port: u16, secrets: &[String], select: bool, seconds: u64) -> Run {
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
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
                let mut conn = support::Conn::open(port).await;
                let (mut lat, mut errors) = (Vec::with_capacity(100_000), 0);
                let mut i = w;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let (status, body) = conn.call_body(&requests[i % requests.len()]).await;
                    let ok = match lease_id(&body).filter(|_| status == 200) {
                        Some(lease) => conn.call(&report_request(port, lease)).await == 200,
                        None => false,
                    };
                    errors += usize::from(!ok);
                    lat.push(t.elapsed().as_micros() as u64);
                    i += CONCURRENCY;
                }
                (lat, Vec::new(), errors)
            })
        })
        .collect();
    collect(workers, seconds).await
}
