//! Test harness: real keyward servers in-process on port 0, each on its own database.
//!
//! SQLite tests get a file in a fresh temporary directory. Postgres tests get a fresh
//! database `kw_test_<uuid>` on the server named by `KEYWARD_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the test ends;
//! nothing shared is ever flushed. Postgres tests fail, not skip, when it is unreachable:
//! `scripts/test.sh` makes sure it runs.
#![allow(dead_code, clippy::unwrap_used)]

pub mod shipped;

use std::sync::Arc;
use std::time::Duration;

use keyward::config::{self, Config, RawConfig};
use keyward::db::Db;
use reqwest::Method;
use serde_json::Value;
use sqlx::{AnyPool, Executor};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-admin-token-0123456789";
/// The data-plane token of test servers (`/v1/select`, reports without a lease).
pub const DATA_TOKEN: &str = "test-data-token-0123456789";
/// `KEYWARD_DEFAULT_PRICE` for tests whose keys have a balance but whose requests'
/// prices are not the point: 1 USD per million input tokens, 2 per million output.
pub const DEFAULT_PRICE: &str = r#"{"input_per_mtok_usd": 1, "output_per_mtok_usd": 2}"#;
/// A fixed key so Postgres servers sharing a database can read each other's secrets.
pub const ENCRYPTION_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named `async fn(Variant)` once per listed variant, in a module per variant:
/// `each_variant!(Backend { sqlite: Sqlite, postgres: Postgres } => (test_a, test_b))`.
#[macro_export]
macro_rules! each_variant {
    ($ty:ident { $($module:ident: $variant:ident),+ } => $names:tt) => {
        $( each_variant!(@one $ty $module $variant $names); )+
    };
    (@one $ty:ident $module:ident $variant:ident ($($name:ident),*)) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::$ty::$variant).await;
                }
            )*
        }
    };
}

/// Runs each named `async fn(Backend)` on SQLite and on Postgres.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        each_variant!(Backend { sqlite: Sqlite, postgres: Postgres } => ($($name),*));
    };
}

pub fn postgres_base_url() -> String {
    std::env::var("KEYWARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database of this test's own, removed on drop.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}", dir.path().join("keyward.db").display()),
                pg_name: None,
                _dir: dir,
            },
            Backend::Postgres => {
                sqlx::any::install_default_drivers();
                let base = postgres_base_url();
                let name = format!("kw_test_{}", uuid::Uuid::new_v4().simple());
                let admin = AnyPool::connect(&base).await.unwrap_or_else(|e| {
                    panic!("Postgres at {base} is unreachable ({e}); run scripts/test.sh")
                });
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .unwrap();
                admin.close().await;
                let (prefix, _) = base.rsplit_once('/').unwrap();
                TestDb {
                    url: format!("{prefix}/{name}"),
                    pg_name: Some(name),
                    _dir: dir,
                }
            }
        }
    }

    /// A database on a server the test runs itself (and so removes with it): nothing is
    /// dropped on drop.
    pub fn at(url: String) -> TestDb {
        TestDb {
            url,
            pg_name: None,
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// A direct connection (migrations applied), for setting up or checking state.
    pub async fn connect(&self) -> Db {
        let db = Db::connect(&self.url).await.unwrap();
        db.migrate().await.unwrap();
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = AnyPool::connect(&postgres_base_url()).await {
                    let _ = pool
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

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
        let config = Config::from_raw(&raw).unwrap();
        let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (data_addr, admin_addr) = (data.local_addr().unwrap(), admin.local_addr().unwrap());
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

pub fn redis_url() -> String {
    std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A Redis key prefix (and hash tag) no other test uses.
pub fn unique_prefix() -> String {
    format!("kwt-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Removes every key under this test's prefix (its own keys only; nothing shared).
pub async fn delete_prefix(url: &str, prefix: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// A redis-server of this test's own on a free port, killed on drop. For tests that
/// flush, stop or restart Redis.
pub struct PrivateRedis {
    pub url: String,
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let port = free_port();
        let mut redis = PrivateRedis {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart().await;
        redis
    }

    /// Starts the server (again) on the same port.
    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let client = redis::Client::open(self.url.as_str()).unwrap();
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("private redis-server did not start");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The two deployment shapes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// SQLite and in-process counters: one instance.
    Embedded,
    /// Postgres and Redis: any number of instances sharing both.
    Distributed,
}

/// Runs each named `async fn(Shape)` embedded and distributed.
#[macro_export]
macro_rules! on_both_shapes {
    ($($name:ident),* $(,)?) => {
        each_variant!(Shape { embedded: Embedded, distributed: Distributed } => ($($name),*));
    };
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

/// Polls `check` until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy in front of Postgres that a test can cut: while down, every proxied
/// connection is dropped and new ones are refused, as in a database outage.
pub struct PgProxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    pub async fn start(target: String) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused-ish
                }
                let target = target.clone();
                let handle = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(handle);
            }
        });
        PgProxy {
            port,
            up,
            connections,
            accept,
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for handle in self.connections.lock().unwrap().drain(..) {
                handle.abort();
            }
        }
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_up(false);
    }
}

/// `host:port` of a postgres:// URL, and the URL with them replaced by `with`.
pub fn reroute(url: &str, with: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (host, path) = rest.split_once('/').unwrap();
    (host.to_string(), format!("{scheme}://{auth}{with}/{path}"))
}

/// A TCP port that was free a moment ago (for child processes that bind it themselves).
///
/// It is below the kernel's ephemeral range (and so is port + 10000, a cluster node's bus
/// port): a port from that range (`bind(:0)`) can be taken by any outgoing connection of
/// the tests running beside this one, between the moment it is picked and the moment the
/// child binds it, or while a server the test restarts on the same port is down.
pub fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > 20_001 {
        let span = ephemeral_low - 20_001;
        for _ in 0..1_000 {
            let port = (10_000 + rand::random::<u32>() % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A three-master Redis Cluster of the test's own (redis-server --cluster-enabled yes on
/// free ports, joined with redis-cli --cluster create), killed on drop.
pub struct PrivateCluster {
    pub url: String,
    nodes: Vec<PrivateRedisNode>,
}

struct PrivateRedisNode {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateRedisNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port whose cluster bus port (port + 10000) is free too.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Starts one cluster-enabled redis-server, on another port when the one picked was
/// taken meanwhile by another test's server (redis-server then exits).
async fn start_cluster_node() -> (u16, PrivateRedisNode) {
    for _ in 0..10 {
        let port = free_cluster_port();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is not installed");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break; // it could not bind: try another port
            }
            let pong = async {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            };
            if pong.await.is_some() {
                return (port, PrivateRedisNode { child, _dir: dir });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("no cluster node could start");
}

impl PrivateCluster {
    pub async fn start() -> PrivateCluster {
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let (port, node) = start_cluster_node().await;
            ports.push(port);
            nodes.push(node);
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stdout)
        );
        for port in &ports {
            eventually(30, || async {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                info.contains("cluster_state:ok").then_some(())
            })
            .await;
        }
        PrivateCluster {
            url: format!("redis+cluster://{}", addresses.join(",")),
            nodes,
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// Every record a Redis counter store has queued on its accounting stream, oldest first
/// (what the stream consumer would write to the database).
pub async fn stream_records(
    redis: &keyward::limits::redis::RedisCounters,
) -> Vec<keyward::usage::UsageRecord> {
    let mut conn = redis.conn().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(redis.stream_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|e| keyward::accounting::codec::record_from_entry(&e.map).unwrap())
        .collect()
}

/// `(method, path)` of every operation of an OpenAPI document, the method as the
/// document spells it (lower case).
pub fn openapi_operations(doc: &Value) -> std::collections::BTreeSet<(String, String)> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect()
}
