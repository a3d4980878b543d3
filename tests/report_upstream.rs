//! `POST /v1/report/upstream`, the proxies' report, straight over HTTP on both shapes:
//! authorized by the lease in `x-keyward-lease` alone (forged or missing → refused,
//! nothing changes), bounded (an oversized excerpt is refused with the JSON error
//! body), and for every fixture answer the key's stats show exactly the tokens the
//! upstream stated (none when it stated none: the reservation stays).
#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine;
use common::{error_code, eventually, Cluster, Shape, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

on_both_shapes!(
    every_fixture_answer_is_charged_its_stated_tokens,
    only_the_lease_authorizes_and_bounds_hold,
    an_upstream_429_cools_the_leases_pick_and_repeats_count_once,
    used_up_rate_limit_headers_rest_the_key_until_their_reset,
);

/// Every fixture of `tests/fixtures/usage`, the path its API is called at, and the total
/// tokens (input + output) it states, or `None` when it states none.
const FIXTURES: &[(&str, &str, Option<i64>)] = &[
    ("openai_chat.json", "/v1/chat/completions", Some(1117 + 46)),
    ("openai_chat.sse", "/v1/chat/completions", Some(2006 + 300)),
    ("openai_chat_no_usage.sse", "/v1/chat/completions", None),
    ("openai_responses.json", "/v1/responses", Some(36 + 387)),
    ("openai_responses.sse", "/v1/responses", Some(4120 + 18)),
    ("openai_completions.json", "/v1/completions", Some(5 + 7)),
    ("openai_embeddings.json", "/v1/embeddings", Some(17)),
    ("anthropic_messages.json", "/v1/messages", Some(6595 + 503)),
    ("anthropic_messages.sse", "/v1/messages", Some(2572 + 42)),
    (
        "anthropic_messages_delta_counts.sse",
        "/v1/messages",
        Some(2580 + 77),
    ),
    ("anthropic_messages_error.sse", "/v1/messages", None),
    (
        "gemini_stream.sse",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        Some(1200 + 405),
    ),
    (
        "gemini_stream.json",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        Some(1200 + 405),
    ),
    (
        "gemini_stream_cut.sse",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        None,
    ),
    (
        "gemini_generate_content.json",
        "/v1beta/models/gemini-2.0-flash:generateContent",
        Some(55 + 7),
    ),
    ("error.json", "/v1/chat/completions", None),
];

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/usage/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(path).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Posts a proxy report with `lease` in `x-keyward-lease` (when given).
async fn post(s: &TestServer, lease: Option<&str>, body: String) -> common::Answer {
    let mut request = s
        .client
        .post(format!("{}/v1/report/upstream", s.data))
        .header("content-type", "application/json")
        .body(body);
    if let Some(lease) = lease {
        request = request.header("x-keyward-lease", lease);
    }
    common::Answer::read("/v1/report/upstream", request.send().await.unwrap()).await
}

/// A lease for `secret`, reserving `estimate` tokens.
async fn lease(s: &TestServer, secret: &str, estimate: i64) -> String {
    let a = s
        .admit(json!({"key": secret, "estimated_tokens": estimate}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["lease_id"].as_str().unwrap().to_string()
}

async fn stats(s: &TestServer, key_id: &str) -> Value {
    s.admin(Method::GET, &format!("/admin/keys/{key_id}/stats"), None)
        .await
        .body
}

/// Tokens left in the key's TPM window, as an admission of `estimate` reports them.
async fn remaining_tokens(s: &TestServer, secret: &str) -> i64 {
    let a = s.admit(json!({"key": secret, "estimated_tokens": 1})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["limits"]["tokens"]["remaining"].as_i64().unwrap()
}

async fn every_fixture_answer_is_charged_its_stated_tokens(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    for (i, (name, path, tokens)) in FIXTURES.iter().enumerate() {
        let s = c.any(i);
        let (key, secret) = s
            .create_key(json!({"rate_limit": null, "tpm_limit": 100_000, "concurrent_limit": 1}))
            .await;
        let key_id = key["id"].as_str().unwrap().to_string();
        let lease = lease(s, &secret, 100).await;
        // Whole in the head, as the Envoy filter sends a short answer.
        let body = json!({"status": 200, "path": path, "head": b64(&fixture(name)), "tail": "",
                          "complete": true, "headers": {"content-type": "text/event-stream"}});
        let a = post(c.any(i + 1), Some(&lease), body.to_string()).await;
        assert_eq!(a.body, json!({"recorded": true}), "{name}");
        // The slot (one) came back, and TPM settled on the stated tokens (the 1-token
        // probe included), or kept the reservation of 100 when none were stated.
        let left = remaining_tokens(c.any(i + 2), &secret).await;
        assert_eq!(left, 100_000 - tokens.unwrap_or(100) - 1, "{name}");
        let total = eventually(10, || async {
            let st = stats(s, &key_id).await;
            (st["total_requests"] == 1).then(|| st["total_tokens"].as_i64().unwrap())
        })
        .await;
        assert_eq!(total, tokens.unwrap_or(0), "{name}: the usage row's tokens");
    }

    // A long stream in head and tail, the middle missing: the usage at its end is read.
    let s = c.any(0);
    let (key, secret) = s
        .create_key(json!({"rate_limit": null, "tpm_limit": 100_000}))
        .await;
    let key_id = key["id"].as_str().unwrap().to_string();
    let lease = lease(s, &secret, 100).await;
    let mut long = Vec::new();
    for _ in 0..2000 {
        long.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"word \"}}]}\n\n");
    }
    long.extend_from_slice(&fixture("openai_chat.sse"));
    let (head, tail) = (&long[..32 * 1024], &long[long.len() - 32 * 1024..]);
    let body = json!({"status": 200, "api_format": "openai_chat", "head": b64(head),
                      "tail": b64(tail), "complete": false});
    let a = post(c.any(1), Some(&lease), body.to_string()).await;
    assert_eq!(a.body, json!({"recorded": true}));
    let total = eventually(10, || async {
        let st = stats(s, &key_id).await;
        (st["total_requests"] == 1).then(|| st["total_tokens"].as_i64().unwrap())
    })
    .await;
    assert_eq!(total, 2006 + 300);
    c.stop().await;
}

async fn only_the_lease_authorizes_and_bounds_hold(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = c.any(0);
    let (key, secret) = s
        .create_key(json!({"rate_limit": null, "tpm_limit": 100_000, "concurrent_limit": 1}))
        .await;
    let key_id = key["id"].as_str().unwrap().to_string();
    let lease = lease(s, &secret, 100).await;
    let good = json!({"status": 200, "path": "/v1/chat/completions",
                      "head": b64(&fixture("openai_chat.json")), "complete": true})
    .to_string();

    // No lease, a made-up one, the real one altered: refused before the body is read.
    let (body, _) = lease.rsplit_once('.').unwrap();
    let made_up = format!("{body}.{}", uuid::Uuid::new_v4().simple());
    let mut altered = lease.clone().into_bytes();
    altered[key_id.len() + 3] ^= 1;
    let altered = String::from_utf8(altered).unwrap();
    let missing = post(c.any(1), None, good.clone()).await;
    assert_eq!(
        (missing.status, error_code(&missing).as_str()),
        (400, "BAD_REQUEST")
    );
    for forged in [made_up.as_str(), altered.as_str(), "not-a-lease"] {
        let a = post(c.any(1), Some(forged), good.clone()).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (404, "LEASE_NOT_FOUND"),
            "{forged}"
        );
        // Even with a body that is not JSON: the lease is checked first.
        let a = post(c.any(2), Some(forged), "{not json".into()).await;
        assert_eq!(a.status, 404, "{forged}");
    }

    // Oversized and malformed bodies: a 4xx with the contract's body, nothing recorded.
    let big = b64(&vec![b' '; 64 * 1024 + 1]);
    for (body, status) in [
        (json!({"status": 200, "head": big}).to_string(), 413),
        (json!({"status": 200, "tail": big}).to_string(), 413),
        (
            format!(r#"{{"status": 200, "head": "{}"}}"#, "A".repeat(300 * 1024)),
            413,
        ),
        (json!({"status": 200, "head": "***"}).to_string(), 400),
        (json!({"status": 700}).to_string(), 400),
        (json!({"head": ""}).to_string(), 400),
        (json!({"status": 200, "api_format": "fax"}).to_string(), 400),
        (json!({"status": 200, "surprise": 1}).to_string(), 400),
        ("[1]".to_string(), 400),
    ] {
        // A body announced over the bound is refused at once and its connection closed:
        // the client may fail to send the rest before it reads the 413.
        let sent = c
            .any(1)
            .client
            .post(format!("{}/v1/report/upstream", c.any(1).data))
            .header("content-type", "application/json")
            .header("x-keyward-lease", &lease)
            .body(body.clone())
            .send()
            .await;
        let a = match sent {
            Ok(answer) => common::Answer::read("/v1/report/upstream", answer).await,
            Err(e) if status == 413 && e.is_request() => continue,
            Err(e) => panic!("{e}"),
        };
        error_code(&a);
        assert_eq!(
            a.status,
            status,
            "{}: {}",
            &body[..body.len().min(80)],
            a.body
        );
    }
    // Nothing of the above settled the lease: its one slot is still taken.
    let busy = s.admit(json!({"key": secret})).await;
    assert_eq!(error_code(&busy), "CONCURRENCY_LIMITED");

    // The real lease settles with the answer's tokens.
    let a = post(c.any(2), Some(&lease), good).await;
    assert_eq!(a.body, json!({"recorded": true}));
    let total = eventually(10, || async {
        let st = stats(s, &key_id).await;
        (st["total_requests"] == 1).then(|| st["total_tokens"].as_i64().unwrap())
    })
    .await;
    assert_eq!(total, 1117 + 46);
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("keyward_data_plane_refusals_total{endpoint=\"report_upstream\",reason=\"lease_not_found\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("keyward_upstream_usage_total{outcome=\"parsed\"}"));
    c.stop().await;
}

async fn an_upstream_429_cools_the_leases_pick_and_repeats_count_once(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = c.any(0);
    let provider = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pk = s
        .admin(
            Method::POST,
            &format!("/admin/providers/{provider}/keys"),
            Some(json!({"label": "a", "value": "sk-secret-a-0000000000"})),
        )
        .await;
    let pk = pk.body["id"].as_str().unwrap().to_string();
    let (_, secret) = s.create_key(json!({"rate_limit": null})).await;
    let a = c
        .any(1)
        .admit(json!({"key": secret, "provider": provider, "select": true}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let lease = a.body["lease_id"].as_str().unwrap().to_string();
    let body = json!({"status": 429, "path": "/v1/chat/completions",
                      "headers": {"Retry-After": "30", "x-ratelimit-remaining-requests": "0"},
                      "head": b64(&fixture("error.json")), "complete": true})
    .to_string();
    assert_eq!(
        post(c.any(2), Some(&lease), body.clone()).await.body,
        json!({"recorded": true})
    );
    assert_eq!(
        post(c.any(0), Some(&lease), body).await.body,
        json!({"recorded": false, "duplicate": true})
    );
    let keys = s
        .admin(
            Method::GET,
            &format!("/admin/providers/{provider}/keys"),
            None,
        )
        .await;
    let keys = keys
        .body
        .as_array()
        .or(keys.body["keys"].as_array())
        .unwrap()
        .clone();
    let key = keys.iter().find(|k| k["id"] == pk.as_str()).unwrap();
    let left = key["live"]["cooldown_remaining_ms"].as_i64().unwrap();
    assert!(
        (25_000..=30_000).contains(&left),
        "Retry-After 30 s: {left}"
    );
    c.stop().await;
}

/// An admission with `"select": true`: its lease id and its pick.
async fn admit_select(s: &TestServer, secret: &str, provider: &str) -> (String, String) {
    let a = s
        .admit(json!({"key": secret, "provider": provider, "select": true}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    (
        a.body["lease_id"].as_str().unwrap().to_string(),
        a.body["provider_key"]["id"].as_str().unwrap().to_string(),
    )
}

/// The issue's case: an answer with `x-ratelimit-remaining-requests: 0` and a reset of
/// 20 s rests the lease's pick (the next select skips it) until the reset, when it
/// returns; the listing shows what was learned and that the cooldown came from the
/// headers. Anthropic's headers do the same with an RFC 3339 reset.
async fn used_up_rate_limit_headers_rest_the_key_until_their_reset(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = c.any(0);
    let provider = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let first = s
        .add_provider_key(
            &provider,
            json!({"label": "a", "value": "sk-learn-a-0000000000", "priority": 0}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let second = s
        .add_provider_key(
            &provider,
            json!({"label": "b", "value": "sk-learn-b-0000000000", "priority": 1}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, secret) = s.create_key(json!({"rate_limit": null})).await;
    let advance = |ms: i64| {
        for server in &c.servers {
            server.state.counters.time_shift().advance(ms);
        }
    };
    let answer = |headers: Value| {
        json!({"status": 200, "path": "/v1/chat/completions", "headers": headers,
               "head": b64(&fixture("openai_chat.json")), "complete": true})
        .to_string()
    };

    // Requests left: nothing rests, the first key stays first.
    let (lease, picked) = admit_select(c.any(1), &secret, &provider).await;
    assert_eq!(picked, first);
    let headers =
        json!({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "20s"});
    let a = post(c.any(2), Some(&lease), answer(headers)).await;
    assert_eq!(a.body, json!({"recorded": true}));
    let (lease, picked) = admit_select(c.any(0), &secret, &provider).await;
    assert_eq!(picked, first, "requests were left");

    // Used up, reset in 20 s: the next selects skip it.
    let headers = json!({"X-RateLimit-Remaining-Requests": "0", "x-ratelimit-reset-requests": "20s",
                         "x-ratelimit-remaining-tokens": "149984", "x-ratelimit-reset-tokens": "6m0s"});
    let a = post(c.any(1), Some(&lease), answer(headers)).await;
    assert_eq!(a.body, json!({"recorded": true}));
    let metrics = c.any(1).metrics().await;
    assert!(
        metrics.contains(&format!(
            "keyward_provider_key_events_total{{event=\"learned_cooldown\",provider=\"{provider}\"}} 1"
        )),
        "{metrics}"
    );
    for i in 0..3 {
        assert_eq!(
            admit_select(c.any(i), &secret, &provider).await.1,
            second,
            "the first key rests"
        );
    }
    let keys = c.any(2).provider_keys(&provider).await;
    let key = keys.iter().find(|k| k["id"] == first.as_str()).unwrap();
    let live = &key["live"];
    let left = live["cooldown_remaining_ms"].as_i64().unwrap();
    assert!((15_000..=20_000).contains(&left), "{live}");
    assert_eq!(live["cooldown_cause"]["from_headers"], true, "{live}");
    assert_eq!(live["cooldown_cause"]["upstream_status"], 200, "{live}");
    let learned = &live["learned"];
    assert_eq!(learned["remaining_requests"], 0, "{live}");
    assert_eq!(learned["remaining_tokens"], 149_984, "{live}");
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(learned[field].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    assert_eq!(at("requests_reset_at") - at("learned_at"), 20_000, "{live}");
    assert_eq!(at("tokens_reset_at") - at("learned_at"), 360_000, "{live}");
    let other = keys.iter().find(|k| k["id"] == second.as_str()).unwrap();
    assert!(other["live"]["learned"].is_null(), "{other}");

    // After the reset it is back.
    advance(21_000);
    let (lease, picked) = admit_select(c.any(1), &secret, &provider).await;
    assert_eq!(picked, first, "back after the reset");

    // Anthropic: input tokens used up until a time 30 s ahead (a duration from the
    // report, so the shifted counter clock does not matter).
    let reset = chrono::Utc::now() + chrono::Duration::seconds(30);
    let headers = json!({"anthropic-ratelimit-requests-remaining": "40",
                         "anthropic-ratelimit-input-tokens-remaining": "0",
                         "anthropic-ratelimit-input-tokens-reset": reset.to_rfc3339()});
    let a = post(c.any(0), Some(&lease), answer(headers)).await;
    assert_eq!(a.body, json!({"recorded": true}));
    assert_eq!(
        admit_select(c.any(2), &secret, &provider).await.1,
        second,
        "input tokens used up"
    );
    let keys = c.any(1).provider_keys(&provider).await;
    let key = keys.iter().find(|k| k["id"] == first.as_str()).unwrap();
    assert_eq!(key["live"]["learned"]["remaining_tokens"], 0, "{key}");
    assert_eq!(key["live"]["learned"]["remaining_requests"], 40, "{key}");
    assert_eq!(key["live"]["cooldown_cause"]["from_headers"], true, "{key}");
    advance(31_000);
    assert_eq!(
        admit_select(c.any(0), &secret, &provider).await.1,
        first,
        "back after the reset"
    );
    c.stop().await;
}
