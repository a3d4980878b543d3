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
    let (data, admin) = (free_port(), free_port());
    let child = keyward(&["serve"])
        .current_dir(dir)
        .env("KEYWARD_LISTEN", format!("127.0.0.1:{data}"))
        .env("KEYWARD_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KEYWARD_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
