//! `/authz` as the proxies call it: the body before the `x-keyward-*` headers, bodies
//! cut short by the proxy, and a provider key picked by default.
#![allow(clippy::unwrap_used)]

mod common;

use common::{error_code, Answer, Backend, TestServer};
use reqwest::Method;
use serde_json::json;

on_both_backends!(
    a_body_cut_short_is_read_as_far_as_it_goes,
    the_body_wins_over_spoofed_headers,
    a_provider_key_is_picked_by_default,
    the_path_model_is_the_checked_model,
    a_prepaid_stream_must_state_its_usage_or_its_limit,
    a_body_hides_no_model_that_an_upstream_reads,
);

async fn authz(
    s: &TestServer,
    path: &str,
    secret: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> Answer {
    let mut request = s
        .client
        .post(format!("{}/authz{path}", s.data))
        .bearer_auth(secret)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or_default(),
        headers,
    }
}

/// A 100 KiB chat request naming `model` first, as Envoy forwards it: its first 64 KiB.
fn cut_body(model: &str) -> Vec<u8> {
    // Written out: `json!` would sort the keys, putting `model` after the prompt.
    let prompt = "x".repeat(100 * 1024);
    let body = format!(
        r#"{{"model": "{model}", "max_tokens": 50, "messages": [{{"role": "user", "content": "{prompt}"}}]}}"#
    );
    assert!(body.len() > 100 * 1024);
    body.as_bytes()[..64 * 1024].to_vec()
}

async fn a_body_cut_short_is_read_as_far_as_it_goes(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, secret) = s
        .create_key(json!({"allowed_models": ["gpt-4o-mini"], "tpm_limit": 40}))
        .await;
    let path = "/v1/chat/completions";
    // The allowed model, read from the cut body; its max_tokens (50) is over the key's
    // 40 TPM, so the estimate was read too.
    let a = authz(&s, path, &secret, &[], cut_body("gpt-4o-mini")).await;
    assert_eq!(
        (a.status, error_code(&a).as_str()),
        (413, "TOKENS_EXCEED_LIMIT")
    );
    let (_, roomy) = s
        .create_key(json!({"allowed_models": ["gpt-4o-mini"]}))
        .await;
    let a = authz(&s, path, &roomy, &[], cut_body("gpt-4o-mini")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.headers.contains_key("x-keyward-lease"));
    // Another model in the cut body: refused by name.
    let a = authz(&s, path, &roomy, &[], cut_body("gpt-4o")).await;
    assert_eq!(
        (a.status, error_code(&a).as_str()),
        (403, "MODEL_NOT_ALLOWED")
    );
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-4o"));
    s.stop().await;
}

async fn the_body_wins_over_spoofed_headers(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, secret) = s
        .create_key(json!({"allowed_models": ["gpt-4o-mini"], "tpm_limit": 2000}))
        .await;
    let path = "/v1/chat/completions";
    let spoofed = [
        ("x-keyward-model", "gpt-4o-mini"),
        ("x-keyward-estimated-tokens", "1"),
    ];
    // The body names gpt-4o: that is what is checked, whatever the header says.
    let body = json!({"model": "gpt-4o", "max_tokens": 10, "messages": []}).to_string();
    let a = authz(&s, path, &secret, &spoofed, body).await;
    assert_eq!(
        (a.status, error_code(&a).as_str()),
        (403, "MODEL_NOT_ALLOWED")
    );
    // The body's estimate, not the header's.
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 4000}).to_string();
    let a = authz(&s, path, &secret, &spoofed, body).await;
    assert_eq!(
        (a.status, error_code(&a).as_str()),
        (413, "TOKENS_EXCEED_LIMIT")
    );
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 1500}).to_string();
    let a = authz(&s, path, &secret, &spoofed, body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers["x-ratelimit-remaining-tokens"], "500");
    // A body that names its model twice is refused: the upstream may take either.
    let twice = r#"{"model": "gpt-4o-mini", "messages": [], "model": "gpt-4o"}"#;
    let a = authz(&s, path, &secret, &[], twice).await;
    assert_eq!((a.status, error_code(&a).as_str()), (400, "BAD_REQUEST"));
    // Without a body the headers still say it (a gateway that forwards none).
    let a = authz(&s, path, &secret, &spoofed, "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    s.stop().await;
}

async fn a_provider_key_is_picked_by_default(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, secret) = s.create_key(json!({"rate_limit": null})).await;
    let pk = s
        .admin(
            Method::POST,
            "/admin/providers/openai/keys",
            Some(json!({"label": "main", "value": "sk-upstream"})),
        )
        .await;
    let pk_id = pk.body["id"].as_str().unwrap();
    let body = r#"{"model": "gpt-4o"}"#;
    // openai has a pool: picked without being asked.
    let a = authz(&s, "/v1/chat/completions", &secret, &[], body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers["x-keyward-provider-key-id"], pk_id);
    assert_eq!(
        a.headers["x-keyward-upstream-authorization"],
        "Bearer sk-upstream"
    );
    // Opting out.
    let a = authz(
        &s,
        "/v1/chat/completions",
        &secret,
        &[("x-keyward-select", "false")],
        body,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(!a.headers.contains_key("x-keyward-provider-key-id"));
    // anthropic has no pool: admitted without a pick (no 503) ...
    let a = authz(&s, "/v1/messages", &secret, &[], body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(!a.headers.contains_key("x-keyward-provider-key-id"));
    // ... unless a pick is required.
    let a = authz(
        &s,
        "/v1/messages",
        &secret,
        &[("x-keyward-select", "true")],
        body,
    )
    .await;
    assert_eq!(
        (a.status, error_code(&a).as_str()),
        (503, "NO_PROVIDER_KEY")
    );
    s.stop().await;
}

/// Gemini routes by the model in the path: that is the model checked, whatever the body
/// says, and a path the upstream could resolve to another route is refused.
async fn the_path_model_is_the_checked_model(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, secret) = s
        .create_key(json!({"allowed_models": ["gemini-1.5-flash"]}))
        .await;
    let allowed = "/v1beta/models/gemini-1.5-flash:generateContent";
    let a = authz(&s, allowed, &secret, &[], r#"{"contents": []}"#).await;
    assert_eq!(a.status, 200, "{}", a.body);
    for (path, body) in [
        // The body names the allowed model, the path the one served.
        (
            "/v1beta/models/gemini-1.5-pro:generateContent",
            r#"{"model": "gemini-1.5-flash", "contents": []}"#,
        ),
        (
            "/v1beta/models/gemini-1.5-flash/../gemini-1.5-pro:generateContent",
            r#"{"contents": []}"#,
        ),
        (
            "/v1beta/models/gemini-1.5-flash%2F..%2Fgemini-1.5-pro:generateContent",
            r#"{"contents": []}"#,
        ),
    ] {
        let a = authz(&s, path, &secret, &[], body).await;
        assert_ne!(a.status, 200, "{path}");
        assert!(
            ["BAD_REQUEST", "MODEL_NOT_ALLOWED"].contains(&error_code(&a).as_str()),
            "{path}: {}",
            a.body
        );
    }
    // Behind nginx the original path comes undecoded in X-Original-URI.
    let a = authz(
        &s,
        "",
        &secret,
        &[(
            "x-original-uri",
            "/v1beta/models/gemini-1.5-flash%2F..%2Fgemini-1.5-pro:generateContent",
        )],
        "",
    )
    .await;
    assert_eq!((a.status, error_code(&a).as_str()), (400, "BAD_REQUEST"));
    s.stop().await;
}

/// An OpenAI chat or completions stream states its usage only when asked
/// (`stream_options.include_usage`). A prepaid key's stream that asks neither for that
/// nor names a limit (`max_tokens`, ...) would be charged the default estimate's hold
/// whatever its length: it is refused before anything is taken, and so is such a stream
/// under a spend limit. With either, or on a
/// key without a balance, or an API whose streams always state their usage, it goes
/// ahead.
async fn a_prepaid_stream_must_state_its_usage_or_its_limit(b: Backend) {
    let s = TestServer::start(b).await;
    for provider in ["openai", "anthropic"] {
        let price = json!({"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10});
        let a = s
            .admin(
                Method::PUT,
                &format!("/admin/prices/{provider}/gpt-4o"),
                Some(price),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let (_, prepaid) = s
        .create_key(json!({"rate_limit": null, "concurrent_limit": null,
                           "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let (_, postpaid) = s
        .create_key(json!({"rate_limit": null, "concurrent_limit": null}))
        .await;
    // A spend limit is charged like a balance: the same rule.
    let (_, budgeted) = s
        .create_key(json!({"rate_limit": null, "concurrent_limit": null,
                           "spend_limits": {"day": {"usd": 1}}}))
        .await;
    let unstated = r#"{"model": "gpt-4o", "stream": true, "messages": []}"#;
    for (path, secret) in [
        ("/v1/chat/completions", &prepaid),
        ("/v1/completions", &prepaid),
        ("/v1/chat/completions", &budgeted),
    ] {
        let a = authz(&s, path, secret, &[], unstated).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{path}"
        );
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("include_usage"), "{message}");
    }
    for (path, secret, body) in [
        (
            "/v1/chat/completions",
            &prepaid,
            r#"{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}"#,
        ),
        (
            "/v1/chat/completions",
            &prepaid,
            r#"{"model": "gpt-4o", "stream": true, "max_tokens": 100}"#,
        ),
        (
            "/v1/chat/completions",
            &prepaid,
            r#"{"model": "gpt-4o", "stream": false}"#,
        ),
        ("/v1/chat/completions", &prepaid, r#"{"model": "gpt-4o"}"#),
        ("/v1/chat/completions", &postpaid, unstated),
        ("/v1/messages", &prepaid, unstated),
    ] {
        let a = authz(&s, path, secret, &[], body).await;
        assert_eq!(a.status, 200, "{path} {body}: {}", a.body);
    }
    // Asking for the usage as false, or twice, is not asking.
    let a = authz(
        &s,
        "/v1/chat/completions",
        &prepaid,
        &[],
        r#"{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": false}}"#,
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    let a = authz(
        &s,
        "/v1/chat/completions",
        &prepaid,
        &[],
        r#"{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "stream_options": {"include_usage": true}}"#,
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    // A header's estimate binds no upstream: it does not state a limit (found by an
    // attacker review).
    let a = authz(
        &s,
        "/v1/chat/completions",
        &budgeted,
        &[("x-keyward-estimated-tokens", "1")],
        unstated,
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    // A long prompt the proxy cut short before `stream` (64 KiB) may be a stream: under
    // a balance or a spend limit it must state its limit before the cut; the same body
    // whole, not streaming, goes ahead, and so does the cut one on a key without either.
    let prompt = "x".repeat(70_000);
    let whole = format!(
        r#"{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "{prompt}"}}], "stream": true}}"#
    );
    let cut = whole[..65_536].to_string();
    for secret in [&prepaid, &budgeted] {
        let a = authz(&s, "/v1/chat/completions", secret, &[], cut.clone()).await;
        assert_eq!(a.status, 400, "{}", a.body);
    }
    let a = authz(&s, "/v1/chat/completions", &postpaid, &[], cut).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let stated = format!(
        r#"{{"model": "gpt-4o", "max_tokens": 100, "messages": [{{"role": "user", "content": "{prompt}"}}], "stream": true}}"#
    );
    let a = authz(
        &s,
        "/v1/chat/completions",
        &budgeted,
        &[],
        stated[..65_536].to_string(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    s.stop().await;
}

/// What lenient upstream parsers read, keyward reads too or refuses: a model after a
/// byte order mark or a lone surrogate counts under its per-model limit, and a model or
/// a token limit an upstream may read differently is refused (400).
async fn a_body_hides_no_model_that_an_upstream_reads(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, secret) = s
        .create_key(json!({"rate_limit": null, "model_limits": {"gpt-4o": {"rate_limit": 1}}}))
        .await;
    let path = "/v1/chat/completions";
    let a = authz(&s, path, &secret, &[], "\u{FEFF}{\"model\": \"gpt-4o\"}").await;
    assert_eq!(a.status, 200, "{}", a.body);
    // The model's one request a minute is spent: each disguise is seen and refused.
    for body in [
        "\u{FEFF}{\"model\": \"gpt-4o\"}",
        r#"{"x\udc00": 1, "model": "gpt-4o"}"#,
    ] {
        let a = authz(&s, path, &secret, &[], body).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (429, "RATE_LIMITED"),
            "{body}"
        );
    }
    for body in [
        r#"{"Model": "gpt-4o"}"#,
        r#"{"model": "gpt-4o-mini", "MODEL": "gpt-4o"}"#,
        r#"{"model": "gpt-4o-mini", "max_tokens": "4096"}"#,
        r#"{"model": "gpt-4o-mini", "max_tokens": 1.5}"#,
        r#"{"model": "gpt-4o-mini", "stream": 1}"#,
        r#"{"model": "gpt-4o-mini", "max_token\u017f": 5}"#,
    ] {
        let a = authz(&s, path, &secret, &[], body).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{body}"
        );
    }
    s.stop().await;
}
