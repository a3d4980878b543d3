//! The repository's own documentation is kept honest against the code: the API reference
//! (`docs/api.md`) names exactly the operations of both OpenAPI documents and every error
//! code with its status; the operations guide (`docs/operations.md`) every metric; the
//! alert rules (`examples/prometheus/alerts.yaml`) pass `promtool` and their unit tests
//! (`alerts_test.yaml`), and use only real metrics; every test `docs/guarantees.md` cites
//! exists; and no doc links outside the repository.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use keyward::http::error::ErrorCode;

const API: &str = include_str!("../docs/api.md");
const OPERATIONS: &str = include_str!("../docs/operations.md");
const GUARANTEES: &str = include_str!("../docs/guarantees.md");
const METRICS_RS: &str = include_str!("../src/metrics.rs");
const ALERTS: &str = include_str!("../examples/prometheus/alerts.yaml");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The text of every `` `…` `` span in `text`.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Identifier-like words of `[a-z0-9_]` that start with `prefix`.
fn words_starting<'a>(text: &'a str, prefix: &str) -> BTreeSet<&'a str> {
    text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| w.starts_with(prefix))
        .collect()
}

/// `(METHOD, path)` of every operation of both OpenAPI documents.
fn operations() -> BTreeSet<(String, String)> {
    let docs = [
        keyward::http::openapi::data_plane(),
        keyward::http::openapi::admin(),
    ];
    docs.iter()
        .flat_map(common::openapi_operations)
        .map(|(method, path)| (method.to_ascii_uppercase(), path))
        .collect()
}

/// Every `` `METHOD /path` `` the API reference names (a query string dropped, axum's
/// `{*rest}` read as OpenAPI's `{rest}`).
fn documented_operations() -> BTreeSet<(String, String)> {
    const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];
    code_spans(API)
        .into_iter()
        .filter_map(|span| span.split_once(' '))
        .filter(|(method, path)| METHODS.contains(method) && path.starts_with('/'))
        .map(|(method, path)| {
            let path = path.split('?').next().unwrap().replace("{*", "{");
            (method.to_string(), path)
        })
        .collect()
}

#[test]
fn the_api_reference_names_every_operation_and_only_those() {
    let real = operations();
    let documented = documented_operations();
    let missing: Vec<_> = real.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "operations docs/api.md lacks: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&real).collect();
    assert!(
        unknown.is_empty(),
        "docs/api.md names operations that do not exist: {unknown:?}"
    );
}

/// The number of a `StatusCode::NAME` the HTTP layer uses. An unknown name fails the test,
/// so a new status cannot slip past it.
/// Every error code the product answers, with its status: the closed list
/// [`keyward::http::error::ErrorCode::ALL`].
fn error_codes() -> BTreeMap<String, u16> {
    ErrorCode::ALL
        .iter()
        .map(|code| (code.as_str().to_string(), code.status().as_u16()))
        .collect()
}

/// No error body is built from a bare string: outside the list itself, the HTTP layer's
/// code (its unit tests aside) holds no code-like literal.
#[test]
fn every_error_code_comes_from_the_closed_list() {
    let mut files = Vec::new();
    let mut dirs = vec![root().join("src/http")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().unwrap() != "error_code.rs" {
                files.push(path);
            }
        }
    }
    let mut checked = 0;
    for path in files {
        let source = std::fs::read_to_string(&path).unwrap();
        let code = source.split("#[cfg(test)]").next().unwrap();
        checked += 1;
        for literal in code.split('"').skip(1).step_by(2) {
            let code_like = literal.len() > 3
                && literal.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                && !literal.starts_with("KEYWARD_")
                && !literal.starts_with("CARGO_");
            assert!(
                !code_like,
                "{}: {literal} is built by hand; use ErrorCode",
                path.display()
            );
        }
    }
    assert!(checked >= 8, "too few HTTP sources read: {checked}");
}

/// `code -> status` from the rows of docs/api.md's error table (`` | `CODE` | 429 | ``).
fn documented_codes() -> BTreeMap<String, u16> {
    API.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|line| {
            let (code, rest) = line.split_once("` | ")?;
            let status = rest.split(' ').next()?.parse().ok()?;
            code.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
                .then(|| (code.to_string(), status))
        })
        .collect()
}

#[test]
fn the_api_reference_gives_every_error_code_its_status() {
    let real = error_codes();
    assert!(real.len() >= 30, "too few codes read: {real:?}");
    let documented = documented_codes();
    assert_eq!(
        real, documented,
        "docs/api.md's error table (left: the code, right: the doc)"
    );
}

/// The name of every metric `src/metrics.rs` registers (its string literals).
fn registered_metrics() -> BTreeSet<String> {
    METRICS_RS
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|l| {
            l.starts_with("keyward_")
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// A series name as PromQL sees it, back to the metric (a histogram's `_bucket`, `_sum`
/// and `_count`).
fn metric_of(series: &str, metrics: &BTreeSet<String>) -> Option<String> {
    if metrics.contains(series) {
        return Some(series.to_string());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| series.strip_suffix(suffix))
        .find(|base| metrics.contains(*base))
        .map(str::to_string)
}

#[test]
fn the_operations_guide_describes_every_metric_and_only_real_ones() {
    let metrics = registered_metrics();
    assert!(metrics.len() >= 19, "too few metrics read: {metrics:?}");
    let rows: BTreeSet<String> = OPERATIONS
        .lines()
        .filter_map(|l| l.strip_prefix("| `keyward_"))
        .filter_map(|l| l.split('`').next())
        .map(|name| format!("keyward_{name}"))
        .collect();
    assert_eq!(
        metrics, rows,
        "docs/operations.md's metrics table (left: src/metrics.rs)"
    );
    for name in words_starting(OPERATIONS, "keyward_") {
        assert!(
            metric_of(name, &metrics).is_some(),
            "docs/operations.md names `{name}`, which is no metric"
        );
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_use_only_real_metrics() {
    let path = root().join("examples/prometheus/alerts.yaml");
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .expect("promtool is not installed (scripts/test.sh installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = registered_metrics();
    let mut used = BTreeSet::new();
    for series in words_starting(ALERTS, "keyward_") {
        let metric = metric_of(series, &metrics)
            .unwrap_or_else(|| panic!("alerts.yaml uses `{series}`, which is no metric"));
        used.insert(metric);
    }
    // Each rule's expression reads at least one of keyward's metrics.
    let exprs: Vec<&str> = ALERTS
        .split("expr:")
        .skip(1)
        .map(|rest| rest.split("for:").next().unwrap())
        .map(|rest| rest.split("labels:").next().unwrap())
        .collect();
    assert!(exprs.len() >= 8, "too few rules read");
    for expr in &exprs {
        assert!(
            !words_starting(expr, "keyward_").is_empty(),
            "a rule that reads none of keyward's metrics: {expr}"
        );
    }
    // And the guide explains each alert.
    for name in ALERTS
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            OPERATIONS.contains(&format!("`{name}`")),
            "docs/operations.md does not explain {name}"
        );
    }
    assert!(used.contains("keyward_redis_circuit_open") && used.contains("keyward_ready"));
}

/// The alerts fire when they should: `examples/prometheus/alerts_test.yaml` holds
/// promtool's unit tests (a provider's first suspension, whose series appears at 1 and
/// which increase() alone cannot see, must fire).
#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let out = std::process::Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(root().join("examples/prometheus/alerts_test.yaml"))
        .output()
        .expect("promtool is not installed (scripts/test.sh installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The markdown files whose links must stay inside the repository.
fn doc_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = [
        "README.md",
        "ARCHITECTURE.md",
        "BENCHMARKS.md",
        "CHANGELOG.md",
    ]
    .iter()
    .map(|f| root().join(f))
    .collect();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(docs.len() >= 3, "docs/ holds {docs:?}");
    files.extend(docs);
    files
}

/// The targets of the `[text](target)` links of a markdown text, outside fenced code.
fn link_targets(text: &str) -> Vec<String> {
    let prose: String = text.split("```").step_by(2).collect::<Vec<_>>().join("\n");
    prose
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target))
        .map(|target| target.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn doc_links_resolve_inside_the_repository_and_nothing_points_outside() {
    let repo = root().canonicalize().unwrap();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        for banned in ["../shared", "product.md", "/work/"] {
            assert!(!text.contains(banned), "{name} mentions `{banned}`");
        }
        for target in link_targets(&text) {
            if target.is_empty()
                || target.starts_with('#')
                || target.starts_with("http://")
                || target.starts_with("https://")
            {
                continue;
            }
            let local = target.split('#').next().unwrap();
            let resolved: PathBuf = file.parent().unwrap().join(local);
            let resolved = resolved
                .canonicalize()
                .unwrap_or_else(|_| panic!("{name}: the link `{target}` leads nowhere"));
            assert!(
                resolved.starts_with(&repo),
                "{name}: the link `{target}` leaves the repository"
            );
        }
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for doc in ["docs/api.md", "docs/guarantees.md", "docs/operations.md"] {
        assert!(
            readme.contains(&format!("]({doc})")),
            "the README does not link {doc}"
        );
    }
}

#[test]
fn every_test_the_guarantees_cite_exists() {
    let mut cited = 0;
    for section in GUARANTEES.split("\n## ").skip(1) {
        let title = section.lines().next().unwrap();
        let citations: Vec<&str> = code_spans(section)
            .into_iter()
            .filter(|s| s.starts_with("tests/") && s.contains(".rs::"))
            .collect();
        assert!(!citations.is_empty(), "guarantee `{title}` cites no test");
        for citation in citations {
            let (file, function) = citation.split_once("::").unwrap();
            let path = root().join(file);
            let source = std::fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("`{citation}`: there is no {file}"));
            let defined = [format!("fn {function}("), format!("fn {function}<")]
                .iter()
                .any(|d| source.contains(d.as_str()));
            assert!(defined, "`{citation}`: {file} has no fn {function}");
            cited += 1;
        }
    }
    assert!(cited >= 50, "only {cited} citations read");
}
