//! What the bench binaries share: starting the release `keyward` binary as its own
//! process and waiting until it is ready, the keys and pools they create, a minimal
//! HTTP/1.1 client, a process's CPU time from `/proc`, and, from the tests' support
//! tree (included by path, not copied), free ports ([`free_port`]), the shipped
//! proxies ([`shipped`]) and private Redis servers and Clusters ([`private_redis`]).
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../../tests/common/ports.rs"]
mod ports;
#[path = "../../tests/common/shipped.rs"]
pub mod shipped;
// `private_redis` polls with the tests' `eventually`.
#[path = "../../tests/common/helpers.rs"]
mod helpers;
#[path = "../../tests/common/redis.rs"]
pub mod private_redis;

pub use ports::free_port;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TOKEN: &str = "bench-admin-token-0123456789";

/// A running keyward process, stopped with SIGTERM on drop.
pub struct Keyward {
    child: Child,
    pub data: u16,
    pub admin: u16,
    _dir: tempfile::TempDir,
}

impl Keyward {
    /// The process id, to read its CPU time from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
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

/// Adds `n` provider keys of equal priority (limits too high to be reached) to the pool
/// of `provider`.
pub async fn create_pool(k: &Keyward, provider: &str, n: usize) {
    let client = reqwest::Client::new();
    for i in 0..n {
        let body = serde_json::json!({"label": format!("k{i}"), "value": format!("sk-bench-{i:04}"),
                                      "max_rpm": 1_000_000_000i64, "max_tpm": 1_000_000_000_000i64});
        let status = client
            .post(format!(
                "http://127.0.0.1:{}/admin/providers/{provider}/keys",
                k.admin
            ))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
    }
}

/// A key whose limits are too high to be reached, so every window is read and written.
pub async fn unlimited_key(client: &reqwest::Client, admin: u16) -> String {
    let body = serde_json::json!({"rate_limit": 1_000_000_000_000i64, "tpm_limit": 1_000_000_000_000i64,
                                  "concurrent_limit": null});
    create_key(client, admin, &body).await
}

/// One keep-alive HTTP/1.1 connection that sends a fixed request: a minimal client, so
/// the load generator takes as little of the shared CPU as it can.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Sends `request`, reads the whole answer, returns its status.
    pub async fn call(&mut self, request: &[u8]) -> u16 {
        let (status, total) = self.answer(request).await;
        self.buf.drain(..total);
        status
    }

    /// Sends `request`, returns the answer's status and body.
    pub async fn call_body(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        let (status, total) = self.answer(request).await;
        let body = self.buf[..total].to_vec();
        self.buf.drain(..total);
        let start = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (status, body[start..].to_vec())
    }

    /// Sends `request` and reads until the whole answer is buffered: its status and its
    /// length in the buffer (head and body). Only `content-length` answers.
    async fn answer(&mut self, request: &[u8]) -> (u16, usize) {
        self.stream.write_all(request).await.unwrap();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap();
                let status: u16 = head[9..12].parse().unwrap();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                let total = end + 4 + length;
                while self.buf.len() < total {
                    self.read().await;
                }
                return (status, total);
            }
            self.read().await;
        }
    }

    async fn read(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

/// The `p` quantile of sorted microseconds, in milliseconds.
pub fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

/// A process's user + system CPU time so far, in clock ticks (see [`clock_ticks_per_s`]).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is the first, utime
    // the 12th, stime the 13th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `CLK_TCK`: the clock ticks of [`cpu_ticks`] in a second (100 on Linux, usually).
pub fn clock_ticks_per_s() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Deletes the Redis keys a bench's keyward wrote under `prefix`.
pub fn drop_redis_keys(redis_port: u16, prefix: &str) {
    drop_redis_pattern(redis_port, &format!("{{{prefix}*"));
}

/// Deletes the Redis keys matching the glob `pattern`, 500 at a time. Each name goes to
/// `DEL` as one argument, so names with quotes or commas (Limitador's JSON) go too.
pub fn drop_redis_pattern(redis_port: u16, pattern: &str) {
    let port = redis_port.to_string();
    let Ok(out) = Command::new("redis-cli")
        .args(["-p", &port, "--scan", "--pattern", pattern])
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let keys: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    for chunk in keys.chunks(500) {
        let _ = Command::new("redis-cli")
            .args(["-p", &port, "DEL"])
            .args(chunk)
            .output();
    }
}
