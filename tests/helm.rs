//! The Helm chart (`helm/keyward`): linted, rendered with several value sets, and every
//! manifest validated against the Kubernetes schemas, by `scripts/check_helm.py` (Helm's
//! SDK from PyPI `helm-python-sdk`, schemas from `kubernetes-validate`).
#![allow(clippy::unwrap_used)]

#[test]
fn the_chart_lints_renders_and_validates() {
    let out = std::process::Command::new("python3")
        .arg("scripts/check_helm.py")
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
}
