//! TLS to Redis and Postgres with rustls, against real servers that require it: a
//! private `redis-server --tls-port`, a private three-node TLS Redis Cluster, and a
//! private Postgres with `ssl = on` whose pg_hba.conf rejects plaintext. The test makes
//! its own certificates (a CA, server certificates it signs, an unrelated second CA)
//! with the `openssl` command line tool; keyward itself links no OpenSSL.
//!
//! Every server is the test's own, on free ports in a temporary directory, and is
//! stopped on drop.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, free_cluster_port, free_port, TestDb, TestServer};
use keyward::config::{self, Config, RawConfig};
use reqwest::Method;
use serde_json::json;
use sqlx::Row;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// Runs a command that must succeed; panics with its output otherwise.
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA, the server certificates it signs, and an unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

/// A server certificate and its key.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(
            pki.path("openssl.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = keyward test CA\n\
             [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )
        .unwrap();
        for name in ["ca", "other-ca"] {
            run(Command::new("openssl")
                .current_dir(pki.dir.path())
                .args(["req", "-x509", "-new", "-nodes", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2"])
                .args(["-config", "openssl.cnf", "-extensions", "ca"])
                .args([
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                ]));
        }
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA keyward is told to trust.
    fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed nothing the servers present.
    fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    /// A server certificate for `sans` (e.g. `DNS:localhost,IP:127.0.0.1`), signed by
    /// [`Pki::ca`].
    fn leaf(&self, name: &str, sans: &str) -> Leaf {
        std::fs::write(
            self.path(&format!("{name}.ext")),
            format!(
                "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage = serverAuth,clientAuth\nsubjectAltName = {sans}\n\
                 authorityKeyIdentifier = keyid\n"
            ),
        )
        .unwrap();
        run(Command::new("openssl")
            .current_dir(self.dir.path())
            .args(["req", "-new", "-nodes", "-newkey", "ec"])
            .args([
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-config",
                "openssl.cnf",
            ])
            .args(["-subj", &format!("/CN={name}")])
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]));
        run(Command::new("openssl")
            .current_dir(self.dir.path())
            .args(["x509", "-req", "-in", &format!("{name}.csr"), "-days", "2"])
            .args(["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"])
            .args(["-extfile", &format!("{name}.ext")])
            .args(["-out", &format!("{name}.pem")]));
        Leaf {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        }
    }
}

/// The SANs of the servers' certificates: what `rediss://127.0.0.1` and
/// `postgres://…@127.0.0.1` verify against.
const LOCAL: &str = "DNS:localhost,IP:127.0.0.1";

/// A redis client of the test's own that trusts `ca` (to check what keyward wrote).
fn tls_client(url: &str, ca: &Path) -> redis::Client {
    keyward::tls::install_provider();
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(ca).unwrap()),
    };
    redis::Client::build_with_tls(url, certs).unwrap()
}

async fn query<T: redis::FromRedisValue>(client: &redis::Client, cmd: &redis::Cmd) -> Option<T> {
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    cmd.query_async(&mut conn).await.ok()
}

/// A redis-server that speaks TLS only (`--port 0`), killed on drop.
struct TlsRedis {
    url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The arguments of a TLS-only redis-server presenting `leaf`.
fn tls_args(port: u16, leaf: &Leaf, ca: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["--port", "0", "--tls-port", &port.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, path) in [
        ("--tls-cert-file", &leaf.cert),
        ("--tls-key-file", &leaf.key),
        ("--tls-ca-cert-file", &ca.to_path_buf()),
    ] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    for arg in [
        "--tls-auth-clients",
        "no",
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ] {
        args.push(arg.into());
    }
    args
}

/// Starts a redis-server with `args` (plus `extra`) on a free port, waiting until it
/// accepts connections (not a TLS PING: some of these certificates are meant to fail
/// verification); another port when the one picked was taken meanwhile.
async fn start_tls_redis(
    pki: &Pki,
    leaf: &Leaf,
    port: impl Fn() -> u16,
    extra: &[&str],
) -> (u16, Child, tempfile::TempDir) {
    for _ in 0..10 {
        let port = port();
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("redis-server")
            .args(tls_args(port, leaf, &pki.ca()))
            .args(extra)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/test.sh installs it)");
        for _ in 0..200 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return (port, child, dir);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("no TLS redis-server could start");
}

impl TlsRedis {
    async fn start(pki: &Pki, leaf: &Leaf) -> TlsRedis {
        let (port, child, dir) = start_tls_redis(pki, leaf, free_port, &[]).await;
        TlsRedis {
            url: format!("rediss://127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three TLS-only cluster nodes (`--tls-cluster yes`), joined with
/// `redis-cli --tls --cluster create`, killed on drop.
struct TlsCluster {
    url: String,
    nodes: Vec<TlsRedis>,
}

impl TlsCluster {
    async fn start(pki: &Pki, leaf: &Leaf) -> TlsCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
            ];
            let (port, child, dir) = start_tls_redis(pki, leaf, free_cluster_port, &extra).await;
            nodes.push(TlsRedis {
                url: format!("rediss://127.0.0.1:{port}"),
                child,
                _dir: dir,
            });
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| n.url.trim_start_matches("rediss://").to_string())
            .collect();
        run(Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(pki.ca())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"]));
        for node in &nodes {
            let client = tls_client(&node.url, &pki.ca());
            eventually(30, || async {
                let info: String = query(&client, redis::cmd("CLUSTER").arg("INFO")).await?;
                info.contains("cluster_state:ok").then_some(())
            })
            .await;
        }
        TlsCluster {
            url: format!("rediss+cluster://{}", addresses.join(",")),
            nodes,
        }
    }
}

/// A Postgres of the test's own with `ssl = on`, accepting TLS connections from
/// 127.0.0.1 only (`hostnossl … reject`), run as the `postgres` OS user (it refuses
/// root); stopped on drop.
struct TlsPostgres {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The `postgres` OS user's uid and gid.
fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "no postgres OS user (scripts/test.sh installs PostgreSQL)"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// Debian's newest PostgreSQL binaries (`initdb`, `postgres`).
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (scripts/test.sh installs it)")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no initdb under /usr/lib/postgresql")
        .1
}

impl TlsPostgres {
    async fn start(leaf: &Leaf) -> TlsPostgres {
        let (uid, gid) = postgres_user();
        let bin = postgres_bin();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
        std::fs::copy(&leaf.cert, &cert).unwrap();
        std::fs::copy(&leaf.key, &key).unwrap();
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(dir.path()));
        run(Command::new("chmod").arg("600").arg(&key));
        let data = dir.path().join("data");
        run(Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--locale=C",
                "-E",
                "UTF8",
            ])
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid));
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        for _ in 0..10 {
            let port = free_port();
            let setting = |name: &str, value: &Path| format!("{name}={}", value.display());
            let mut child = Command::new(bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-c", &format!("port={port}")])
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                .args(["-c", &setting("unix_socket_directories", dir.path())])
                .args(["-c", "ssl=on"])
                .args(["-c", &setting("ssl_cert_file", &cert)])
                .args(["-c", &setting("ssl_key_file", &key)])
                .current_dir(dir.path())
                .uid(uid)
                .gid(gid)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            for _ in 0..200 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break; // the port was taken: another one
                }
                let ready = Command::new(bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                    .status()
                    .unwrap();
                if ready.success() {
                    return TlsPostgres {
                        port,
                        child,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("the private TLS Postgres did not start");
    }

    /// A URL for the `postgres` database with these query parameters.
    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        // SIGINT: a fast shutdown that ends its backends too (SIGKILL would leave them).
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn verify(mode: &str, ca: &Path) -> String {
    format!("sslmode={mode}&sslrootcert={}", ca.display())
}

/// `keyward migrate` with this database URL: (exit code, stderr).
fn migrate(url: &str) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("migrate");
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYWARD_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd.env(config::DATABASE_URL, url).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The configuration of a keyward on `database_url`, and on `redis_url` trusting `ca`.
fn settings(db: &TestDb, redis_url: &str, ca: Option<&Path>) -> RawConfig {
    let mut raw = common::base_config(db);
    raw.insert(config::REDIS_URL, redis_url.to_string());
    raw.insert(config::REDIS_PREFIX, common::unique_prefix());
    if let Some(ca) = ca {
        raw.insert(config::REDIS_CA_FILE, ca.display().to_string());
    }
    raw
}

/// The start-up error of `raw` as `keyward serve` prints it (`keyward: {e:#}`, after
/// the configuration was accepted).
async fn start_up_error(raw: &RawConfig) -> String {
    let config = Config::from_raw(raw).unwrap();
    let started = tokio::time::timeout(Duration::from_secs(20), keyward::app::build(&config))
        .await
        .expect("start-up neither failed nor succeeded within 20 s");
    let error = match started {
        Ok(_) => panic!("keyward started where it must refuse to"),
        Err(e) => format!("{e:#}"),
    };
    assert_eq!(error.lines().count(), 1, "{error}");
    error
}

/// The whole distributed shape over TLS: keyward migrates a Postgres that rejects
/// plaintext (`keyward migrate`, verify-full against the test CA), starts on it and on a
/// TLS-only Redis trusting `KEYWARD_REDIS_CA_FILE`, enforces a limit with counters that
/// land in that Redis, subscribes to invalidations there, and accounts a report through
/// the Redis stream into Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_runs_on_a_tls_postgres_and_a_tls_redis() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", LOCAL);
    let pg = TlsPostgres::start(&leaf).await;
    let redis = TlsRedis::start(&pki, &leaf).await;
    let url = pg.url("127.0.0.1", &verify("verify-full", &pki.ca()));

    // A plaintext connection is refused: whatever works below used TLS.
    sqlx::any::install_default_drivers();
    let plain = sqlx::AnyPool::connect(&pg.url("127.0.0.1", "sslmode=disable")).await;
    assert!(plain.is_err(), "the private Postgres accepted plaintext");

    let (code, stderr) = migrate(&url);
    assert_eq!(code, Some(0), "{stderr}");
    // verify-ca accepts the same server (its certificate names the host as well).
    let (code, stderr) = migrate(&pg.url("127.0.0.1", &verify("verify-ca", &pki.ca())));
    assert_eq!(code, Some(0), "{stderr}");
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let ssl: bool = sqlx::query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    let migrations: i64 = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert!(migrations > 0, "keyward migrate applied nothing");

    let db = Arc::new(TestDb::at(url));
    let raw = settings(&db, &redis.url, Some(&pki.ca()));
    let prefix = raw[config::REDIS_PREFIX].clone();
    let server = TestServer::start_on(db.clone(), raw).await;
    let (key, secret) = server.create_key(json!({"rate_limit": 2})).await;
    let id = key["id"].as_str().unwrap();
    let body = json!({"key": secret, "estimated_tokens": 0});
    let first = server.admit(body.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(server.admit(body.clone()).await.status, 200);
    assert_eq!(server.admit(body.clone()).await.status, 429);

    // The counters are in the TLS Redis, and the invalidation subscription is there too.
    let checker = tls_client(&redis.url, &pki.ca());
    let rpm = common::redis::client_key(&prefix, id, "rpm");
    let exists: i64 = query(&checker, redis::cmd("EXISTS").arg(&rpm))
        .await
        .unwrap();
    assert_eq!(exists, 1, "no {rpm} in the TLS Redis");
    let channel = format!("{prefix}:invalidate");
    eventually(10, || async {
        let subs: (String, i64) =
            query(&checker, redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel)).await?;
        (subs.1 >= 1).then_some(())
    })
    .await;

    // A report goes through the stream (a dedicated connection) into Postgres.
    let lease = first.body["lease_id"].as_str().unwrap();
    let r = server
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "prompt_tokens": 3, "completion_tokens": 4}),
        )
        .await;
    assert_eq!(r.body, json!({"recorded": true}));
    let stats_path = format!("/admin/keys/{id}/stats");
    eventually(15, || async {
        let stats = server.admin(Method::GET, &stats_path, None).await.body;
        (stats["total_requests"] == 1 && stats["total_tokens"] == 7).then_some(())
    })
    .await;
    let records: i64 = sqlx::query("SELECT COUNT(*) FROM usage_records WHERE key_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(records, 1);
    pool.close().await;
    server.stop().await;
}

/// A TLS-only Redis Cluster (`--tls-cluster yes`) through `rediss+cluster://` and
/// `KEYWARD_REDIS_CA_FILE`: every node the client discovers is reached over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_runs_on_a_tls_redis_cluster() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", LOCAL);
    let cluster = TlsCluster::start(&pki, &leaf).await;
    let db = Arc::new(TestDb::new(common::Backend::Postgres).await);
    let raw = settings(&db, &cluster.url, Some(&pki.ca()));
    let prefix = raw[config::REDIS_PREFIX].clone();
    let server = TestServer::start_on(db.clone(), raw).await;
    let (key, secret) = server.create_key(json!({"rate_limit": 3})).await;
    let id = key["id"].as_str().unwrap();
    let body = json!({"key": secret, "estimated_tokens": 0});
    let answers = futures_util::future::join_all((0..5).map(|_| server.admit(body.clone()))).await;
    let admitted: Vec<_> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(
        admitted.len(),
        3,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );

    // The counter is on one of the nodes (the one owning its tenant shard's slot).
    let rpm = common::redis::client_key(&prefix, id, "rpm");
    let mut found = 0;
    for node in &cluster.nodes {
        let client = tls_client(&node.url, &pki.ca());
        let here: Option<i64> = query(&client, redis::cmd("EXISTS").arg(&rpm)).await;
        found += here.unwrap_or(0);
    }
    assert_eq!(found, 1, "the counter is not in the TLS cluster");

    // A report goes through the stream on the cluster into the database.
    let lease = admitted[0].body["lease_id"].as_str().unwrap();
    let r = server
        .data_post("/v1/report", json!({"lease_id": lease, "prompt_tokens": 2}))
        .await;
    assert_eq!(r.body, json!({"recorded": true}));
    let stats_path = format!("/admin/keys/{id}/stats");
    eventually(15, || async {
        let stats = server.admin(Method::GET, &stats_path, None).await.body;
        (stats["total_requests"] == 1).then_some(())
    })
    .await;
    server.stop().await;
}

/// A server certificate that the configured roots do not trust, or that does not name
/// the host of the URL, stops start-up with one line naming the variable and saying
/// "certificate"; the same certificate is accepted when it is trusted (verify-ca).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_or_misnamed_server_certificate_stops_start_up() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", LOCAL);
    let elsewhere = pki.leaf("elsewhere", "DNS:elsewhere.invalid");
    let redis = TlsRedis::start(&pki, &leaf).await;
    let misnamed_redis = TlsRedis::start(&pki, &elsewhere).await;
    let pg = TlsPostgres::start(&elsewhere).await;
    let db = TestDb::new(common::Backend::Sqlite).await;

    // Redis: the wrong CA file, no CA file (the system roots do not hold the test CA),
    // the right CA for a certificate of another host.
    for (url, ca) in [
        (&redis.url, Some(pki.other_ca())),
        (&redis.url, None),
        (&misnamed_redis.url, Some(pki.ca())),
    ] {
        let error = start_up_error(&settings(&db, url, ca.as_deref())).await;
        assert!(error.starts_with("KEYWARD_REDIS_URL: "), "{error}");
        assert!(error.contains("certificate"), "{error}");
        assert!(error.contains("KEYWARD_REDIS_CA_FILE"), "{error}");
    }

    // Postgres: `require` encrypts without checking the certificate, so keyward starts;
    // under verify-full the certificate does not name 127.0.0.1; another CA trusts
    // nothing. verify-ca checks the name too, unlike libpq's: sqlx 0.8's verifier does
    // not recognise rustls' newer name-mismatch error (sqlx issue 3793). When this case
    // starts to pass after a sqlx upgrade, update the README's "TLS" paragraph.
    let unchecked = pg.url("127.0.0.1", "sslmode=require");
    let (code, stderr) = migrate(&unchecked);
    assert_eq!(code, Some(0), "{stderr}");
    let pg_db = Arc::new(TestDb::at(unchecked));
    let mut raw = common::base_config(&pg_db);
    TestServer::start_on(pg_db.clone(), raw.clone())
        .await
        .stop()
        .await;
    for query in [
        verify("verify-full", &pki.ca()),
        verify("verify-ca", &pki.other_ca()),
        verify("verify-ca", &pki.ca()),
    ] {
        raw.insert(config::DATABASE_URL, pg.url("127.0.0.1", &query));
        let error = start_up_error(&raw).await;
        assert!(
            error.starts_with("KEYWARD_DATABASE_URL: "),
            "{query}: {error}"
        );
        assert!(error.contains("certificate"), "{error}");
        // `keyward migrate` says the same.
        let (code, stderr) = migrate(&raw[config::DATABASE_URL]);
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("keyward: KEYWARD_DATABASE_URL: "),
            "{stderr}"
        );
        assert!(stderr.contains("certificate"), "{stderr}");
    }
}

/// `KEYWARD_REDIS_CA_FILE` is checked with the other settings: a file that cannot be
/// read, holds no certificate, or sits beside a URL without TLS is one line naming it.
#[test]
fn a_ca_file_that_cannot_serve_is_a_configuration_error() {
    let pki = Pki::new();
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "no certificate here\n").unwrap();
    let ca = pki.ca().display().to_string();
    let key = pki.path("ca.key").display().to_string();
    let missing = pki.path("missing.pem").display().to_string();
    let empty = empty.display().to_string();
    for (url, file, says) in [
        (
            Some("rediss://127.0.0.1:6380"),
            missing.as_str(),
            "cannot read",
        ),
        (
            Some("rediss://127.0.0.1:6380"),
            empty.as_str(),
            "no certificate",
        ),
        (
            Some("rediss://127.0.0.1:6380"),
            key.as_str(),
            "no certificate",
        ),
        (Some("redis://127.0.0.1:6379"), ca.as_str(), "rediss://"),
        (
            Some("redis+cluster://127.0.0.1:7000"),
            ca.as_str(),
            "rediss://",
        ),
        (None, ca.as_str(), "rediss://"),
    ] {
        let mut raw = RawConfig::new();
        if let Some(url) = url {
            raw.insert(config::REDIS_URL, url.to_string());
        }
        raw.insert(config::REDIS_CA_FILE, file.to_string());
        let errors = Config::from_raw(&raw).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let line = errors[0].to_string();
        assert!(line.starts_with("KEYWARD_REDIS_CA_FILE: "), "{line}");
        assert!(line.contains(says) && !line.contains('\n'), "{line}");
    }
    for url in [
        "rediss://127.0.0.1:6380",
        "rediss+cluster://127.0.0.1:7000,127.0.0.1:7001",
    ] {
        let mut raw = RawConfig::new();
        raw.insert(config::REDIS_URL, url.to_string());
        raw.insert(config::REDIS_CA_FILE, ca.clone());
        let config = Config::from_raw(&raw).unwrap();
        assert_eq!(
            config.redis_ca.as_deref(),
            Some(std::fs::read(pki.ca()).unwrap().as_slice())
        );
    }
}

/// No OpenSSL: not in the dependency graph (rustls with ring only; aws-lc would need
/// cmake and a C toolchain), and not linked into the binary.
#[test]
fn keyward_links_no_openssl() {
    let lock = include_str!("../Cargo.lock");
    for name in [
        "openssl-sys",
        "openssl",
        "native-tls",
        "aws-lc-sys",
        "aws-lc-rs",
    ] {
        assert!(
            !lock.contains(&format!("name = \"{name}\"\n")),
            "{name} is in Cargo.lock"
        );
    }
    assert!(lock.contains("name = \"rustls\"\n") && lock.contains("name = \"ring\"\n"));
    let out = Command::new("ldd").arg(BIN).output().unwrap();
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !libs.is_empty(), "ldd {BIN} failed");
    assert!(
        !libs.contains("libssl") && !libs.contains("libcrypto"),
        "{libs}"
    );
}
