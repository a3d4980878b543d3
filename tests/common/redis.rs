//! Redis for tests: the shared server (`KEYWARD_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), where each test writes under a prefix of its own and deletes
//! only that; a private `redis-server` ([`PrivateRedis`]) or three-master Redis Cluster
//! ([`PrivateCluster`]) for tests that flush, stop, restart or watch Redis; and a reader
//! of a Redis store's queued accounting records.

use std::time::Duration;

use super::helpers::eventually;
use super::ports::{free_cluster_port, free_port};

pub fn redis_url() -> String {
    std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A Redis key prefix (and hash tag) no other test uses.
pub fn unique_prefix() -> String {
    format!("kwt-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Where a key without a user keeps its `what` (`rpm`, `tpm`, `leases`, …) under
/// `prefix`, with the default shard count.
pub fn client_key(prefix: &str, key_id: &str, what: &str) -> String {
    use keyward::limits::scripts::{KeySpace, DEFAULT_SHARDS};
    let space = KeySpace::new(prefix, DEFAULT_SHARDS);
    let shard = space.shard_of(keyward::limits::Tenant::Key(key_id));
    space.client(shard, key_id, what)
}

/// Removes every key under this test's prefix (its own keys only; nothing shared).
pub async fn delete_prefix(url: &str, prefix: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        // Its tenant shards' tags `{<prefix>:<i>.<j>}`, its pools' `{<prefix>:p:…}` and
        // its own `{<prefix>}`.
        .arg(format!("{{{prefix}*"))
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

/// A three-master Redis Cluster of the test's own (redis-server --cluster-enabled yes on
/// free ports, joined with redis-cli --cluster create), killed on drop.
pub struct PrivateCluster {
    pub url: String,
    /// Its masters' ports.
    pub ports: Vec<u16>,
    nodes: Vec<PrivateRedisNode>,
}

struct PrivateRedisNode {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for PrivateRedisNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster node's command line.
fn cluster_node_args(port: u16) -> Vec<String> {
    [
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
    ]
    .map(String::from)
    .to_vec()
}

/// Starts one cluster-enabled redis-server, on another port when the one picked was
/// taken meanwhile by another test's server (redis-server then exits).
async fn start_cluster_node() -> (u16, PrivateRedisNode) {
    for _ in 0..10 {
        let port = free_cluster_port();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("redis-server")
            .args(cluster_node_args(port))
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
                return (port, PrivateRedisNode { child, dir });
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
        PrivateCluster::until_state(&ports, "ok").await;
        PrivateCluster {
            url: format!("redis+cluster://{}", addresses.join(",")),
            ports,
            nodes,
        }
    }

    fn node_at(&mut self, port: u16) -> &mut PrivateRedisNode {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        &mut self.nodes[i]
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`) to the master on `port`.
    pub fn signal(&mut self, port: u16, signal: &str) {
        let pid = self.node_at(port).child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
        if signal == "KILL" {
            let _ = self.node_at(port).child.wait();
        }
    }

    /// Starts the master on `port` again after [`PrivateCluster::signal`] `KILL`, from
    /// its own directory (its `nodes.conf`: it rejoins with its slots), and waits until
    /// every master sees the cluster whole.
    pub async fn restart(&mut self, port: u16) {
        let node = self.node_at(port);
        node.child = std::process::Command::new("redis-server")
            .args(cluster_node_args(port))
            .current_dir(node.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        PrivateCluster::until_state(&self.ports, "ok").await;
    }

    /// Waits until every node on `ports` reports `cluster_state:<state>` (`ok`: the
    /// cluster is whole; `fail`: it saw a master go).
    pub async fn until_state(ports: &[u16], state: &str) {
        let want = format!("cluster_state:{state}");
        for port in ports {
            eventually(30, || async {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                info.contains(&want).then_some(())
            })
            .await;
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// A plain connection to the master on `port`.
    pub async fn node(port: u16) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// The port of the master that owns `slot` (from `CLUSTER SLOTS`).
    pub async fn owner_of(&self, slot: u32) -> u16 {
        let mut conn = Self::node(self.ports[0]).await;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let int = |v: &redis::Value| redis::from_redis_value_ref::<i64>(v).unwrap();
            let (lo, hi) = (int(&parts[0]), int(&parts[1]));
            if (lo..=hi).contains(&i64::from(slot)) {
                let redis::Value::Array(master) = &parts[2] else {
                    panic!("CLUSTER SLOTS without a master");
                };
                return int(&master[1]) as u16;
            }
        }
        panic!("no master owns slot {slot}");
    }
}

/// Every record a Redis counter store has queued on its accounting stream, oldest first
/// (what the stream consumer would write to the database).
pub async fn stream_records(
    redis: &keyward::limits::redis::RedisCounters,
) -> Vec<keyward::usage::UsageRecord> {
    let mut conn = redis.conn().await.unwrap();
    let mut entries = Vec::new();
    for stream in redis.stream_keys() {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        entries.extend(reply.ids);
    }
    // Oldest first across the shards' streams (entry ids begin with their time).
    let order = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    entries.sort_by_key(|e| order(&e.id));
    entries
        .iter()
        .map(|e| keyward::accounting::codec::record_from_entry(&e.map).unwrap())
        .collect()
}

/// Queues one well-formed usage record `id` on `stream`, as report.lua writes it (100
/// prompt and 40 completion tokens of gpt-4o at openai, 7 micro-USD).
pub async fn queue_usage_record(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    stream: &str,
    id: &str,
) {
    let mut add = redis::cmd("XADD");
    add.arg(stream).arg("*");
    for (name, value) in [
        ("id", id),
        ("key", ""),
        ("provider", "openai"),
        ("model", "gpt-4o"),
        ("fmt", ""),
        ("pk", ""),
        ("pt", "100"),
        ("ct", "40"),
        ("cost", "7"),
        ("lat", ""),
        ("st", "200"),
        ("ts", "1700000000000"),
    ] {
        add.arg(name).arg(value);
    }
    let _: String = add.query_async(conn).await.unwrap();
}
