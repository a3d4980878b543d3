//! What the bench binaries share: starting the release `keyward` binary as its own
//! process and waiting until it is ready.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const TOKEN: &str = "bench-admin-token-0123456789";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running keyward process, stopped with SIGTERM on drop.
pub struct Keyward {
    child: Child,
    pub data: u16,
    pub admin: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Keyward {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Starts `keyward serve` with the admin token, ports of its own, a SQLite file in a
/// fresh directory unless `env` names a database, and `env` on top. `KEYWARD_BENCH_BIN`
/// names another `keyward` binary to run instead (another build, compared in one session).
pub async fn start(env: &[(&str, String)]) -> Keyward {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = (free_port(), free_port());
    let binary = std::env::var("KEYWARD_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_keyward").to_string());
    let mut cmd = Command::new(binary);
    cmd.arg("serve")
        .env("KEYWARD_LISTEN", format!("127.0.0.1:{data}"))
        .env("KEYWARD_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KEYWARD_ADMIN_TOKEN", TOKEN)
        .env(
            "KEYWARD_DATABASE_URL",
            format!("sqlite://{}/bench.db", dir.path().display()),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    for (name, value) in env {
        cmd.env(name, value);
    }
    let k = Keyward {
        child: cmd.spawn().unwrap(),
        data,
        admin,
        _dir: dir,
    };
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{data}/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return k;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("keyward did not start");
}

/// Creates a client key through the admin API; returns its secret.
pub async fn create_key(client: &reqwest::Client, admin: u16, body: &serde_json::Value) -> String {
    let created: serde_json::Value = client
        .post(format!("http://127.0.0.1:{admin}/admin/keys"))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["secret"].as_str().unwrap().to_string()
}
