//! Guarantee 8: bad input gets a 4xx with the contract's error body, changes nothing,
//! and never crashes the server: on the admin API, and for the names every data-plane
//! endpoint accepts.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{error_code, Backend, TestServer, TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

on_both_backends!(
    bad_create_bodies_are_refused_and_change_nothing,
    bad_patch_and_balance_bodies_are_refused_and_change_nothing,
    bad_ids_and_queries_are_refused,
    bodies_that_are_not_json_text_are_refused,
    bad_names_are_refused_on_every_data_plane_endpoint,
    paths_and_header_counts_are_refused_with_the_error_body,
);

const DATA_TOKEN: &str = "test-data-token-0123456789";

/// Names no endpoint may accept: a NUL (Postgres refuses it in a usage record, after the
/// request was admitted), 5 KB (within every body bound), and control characters.
fn bad_names() -> Vec<(&'static str, String)> {
    vec![
        ("NUL", "gpt-4o\u{0}".to_string()),
        ("5 KB", "m".repeat(5_000)),
        ("newline", "gpt-4o\nmini".to_string()),
        ("bell", "\u{7}".to_string()),
        ("C1 control", "g\u{85}pt".to_string()),
    ]
}

fn refused_naming(a: &common::Answer, field: &str, what: &str) {
    assert_eq!(a.status, 400, "{field} with {what}: {}", a.body);
    assert_eq!(
        (a.status, error_code(a).as_str()),
        (400, "BAD_REQUEST"),
        "{field} with {what}: {}",
        a.body
    );
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(field), "{field} with {what}: {message}");
}

async fn bad_names_are_refused_on_every_data_plane_endpoint(b: Backend) {
    let s = TestServer::start_with(b, |raw| {
        raw.insert(keyward::config::DATA_TOKEN, DATA_TOKEN.to_string());
    })
    .await;
    let (key, secret) = s.create_key(json!({"rate_limit": 100})).await;
    let id = key["id"].as_str().unwrap().to_string();
    let pk = s
        .admin(
            Method::POST,
            "/admin/providers/openai/keys",
            Some(json!({"label": "main", "value": "sk-upstream"})),
        )
        .await;
    assert_eq!(pk.status, 201, "{}", pk.body);
    let pool_before = s
        .admin(Method::GET, "/admin/providers/openai/keys", None)
        .await
        .body;
    let lease = s.admit(json!({"key": secret, "model": "gpt-4o"})).await;
    assert_eq!(lease.status, 200, "{}", lease.body);
    let lease = lease.body["lease_id"].as_str().unwrap().to_string();

    for (what, bad) in bad_names() {
        // /v1/admit: each name, with and without a pick.
        for field in ["provider", "model", "api_format"] {
            for select in [false, true] {
                let mut body = json!({"key": secret, "provider": "openai", "select": select});
                body[field] = json!(bad);
                let a = s.admit(body).await;
                refused_naming(&a, field, what);
            }
        }
        // /authz: the model from the body, the provider from its header.
        let authz = |body: String| {
            s.client
                .post(format!("{}/authz/v1/chat/completions", s.data))
                .bearer_auth(&secret)
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let a = authz(json!({"model": bad, "max_tokens": 5}).to_string())
            .await
            .unwrap();
        refused_naming(&common::Answer::read("authz", a).await, "model", what);
        // /v1/select, with the data-plane token.
        let a = s
            .client
            .post(format!("{}/v1/select", s.data))
            .bearer_auth(DATA_TOKEN)
            .json(&json!({"provider": bad}))
            .send()
            .await
            .unwrap();
        refused_naming(&common::Answer::read("select", a).await, "provider", what);
        // /v1/report, authorized by a real lease: refused, and the lease is not used up.
        let a = s
            .data_post("/v1/report", json!({"lease_id": lease, "model": bad}))
            .await;
        refused_naming(&a, "model", what);
    }
    // A header can carry neither a NUL nor a newline, but a tab and other bytes.
    for value in ["open\tai", "gpt\t4o"] {
        for header in ["x-keyward-provider", "x-keyward-model"] {
            let a = s
                .client
                .post(format!("{}/authz/v1/chat/completions", s.data))
                .bearer_auth(&secret)
                .header(header, value)
                .send()
                .await
                .unwrap();
            let a = common::Answer::read("authz header", a).await;
            let field = header.trim_start_matches("x-keyward-");
            refused_naming(&a, field, "a tab");
        }
    }

    // Nothing changed: one admission counted, the lease still reports, the pool is as it
    // was, and accounting goes on (the one report reaches the stats).
    let next = s.admit(json!({"key": secret, "model": "gpt-4o"})).await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(next.headers["x-ratelimit-remaining-requests"], "98");
    let reported = s
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "model": "gpt-4o", "prompt_tokens": 3}),
        )
        .await;
    assert_eq!(reported.body, json!({"recorded": true}));
    let pool_after = s
        .admin(Method::GET, "/admin/providers/openai/keys", None)
        .await
        .body;
    assert_eq!(
        pool_after["keys"][0]["live"],
        pool_before["keys"][0]["live"]
    );
    common::eventually(10, || async {
        let stats = s
            .admin(Method::GET, &format!("/admin/keys/{id}/stats"), None)
            .await;
        (stats.body["total_requests"] == 1).then_some(())
    })
    .await;
    s.stop().await;
}

async fn paths_and_header_counts_are_refused_with_the_error_body(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, secret) = s.create_key(json!({})).await;
    for path in [
        "/authz/%ff",
        "/authz/v1/%ff%fe/chat/completions",
        "/v1/leases/%ff/renew",
    ] {
        let a = s
            .client
            .post(format!("{}{path}", s.data))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        let a = common::Answer::read(path, a).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{path}"
        );
    }
    // More headers than hyper's default of 100, on both listeners.
    for base in [&s.data, &s.admin] {
        for count in [101, 150, 900] {
            let mut request = s
                .client
                .get(format!("{base}/admin/keys"))
                .bearer_auth(TOKEN);
            for i in 0..count {
                request = request.header(format!("x-h-{i}"), "v");
            }
            let a = common::Answer::read("many headers", request.send().await.unwrap()).await;
            assert_eq!(
                (a.status, error_code(&a).as_str()),
                (431, "HEADERS_TOO_LARGE"),
                "{count} headers"
            );
        }
        // 90 of them (with the client's own few) still pass.
        let mut request = s
            .client
            .get(format!("{base}/admin/keys"))
            .bearer_auth(TOKEN);
        for i in 0..90 {
            request = request.header(format!("x-h-{i}"), "v");
        }
        assert_ne!(request.send().await.unwrap().status(), 431);
    }
    s.stop().await;
}

/// Everything the admin API would show about every key.
async fn snapshot(s: &TestServer) -> (Value, Value) {
    let users = s.admin(Method::GET, "/admin/keys", None).await.body;
    let standalone = s
        .admin(Method::GET, "/admin/keys/standalone", None)
        .await
        .body;
    (users, standalone)
}

async fn expect_400(s: &TestServer, method: Method, path: &str, body: &str) {
    let a = s
        .admin_raw(method.clone(), path, Some(body.to_string()), Some(TOKEN))
        .await;
    assert_eq!(a.status, 400, "{method} {path} {body}: {}", a.body);
    assert_eq!(error_code(&a), "BAD_REQUEST", "{body}");
}

async fn bad_create_bodies_are_refused_and_change_nothing(b: Backend) {
    let s = TestServer::start(b).await;
    s.create_key(json!({"user_id": "u", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let before = snapshot(&s).await;
    for body in [
        "{",
        "{\"name\": \"x\",}",
        "[]",
        "\"key\"",
        "42",
        "null",
        r#"{"unknown": 1}"#,
        r#"{"user_id": 5}"#,
        r#"{"name": ["a"]}"#,
        r#"{"allowed_models": "gpt-4o"}"#,
        r#"{"allowed_models": [1, 2]}"#,
        r#"{"rate_limit": "100"}"#,
        r#"{"rate_limit": 1.5}"#,
        r#"{"rate_limit": -1}"#,
        r#"{"rate_limit": 0}"#,
        r#"{"tpm_limit": 0}"#,
        r#"{"tpm_limit": -100}"#,
        r#"{"concurrent_limit": 0}"#,
        r#"{"concurrent_limit": 99999999999999999999}"#,
        r#"{"expire_days": 0}"#,
        r#"{"expire_days": -3}"#,
        r#"{"expire_days": 100000}"#,
        r#"{"expires_at": "next week"}"#,
        r#"{"expires_at": "2001-01-01T00:00:00Z"}"#,
        r#"{"expire_days": 1, "expires_at": "2999-01-01T00:00:00Z"}"#,
        r#"{"is_standalone": "yes"}"#,
        r#"{"is_standalone": true, "initial_balance_usd": -5}"#,
        r#"{"is_standalone": true, "initial_balance_usd": 1e10}"#,
        r#"{"is_standalone": true, "initial_balance_usd": 0.0000001}"#,
        r#"{"is_standalone": true, "initial_balance_usd": "5"}"#,
        r#"{"initial_balance_usd": 5}"#,
        r#"{"auto_delete_on_expiry": "true"}"#,
        r#"{"name": ""}"#,
        r#"{"name": "line\nbreak"}"#,
        r#"{"user_id": "   "}"#,
    ] {
        expect_400(&s, Method::POST, "/admin/keys", body).await;
    }
    assert_eq!(
        snapshot(&s).await,
        before,
        "a refused create changed something"
    );
    s.stop().await;
}

async fn bad_patch_and_balance_bodies_are_refused_and_change_nothing(b: Backend) {
    let s = TestServer::start(b).await;
    let (key, _) = s
        .create_key(json!({"is_standalone": true, "initial_balance_usd": 2}))
        .await;
    let id = key["id"].as_str().unwrap();
    let before = snapshot(&s).await;
    let patch = format!("/admin/keys/{id}");
    for body in [
        "{",
        "[]",
        r#"{"rate_limit": -1}"#,
        r#"{"rate_limit": 0}"#,
        r#"{"tpm_limit": "many"}"#,
        r#"{"concurrent_limit": 0}"#,
        r#"{"is_active": "false"}"#,
        r#"{"expires_at": 5}"#,
        r#"{"expires_at": "tomorrow"}"#,
        r#"{"allowed_providers": [""]}"#,
        r#"{"id": "00000000-0000-4000-8000-000000000000"}"#,
        r#"{"created_at": "2020-01-01T00:00:00Z"}"#,
        r#"{"balance_used_usd": 0}"#,
        r#"{"remaining_balance_usd": 100}"#,
        r#"{"key_hash": "00"}"#,
    ] {
        expect_400(&s, Method::PATCH, &patch, body).await;
    }
    let balance = format!("/admin/keys/{id}/balance");
    for body in [
        "",
        "{}",
        r#"{"amount": 1}"#,
        r#"{"amount_usd": "1"}"#,
        r#"{"amount_usd": null}"#,
        r#"{"amount_usd": [1]}"#,
        r#"{"amount_usd": 1, "note": "x"}"#,
        r#"{"amount_usd": 1.0000001}"#,
        r#"{"amount_usd": 2000000000}"#,
        r#"{"amount_usd": -1e400}"#,
        r#"{"amount_usd": NaN}"#,
    ] {
        expect_400(&s, Method::POST, &balance, body).await;
    }
    expect_400(
        &s,
        Method::POST,
        "/admin/keys/expire",
        r#"{"auto_delete": "yes"}"#,
    )
    .await;
    expect_400(
        &s,
        Method::POST,
        "/admin/keys/expire",
        r#"{"everything": true}"#,
    )
    .await;
    assert_eq!(
        snapshot(&s).await,
        before,
        "a refused change changed something"
    );
    s.stop().await;
}

async fn bad_ids_and_queries_are_refused(b: Backend) {
    let s = TestServer::start(b).await;
    s.create_key(json!({})).await;
    let before = snapshot(&s).await;
    for id in [
        "not-a-uuid",
        "1",
        "00000000-0000-4000-8000-00000000000g",
        "%FF%FE",
        "..%2F..%2Fetc",
    ] {
        for (method, suffix) in [
            (Method::GET, ""),
            (Method::PATCH, ""),
            (Method::DELETE, ""),
            (Method::POST, "/reveal"),
            (Method::POST, "/balance"),
            (Method::GET, "/stats"),
        ] {
            let body = if method == Method::GET || method == Method::DELETE {
                ""
            } else {
                r#"{"amount_usd": 1}"#
            };
            expect_400(&s, method, &format!("/admin/keys/{id}{suffix}"), body).await;
        }
    }
    for query in [
        "?active=maybe",
        "?active=yes",
        "?page=2",
        "?user_id=u&sort=asc",
    ] {
        let a = s
            .admin(Method::GET, &format!("/admin/keys{query}"), None)
            .await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (400, "BAD_REQUEST"),
            "{query}"
        );
    }
    let a = s
        .admin(Method::GET, "/admin/keys/standalone?user_id=u", None)
        .await;
    assert_eq!(a.status, 400, "standalone keys are not listed by user");
    let a = s.admin(Method::PUT, "/admin/keys", None).await;
    assert_eq!(
        (a.status, error_code(&a).as_str()),
        (405, "METHOD_NOT_ALLOWED")
    );
    let a = s.admin(Method::GET, "/admin/nothing-here", None).await;
    assert_eq!((a.status, error_code(&a).as_str()), (404, "NOT_FOUND"));
    assert_eq!(snapshot(&s).await, before);
    s.stop().await;
}

async fn bodies_that_are_not_json_text_are_refused(b: Backend) {
    let s = TestServer::start(b).await;
    let before = snapshot(&s).await;
    // Invalid UTF-8 inside a JSON string.
    let invalid_utf8: Vec<u8> = [&b"{\"name\": \""[..], &[0xff, 0xfe, 0xfd], &b"\"}"[..]].concat();
    let a = s
        .admin_raw(Method::POST, "/admin/keys", Some(invalid_utf8), Some(TOKEN))
        .await;
    assert_eq!((a.status, error_code(&a).as_str()), (400, "BAD_REQUEST"));
    // An oversized body is refused before it is parsed.
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(300 * 1024));
    let sent = s
        .client
        .post(format!("{}/admin/keys", s.admin))
        .bearer_auth(TOKEN)
        .body(huge)
        .send()
        .await;
    match sent {
        Ok(response) => assert_eq!(response.status().as_u16(), 413),
        // Its Content-Length is refused at once, and the connection closed: the client
        // may fail to send the rest before it reads the 413.
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    // A name far longer than allowed but under the size limit.
    let long = format!("{{\"name\": \"{}\"}}", "x".repeat(1000));
    expect_400(&s, Method::POST, "/admin/keys", &long).await;
    // Deep nesting is a parse error, not a stack overflow.
    let deep = format!(
        "{{\"name\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let a = s
        .admin_raw(Method::POST, "/admin/keys", Some(deep), Some(TOKEN))
        .await;
    assert!(a.status == 400 || a.status == 413, "{}", a.status);
    assert_eq!(snapshot(&s).await, before);
    // Huge headers: 431 with the error body, on both listeners.
    for base in [&s.admin, &s.data] {
        let response = s
            .client
            .get(format!("{base}/admin/keys"))
            .bearer_auth(TOKEN)
            .header("x-padding", "p".repeat(40 * 1024))
            .send()
            .await
            .unwrap();
        let a = common::Answer::read("huge headers", response).await;
        assert_eq!(
            (a.status, error_code(&a).as_str()),
            (431, "HEADERS_TOO_LARGE")
        );
    }
    // And the server is still well.
    assert_eq!(s.admin(Method::GET, "/admin/keys", None).await.status, 200);
    s.stop().await;
}

/// Anyone on the pod network reaches the data plane: a connection whose headers never
/// finish is closed, and a request whose body never finishes is answered 408
/// `REQUEST_TIMEOUT`, each within its bound (10 s), while other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_headers_and_bodies_do_not_hold_a_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start(Backend::Sqlite).await;
    let addr = s.data.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    let mut headers_only = tokio::net::TcpStream::connect(&addr).await.unwrap();
    headers_only
        .write_all(b"POST /v1/admit HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut body_short = tokio::net::TcpStream::connect(&addr).await.unwrap();
    body_short
        .write_all(b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"key\":")
        .await
        .unwrap();
    // Meanwhile the others are served.
    let a = s.admit(json!({"key": "sk-kw-unknown-000000000000"})).await;
    assert_eq!(a.status, 401);
    let read_all = |mut stream: tokio::net::TcpStream| async move {
        let mut out = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(15),
            stream.read_to_end(&mut out),
        )
        .await;
        (read.is_ok(), String::from_utf8_lossy(&out).into_owned())
    };
    let (closed, said) = read_all(headers_only).await;
    assert!(closed, "a connection with unfinished headers stayed open");
    assert!(!said.contains("200"), "{said}");
    let (closed, said) = read_all(body_short).await;
    assert!(closed, "a connection with an unfinished body stayed open");
    assert!(
        said.starts_with("HTTP/1.1 408") && said.contains("REQUEST_TIMEOUT"),
        "{said}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(14));
    s.stop().await;
}

/// A client that pipelines requests for a large answer (`/openapi.json`) and never reads
/// the answers does not hold its connection: once writing has made no progress for the
/// request bound (10 s), the connection closes, before every answer was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_does_not_hold_a_connection() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    const REQUESTS: usize = 1000;
    let s = TestServer::start(Backend::Sqlite).await;
    let addr = s.data.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // About 7 KB each: far more than the kernel's buffers on both sides hold.
    let request = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(REQUESTS);
    stream.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    // Meanwhile the others are served.
    let a = s.admit(json!({"key": "sk-kw-unknown-000000000000"})).await;
    assert_eq!(a.status, 401);
    // Read nothing for the bound and a margin; then the connection must be closed: what
    // keyward sent before it gave up arrives, then the end (or a reset), at once.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let (out, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let answers = String::from_utf8_lossy(&out)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        closed,
        "the connection stayed open ({answers} answers read, {:?} after the requests)",
        started.elapsed()
    );
    assert!(answers < REQUESTS, "every answer was sent: {answers}");
    assert!(started.elapsed() < Duration::from_secs(18));
    s.stop().await;
}

/// A connection to `to` from `from`, this machine's own non-loopback address: to a
/// listener on `0.0.0.0`, a remote peer's.
async fn connect_from(from: IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// What keyward sends back to `request` on `stream`, and whether it then closed the
/// connection (within 3 s).
async fn until_closed(mut stream: tokio::net::TcpStream, request: &[u8]) -> (bool, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A connection closed at once may refuse the write itself.
    if stream.write_all(request).await.is_err() {
        return (true, String::new());
    }
    let mut out = Vec::new();
    let read = async {
        let mut chunk = [0; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .is_ok();
    (closed, String::from_utf8_lossy(&out).into_owned())
}

/// The value of one series in a scrape (0 when absent).
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// keyward with its data plane on `0.0.0.0` and `KEYWARD_MAX_CONNECTIONS_PER_PEER` at
/// `per_peer`; with this machine's own address and the data plane's address from it.
async fn open_to_the_network(per_peer: usize) -> (TestServer, IpAddr, SocketAddr) {
    let own = common::own_address();
    let db = std::sync::Arc::new(common::TestDb::new(Backend::Sqlite).await);
    let mut raw = common::base_config(&db);
    raw.insert(
        keyward::config::MAX_CONNECTIONS_PER_PEER,
        per_peer.to_string(),
    );
    let s = TestServer::start_listening(db, raw, "0.0.0.0:0").await;
    let port = s.data.rsplit(':').next().unwrap().parse().unwrap();
    (s, own, SocketAddr::new(own, port))
}

/// A loopback client (the proxy beside keyward, the probe) is answered at once on new
/// connections (the server's own client may hold one open from before): `/readyz` and an
/// admission, each within 2 s.
async fn loopback_is_served(s: &TestServer, secret: &str) {
    let wait = Duration::from_secs(2);
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let ready = tokio::time::timeout(wait, fresh().get(format!("{}/readyz", s.data)).send())
        .await
        .expect("loopback /readyz waited behind a remote peer's connections")
        .unwrap();
    assert_eq!(ready.status(), 200);
    let admit = fresh()
        .post(format!("{}/v1/admit", s.data))
        .json(&json!({"key": secret}))
        .send();
    let a = tokio::time::timeout(wait, admit)
        .await
        .expect("a loopback admission waited behind a remote peer's connections")
        .unwrap();
    assert_eq!(a.status(), 200);
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// One remote peer holds at most `KEYWARD_MAX_CONNECTIONS_PER_PEER` of the data plane's
/// connections, here 8 that never finish their headers: its next one is closed at once,
/// unanswered, and counted, while loopback clients are answered at once; once one of its
/// connections closes, the peer is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holds_at_most_its_share_of_the_data_planes_connections() {
    use tokio::io::AsyncWriteExt;
    let (s, own, remote) = open_to_the_network(8).await;
    let (_, secret) = s.create_key(json!({})).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut stream = connect_from(own, remote).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    // Accepted after the 8 (the listen queue is first in, first out), so refused.
    let (closed, said) = until_closed(connect_from(own, remote).await, HEALTHZ).await;
    assert!(
        closed && said.is_empty(),
        "the peer's 9th connection was not closed unanswered: {said:?}"
    );
    loopback_is_served(&s, &secret).await;
    let series = "keyward_connections_refused_total{listener=\"data\",reason=\"peer_cap\"}";
    assert!(sample(&s.metrics().await, series) >= 1.0);

    // One of its connections closes: the peer has room again.
    drop(held.pop());
    let from_the_peer = reqwest::Client::builder()
        .local_address(own)
        .build()
        .unwrap();
    common::eventually(5, || async {
        let answer = from_the_peer
            .get(format!("http://{remote}/healthz"))
            .send()
            .await;
        answer.ok().filter(|a| a.status() == 200).map(|_| ())
    })
    .await;
    drop(held);
    s.stop().await;
}

/// Remote peers cannot take the connections loopback peers have of their own: with all
/// the data plane's connections for remote peers held by one peer (its cap raised to
/// all of them), the next remote connection is closed at once and counted, and loopback
/// clients are still answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_peer_filling_the_data_plane_leaves_loopback_served() {
    let remote_total = keyward::http::Bounds::DATA.remote;
    // Both ends of each connection are in this process.
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let open_files: usize = limits
        .lines()
        .find_map(|l| {
            l.strip_prefix("Max open files")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(
        open_files > 2 * remote_total + 2000,
        "this test holds {} sockets: raise the open-file limit (ulimit -n, now {open_files})",
        2 * remote_total
    );
    let (s, own, remote) = open_to_the_network(remote_total).await;
    let (_, secret) = s.create_key(json!({})).await;
    let mut held = Vec::with_capacity(remote_total);
    for _ in 0..remote_total {
        held.push(connect_from(own, remote).await);
    }
    loopback_is_served(&s, &secret).await;
    let (closed, said) = until_closed(connect_from(own, remote).await, HEALTHZ).await;
    assert!(
        closed && said.is_empty(),
        "a remote connection over the data plane's cap was not closed unanswered: {said:?}"
    );
    let series = "keyward_connections_refused_total{listener=\"data\",reason=\"remote_cap\"}";
    assert!(sample(&s.metrics().await, series) >= 1.0);
    drop(held);
    s.stop().await;
}

/// An answer given before its request's body was read (a proof missing, a body
/// announced over its bound) says `Connection: close` and closes: the connection cannot
/// carry another request past the unread body, and a client that pooled it would send
/// its next request into a closing socket (reqwest saw `IncompleteMessage`). An answer
/// to a request whose body was read keeps the connection, so a proxy's pool stays warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_was_read_closes_the_connection() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(Backend::Sqlite).await;
    let addr = s.data.trim_start_matches("http://").to_string();
    let (_, secret) = s.create_key(json!({})).await;
    // The head of the answer, and whether the server closed after it.
    let exchange = |request: String| {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let (out, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
            (String::from_utf8_lossy(&out).to_lowercase(), closed)
        }
    };
    let unread = [
        // No data token, 10 of 1,000 bytes sent.
        "POST /v1/select HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"provider\""
            .to_string(),
        // Announced over the bound.
        "POST /v1/admit HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n{".to_string(),
    ];
    for request in unread {
        let (head, closed) = exchange(request.clone()).await;
        assert!(
            head.contains("\r\nconnection: close\r\n") && closed,
            "{request:?}: {head:?} closed={closed}"
        );
    }
    let body = json!({"key": secret}).to_string();
    let read = format!(
        "POST /v1/admit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (head, closed) = exchange(read).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("connection: close") && !closed,
        "a request read whole lost its connection: {head:?}"
    );
    s.stop().await;
}

/// A request head that never ends is refused as soon as it outgrows what keyward buffers
/// of a connection (48 KiB), not held until the header bound: hyper's default buffer
/// (about 400 KiB) let one peer's 1,024 connections take 400 MiB with endless headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_request_head_is_refused_once_it_outgrows_the_buffer() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(Backend::Sqlite).await;
    let addr = s.data.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
        "a".repeat(100 * 1024)
    );
    // The server may stop reading (and close) before all of it is written.
    let _ = stream.write_all(head.as_bytes()).await;
    let (out, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(
        closed,
        "100 KiB of an unfinished head was buffered and the connection held"
    );
    let answer = String::from_utf8_lossy(&out);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    // And the server is still well.
    let healthy = s
        .client
        .get(format!("{}/healthz", s.data))
        .send()
        .await
        .unwrap();
    assert_eq!(healthy.status(), 200);
    s.stop().await;
}

/// A client that pipelines requests and reads the answers slowly, enough to count as
/// progress, holds little of the kernel's memory: keyward's sockets have fixed buffers,
/// not autotuned ones (which held 250 to 400 KiB of answers per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_little_of_the_kernels_memory() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(Backend::Sqlite).await;
    let addr = s.data.trim_start_matches("http://").to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let client_port = stream.local_addr().unwrap().port();
    // About 7 KB each; the client reads nothing.
    let request = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(500);
    let _ =
        tokio::time::timeout(Duration::from_secs(2), stream.write_all(request.as_bytes())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // keyward's end of the connection: its send queue (ss's Send-Q).
    let out = std::process::Command::new("ss")
        .args([
            "-tnH",
            &format!("sport = :{port} and dport = :{client_port}"),
        ])
        .output()
        .expect("ss (iproute2) is not installed");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let queued: usize = line
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no connection in {line:?}"));
    assert!(
        queued <= 64 * 1024,
        "keyward's send queue holds {queued} bytes for one slow reader"
    );
    drop(stream);
    s.stop().await;
}

/// Reads `stream` until the server closes it (an end or a reset), for at most `wait`:
/// what arrived, and whether it was closed within that time.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut chunk = vec![0; 64 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (out, closed)
}
