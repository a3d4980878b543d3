//! Prometheus metrics, served as text on `GET /metrics` (data listener).
//!
//! Every name starts with `keyward_`, is in base units (seconds), and counters end in
//! `_total`. No label carries a key id or anything per key: label values come from
//! fixed sets (endpoints, reasons, operations) or from provider names, which an operator
//! configures and which stay few.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `keyward_decisions_total` | counter | `endpoint` (admit, select, authz), `outcome` (allowed, denied), `reason` (none or the error code, with the limit for RATE_LIMITED) |
//! | `keyward_decision_duration_seconds` | histogram | `endpoint` |
//! | `keyward_redis_script_duration_seconds` | histogram | `script` (admit, select, report, renew, pool_state, pool_sync, quota_read) |
//! | `keyward_redis_script_errors_total` | counter | `script` |
//! | `keyward_provider_selections_total` | counter | `provider` |
//! | `keyward_compensations_total` | counter | `side` (client: a cancel, pick: an unpick), `outcome` (returned, duplicate, failed): units one side of an admission with selection took and gave back because the other side refused or failed |
//! | `keyward_provider_key_events_total` | counter | `provider`, `event` (cooldown, suspension, learned_cooldown: the upstream's rate-limit headers said a limit is used up) |
//! | `keyward_reports_total` | counter | `result` (recorded, duplicate, too_late) |
//! | `keyward_upstream_usage_total` | counter | `outcome` (parsed, not_found, compressed, unknown_format, out_of_range): what `/v1/report/upstream` read from the upstream's answer |
//! | `keyward_data_plane_refusals_total` | counter | `endpoint` (select, report, report_upstream, renew), `reason` (no_token, wrong_token, token_not_configured, lease_not_found, not_the_lease_provider_key, no_lease): calls refused for lack of proof, and suspicious ones |
//! | `keyward_connections_refused_total` | counter | `listener` (data, admin), `reason` (peer_cap, remote_cap): connections closed unanswered at once, over their peer's cap or the listener's connections for remote peers |
//! | `keyward_accounting_records_total` | counter | `result` (applied, duplicate) |
//! | `keyward_accounting_failures_total` | counter | |
//! | `keyward_accounting_dead_letters_total` | counter | (records the database refused, set aside in `usage_dead_letters`) |
//! | `keyward_accounting_queue_depth` | gauge | (records not yet applied: Redis, the consumer group's pending entries plus those not yet delivered; embedded, the channel plus the batch in hand) |
//! | `keyward_accounting_lag_seconds` | gauge | (age of the oldest record not yet applied; 0 when none; grows while the writer is stuck) |
//! | `keyward_alerts_pending` | gauge | (spend alerts not yet delivered to the webhook, refreshed every second by each replica) |
//! | `keyward_alert_deliveries_total` | counter | `result` (delivered: the receiver answered 2xx; failed: no answer or another status, retried later) |
//! | `keyward_cache_lookups_total` | counter | `cache` (client_keys, provider_pools, model_prices, users), `result` (hit, stale, miss) |
//! | `keyward_backend_failure_mode` | gauge | `mode` (deny, allow, local): 1 for the mode in force |
//! | `keyward_redis_circuit_open` | gauge | 1 while Redis calls are skipped after failures |
//! | `keyward_degraded_answers_total` | counter | `mode` (allow, local): answers given without Redis |
//! | `keyward_ready` | gauge | `check` (database, redis, accounting): 1 when the check passed the last time `/readyz` ran, else 0; absent until then |
//! | `keyward_build_info` | gauge | `version` |

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 50 µs to 2.5 s: decisions are expected well under a millisecond.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

pub struct Metrics {
    registry: Registry,
    pub decisions: IntCounterVec,
    pub decision_seconds: HistogramVec,
    pub script_seconds: HistogramVec,
    pub script_errors: IntCounterVec,
    pub provider_selections: IntCounterVec,
    pub compensations: IntCounterVec,
    pub provider_key_events: IntCounterVec,
    pub reports: IntCounterVec,
    pub upstream_usage: IntCounterVec,
    pub data_plane_refusals: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub accounting_records: IntCounterVec,
    pub accounting_failures: IntCounter,
    pub accounting_dead_letters: IntCounter,
    pub accounting_queue_depth: IntGauge,
    pub accounting_lag_seconds: Gauge,
    pub alerts_pending: IntGauge,
    pub alert_deliveries: IntCounterVec,
    pub cache_lookups: IntCounterVec,
    pub backend_failure_mode: IntGaugeVec,
    pub redis_circuit_open: IntGauge,
    pub degraded_answers: IntCounterVec,
    pub ready: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

// The metric definitions are constants: `expect` here can only fail on a programming
// error, and fails at the first scrape or use in every test.
#[allow(clippy::expect_used)]
fn build() -> Metrics {
    let r = Registry::new();
    let accounting_failures = IntCounter::new(
        "keyward_accounting_failures_total",
        "Batches the database could not apply (retried).",
    )
    .expect("valid metric");
    r.register(Box::new(accounting_failures.clone()))
        .expect("unique metric");
    let accounting_dead_letters = IntCounter::new(
        "keyward_accounting_dead_letters_total",
        "Usage records the database refused, set aside as dead letters.",
    )
    .expect("valid metric");
    r.register(Box::new(accounting_dead_letters.clone()))
        .expect("unique metric");
    let accounting_queue_depth = IntGauge::new(
        "keyward_accounting_queue_depth",
        "Finished requests queued (pending included) and not yet applied to the database.",
    )
    .expect("valid metric");
    r.register(Box::new(accounting_queue_depth.clone()))
        .expect("unique metric");
    let accounting_lag_seconds = Gauge::new(
        "keyward_accounting_lag_seconds",
        "Age of the oldest finished request not yet applied to the database.",
    )
    .expect("valid metric");
    r.register(Box::new(accounting_lag_seconds.clone()))
        .expect("unique metric");
    let alerts_pending = IntGauge::new(
        "keyward_alerts_pending",
        "Spend alerts not yet delivered to the webhook.",
    )
    .expect("valid metric");
    r.register(Box::new(alerts_pending.clone()))
        .expect("unique metric");
    let backend_failure_mode = IntGaugeVec::new(
        Opts::new(
            "keyward_backend_failure_mode",
            "The KEYWARD_ON_BACKEND_ERROR mode in force (1).",
        ),
        &["mode"],
    )
    .expect("valid metric");
    r.register(Box::new(backend_failure_mode.clone()))
        .expect("unique metric");
    let redis_circuit_open = IntGauge::new(
        "keyward_redis_circuit_open",
        "1 while Redis calls are skipped after consecutive failures.",
    )
    .expect("valid metric");
    r.register(Box::new(redis_circuit_open.clone()))
        .expect("unique metric");
    let build_info = IntGaugeVec::new(
        Opts::new("keyward_build_info", "The running version (1)."),
        &["version"],
    )
    .expect("valid metric");
    r.register(Box::new(build_info.clone()))
        .expect("unique metric");
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    // Readiness as a metric, so an alert can say which check fails: `/readyz` answers
    // only whoever probes it.
    let ready = IntGaugeVec::new(
        Opts::new(
            "keyward_ready",
            "Readiness checks the last time /readyz ran: 1 passed, 0 failed.",
        ),
        &["check"],
    )
    .expect("valid metric");
    r.register(Box::new(ready.clone())).expect("unique metric");
    Metrics {
        data_plane_refusals: counter(
            &r,
            "keyward_data_plane_refusals_total",
            "Data-plane calls refused for lack of proof (data token or lease), or suspicious.",
            &["endpoint", "reason"],
        ),
        connections_refused: counter(
            &r,
            "keyward_connections_refused_total",
            "Connections closed unanswered at once: their peer held KEYWARD_MAX_CONNECTIONS_PER_PEER (peer_cap), or every connection for remote peers was in use (remote_cap).",
            &["listener", "reason"],
        ),
        decisions: counter(
            &r,
            "keyward_decisions_total",
            "Admission and selection decisions.",
            &["endpoint", "outcome", "reason"],
        ),
        decision_seconds: histogram(
            &r,
            "keyward_decision_duration_seconds",
            "Time to decide, in seconds.",
            &["endpoint"],
        ),
        script_seconds: histogram(
            &r,
            "keyward_redis_script_duration_seconds",
            "Redis script round trips, in seconds.",
            &["script"],
        ),
        script_errors: counter(
            &r,
            "keyward_redis_script_errors_total",
            "Redis script calls that failed.",
            &["script"],
        ),
        compensations: counter(
            &r,
            "keyward_compensations_total",
            "Units an admission's one side took and gave back because the other side refused or failed.",
            &["side", "outcome"],
        ),
        provider_selections: counter(
            &r,
            "keyward_provider_selections_total",
            "Provider keys picked.",
            &["provider"],
        ),
        provider_key_events: counter(
            &r,
            "keyward_provider_key_events_total",
            "Provider keys cooled down (429, or a limit used up by their rate-limit headers) or suspended (401/403).",
            &["provider", "event"],
        ),
        reports: counter(
            &r,
            "keyward_reports_total",
            "Reports received.",
            &["result"],
        ),
        upstream_usage: counter(
            &r,
            "keyward_upstream_usage_total",
            "Proxy reports (/v1/report/upstream) by what was read from the answer: parsed, not_found, compressed, unknown_format, out_of_range.",
            &["outcome"],
        ),
        accounting_records: counter(
            &r,
            "keyward_accounting_records_total",
            "Usage records written to the database.",
            &["result"],
        ),
        alert_deliveries: counter(
            &r,
            "keyward_alert_deliveries_total",
            "Webhook delivery attempts of spend alerts, by result (delivered, failed).",
            &["result"],
        ),
        cache_lookups: counter(
            &r,
            "keyward_cache_lookups_total",
            "In-process cache lookups.",
            &["cache", "result"],
        ),
        degraded_answers: counter(
            &r,
            "keyward_degraded_answers_total",
            "Answers given without Redis, by KEYWARD_ON_BACKEND_ERROR.",
            &["mode"],
        ),
        redis_circuit_open,
        ready,
        accounting_failures,
        accounting_dead_letters,
        accounting_queue_depth,
        accounting_lag_seconds,
        alerts_pending,
        backend_failure_mode,
        registry: r,
    }
}

/// The series of a fixed label set, made at start-up so a dashboard or an alert sees them
/// at 0 before their first event (a labelled series is otherwise absent until then, and
/// `rate()` or `> 0` over an absent series says nothing).
fn known_series(m: &Metrics) {
    let each = |c: &IntCounterVec, sets: &[&[&str]]| {
        for labels in sets {
            c.with_label_values(labels);
        }
    };
    each(&m.reports, &[&["recorded"], &["duplicate"], &["too_late"]]);
    for side in ["client", "pick"] {
        for outcome in ["returned", "duplicate", "failed"] {
            m.compensations.with_label_values(&[side, outcome]);
        }
    }
    each(
        &m.upstream_usage,
        &[
            &["parsed"],
            &["not_found"],
            &["compressed"],
            &["unknown_format"],
            &["out_of_range"],
        ],
    );
    each(&m.accounting_records, &[&["applied"], &["duplicate"]]);
    each(&m.alert_deliveries, &[&["delivered"], &["failed"]]);
    each(&m.degraded_answers, &[&["allow"], &["local"]]);
    each(
        &m.connections_refused,
        &[
            &["data", "peer_cap"],
            &["data", "remote_cap"],
            &["admin", "remote_cap"],
        ],
    );
    for script in SCRIPT_NAMES {
        m.script_errors.with_label_values(&[script]);
    }
}

/// Every script's label (`keyward_redis_script_errors_total`, its duration histogram).
const SCRIPT_NAMES: [&str; 11] = [
    "admit",
    "admit_window",
    "pick",
    "report",
    "pool_report",
    "renew",
    "pool_state",
    "pool_sync",
    "quota_read",
    "unpick",
    "cancel",
];

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = build();
    known_series(&m);
    m
});

pub fn get() -> &'static Metrics {
    &METRICS
}

/// The endpoints, caches, results and scripts of the series every decision touches.
const ENDPOINTS: [&str; 3] = ["admit", "select", "authz"];
const CACHES: [&str; 4] = ["client_keys", "provider_pools", "model_prices", "users"];
const CACHE_RESULTS: [&str; 3] = ["hit", "stale", "miss"];
const SCRIPTS: [&str; 3] = ["admit", "admit_window", "report"];

/// Handles of those series, looked up once: `with_label_values` hashes its labels and
/// takes the vector's lock on every call, a cost each decision paid several times.
/// Other label values still go through the vectors (the same series either way).
struct Hot {
    decision_seconds: [Histogram; ENDPOINTS.len()],
    allowed: [IntCounter; ENDPOINTS.len()],
    cache_lookups: [[IntCounter; CACHE_RESULTS.len()]; CACHES.len()],
    script_seconds: [Histogram; SCRIPTS.len()],
}

static HOT: LazyLock<Hot> = LazyLock::new(|| {
    let m = get();
    Hot {
        decision_seconds: ENDPOINTS.map(|e| m.decision_seconds.with_label_values(&[e])),
        allowed: ENDPOINTS.map(|e| m.decisions.with_label_values(&[e, "allowed", "none"])),
        cache_lookups: CACHES
            .map(|c| CACHE_RESULTS.map(|r| m.cache_lookups.with_label_values(&[c, r]))),
        script_seconds: SCRIPTS.map(|s| m.script_seconds.with_label_values(&[s])),
    }
});

fn index(names: &[&str], name: &str) -> Option<usize> {
    names.iter().position(|n| *n == name)
}

/// Counts one lookup of the in-process cache `cache` with its `result` (hit, stale, miss).
pub fn cache_lookup(cache: &str, result: &str) {
    match (index(&CACHES, cache), index(&CACHE_RESULTS, result)) {
        (Some(c), Some(r)) => HOT.cache_lookups[c][r].inc(),
        _ => get()
            .cache_lookups
            .with_label_values(&[cache, result])
            .inc(),
    }
}

/// Records how long one Redis script call took.
pub fn script_duration(script: &str, seconds: f64) {
    match index(&SCRIPTS, script) {
        Some(i) => HOT.script_seconds[i].observe(seconds),
        None => get()
            .script_seconds
            .with_label_values(&[script])
            .observe(seconds),
    }
}

/// The text exposition of every metric.
pub fn render() -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Records one decision: its endpoint, its outcome and how long it took, as metrics and
/// as one log line at debug level.
pub fn decision(endpoint: &str, started: Instant, denial: Option<(&str, Option<&str>)>) {
    let m = get();
    let seconds = started.elapsed().as_secs_f64();
    let hot = index(&ENDPOINTS, endpoint);
    match hot {
        Some(i) => HOT.decision_seconds[i].observe(seconds),
        None => m
            .decision_seconds
            .with_label_values(&[endpoint])
            .observe(seconds),
    }
    tracing::debug!(
        endpoint,
        allowed = denial.is_none(),
        reason = denial.map_or("none", |(code, _)| code),
        limit = denial.and_then(|(_, limit)| limit),
        micros = (seconds * 1e6) as u64,
        "decision"
    );
    match denial {
        None => match hot {
            Some(i) => HOT.allowed[i].inc(),
            None => m
                .decisions
                .with_label_values(&[endpoint, "allowed", "none"])
                .inc(),
        },
        Some((code, limit)) => {
            let reason = match limit {
                Some(limit) if code == "RATE_LIMITED" || code == "CONCURRENCY_LIMITED" => {
                    format!("{}_{limit}", code.to_ascii_lowercase())
                }
                _ => code.to_ascii_lowercase(),
            };
            m.decisions
                .with_label_values(&[endpoint, "denied", &reason])
                .inc();
        }
    }
}

/// Records a batch the accounting writer applied: the records it inserted, and those it
/// found already applied. (Plain counts, so that this module imports no domain type.)
pub fn applied(inserted: usize, duplicates: usize) {
    let m = get();
    m.accounting_records
        .with_label_values(&["applied"])
        .inc_by(inserted as u64);
    m.accounting_records
        .with_label_values(&["duplicate"])
        .inc_by(duplicates as u64);
}

/// Records a batch the accounting writer failed to apply.
pub fn apply_failed() {
    get().accounting_failures.inc();
}

/// Records what the accounting queue holds: how many records are not yet applied, and
/// when the oldest of them was made (Unix ms; `None` when the queue is empty).
pub fn accounting_queue(depth: i64, oldest_created_ms: Option<i64>) {
    let m = get();
    m.accounting_queue_depth.set(depth);
    let lag = oldest_created_ms.map_or(0.0, |oldest| {
        (crate::clock::now_ms() - oldest).max(0) as f64 / 1000.0
    });
    m.accounting_lag_seconds.set(lag);
}
