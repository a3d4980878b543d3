//! The Limitador yardstick (`LIMITADOR_BIN`): a server taking limitador-server's command
//! line, in its in-memory and Redis modes under the same saturation as keyward, `POST
//! /check_and_report` with one limit of one counter (too high to be reached), its CPU per
//! check and Redis's, and keyward's ratios to it. limitador-server itself is not on
//! crates.io; `scripts/limitador.sh` builds `benches/limitador/`, the `limitador` library
//! 0.14 (the code limitador-server runs: its in-memory storage, its Redis storage
//! `AsyncRedisStorage`) behind a minimal hyper server, one worker per core like
//! limitador-server's (`LIMITADOR_THREADS` sets another count). The rows are labelled with
//! what `LIMITADOR_BIN --version` says ran.

use std::process::{Command, Stdio};

use crate::measure::{Row, Summary};
use crate::support;
use crate::yardsticks::{ready, saturate_measured, Process};

/// What ran as Limitador, from `binary --version`: the yardstick's own label (it starts
/// with "Limitador"), or that line in parentheses; and its thread count.
fn limitador_label(binary: &str) -> String {
    let version = Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let what = if version.starts_with("Limitador") {
        version
    } else {
        format!("Limitador ({version})")
    };
    let threads = match std::env::var("LIMITADOR_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
    {
        Some(1) => "1 thread".to_string(),
        Some(n) if n > 1 => format!("{n} threads"),
        _ => "a worker per core".to_string(),
    };
    format!("{what}, {threads}")
}

/// The Limitador row of `mode` (`memory` or `redis`), if it ran.
fn limitador_row<'a>(summary: &'a Summary, mode: &str) -> Option<&'a Row> {
    let mode = format!(", {mode}, 1 counter, saturation");
    summary
        .rows
        .iter()
        .find(|r| r.name.starts_with("Limitador") && r.name.ends_with(&mode))
}

/// Limitador's two modes, when `LIMITADOR_BIN` names its server; one line otherwise.
pub async fn run(redis_port: u16, summary: &mut Summary) {
    let Ok(binary) = std::env::var("LIMITADOR_BIN") else {
        summary.line(
            "Limitador: skipped (set LIMITADOR_BIN, e.g. LIMITADOR_BIN=$(scripts/limitador.sh))",
        );
        return;
    };
    let label = limitador_label(&binary);
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.yaml");
    // One limit of one counter, too high to be reached (the bench key's RPM window), in
    // a namespace of this run's own so its Redis keys can be dropped after.
    let namespace = format!("bench-limitador-{}", std::process::id());
    std::fs::write(
        &limits,
        format!("---\n- namespace: {namespace}\n  max_value: 1000000000000\n  seconds: 60\n  conditions: []\n  variables: []\n"),
    )
    .unwrap();
    let url = format!("redis://127.0.0.1:{redis_port}");
    for (mode, storage) in [
        ("memory", vec!["memory"]),
        ("redis", vec!["redis", url.as_str()]),
    ] {
        let (http, rls) = (support::free_port(), support::free_port());
        let child = Command::new(&binary)
            .args(["--http-ip", "127.0.0.1", "--http-port", &http.to_string()])
            .args(["--rls-ip", "127.0.0.1", "--rls-port", &rls.to_string()])
            .arg(&limits)
            .args(&storage)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            summary.line(format!("Limitador: {binary} did not run"));
            return;
        };
        let child = Process(child);
        let body = format!(r#"{{"namespace":"{namespace}","values":{{"key":"bench"}},"delta":1}}"#);
        let request = format!(
            "POST /check_and_report HTTP/1.1\r\nhost: 127.0.0.1:{http}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        if !ready(http, &request).await {
            summary.line(format!(
                "{label}, {mode}: did not answer 200 to check_and_report"
            ));
            continue;
        }
        let redis: &[u16] = if mode == "redis" { &[redis_port] } else { &[] };
        let name = format!("{label}, {mode}, 1 counter, saturation");
        saturate_measured(&name, http, &request, child.0.id(), redis, summary).await;
    }
    support::drop_redis_pattern(redis_port, &format!("*{{{namespace}}}*"));
}

/// keyward against Limitador in the same run: Redis CPU per decision against Limitador's
/// per check (target: at most 1x), and the embedded shape against its in-memory mode.
pub fn ratios(summary: &Summary, lines: &mut Vec<String>) {
    let get = |name: &str| summary.get(name);
    if let (Some(k), Some(l)) = (
        get("redis, 1 key, saturation"),
        limitador_row(summary, "redis"),
    ) {
        if let (Some(kr), Some(lr)) = (&k.cost.redis, &l.cost.redis) {
            lines.push(format!(
                "keyward Redis CPU per decision (redis, 1 key, saturation) / {} per check: {:.1} / {:.1} µs = **{:.2}x** (target <= 1x); script time {:.1} / {:.1} µs ({:.2} / {:.2} script calls); decisions/s {:.0} / {:.0} = {:.2}x",
                l.name, kr.cpu_us, lr.cpu_us, kr.cpu_us / lr.cpu_us,
                kr.scripts_us, lr.scripts_us, kr.calls_per_decision, lr.calls_per_decision,
                k.rate, l.rate, k.rate / l.rate,
            ));
        }
    }
    if let (Some(k), Some(l)) = (
        get("embedded, 1 key, saturation"),
        limitador_row(summary, "memory"),
    ) {
        let cpu = match (k.cost.sidecar_us, l.cost.sidecar_us) {
            (Some(kc), Some(lc)) => {
                format!("; CPU µs/decision {kc:.1} / {lc:.1} = {:.2}x", kc / lc)
            }
            _ => String::new(),
        };
        lines.push(format!(
            "keyward embedded (1 key, saturation) / {}: decisions/s {:.0} / {:.0} = **{:.2}x**{cpu}",
            l.name, k.rate, l.rate, k.rate / l.rate,
        ));
    }
}
