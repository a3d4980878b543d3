//! The Helm chart (`helm/keyward`): linted, rendered with several value sets, every
//! manifest validated against the Kubernetes schemas, the render refused where the chart
//! must refuse, and the sidecar example's proxy configuration (the chart's byte-identical
//! copies of `examples/`) accepted by `nginx -t` and `envoy --mode validate`, by
//! `scripts/check_helm.py` (Helm's SDK from PyPI `helm-python-sdk`, schemas from
//! `kubernetes-validate`; nginx, its Lua module and envoy as scripts/test.sh installs them),
//! which also runs that example end to end (keyward, the proxy, an LLM API stub).
#![allow(clippy::unwrap_used)]

/// Also runs the sidecar example end to end with nginx and with Envoy: `KEYWARD_BIN` is
/// this build's keyward, which the example's pod would run.
#[test]
fn the_chart_lints_renders_and_validates() {
    let out = std::process::Command::new("python3")
        .arg("scripts/check_helm.py")
        .env("KEYWARD_BIN", env!("CARGO_BIN_EXE_keyward"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 is needed for the chart checks");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("manifests valid"), "{said}");
    assert!(
        said.contains("ran end to end with nginx and with envoy"),
        "{said}"
    );
}

/// The chart's `appVersion` (the image tag it defaults to) follows the crate's version,
/// so a release cannot ship a chart that runs another build.
#[test]
fn the_charts_app_version_is_the_crates_version() {
    let chart = include_str!("../helm/keyward/Chart.yaml");
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"'))
        .expect("Chart.yaml has an appVersion");
    assert_eq!(app_version, env!("CARGO_PKG_VERSION"));
}
