//! The OpenAPI documents (`/openapi.json` on each listener) are in step with the code,
//! and a property-based run of schemathesis against a live server finds no 5xx and no
//! error outside the contract's error body.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::{Backend, TestServer, TOKEN};
use keyward::http::openapi::{self, ADMIN_ROUTES, DATA_ROUTES};
use serde_json::{json, Value};

fn table(routes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    routes
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

/// The paths of the `.route("…", …)` calls in a router's source (axum's `{*path}` is
/// OpenAPI's `{path}`; `/authz` alone is the same check as `/authz/{path}`).
fn routed_paths(source: &str) -> BTreeSet<String> {
    source
        .split(".route(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"'))
        .map(|rest| rest.split('"').next().unwrap().replace("{*", "{"))
        .filter(|p| p != "/authz")
        .collect()
}

#[test]
fn the_documents_the_route_tables_and_the_routers_agree() {
    assert_eq!(
        common::openapi_operations(&openapi::data_plane()),
        table(DATA_ROUTES)
    );
    assert_eq!(
        common::openapi_operations(&openapi::admin()),
        table(ADMIN_ROUTES)
    );
    let paths = |routes: &[(&str, &str)]| {
        routes
            .iter()
            .map(|(_, p)| p.to_string())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        routed_paths(include_str!("../src/http/data.rs")),
        paths(DATA_ROUTES)
    );
    assert_eq!(
        routed_paths(include_str!("../src/http/admin/mod.rs")),
        paths(ADMIN_ROUTES)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_exists_and_the_documents_are_served() {
    let s = TestServer::start(Backend::Sqlite).await;
    let uuid = "00000000-0000-4000-8000-000000000000";
    let lease = format!("{uuid}.{}", "0".repeat(32));
    for (base, routes, token) in [
        (&s.data, DATA_ROUTES, None),
        (&s.admin, ADMIN_ROUTES, Some(TOKEN)),
    ] {
        for (method, path) in routes {
            let url = format!(
                "{base}{}",
                path.replace("{id}", uuid)
                    .replace("{lease_id}", &lease)
                    .replace("{provider}", "openai")
                    .replace("{model}", "accounts/x/models/llama-v3")
                    .replace("{path}", "v1/chat/completions")
            );
            let mut request = s
                .client
                .request(method.to_uppercase().parse().unwrap(), url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.json(&json!({})).send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            // The routers' fallbacks answer "no such endpoint" (404) and 405.
            assert!(
                !text.contains("no such endpoint") && status != 405,
                "{method} {path} is documented but not routed ({status}: {text})"
            );
        }
    }
    let doc: Value = s
        .client
        .get(format!("{}/openapi.json", s.data))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc, openapi::data_plane());
    let doc: Value = s
        .client
        .get(format!("{}/openapi.json", s.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc, openapi::admin());
    s.stop().await;
}

/// The contract answers a pick from a provider with no active key with 503
/// `NO_PROVIDER_KEY`, and generated provider names have none: that 503 (in the `Error`
/// body, which the schema check still enforces) is expected there, nowhere else.
const SCHEMATHESIS_CONFIG: &str = r#"
[[operations]]
include-path-regex = "^/v1/(admit|select)$"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"#;

/// schemathesis (PyPI) generates requests from each document, valid and not: every
/// answer must be a non-5xx that matches the document, errors in the `Error` schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_stray_error_body() {
    let s = TestServer::start(Backend::Sqlite).await;
    s.create_key(json!({"is_standalone": true, "initial_balance_usd": 1}))
        .await;
    for (base, auth) in [
        (
            s.data.clone(),
            Some(format!("Authorization: Bearer {}", common::DATA_TOKEN)),
        ),
        (
            s.admin.clone(),
            Some(format!("Authorization: Bearer {TOKEN}")),
        ),
    ] {
        let run = tokio::task::spawn_blocking(move || {
            // Its cache goes to a fresh directory, not into the checkout.
            let scratch = tempfile::tempdir().unwrap();
            let config = scratch.path().join("schemathesis.toml");
            std::fs::write(&config, SCHEMATHESIS_CONFIG).unwrap();
            let mut cmd = std::process::Command::new("schemathesis");
            cmd.current_dir(scratch.path());
            cmd.arg("--config-file")
                .arg(&config)
                .args(["run", &format!("{base}/openapi.json")])
                .args(["--checks", "not_a_server_error,response_schema_conformance"])
                .args(["--max-examples", "300", "--no-color"]);
            if let Some(auth) = &auth {
                cmd.args(["-H", auth]);
            }
            cmd.output()
                .expect("schemathesis is not installed (scripts/test.sh installs it)")
        })
        .await
        .unwrap();
        let said = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "schemathesis failed against {}:\n{said}",
            s.data
        );
        assert!(said.contains("passed"), "{said}");
    }
    s.stop().await;
}
