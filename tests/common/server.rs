//! keyward in-process: a real server on port 0 over the test's own database
//! ([`TestServer`]), the configuration it starts from, its answers ([`Answer`],
//! [`error_code`]), and several instances of one deployment [`Shape`] sharing a database
//! and a Redis prefix ([`Cluster`]).

use std::sync::Arc;
use std::time::Duration;

use keyward::config::{self, Config, RawConfig};
use reqwest::Method;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::db::{Backend, TestDb};
use super::redis::{delete_prefix, redis_url, unique_prefix};

pub const TOKEN: &str = "test-admin-token-0123456789";
/// The data-plane token of test servers (`/v1/select`, reports without a lease).
pub const DATA_TOKEN: &str = "test-data-token-0123456789";
/// `KEYWARD_DEFAULT_PRICE` for tests whose keys have a balance but whose requests'
/// prices are not the point: 1 USD per million input tokens, 2 per million output.
pub const DEFAULT_PRICE: &str = r#"{"input_per_mtok_usd": 1, "output_per_mtok_usd": 2}"#;
/// A fixed key so Postgres servers sharing a database can read each other's secrets.
pub const ENCRYPTION_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The configuration a test server runs with, before the test tweaks it.
pub fn base_config(db: &TestDb) -> RawConfig {
    let mut raw = RawConfig::new();
    raw.insert(config::DATABASE_URL, db.url.clone());
    raw.insert(config::ADMIN_TOKEN, TOKEN.to_string());
    raw.insert(config::DATA_TOKEN, DATA_TOKEN.to_string());
    raw.insert(config::ENCRYPTION_KEY, ENCRYPTION_KEY.to_string());
    raw.insert(config::EXPIRY_INTERVAL_S, "0".to_string());
    raw.insert(config::SHUTDOWN_GRACE_S, "5".to_string());
    raw
}

pub struct TestServer {
    pub data: String,
    pub admin: String,
    pub client: reqwest::Client,
    pub db: Arc<TestDb>,
    pub state: keyward::http::AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    /// Reads a response whose body must be JSON.
    pub async fn read(what: &str, response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{what}: answer ({status}) is not JSON: {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        Answer {
            status,
            body,
            headers,
        }
    }
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut RawConfig)) -> TestServer {
        let db = TestDb::new(backend).await;
        let mut raw = base_config(&db);
        tweak(&mut raw);
        Self::start_on(Arc::new(db), raw).await
    }

    pub async fn start_on(db: Arc<TestDb>, raw: RawConfig) -> TestServer {
        Self::start_listening(db, raw, "127.0.0.1:0").await
    }

    /// Like [`Self::start_on`], with the data plane bound to `data` (`0.0.0.0:0`: reached
    /// from the machine's own non-loopback address too, as a remote peer); `self.data`
    /// reaches it over loopback either way.
    pub async fn start_listening(db: Arc<TestDb>, raw: RawConfig, data: &str) -> TestServer {
        let config = Config::from_raw(&raw).unwrap();
        let data = TcpListener::bind(data).await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let data_addr =
            std::net::SocketAddr::from(([127, 0, 0, 1], data.local_addr().unwrap().port()));
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let parts = keyward::app::build(&config).await.unwrap();
        let state = parts.state.clone();
        let task = tokio::spawn(keyward::app::run_parts(parts, config, data, admin, async {
            let _ = rx.await;
        }));
        let server = TestServer {
            data: format!("http://{data_addr}"),
            admin: format!("http://{admin_addr}"),
            client: reqwest::Client::new(),
            db,
            state,
            shutdown: Some(tx),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self
                .client
                .get(format!("{}/readyz", self.data))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server did not become ready");
    }

    /// An admin call with the right token.
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string());
        self.admin_raw(method, path, body, Some(TOKEN)).await
    }

    pub async fn admin_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<impl Into<reqwest::Body>>,
        token: Option<&str>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.admin));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        Answer::read(path, request.send().await.unwrap()).await
    }

    /// A data-plane call with a JSON body and no credential but what the body holds.
    pub async fn data_post(&self, path: &str, body: Value) -> Answer {
        self.data_post_auth(path, body, None).await
    }

    /// A data-plane call with the data-plane token, as a trusted gateway makes it.
    pub async fn data_post_token(&self, path: &str, body: Value) -> Answer {
        self.data_post_auth(path, body, Some(DATA_TOKEN)).await
    }

    /// A data-plane call with `Authorization: Bearer <token>` when a token is given.
    pub async fn data_post_auth(&self, path: &str, body: Value, token: Option<&str>) -> Answer {
        let mut request = self.client.post(format!("{}{path}", self.data)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Answer::read(path, request.send().await.unwrap()).await
    }

    /// The data plane's Prometheus scrape, as text.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(format!("{}/metrics", self.data)).send();
        response.await.unwrap().text().await.unwrap()
    }

    pub async fn admit(&self, body: Value) -> Answer {
        self.data_post("/v1/admit", body).await
    }

    /// Adds a provider key through the admin API and returns its record.
    pub async fn add_provider_key(&self, provider: &str, body: Value) -> Value {
        let path = format!("/admin/providers/{provider}/keys");
        let a = self.admin(Method::POST, &path, Some(body)).await;
        assert_eq!(a.status, 201, "{}", a.body);
        a.body
    }

    /// The provider's keys, by priority, each with its `live` state.
    pub async fn provider_keys(&self, provider: &str) -> Vec<Value> {
        let path = format!("/admin/providers/{provider}/keys");
        let a = self.admin(Method::GET, &path, None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["keys"].as_array().unwrap().clone()
    }

    /// Creates a key and returns `(key, secret)`.
    pub async fn create_key(&self, body: Value) -> (Value, String) {
        let a = self.admin(Method::POST, "/admin/keys", Some(body)).await;
        assert_eq!(a.status, 201, "{}", a.body);
        let secret = a.body["secret"].as_str().unwrap().to_string();
        (a.body["key"].clone(), secret)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// The id a lease's usage record and duplicate guard carry: the signed lease id's inner
/// `<key id>.<token>` (the same whichever key signed it).
pub fn lease_record_id(lease: &str) -> String {
    lease.splitn(3, '.').take(2).collect::<Vec<_>>().join(".")
}

/// Asserts the contract's error body and returns its code.
pub fn error_code(answer: &Answer) -> String {
    let error = &answer.body["error"];
    assert!(error.is_object(), "not an error body: {}", answer.body);
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        answer.body
    );
    assert_eq!(
        answer
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    error["code"].as_str().unwrap().to_string()
}

/// The two deployment shapes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// SQLite and in-process counters: one instance.
    Embedded,
    /// Postgres and Redis: any number of instances sharing both.
    Distributed,
}

/// Instances of keyward sharing one database (and, distributed, one Redis prefix).
pub struct Cluster {
    pub servers: Vec<TestServer>,
    pub db: Arc<TestDb>,
    redis_prefix: Option<String>,
}

impl Cluster {
    /// Three instances when distributed, one when embedded.
    pub async fn start(shape: Shape, tweak: impl Fn(&mut RawConfig)) -> Cluster {
        let n = if shape == Shape::Distributed { 3 } else { 1 };
        Self::start_n(shape, n, tweak).await
    }

    pub async fn start_n(shape: Shape, n: usize, tweak: impl Fn(&mut RawConfig)) -> Cluster {
        let backend = match shape {
            Shape::Embedded => Backend::Sqlite,
            Shape::Distributed => Backend::Postgres,
        };
        let db = Arc::new(TestDb::new(backend).await);
        let prefix = (shape == Shape::Distributed).then(unique_prefix);
        let mut servers = Vec::new();
        for _ in 0..n {
            let mut raw = base_config(&db);
            if let Some(prefix) = &prefix {
                raw.insert(config::REDIS_URL, redis_url());
                raw.insert(config::REDIS_PREFIX, prefix.clone());
            }
            tweak(&mut raw);
            servers.push(TestServer::start_on(db.clone(), raw).await);
        }
        Cluster {
            servers,
            db,
            redis_prefix: prefix,
        }
    }

    /// The instance for the `i`-th request, round robin.
    pub fn any(&self, i: usize) -> &TestServer {
        &self.servers[i % self.servers.len()]
    }

    pub async fn stop(self) {
        for s in self.servers {
            s.stop().await;
        }
        if let Some(prefix) = self.redis_prefix {
            delete_prefix(&redis_url(), &prefix).await;
        }
    }
}
