//! The `keyward` binary itself: configuration errors, `migrate`, the embedded default,
//! the generated key file, and graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Backend, TestDb, ENCRYPTION_KEY, TOKEN};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// A command with no KEYWARD_* variables from the outside world.
fn keyward(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYWARD_") {
            cmd.env_remove(name);
        }
    }
    // Any free port unless a test names one: the defaults (8080, 8081) may be taken by
    // anything else on the machine, and a test must not depend on them.
    cmd.env("KEYWARD_LISTEN", "127.0.0.1:0")
        .env("KEYWARD_ADMIN_LISTEN", "127.0.0.1:0");
    cmd
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_settings_stop_start_up_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("KEYWARD_LISTEN", "not-an-address"),
        ("KEYWARD_ADMIN_LISTEN", "127.0.0.1:99999"),
        ("KEYWARD_ON_BACKEND_ERROR", "sometimes"),
        ("KEYWARD_LOG_FORMAT", "yaml"),
        ("KEYWARD_ENCRYPTION_KEY", "dG9vIHNob3J0"),
        ("KEYWARD_ENCRYPTION_KEYS_PREVIOUS", "%%%"),
        ("KEYWARD_DATABASE_URL", "mysql://user:hunter2@db/keyward"),
        ("KEYWARD_REDIS_URL", "http://cache:6379"),
        ("KEYWARD_EXPIRY_INTERVAL_S", "soon"),
        ("KEYWARD_ADMIN_TOKEN", "fifteen-chars-x"),
        ("KEYWARD_DATA_TOKEN", "fifteen-chars-x"),
        ("KEYWARD_REDIS_URL", "redis://:hunter2@localhost:99999"),
        ("KEYWARD_ADMIN_TOKEN_FILE", "/nonexistent/admin-token"),
    ] {
        let out = keyward(&["serve"]).env(var, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = stderr_of(&out);
        assert_eq!(err.lines().count(), 1, "{var}: {err}");
        assert!(err.starts_with(&format!("keyward: {var}: ")), "{err}");
        assert!(!err.contains("hunter2"), "a password was echoed: {err}");
    }
    // A flag is checked the same way.
    let out = keyward(&["serve", "--listen", "nowhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("KEYWARD_LISTEN"));
}

#[test]
fn postgres_without_an_encryption_key_is_refused() {
    let out = keyward(&["serve"])
        .env(
            "KEYWARD_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).starts_with("keyward: KEYWARD_ENCRYPTION_KEY: "),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn help_does_not_print_secret_values() {
    let out = keyward(&["serve", "--help"])
        .env("KEYWARD_ADMIN_TOKEN", "help-must-not-show-this")
        .env("KEYWARD_ENCRYPTION_KEY", ENCRYPTION_KEY)
        .env("KEYWARD_DATABASE_URL", "postgres://u:pw-in-url@db/x")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("KEYWARD_ADMIN_TOKEN"), "{help}");
    for secret in ["help-must-not-show-this", ENCRYPTION_KEY, "pw-in-url"] {
        assert!(!help.contains(secret), "{help}");
    }
}

#[test]
fn version_prints_the_crates_version() {
    let out = keyward(&["--version"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("keyward {}\n", env!("CARGO_PKG_VERSION"))
    );
}

async fn migrate_twice(backend: Backend) {
    let db = TestDb::new(backend).await;
    for _ in 0..2 {
        let out = keyward(&["migrate"])
            .env("KEYWARD_DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let conn = db.connect().await;
    let filter = keyward::client_keys::store::ListFilter::default();
    assert!(keyward::client_keys::store::list(&conn, &filter)
        .await
        .unwrap()
        .is_empty());
    conn.close().await;
}

#[tokio::test]
async fn migrate_applies_and_is_idempotent_on_sqlite() {
    migrate_twice(Backend::Sqlite).await;
}

#[tokio::test]
async fn migrate_applies_and_is_idempotent_on_postgres() {
    migrate_twice(Backend::Postgres).await;
}

#[test]
fn migrate_refuses_an_unknown_scheme() {
    let out = keyward(&["migrate"])
        .env("KEYWARD_DATABASE_URL", "oracle://x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).starts_with("keyward: KEYWARD_DATABASE_URL: "));
}

struct Running {
    child: Child,
    data: u16,
    admin: u16,
}

/// `keyward serve` with nothing configured but addresses and the admin token, in `dir`.
fn serve_embedded(dir: &std::path::Path) -> Running {
    serve_embedded_with(dir, &[], Stdio::null())
}

/// Like [`serve_embedded`], with more variables and the log (stdout) sent to `log`.
fn serve_embedded_with(dir: &std::path::Path, env: &[(&str, &str)], log: Stdio) -> Running {
    let (data, admin) = (free_port(), free_port());
    let mut cmd = keyward(&["serve"]);
    cmd.current_dir(dir)
        .env("KEYWARD_LISTEN", format!("127.0.0.1:{data}"))
        .env("KEYWARD_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KEYWARD_ADMIN_TOKEN", TOKEN)
        .env("KEYWARD_EXPIRY_INTERVAL_S", "0")
        .stdout(log)
        .stderr(Stdio::null());
    for (var, value) in env {
        cmd.env(var, value);
    }
    let child = cmd.spawn().unwrap();
    Running { child, data, admin }
}

async fn wait_ready(client: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("keyward did not become ready");
}

/// Creates a key with default settings through a running binary's admin API.
async fn create_key(client: &reqwest::Client, admin: u16) -> Value {
    client
        .post(format!("http://127.0.0.1:{admin}/admin/keys"))
        .bearer_auth(TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn terminate(mut running: Running) -> std::process::ExitStatus {
    let pid = running.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "keyward did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn embedded_default_serves_keeps_its_key_file_and_stops_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();

    let first = serve_embedded(dir.path());
    wait_ready(&client, first.data).await;
    let created = create_key(&client, first.admin).await;
    let id = created["key"]["id"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(terminate(first).success(), "SIGTERM must be a clean exit");

    // The default database and the generated key file sit in the working directory.
    assert!(dir.path().join("keyward.db").exists());
    let key_file = dir.path().join("keyward.db.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // After a restart the same key file decrypts what the first run stored.
    let second = serve_embedded(dir.path());
    wait_ready(&client, second.data).await;
    let revealed: Value = client
        .post(format!(
            "http://127.0.0.1:{}/admin/keys/{id}/reveal",
            second.admin
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(revealed["secret"].as_str(), Some(secret.as_str()));
    assert!(terminate(second).success());
}

/// How many of a process's threads are Tokio workers (named so by the runtime).
fn tokio_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("tokio-rt-worker") || name.starts_with("tokio-runtime-w"))
        .count()
}

#[tokio::test]
async fn keyward_threads_sets_the_runtime_one_thread_by_default() {
    let client = reqwest::Client::new();
    for (threads, workers) in [(None, 0), (Some("2"), 2)] {
        let dir = tempfile::tempdir().unwrap();
        let env: Vec<(&str, &str)> = threads
            .map(|t| ("KEYWARD_THREADS", t))
            .into_iter()
            .collect();
        let running = serve_embedded_with(dir.path(), &env, Stdio::null());
        wait_ready(&client, running.data).await;
        // One thread: the main thread runs everything, no worker threads.
        assert_eq!(
            tokio_workers(running.child.id()),
            workers,
            "KEYWARD_THREADS={threads:?}"
        );
        create_key(&client, running.admin).await;
        assert!(terminate(running).success());
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_a_line_per_decision() {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = (free_port(), free_port());
    let child = keyward(&["serve"])
        .current_dir(dir.path())
        .env("KEYWARD_LISTEN", format!("127.0.0.1:{data}"))
        .env("KEYWARD_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KEYWARD_ADMIN_TOKEN", TOKEN)
        .env("KEYWARD_LOG_FORMAT", "json")
        .env("RUST_LOG", "keyward=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    wait_ready(&client, data).await;
    let created = create_key(&client, admin).await;
    let secret = created["secret"].as_str().unwrap().to_string();
    for key in [secret.as_str(), "sk-kw-unknown-00000000000000"] {
        client
            .post(format!("http://127.0.0.1:{data}/v1/admit"))
            .json(&serde_json::json!({"key": key}))
            .send()
            .await
            .unwrap();
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect();
    let decisions: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 2, "{text}");
    assert_eq!(decisions[0]["allowed"], true);
    assert_eq!(decisions[1]["reason"], "INVALID_KEY");
    assert!(lines.iter().any(|l| l["message"] == "client key created"));
    assert!(!text.contains(&secret), "the secret reached the logs");
}

#[test]
fn secrets_given_as_flags_are_refused() {
    for flag in [
        "--admin-token",
        "--data-token",
        "--encryption-key",
        "--encryption-keys-previous",
    ] {
        let out = keyward(&["serve", flag, "flag-secret-0123456789"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} was accepted");
        let err = stderr_of(&out);
        assert!(!err.contains("flag-secret"), "{err}");
        // One line naming the variable to use instead.
        let var = format!("KEYWARD_{}", flag[2..].replace('-', "_").to_uppercase());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("keyward: {var}: ")), "{err}");
    }
    for (args, var) in [
        (
            vec![
                "serve",
                "--database-url",
                "postgres://u:hunter2@127.0.0.1/k",
            ],
            "KEYWARD_DATABASE_URL",
        ),
        (
            vec!["serve", "--redis-url", "redis://:hunter2@127.0.0.1:6379"],
            "KEYWARD_REDIS_URL",
        ),
        (
            vec![
                "migrate",
                "--database-url",
                "postgres://u:hunter2@127.0.0.1/k",
            ],
            "KEYWARD_DATABASE_URL",
        ),
    ] {
        let out = keyward(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr_of(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("keyward: {var}: ")), "{err}");
        assert!(err.contains(&format!("{var}_FILE")), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn an_unreachable_database_or_redis_is_one_line_naming_the_variable_and_the_cause() {
    let dead = free_port();
    let out = keyward(&["serve"])
        .env(
            "KEYWARD_DATABASE_URL",
            format!("postgres://postgres:hunter2@127.0.0.1:{dead}/keyward"),
        )
        .env("KEYWARD_ENCRYPTION_KEY", ENCRYPTION_KEY)
        .env("KEYWARD_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("keyward: KEYWARD_DATABASE_URL: ") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let out = keyward(&["serve"])
        .current_dir(dir.path())
        .env(
            "KEYWARD_REDIS_URL",
            format!("redis://:hunter2@127.0.0.1:{dead}"),
        )
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("keyward: KEYWARD_REDIS_URL: ") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

/// `keyward serve` in `dir` that is expected to stop at start-up: its stderr.
fn failed_start(dir: &std::path::Path, env: &[(&str, &str)]) -> String {
    let mut cmd = keyward(&["serve"]);
    cmd.current_dir(dir)
        .env("KEYWARD_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("KEYWARD_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("KEYWARD_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::null());
    for (var, value) in env {
        cmd.env(var, value);
    }
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keyward started where it must refuse to");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[tokio::test]
async fn the_key_file_is_never_replaced_beside_stored_secrets_nor_used_when_others_can_read_it_nor_another_key(
) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    // The admin token can come from a file.
    let mut cmd = keyward(&["serve"]);
    let (data, admin) = (free_port(), free_port());
    cmd.current_dir(dir.path())
        .env("KEYWARD_LISTEN", format!("127.0.0.1:{data}"))
        .env("KEYWARD_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KEYWARD_ADMIN_TOKEN_FILE", &token_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let running = Running {
        child: cmd.spawn().unwrap(),
        data,
        admin,
    };
    wait_ready(&client, running.data).await;
    let created = create_key(&client, running.admin).await;
    assert!(created["secret"].is_string(), "{created}");
    assert!(terminate(running).success());

    // The key file is lost: no new key, start-up stops naming the file.
    let key_file = dir.path().join("keyward.db.key");
    let kept = std::fs::read(&key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    let err = failed_start(dir.path(), &[]);
    assert!(
        err.contains("keyward.db.key") && err.contains("missing"),
        "{err}"
    );
    assert!(!key_file.exists(), "a new key file was generated");

    // Restored but readable by others: refused until it is chmod 600.
    std::fs::write(&key_file, &kept).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = failed_start(dir.path(), &[]);
    assert!(
        err.contains("keyward.db.key") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Another key than the one the secrets were written with: refused, naming it.
    let err = failed_start(
        dir.path(),
        &[(
            "KEYWARD_ENCRYPTION_KEY",
            "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=",
        )],
    );
    assert!(
        err.starts_with("keyward: KEYWARD_ENCRYPTION_KEY: decrypts none of the stored secrets"),
        "{err}"
    );
    let again = serve_embedded(dir.path());
    wait_ready(&client, again.data).await;
    // The exec probe of the Helm sidecar finds it from KEYWARD_LISTEN.
    let out = probe(again.data, "/readyz");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(terminate(again).success());
    let out = probe(free_port(), "/healthz");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).starts_with("keyward: probe: cannot connect"));
}

/// `keyward probe <path>` against the data plane on `port`, given as `0.0.0.0:<port>`.
fn probe(port: u16, path: &str) -> Output {
    keyward(&["probe", path])
        .env("KEYWARD_LISTEN", format!("0.0.0.0:{port}"))
        .output()
        .unwrap()
}

/// Makes files immutable (`chattr +i`) and undoes it on drop. Tests run as root, and
/// root ignores permission bits, so a `chmod 444` would not make the database read-only;
/// an immutable file refuses writes to root too, including through descriptors opened
/// before (as when a file system turns read-only under a running process). `None` when
/// the file system or the user cannot (the test then says so and passes).
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    fn set(paths: &[std::path::PathBuf]) -> Option<Immutable> {
        let paths: Vec<_> = paths.iter().filter(|p| p.exists()).cloned().collect();
        let ok = Command::new("chattr")
            .arg("+i")
            .args(&paths)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(Immutable(paths))
        } else {
            eprintln!("chattr +i is not available here: read-only database not tested");
            None
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").args(&self.0).status();
    }
}

#[tokio::test]
async fn a_read_only_database_stops_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let first = serve_embedded(dir.path());
    wait_ready(&client, first.data).await;
    create_key(&client, first.admin).await;
    assert!(terminate(first).success());

    let Some(_lock) = Immutable::set(&[dir.path().join("keyward.db")]) else {
        return;
    };
    let err = failed_start(dir.path(), &[]);
    assert!(
        err.starts_with("keyward: KEYWARD_DATABASE_URL: ") && err.contains("read-only"),
        "{err}"
    );
}

#[tokio::test]
async fn with_a_database_turned_read_only_reports_are_refused_and_sigterm_still_stops() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let running = serve_embedded_with(dir.path(), &[], Stdio::from(log));
    wait_ready(&client, running.data).await;
    let secret = create_key(&client, running.admin).await["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let data = format!("http://127.0.0.1:{}", running.data);
    let admit = || async {
        let answer: Value = client
            .post(format!("{data}/v1/admit"))
            .json(&serde_json::json!({"key": secret}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["lease_id"].as_str().unwrap().to_string()
    };
    let report = |lease: String| {
        client
            .post(format!("{data}/v1/report"))
            .json(&serde_json::json!({"lease_id": lease, "prompt_tokens": 1}))
            .send()
    };
    let (early, late) = (admit().await, admit().await);

    // Not the -shm file: SQLite maps it into memory, and a write to an immutable mapping
    // is a SIGBUS, not an error.
    let files: Vec<_> = ["keyward.db", "keyward.db-wal"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    let Some(_lock) = Immutable::set(&files) else {
        terminate(running);
        return;
    };
    // Reported before the writer found out: queued, then it fails to apply it.
    let r = report(early).await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = client.get(format!("{data}/readyz")).send().await.unwrap();
        if ready.status() == 503 {
            let body: Value = ready.json().await.unwrap();
            assert_eq!(body["checks"]["accounting"], "cannot_write", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = probe(running.data, "/readyz");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("answered 503"),
        "{}",
        stderr_of(&out)
    );
    // Now that the writer cannot write, a report is not acknowledged as recorded.
    let r = report(late.clone()).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "BACKEND_UNAVAILABLE", "{body}");

    let started = Instant::now();
    terminate(running);
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("not applied"), "{log}");
}

#[test]
fn migrate_reads_the_database_url_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("from-file.db");
    let url_file = dir.path().join("url");
    std::fs::write(&url_file, format!("sqlite://{}\n", db.display())).unwrap();
    let out = keyward(&["migrate"])
        .env("KEYWARD_DATABASE_URL_FILE", &url_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(db.exists());
    // Both the variable and its file: one line naming both.
    let out = keyward(&["migrate"])
        .env("KEYWARD_DATABASE_URL_FILE", &url_file)
        .env("KEYWARD_DATABASE_URL", "sqlite::memory:")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(
        err.starts_with("keyward: KEYWARD_DATABASE_URL: ")
            && err.contains("KEYWARD_DATABASE_URL_FILE"),
        "{err}"
    );
}

/// Each setting is declared once, in `keyward::config::SETTINGS`, and the README's
/// Configuration table is exactly its rendering: a setting added, removed or changed
/// (default, range, flag, secret or not) without the README is caught here. On a
/// mismatch the expected table is printed, to paste into the README.
#[test]
fn the_readme_configuration_table_is_the_declarations_rendered() {
    let rendered = keyward::config::markdown_table();
    let readme = include_str!("../README.md");
    let section = readme
        .find("\n## Configuration\n")
        .expect("the README has a Configuration section");
    let start = section
        + readme[section..]
            .find("\n|")
            .expect("the Configuration section has a table")
        + 1;
    let table: String = readme[start..]
        .lines()
        .take_while(|l| l.starts_with('|'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        table == rendered,
        "the README's configuration table differs from the declarations; it should be:\n{rendered}"
    );
    // One row a setting (and one for the `_FILE` twins), and no cell broken by a `|`.
    let rows = rendered.lines().count() - 2;
    assert_eq!(rows, keyward::config::SETTINGS.len() + 1);
    for line in rendered.lines() {
        assert_eq!(line.matches('|').count(), 6, "{line}");
    }
}

/// The help of one flag in `keyward <args> --help`: the lines from `--flag` to the next.
fn flag_help(help: &str, flag: &str) -> Option<String> {
    let start = help.find(&format!("      --{flag} "))?;
    let rest = &help[start + 8..];
    let end = rest
        .find("\n      --")
        .or(rest.find("\n  -h"))
        .unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

/// `keyward serve --help` shows each flag with its variable and default from the same
/// declaration the parser uses; a secret has no flag there, only its variable.
#[test]
fn serve_help_shows_each_flag_with_its_variable_and_default_from_the_declarations() {
    use keyward::config::{Exposure, Fallback, SETTINGS};
    let out = keyward(&["serve", "--help"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    for s in SETTINGS {
        let shown = flag_help(&help, s.flag);
        if s.exposure == Exposure::Secret {
            assert!(shown.is_none(), "a secret has a flag in --help: {help}");
            assert!(help.contains(&format!("  {}: ", s.var)), "{help}");
            continue;
        }
        let shown = shown.unwrap_or_else(|| panic!("--{} is not in --help: {help}", s.flag));
        assert!(shown.contains(&format!("[env: {}]", s.var)), "{shown}");
        let default = match s.default {
            Fallback::Value(text) | Fallback::Instead(text) => text,
            Fallback::Unset => "unset",
        };
        assert!(shown.contains(&format!("[default: {default}]")), "{shown}");
    }
    // Spot checks against the parser's own behaviour, so a rendering that drifted from
    // the declarations in both places at once is still caught.
    let lease = flag_help(&help, "lease-ttl-s").unwrap();
    assert!(
        lease.contains("[default: 300]") && lease.contains("1 to 86400 seconds"),
        "{lease}"
    );
    for (value, accepted) in [("86400", true), ("86401", false), ("0", false)] {
        let out = keyward(&["serve", "--lease-ttl-s", value, "--listen", "nowhere"])
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert_eq!(
            !err.contains("KEYWARD_LEASE_TTL_S"),
            accepted,
            "{value}: {err}"
        );
    }
    // The secrets have no flag, and their flags are refused (secrets_given_as_flags_are_refused).
    assert!(!help.contains("--admin-token"), "{help}");
}

/// Start-up tells what it will ignore: a misspelt `KEYWARD_…` variable, shards without
/// Redis; and a log written to a file is plain text (no colour codes), its start-up line
/// readable (`shards=none`, not a debug rendering).
#[tokio::test]
async fn ignored_settings_are_warned_about_and_a_log_file_is_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("keyward.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let client = reqwest::Client::new();
    let running = serve_embedded_with(
        dir.path(),
        &[("KEYWARD_RATE_LIMT", "5"), ("KEYWARD_REDIS_SHARDS", "4")],
        Stdio::from(log),
    );
    wait_ready(&client, running.data).await;
    assert!(terminate(running).success());
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file:\n{text}"
    );
    let line = |needle: &str| text.lines().find(|l| l.contains(needle));
    let misspelt = line("KEYWARD_RATE_LIMT").expect("no warning for a misspelt variable");
    assert!(
        misspelt.contains("WARN") && misspelt.contains("not a keyward setting"),
        "{misspelt}"
    );
    let shards =
        line("only the Redis shape has shards").expect("no warning for shards without Redis");
    assert!(shards.contains("KEYWARD_REDIS_SHARDS"), "{shards}");
    let serving = line("keyward serving").unwrap();
    assert!(serving.contains("shards=none"), "{serving}");
}

/// Both listeners queue up to 4,096 connections (`ss` shows a listening socket's queue
/// bound as its Send-Q), not the standard library's 128: under a burst of connections
/// closed at once over a peer's cap, a queue of 128 overflowed and a loopback client's
/// connection waited a second for its SYN to be sent again.
#[tokio::test]
async fn the_listeners_queue_4096_connections() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let running = serve_embedded(dir.path());
    wait_ready(&client, running.data).await;
    for port in [running.data, running.admin] {
        let out = Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) is not installed");
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        let queue: Vec<&str> = line.split_whitespace().collect();
        // State, Recv-Q, Send-Q (the bound, capped by net.core.somaxconn), ...
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            queue.get(2).and_then(|q| q.parse().ok()),
            Some(somaxconn.min(4096)),
            "{line}"
        );
    }
    assert!(terminate(running).success());
}
