//! The trust boundary of the data plane (contract guarantee 9): nothing hands out a
//! provider secret, charges a key, cools a provider key or renews a lease unless the
//! caller proves it may, with a client key, a lease keyward issued, or the data-plane
//! token. Each test walks an attack from the pod network and checks, through the admin
//! API and `/metrics`, that it changed nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{error_code, eventually, Cluster, Shape, TestServer, DATA_TOKEN};
use keyward::config;
use reqwest::Method;
use serde_json::{json, Value};

on_both_shapes!(
    without_the_data_token_no_secret_leaves_and_no_key_cools,
    forged_and_altered_leases_charge_and_cool_nothing,
    a_disabled_keys_leases_are_not_renewed,
);

/// A provider of the test's own, so process-wide metrics and pools are the test's alone.
fn unique_provider() -> String {
    format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn add_provider_key(s: &TestServer, provider: &str, label: &str) -> String {
    let value = format!("sk-secret-{label}-0000000000");
    let key = s
        .add_provider_key(provider, json!({"label": label, "value": value}))
        .await;
    key["id"].as_str().unwrap().to_string()
}

/// Every key of the provider with its live state, by id.
async fn live(s: &TestServer, provider: &str) -> Vec<(String, Value)> {
    let keys = s.provider_keys(provider).await;
    keys.iter()
        .map(|k| (k["id"].as_str().unwrap().to_string(), k["live"].clone()))
        .collect()
}

async fn assert_nothing_cools(s: &TestServer, provider: &str) {
    for (id, live) in live(s, provider).await {
        assert_eq!(live["cooldown_remaining_ms"], 0, "{id} cools: {live}");
        assert_eq!(live["suspended"], false, "{id} is suspended: {live}");
    }
}

/// The value of one sample of `/metrics` (0 when absent).
async fn sample(s: &TestServer, series: &str) -> f64 {
    let text = s.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn refusals(endpoint: &str, reason: &str) -> String {
    format!("keyward_data_plane_refusals_total{{endpoint=\"{endpoint}\",reason=\"{reason}\"}}")
}

/// Finding 1 of the trust-boundary issue as a test: select → report walks the whole
/// pool's secrets and cools every key for a day, with no credential at all.
async fn without_the_data_token_no_secret_leaves_and_no_key_cools(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let provider = unique_provider();
    let a = add_provider_key(s, &provider, "a").await;
    let b = add_provider_key(s, &provider, "b").await;
    let no_token = sample(s, &refusals("select", "no_token")).await;

    for token in [None, Some("not-the-data-token-000000"), Some("")] {
        let answer = c
            .any(1)
            .data_post_auth("/v1/select", json!({"provider": provider}), token)
            .await;
        assert_eq!(
            (answer.status, error_code(&answer).as_str()),
            (401, "UNAUTHORIZED"),
            "{token:?}"
        );
        assert!(!answer.body.to_string().contains("sk-secret"));
        // Not even a malformed body tells a caller without the token anything else.
        let answer = c
            .any(1)
            .data_post_auth("/v1/select", json!({"nonsense": 1}), token)
            .await;
        assert_eq!(answer.status, 401, "{}", answer.body);
    }
    for id in [&a, &b] {
        let answer = c
            .any(2)
            .data_post(
                "/v1/report",
                json!({"provider_key_id": id, "upstream_status": 429, "retry_after_s": 86400}),
            )
            .await;
        assert_eq!(
            (answer.status, error_code(&answer).as_str()),
            (401, "UNAUTHORIZED")
        );
    }
    // An empty report used to insert a usage row each time.
    let answer = s.data_post("/v1/report", json!({})).await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_nothing_cools(s, &provider).await;
    assert!(sample(s, &refusals("select", "no_token")).await >= no_token + 2.0);

    // With the token, the pool still serves, both keys in turn.
    let mut seen = Vec::new();
    for i in 0..2 {
        let answer = c
            .any(i)
            .data_post_token("/v1/select", json!({"provider": provider}))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(answer.body["provider_key"]["value"]
            .as_str()
            .unwrap()
            .starts_with("sk-secret-"));
        seen.push(answer.body["provider_key"]["id"].clone());
    }
    assert_ne!(seen[0], seen[1], "neither key was cooled: both are picked");
    c.stop().await;

    // With no data token configured, those calls are refused as such.
    let c = Cluster::start(shape, |raw| {
        raw.remove(config::DATA_TOKEN);
    })
    .await;
    for path in ["/v1/select", "/v1/report"] {
        let body = json!({"provider": "openai"});
        let body = if path == "/v1/select" {
            body
        } else {
            json!({})
        };
        let answer = c.any(0).data_post_token(path, body).await;
        assert_eq!(
            (answer.status, error_code(&answer).as_str()),
            (403, "DATA_TOKEN_NOT_CONFIGURED"),
            "{path}"
        );
    }
    c.stop().await;
}

/// Finding 2: a report trusted the key id inside any well-formed lease id. Forged,
/// altered and borrowed leases are refused and change nothing; the real lease then
/// settles once, on any replica, and cools only the provider key picked for it.
async fn forged_and_altered_leases_charge_and_cool_nothing(shape: Shape) {
    let c = Cluster::start(shape, |raw| {
        raw.insert(keyward::config::DEFAULT_PRICE, common::DEFAULT_PRICE.into());
    })
    .await;
    let s = &c.servers[0];
    let provider = unique_provider();
    let a = add_provider_key(s, &provider, "a").await;
    let b = add_provider_key(s, &provider, "b").await;
    let (key, secret) = s
        .create_key(json!({"is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let key_id = key["id"].as_str().unwrap().to_string();
    let admitted = c
        .any(1)
        .admit(json!({"key": secret, "provider": provider, "select": true}))
        .await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    let lease = admitted.body["lease_id"].as_str().unwrap().to_string();
    let picked = admitted.body["provider_key"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if picked == a { &b } else { &a };
    assert!(lease.starts_with(&key_id), "{lease}");
    assert!(lease.contains(&picked), "the lease names its pick: {lease}");
    let not_found = sample(s, &refusals("report", "lease_not_found")).await;

    // A real key id with random bytes (the old format), a new-format lease with a made-up
    // signature, and the real lease with one character changed at either end.
    let random = format!("{key_id}.{}", uuid::Uuid::new_v4().simple());
    let (body, _) = lease.rsplit_once('.').unwrap();
    let made_up = format!("{body}.{}", uuid::Uuid::new_v4().simple());
    let flip = |i: usize| {
        let mut bytes = lease.clone().into_bytes();
        bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(bytes).unwrap()
    };
    let token_at = key_id.len() + 5;
    for forged in [random, made_up, flip(token_at), flip(lease.len() - 1)] {
        let answer = c
            .any(2)
            .data_post(
                "/v1/report",
                json!({"lease_id": forged, "cost_usd": 0.9, "prompt_tokens": 5,
                       "upstream_status": 429, "retry_after_s": 86400}),
            )
            .await;
        assert_eq!(
            (answer.status, error_code(&answer).as_str()),
            (404, "LEASE_NOT_FOUND"),
            "{forged}"
        );
        let answer = c
            .any(0)
            .data_post(&format!("/v1/leases/{forged}/renew"), json!({}))
            .await;
        assert_eq!(
            (answer.status, error_code(&answer).as_str()),
            (404, "LEASE_NOT_FOUND"),
            "{forged}"
        );
    }
    // The real lease used to cool a provider key it did not pick, by body or header.
    let borrowed = json!({"lease_id": lease, "provider_key_id": other, "cost_usd": 0.9,
                         "upstream_status": 429, "retry_after_s": 86400});
    let answer = c.any(2).data_post("/v1/report", borrowed).await;
    assert_eq!(
        (answer.status, error_code(&answer).as_str()),
        (400, "BAD_REQUEST"),
        "{}",
        answer.body
    );
    assert_nothing_cools(s, &provider).await;
    assert!(sample(s, &refusals("report", "lease_not_found")).await >= not_found + 4.0);
    assert!(sample(s, &refusals("report", "not_the_lease_provider_key")).await >= 1.0);

    // Nothing was charged, and the lease itself still settles: once, on any replica,
    // cooling the key it picked (named by the lease alone) and no other.
    let answer = c
        .any(0)
        .data_post(&format!("/v1/leases/{lease}/renew"), json!({}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["lease_id"], lease.as_str());
    let report =
        json!({"lease_id": lease, "cost_usd": 0.25, "upstream_status": 429, "retry_after_s": 30});
    let answer = c.any(2).data_post("/v1/report", report.clone()).await;
    assert_eq!(answer.body, json!({"recorded": true}));
    let answer = c.any(1).data_post("/v1/report", report).await;
    assert_eq!(answer.body["duplicate"], true);
    let states = live(s, &provider).await;
    for (id, state) in states {
        let cooling = state["cooldown_remaining_ms"].as_i64().unwrap() > 0;
        assert_eq!(cooling, id == picked, "{id}: {state}");
    }
    let used = eventually(10, || async {
        let k = s
            .admin(Method::GET, &format!("/admin/keys/{key_id}"), None)
            .await;
        (k.body["balance_used_usd"] != 0).then(|| k.body["balance_used_usd"].clone())
    })
    .await;
    assert_eq!(used, json!(0.25), "only the real report was charged");
    c.stop().await;
}

/// A lease verifies on every replica that holds the keyring it was signed with, also
/// after a rotation that keeps the old key as a previous one; a replica that does not
/// know the key refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_key_rotation_on_every_replica() {
    const OLD: &str = common::ENCRYPTION_KEY;
    const NEW: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let db = Arc::new(common::TestDb::new(common::Backend::Postgres).await);
    let prefix = common::unique_prefix();
    let server = |key: &'static str, previous: Option<&'static str>| {
        let mut raw = common::base_config(&db);
        raw.insert(config::REDIS_URL, common::redis_url());
        raw.insert(config::REDIS_PREFIX, prefix.clone());
        raw.insert(config::ENCRYPTION_KEY, key.to_string());
        if let Some(previous) = previous {
            raw.insert(config::ENCRYPTION_KEYS_PREVIOUS, previous.to_string());
        }
        TestServer::start_on(db.clone(), raw)
    };
    let before = server(OLD, None).await;
    // Started before any secret was stored (after, start-up would refuse its key).
    let stranger = server(NEW, None).await;
    let (_, secret) = before.create_key(json!({})).await;
    let admitted = before.admit(json!({"key": secret})).await;
    let lease = admitted.body["lease_id"].as_str().unwrap().to_string();

    let answer = stranger
        .data_post(&format!("/v1/leases/{lease}/renew"), json!({}))
        .await;
    assert_eq!(answer.status, 404, "{}", answer.body);

    let after = server(NEW, Some(OLD)).await;
    let answer = after
        .data_post(&format!("/v1/leases/{lease}/renew"), json!({}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = after
        .data_post("/v1/report", json!({"lease_id": lease}))
        .await;
    assert_eq!(answer.body, json!({"recorded": true}));
    for s in [before, stranger, after] {
        s.stop().await;
    }
    common::delete_prefix(&common::redis_url(), &prefix).await;
}

/// The data-plane token is compared whole: a prefix, a longer value or another scheme
/// does not pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_token_is_compared_whole() {
    let s = TestServer::start(common::Backend::Sqlite).await;
    let longer = format!("{DATA_TOKEN}x");
    for token in [&DATA_TOKEN[..DATA_TOKEN.len() - 1], longer.as_str()] {
        let answer = s
            .data_post_auth("/v1/select", json!({"provider": "openai"}), Some(token))
            .await;
        assert_eq!(answer.status, 401, "{token}");
    }
    let answer = s
        .client
        .post(format!("{}/v1/select", s.data))
        .header("authorization", format!("Basic {DATA_TOKEN}"))
        .json(&json!({"provider": "openai"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let answer = s
        .data_post_token("/v1/select", json!({"provider": "openai"}))
        .await;
    assert_eq!(
        (answer.status, error_code(&answer).as_str()),
        (503, "NO_PROVIDER_KEY"),
        "the right token passes"
    );
    s.stop().await;
}

/// A client key's lease cannot take a provider key out for a day: its 429 cools the key
/// for at most `KEYWARD_PROVIDER_COOLDOWN_MAX_S`. A report with the data-plane token (the
/// operator's own gateway) may set the upstream's full `retry_after_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_cools_its_key_for_at_most_the_configured_maximum() {
    let s = TestServer::start_with(common::Backend::Sqlite, |raw| {
        raw.insert(config::PROVIDER_COOLDOWN_MAX_S, "120".to_string());
    })
    .await;
    let provider = unique_provider();
    let a = add_provider_key(&s, &provider, "a").await;
    let b = add_provider_key(&s, &provider, "b").await;
    let (_, secret) = s.create_key(json!({})).await;
    let admitted = s
        .admit(json!({"key": secret, "provider": provider, "select": true}))
        .await;
    let lease = admitted.body["lease_id"].as_str().unwrap();
    let picked = admitted.body["provider_key"]["id"].as_str().unwrap();
    let other = if picked == a { &b } else { &a };
    let day = json!({"lease_id": lease, "upstream_status": 429, "retry_after_s": 86400});
    assert_eq!(s.data_post("/v1/report", day).await.body["recorded"], true);
    let day = json!({"provider_key_id": other, "upstream_status": 429, "retry_after_s": 86400});
    assert_eq!(
        s.data_post_token("/v1/report", day).await.body["recorded"],
        true
    );
    let states = live(&s, &provider).await;
    let remaining = |id: &str| {
        let (_, state) = states.iter().find(|(k, _)| k == id).unwrap();
        state["cooldown_remaining_ms"].as_i64().unwrap()
    };
    assert!(
        (110_000..=120_000).contains(&remaining(picked)),
        "{states:?}"
    );
    assert!(remaining(other) > 86_000_000, "{states:?}");
    s.stop().await;
}

/// The same maximum holds for a suspension a lease's 401/403 sets, whatever
/// `KEYWARD_PROVIDER_SUSPEND_S` says (a client can make the upstream answer 401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_suspends_its_key_for_at_most_the_configured_maximum() {
    let s = TestServer::start_with(common::Backend::Sqlite, |raw| {
        raw.insert(config::PROVIDER_COOLDOWN_MAX_S, "120".to_string());
        raw.insert(config::PROVIDER_SUSPEND_S, "7200".to_string());
    })
    .await;
    let provider = unique_provider();
    add_provider_key(&s, &provider, "a").await;
    let (_, secret) = s.create_key(json!({})).await;
    let admitted = s
        .admit(json!({"key": secret, "provider": provider, "select": true}))
        .await;
    let lease = admitted.body["lease_id"].as_str().unwrap();
    let report = json!({"lease_id": lease, "upstream_status": 401});
    assert_eq!(
        s.data_post("/v1/report", report).await.body["recorded"],
        true
    );
    let states = live(&s, &provider).await;
    let remaining = states[0].1["suspended_remaining_ms"].as_i64().unwrap();
    assert!((110_000..=120_000).contains(&remaining), "{states:?}");
    s.stop().await;
}

/// Someone whose key was disabled (or deleted) cannot keep its leases alive to report on
/// later: renewals of its leases answer 404 on every replica; the report of a request
/// that did run is still recorded.
async fn a_disabled_keys_leases_are_not_renewed(shape: Shape) {
    let c = Cluster::start(shape, |_| {}).await;
    let s = &c.servers[0];
    let (key, secret) = s.create_key(json!({"concurrent_limit": 2})).await;
    let id = key["id"].as_str().unwrap();
    let leases: Vec<String> =
        futures_util::future::join_all((0..2).map(|_| s.admit(json!({"key": secret}))))
            .await
            .iter()
            .map(|a| a.body["lease_id"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(renew(c.any(0), &leases[0]).await.status, 200);
    let patched = s
        .admin(
            Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"is_active": false})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    for i in 0..c.servers.len() {
        let r = renew(c.any(i), &leases[0]).await;
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (404, "LEASE_NOT_FOUND"),
            "{}",
            r.body
        );
    }
    let reported = c
        .any(1)
        .data_post(
            "/v1/report",
            json!({"lease_id": leases[1], "prompt_tokens": 3}),
        )
        .await;
    assert_eq!(reported.body, json!({"recorded": true}));
    c.stop().await;
}

async fn renew(s: &TestServer, lease: &str) -> common::Answer {
    s.data_post(&format!("/v1/leases/{lease}/renew"), json!({}))
        .await
}

/// A request announcing a body and sending none: what it was answered, up to `code` (or
/// until the connection closes), and how long that took to come.
async fn announced_but_unsent(
    s: &TestServer,
    head: &str,
    code: &str,
) -> (String, std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.data.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    stream
        .write_all(format!("{head}Host: x\r\nContent-Type: application/json\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    while !said.windows(code.len()).any(|w| w == code.as_bytes()) {
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(15), stream.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => said.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    (
        String::from_utf8_lossy(&said).into_owned(),
        started.elapsed(),
    )
}

/// No body is read, nor held, before the proof the headers carry: `/v1/select` without
/// the data-plane token, `/authz` without a client key and `/v1/report/upstream` without
/// a lease it issued are refused as soon as their headers arrive, though they announce a
/// body and send none (else the answer would wait for the 10 s request bound). A body
/// announced over its endpoint's bound is refused at once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_body_is_read_before_its_proof() {
    let s = TestServer::start(common::Backend::Sqlite).await;
    let length = "Content-Length: 1000000\r\n";
    let mut failures = Vec::new();
    for (head, status, code) in [
        (
            format!("POST /v1/select HTTP/1.1\r\n{length}"),
            401,
            "UNAUTHORIZED",
        ),
        (
            format!("POST /v1/select HTTP/1.1\r\nAuthorization: Bearer wrong\r\n{length}"),
            401,
            "UNAUTHORIZED",
        ),
        (
            format!("POST /authz/v1/chat/completions HTTP/1.1\r\n{length}"),
            401,
            "MISSING_KEY",
        ),
        (
            format!("POST /authz HTTP/1.1\r\nX-Original-URI: /v1/messages\r\n{length}"),
            401,
            "MISSING_KEY",
        ),
        (
            format!("POST /v1/report/upstream HTTP/1.1\r\n{length}"),
            400,
            "BAD_REQUEST",
        ),
        (
            format!("POST /v1/report/upstream HTTP/1.1\r\nx-keyward-lease: forged\r\n{length}"),
            404,
            "LEASE_NOT_FOUND",
        ),
        (
            "POST /v1/admit HTTP/1.1\r\nContent-Length: 300000\r\n".to_string(),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ] {
        let (said, took) = announced_but_unsent(&s, &head, code).await;
        let first = head.lines().next().unwrap_or_default();
        let answered = said.lines().next().unwrap_or_default();
        if !said.starts_with(&format!("HTTP/1.1 {status}")) || !said.contains(code) {
            failures.push(format!(
                "{first}: {answered} after {took:?}, not {status} {code}"
            ));
        } else if took >= std::time::Duration::from_secs(2) {
            failures.push(format!("{first}: answered after {took:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    s.stop().await;
}

/// A request of `head` (its first line and headers) announcing a body of `length` bytes
/// and sending all of it but the last byte, as fast as it goes, from address `from` to
/// `to`: keyward holds what it read of the body until the request bound (10 s) answers
/// it, unless it refused the body at once. A refusal may close the connection under the
/// send: that is no failure here.
async fn almost_sent(
    from: std::net::IpAddr,
    to: std::net::SocketAddr,
    head: &str,
    length: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    let mut request = format!(
        "{head}Host: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .into_bytes();
    request.resize(request.len() + length - 1, b' ');
    let sent = stream.write_all(&request);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), sent).await;
    stream
}

/// Whether keyward has answered on `stream` (or closed it): a body it still holds has
/// neither.
async fn answered(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let read = stream.read(&mut buf);
    tokio::time::timeout(std::time::Duration::from_millis(50), read)
        .await
        .is_ok()
}

/// One remote peer (the machine's own non-loopback address), sending `/authz` bodies of
/// 1 MiB slowly (all but their last byte) with three client keys, holds at most its share
/// of the bodies keyward holds for remote peers (8 MiB of 64 MiB): its next body, of any
/// key and any endpoint (`/v1/admit` too), is refused at once with 503 `BUSY`, while
/// loopback (the proxy beside keyward) is served at once: an `/authz` with a body of one
/// of the same keys, and the `/v1/report/upstream` of a lease of that key. So is an admin
/// call with a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_spend_every_tenants_body_budget() {
    use std::time::{Duration, Instant};
    const MIB: usize = 1024 * 1024;
    let own = common::own_address();
    let db = Arc::new(common::TestDb::new(common::Backend::Sqlite).await);
    let s = TestServer::start_listening(db.clone(), common::base_config(&db), "0.0.0.0:0").await;
    let port = s.data.rsplit(':').next().unwrap().parse().unwrap();
    let remote = std::net::SocketAddr::new(own, port);
    let mut secrets = Vec::new();
    for _ in 0..3 {
        secrets.push(s.create_key(json!({})).await.1);
    }
    // A lease of the first key, taken by the proxy before the flood.
    let admitted = s.admit(json!({"key": secrets[0]})).await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    let lease = admitted.body["lease_id"].as_str().unwrap().to_string();
    let head = |secret: &str| {
        format!("POST /authz/v1/chat/completions HTTP/1.1\r\nx-api-key: {secret}\r\n")
    };
    let started = Instant::now();
    // Four bodies of each key: 12 MiB, more than the peer's share, and as much of each
    // key as a key's share would have been.
    let flood = (0..12).map(|i| {
        let head = head(&secrets[i % 3]);
        async move { almost_sent(own, remote, &head, MIB).await }
    });
    let mut holders: Vec<_> = futures_util::future::join_all(flood).await;
    // What keyward has not answered after a moment, it holds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut held = 0;
    for stream in &mut holders {
        held += usize::from(!answered(stream).await);
    }
    // Bodies refused while others grew may leave part of the share free: more bodies,
    // one at a time, until eight are held (the share, each holding 1 MiB).
    for i in 0..8 {
        if held >= 8 {
            break;
        }
        let mut stream = almost_sent(own, remote, &head(&secrets[i % 3]), MIB).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        held += usize::from(!answered(&mut stream).await);
        holders.push(stream);
    }
    let body = format!(
        r#"{{"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(256 * 1024)
    );
    let from_the_peer = reqwest::Client::builder()
        .local_address(own)
        .build()
        .unwrap();
    let send = |request: reqwest::RequestBuilder| async move {
        let asked = Instant::now();
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        // An admission's answer has an empty body; a refusal's is the error body.
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or_default();
        let answer = common::Answer {
            status,
            body,
            headers,
        };
        (answer, asked.elapsed())
    };
    let authz = |client: &reqwest::Client, base: &str, secret: &str| {
        client
            .post(format!("{base}/authz/v1/chat/completions"))
            .header("x-api-key", secret)
            .header("content-type", "application/json")
            .body(body.clone())
    };
    let quick = |took: Duration| took < Duration::from_secs(2);
    // The proxy beside keyward, on loopback, is served at once: an `/authz` with a body
    // of a key the peer's bodies hold...
    let (a, took) = send(authz(&s.client, &s.data, &secrets[0])).await;
    assert_eq!(
        (a.status, quick(took)),
        (200, true),
        "a loopback /authz, after {took:?}: {}",
        a.body
    );
    // ...and its report of that key's lease (a body of 100 KB, mostly blanks).
    let report = format!(
        r#"{{"status": 200, "path": "/v1/chat/completions", "head": "", "complete": true{}}}"#,
        " ".repeat(100_000)
    );
    let (a, took) = send(
        s.client
            .post(format!("{}/v1/report/upstream", s.data))
            .header("x-keyward-lease", &lease)
            .header("content-type", "application/json")
            .body(report),
    )
    .await;
    assert_eq!(
        (a.status, a.body["recorded"].as_bool(), quick(took)),
        (200, Some(true), true),
        "a loopback report of the key's lease, after {took:?}: {}",
        a.body
    );
    // So is the operator's admin call with a body (100 KB, mostly blanks).
    let asked = Instant::now();
    let padded = format!("{{\"name\": \"after the flood\"{}}}", " ".repeat(100_000));
    let a = s
        .admin_raw(
            Method::POST,
            "/admin/keys",
            Some(padded),
            Some(common::TOKEN),
        )
        .await;
    let took = asked.elapsed();
    assert_eq!(
        (a.status, quick(took)),
        (201, true),
        "an admin call, after {took:?}: {}",
        a.body
    );
    // The peer holds its share and no more; its next body is refused at once, whatever
    // its key, and whatever its endpoint: `/v1/admit`'s body counts too.
    assert_eq!(held, 8, "bodies of one peer held at once (1 MiB each)");
    let base = format!("http://{remote}");
    let admit = from_the_peer
        .post(format!("{base}/v1/admit"))
        .json(&json!({"key": secrets[1]}));
    let mut failures = Vec::new();
    for (what, request) in [
        ("/authz", authz(&from_the_peer, &base, &secrets[2])),
        ("/v1/admit", admit),
    ] {
        let (a, took) = send(request).await;
        let message = a.body["error"]["message"].as_str().unwrap_or_default();
        if (a.status, error_code(&a).as_str(), quick(took)) != (503, "BUSY", true)
            || !message.contains(&format!("peer address ({own})"))
        {
            failures.push(format!(
                "the peer's next {what}, after {took:?}: {}",
                a.body
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // All of it within the request bound of the first bodies, which were held throughout.
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    drop(holders);
    s.stop().await;
}
