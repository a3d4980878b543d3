//! `GET /metrics`: a live scrape passes `promtool check metrics`, has the documented
//! series, and carries nothing per key.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;

use common::{eventually, Cluster, Shape};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_passes_promtool_and_names_no_key() {
    let c = Cluster::start_n(Shape::Distributed, 1, |_| {}).await;
    let s = &c.servers[0];
    let (key, secret) = s.create_key(json!({"rate_limit": 2})).await;
    let pk = s
        .admin(
            Method::POST,
            "/admin/providers/openai/keys",
            Some(json!({"label": "p", "value": "sk-p-000000"})),
        )
        .await;
    for _ in 0..3 {
        s.admit(json!({"key": secret})).await;
    }
    let a = s
        .data_post_token("/v1/select", json!({"provider": "openai"}))
        .await;
    assert_eq!(a.status, 200);
    s.admit(json!({"key": "sk-kw-unknown-key-000000000000"}))
        .await;
    let lease = s
        .admit(
            json!({"key": s.create_key(json!({})).await.1, "provider": "openai", "select": true}),
        )
        .await
        .body["lease_id"]
        .clone();
    let pk_id = pk.body["id"].as_str().unwrap();
    s.data_post(
        "/v1/report",
        json!({"lease_id": lease, "provider_key_id": pk_id, "upstream_status": 429}),
    )
    .await;

    // Readiness is a metric too (set each time `/readyz` runs).
    let ready = s
        .client
        .get(format!("{}/readyz", s.data))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // Wait until the accounting writer has applied the report.
    let text = eventually(10, || async {
        let text = s.metrics().await;
        text.contains("keyward_accounting_records_total{result=\"applied\"} 1")
            .then_some(text)
    })
    .await;
    for series in [
        "keyward_decisions_total{endpoint=\"admit\",outcome=\"allowed\",reason=\"none\"} 3",
        "keyward_decisions_total{endpoint=\"admit\",outcome=\"denied\",reason=\"rate_limited_requests\"} 1",
        "keyward_decisions_total{endpoint=\"admit\",outcome=\"denied\",reason=\"invalid_key\"} 1",
        "keyward_decisions_total{endpoint=\"select\",outcome=\"allowed\",reason=\"none\"} 1",
        "keyward_decision_duration_seconds_bucket{endpoint=\"admit\",le=\"0.001\"}",
        "keyward_redis_script_duration_seconds_count{script=\"admit\"}",
        // One select, one admit with select (whose lease then cools its key).
        "keyward_provider_selections_total{provider=\"openai\"} 2",
        "keyward_provider_key_events_total{event=\"cooldown\",provider=\"openai\"} 1",
        "keyward_reports_total{result=\"recorded\"} 1",
        "keyward_cache_lookups_total{cache=\"client_keys\",result=\"hit\"}",
        "keyward_backend_failure_mode{mode=\"deny\"} 1",
        "keyward_accounting_queue_depth",
        "keyward_ready{check=\"database\"} 1",
        "keyward_ready{check=\"redis\"} 1",
        "keyward_ready{check=\"accounting\"} 1",
        "keyward_build_info{version=",
        // Series of a fixed label set exist before their first event, at 0.
        "keyward_reports_total{result=\"too_late\"} 0",
        "keyward_compensations_total{outcome=\"failed\",side=\"client\"} 0",
        "keyward_compensations_total{outcome=\"returned\",side=\"pick\"} 0",
        "keyward_upstream_usage_total{outcome=\"compressed\"} 0",
        "keyward_accounting_records_total{result=\"duplicate\"} 0",
        "keyward_alert_deliveries_total{result=\"failed\"} 0",
        "keyward_degraded_answers_total{mode=\"local\"} 0",
        "keyward_redis_script_errors_total{script=\"unpick\"} 0",
    ] {
                // This is the only test in its binary, so the process-wide counters are its own.
        let found = match series.split_once(' ') {
            Some(_) => text.lines().any(|l| l == series),
            None => text.contains(series),
        };
        assert!(found, "missing `{series}` in:\n{text}");
    }
    for secret_or_id in [
        secret.as_str(),
        key["id"].as_str().unwrap(),
        pk_id,
        "sk-p-000000",
    ] {
        assert!(
            !text.contains(secret_or_id),
            "a per-key value is in the metrics"
        );
    }

    let (ok, output) = promtool_check(&text);
    assert!(ok, "promtool check metrics failed:\n{output}");
    c.stop().await;
}

/// `promtool check metrics` on `text`: whether it passed, and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is not installed (scripts/test.sh installs the prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}
