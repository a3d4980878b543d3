//! One connection type for a standalone Redis and a Redis Cluster.
//!
//! `KEYWARD_REDIS_URL` is `redis://host:port` (or `rediss://`) for one Redis, and
//! `redis+cluster://host:port,host:port,…` (or `rediss+cluster://`) for a cluster: the
//! listed nodes are where the client starts to discover the rest. Every keyward key is
//! under one hash tag, so each script runs on the one node that owns that slot; the
//! cluster client routes it there (and loads scripts on every primary).
//!
//! TLS: a [`Target`] carries the roots trusted for `rediss://` (`KEYWARD_REDIS_CA_FILE`
//! beside the system roots, see [`crate::tls`]), and every connection keyward opens to
//! Redis is made from it: the pools of the hot path's lanes, dedicated connections,
//! pub/sub. Without a CA file the redis crate trusts the system roots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, TlsCertificates, Value};

use super::CounterError;

/// How long one call waits for Redis's answer: the redis crate's default for a standalone
/// connection, set explicitly for the cluster's (which has none by default).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long opening a connection to one node may take (the redis crate's default).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Retries of a cluster request (MOVED, ASK, TRYAGAIN, a reconnection), all within
/// [`RESPONSE_TIMEOUT`].
const CLUSTER_RETRIES: u32 = 3;

/// The node URLs of `KEYWARD_REDIS_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nodes {
    Single(String),
    /// Node URLs (`redis://host:port`), at least one.
    Cluster(Vec<String>),
}

/// Where Redis is, and which certificates its TLS connections trust.
#[derive(Debug, Clone)]
pub struct Target {
    pub nodes: Nodes,
    /// `None`: the redis crate's default, the system roots.
    certs: Option<TlsCertificates>,
}

impl Target {
    /// Parses `KEYWARD_REDIS_URL`; `None` for anything keyward cannot use.
    pub fn parse(url: &str) -> Option<Target> {
        Self::parse_nodes(url).map(|nodes| Target { nodes, certs: None })
    }

    fn parse_nodes(url: &str) -> Option<Nodes> {
        for (cluster, single) in [
            ("redis+cluster://", "redis://"),
            ("rediss+cluster://", "rediss://"),
        ] {
            if let Some(rest) = url.strip_prefix(cluster) {
                let (auth, hosts) = match rest.rsplit_once('@') {
                    Some((auth, hosts)) => (format!("{auth}@"), hosts),
                    None => (String::new(), rest),
                };
                let nodes: Vec<String> = hosts
                    .split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(|h| format!("{single}{auth}{h}"))
                    .collect();
                return (!nodes.is_empty()).then_some(Nodes::Cluster(nodes));
            }
        }
        (url.starts_with("redis://") || url.starts_with("rediss://"))
            .then(|| Nodes::Single(url.to_string()))
    }

    /// Whether the URL asks for TLS (`rediss://`, `rediss+cluster://`).
    pub fn is_tls(url: &str) -> bool {
        url.starts_with("rediss://") || url.starts_with("rediss+cluster://")
    }

    /// Trusts `ca` (PEM, checked by [`crate::tls::ca_certificates`]) beside the system
    /// roots for `rediss://` connections.
    pub fn with_ca(mut self, ca: &[u8]) -> Result<Target, String> {
        let extra = crate::tls::ca_certificates(ca)?;
        self.certs = Some(TlsCertificates {
            client_tls: None,
            root_cert: Some(crate::tls::roots_with_system(&extra)),
        });
        Ok(self)
    }

    /// The node URLs, one for a standalone Redis.
    pub fn node_urls(&self) -> &[String] {
        match &self.nodes {
            Nodes::Single(url) => std::slice::from_ref(url),
            Nodes::Cluster(nodes) => nodes,
        }
    }

    /// A client for one node URL, with this target's trust.
    pub fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match &self.certs {
            Some(certs) if url.starts_with("rediss://") => {
                redis::Client::build_with_tls(url, certs.clone())
            }
            _ => redis::Client::open(url),
        }
    }

    /// A client to subscribe to invalidations with (in a cluster, PUBLISH reaches every
    /// node, so the first one will do).
    pub fn pubsub_client(&self) -> redis::RedisResult<redis::Client> {
        self.client(&self.node_urls()[0])
    }

    /// A cluster client with the standalone connection's bounds: without a response
    /// timeout the redis crate waits for a dead or paused master indefinitely (retrying
    /// with backoff), so every call to its slots would hang instead of failing over to
    /// the failure policy. The response timeout also bounds a whole request, retries and
    /// redirections included.
    fn cluster_builder(&self, nodes: &[String]) -> ClusterClientBuilder {
        let builder = ClusterClientBuilder::new(nodes.to_vec())
            .response_timeout(RESPONSE_TIMEOUT)
            .connection_timeout(CONNECTION_TIMEOUT)
            .retries(CLUSTER_RETRIES);
        match &self.certs {
            Some(certs) if nodes.iter().all(|n| n.starts_with("rediss://")) => {
                builder.certs(certs.clone())
            }
            _ => builder,
        }
    }

    /// On a cluster, whether every master that owns slots answers and sees the cluster
    /// whole (`cluster_state:ok`), each asked on a connection of its own within
    /// [`RESPONSE_TIMEOUT`]. The cluster connection alone cannot tell: it sends a
    /// command meant for every master only to those it is connected to, so a dead
    /// master is skipped. `conn` reads the slot map. A standalone Redis: `Ok`.
    pub async fn masters_answer(&self, conn: &mut Conn) -> Result<(), CounterError> {
        let Nodes::Cluster(nodes) = &self.nodes else {
            return Ok(());
        };
        let slots: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
        let mut masters: Vec<(String, i64)> = slots
            .iter()
            .filter_map(|range| match range {
                Value::Array(parts) => match parts.get(2) {
                    Some(Value::Array(master)) => Some((
                        redis::from_redis_value_ref::<String>(master.first()?).ok()?,
                        redis::from_redis_value_ref::<i64>(master.get(1)?).ok()?,
                    )),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        masters.sort();
        masters.dedup();
        if masters.is_empty() {
            return Err(CounterError::Protocol("the cluster has no slots".into()));
        }
        // The nodes' scheme and credentials, with each master's address.
        let first = &nodes[0];
        let (scheme, rest) = first.split_once("://").unwrap_or(("redis", first));
        let auth = rest.rsplit_once('@').map_or("", |(auth, _)| auth);
        let auth = if auth.is_empty() {
            String::new()
        } else {
            format!("{auth}@")
        };
        let checks = masters.iter().map(|(host, port)| {
            let url = format!("{scheme}://{auth}{host}:{port}");
            async move {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT));
                let mut node = self
                    .client(&url)?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut node)
                    .await?;
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    Ok(())
                } else {
                    Err(CounterError::Protocol(format!(
                        "the cluster master {host}:{port} reports the cluster down"
                    )))
                }
            }
        });
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, CounterError>>()
            .map(drop)
    }

    /// A connection of its own with a long response timeout, for blocking reads.
    pub async fn dedicated(&self, response_timeout: Duration) -> Result<Conn, CounterError> {
        match &self.nodes {
            Nodes::Single(url) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(response_timeout));
                let client = self.client(url)?;
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Nodes::Cluster(nodes) => {
                let client = self
                    .cluster_builder(nodes)
                    .response_timeout(response_timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// A multiplexed connection to a Redis or to a cluster; cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where the hot path's lanes get their connections from: a deadpool pool of either
/// kind, which creates and health-checks them (named for what it does, not "pool":
/// a provider's keys are its roster).
#[derive(Clone)]
pub enum Connector {
    Single(deadpool_redis::Pool),
    Cluster(deadpool::managed::Pool<ClusterManager>),
}

impl Connector {
    /// A pool with short timeouts, so an outage fails fast.
    pub fn new(target: &Target, size: usize) -> Result<Connector, CounterError> {
        let mut pool_config = deadpool_redis::PoolConfig::new(size);
        pool_config.timeouts.wait = Some(Duration::from_secs(1));
        pool_config.timeouts.create = Some(Duration::from_secs(1));
        pool_config.timeouts.recycle = Some(Duration::from_secs(1));
        let runtime = deadpool_redis::Runtime::Tokio1;
        let error = |e: &dyn std::fmt::Display| {
            CounterError::Protocol(format!("cannot create the Redis pool: {e}"))
        };
        match &target.nodes {
            Nodes::Single(url) => {
                // The client's connection info carries the TLS roots to the manager's client.
                let info = target.client(url)?.get_connection_info().clone();
                let manager = deadpool_redis::Manager::new(info)?;
                deadpool_redis::Pool::builder(manager)
                    .config(pool_config)
                    .runtime(runtime)
                    .build()
                    .map(Connector::Single)
                    .map_err(|e| error(&e))
            }
            Nodes::Cluster(nodes) => {
                let manager = ClusterManager {
                    client: target.cluster_builder(nodes).build()?,
                    ping_number: AtomicUsize::new(0),
                };
                deadpool::managed::Pool::builder(manager)
                    .config(pool_config)
                    .runtime(runtime)
                    .build()
                    .map(Connector::Cluster)
                    .map_err(|e| error(&e))
            }
        }
    }

    /// A health-checked connection, taken out of the pool for good.
    pub async fn take(&self) -> Result<Conn, CounterError> {
        Ok(match self {
            Connector::Single(p) => Conn::Single(deadpool_redis::Connection::take(p.get().await?)),
            Connector::Cluster(p) => Conn::Cluster(deadpool::managed::Object::take(p.get().await?)),
        })
    }
}

/// deadpool-redis' cluster manager, with a client that keyward builds (so that it can
/// carry the TLS roots, which deadpool-redis' cluster configuration has no place for).
pub struct ClusterManager {
    client: ClusterClient,
    ping_number: AtomicUsize,
}

impl deadpool::managed::Manager for ClusterManager {
    type Type = ClusterConnection;
    type Error = redis::RedisError;

    async fn create(&self) -> Result<ClusterConnection, redis::RedisError> {
        self.client.get_async_connection().await
    }

    async fn recycle(
        &self,
        conn: &mut ClusterConnection,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<redis::RedisError> {
        let ping = self.ping_number.fetch_add(1, Ordering::Relaxed).to_string();
        let answer: String = redis::cmd("PING").arg(&ping).query_async(conn).await?;
        if answer == ping {
            Ok(())
        } else {
            Err(deadpool::managed::RecycleError::message(
                "invalid PING answer",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(url: &str) -> Option<Nodes> {
        Target::parse(url).map(|t| t.nodes)
    }

    #[test]
    fn urls() {
        assert_eq!(
            nodes("redis://h:1"),
            Some(Nodes::Single("redis://h:1".into()))
        );
        assert_eq!(
            nodes("redis+cluster://:pw@a:1,b:2"),
            Some(Nodes::Cluster(vec![
                "redis://:pw@a:1".into(),
                "redis://:pw@b:2".into()
            ]))
        );
        assert_eq!(
            nodes("rediss+cluster://a:1"),
            Some(Nodes::Cluster(vec!["rediss://a:1".into()]))
        );
        assert_eq!(nodes("redis+cluster://"), None);
        assert_eq!(nodes("http://x"), None);
        assert!(Target::is_tls("rediss+cluster://a:1") && Target::is_tls("rediss://a:1"));
        assert!(!Target::is_tls("redis://a:1") && !Target::is_tls("redis+cluster://a:1"));
    }
}
