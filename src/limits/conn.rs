//! One connection type for a standalone Redis and a Redis Cluster.
//!
//! `KEYWARD_REDIS_URL` is `redis://host:port` (or `rediss://`) for one Redis, and
//! `redis+cluster://host:port,host:port,…` (or `rediss+cluster://`) for a cluster: the
//! listed nodes are where the client starts to discover the rest. Every keyward key is
//! under one hash tag, so each script runs on the one node that owns that slot; the
//! cluster client routes it there (and loads scripts on every primary).

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::CounterError;

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Single(String),
    /// Node URLs (`redis://host:port`), at least one.
    Cluster(Vec<String>),
}

impl Target {
    /// Parses `KEYWARD_REDIS_URL`; `None` for anything keyward cannot use.
    pub fn parse(url: &str) -> Option<Target> {
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
                return (!nodes.is_empty()).then_some(Target::Cluster(nodes));
            }
        }
        (url.starts_with("redis://") || url.starts_with("rediss://"))
            .then(|| Target::Single(url.to_string()))
    }

    /// A node to subscribe to invalidations on (in a cluster, PUBLISH reaches every node).
    pub fn pubsub_url(&self) -> &str {
        match self {
            Target::Single(url) => url,
            Target::Cluster(nodes) => &nodes[0],
        }
    }

    /// A connection of its own with a long response timeout, for blocking reads.
    pub async fn dedicated(&self, response_timeout: Duration) -> Result<Conn, CounterError> {
        match self {
            Target::Single(url) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(response_timeout));
                let client = redis::Client::open(url.as_str())?;
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Target::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
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

/// The deadpool pool of either kind: it creates and health-checks connections.
#[derive(Clone)]
pub enum Pools {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl Pools {
    /// A pool with short timeouts, so an outage fails fast.
    pub fn new(target: &Target, size: usize) -> Result<Pools, CounterError> {
        let mut pool_config = deadpool_redis::PoolConfig::new(size);
        pool_config.timeouts.wait = Some(Duration::from_secs(1));
        pool_config.timeouts.create = Some(Duration::from_secs(1));
        pool_config.timeouts.recycle = Some(Duration::from_secs(1));
        let runtime = Some(deadpool_redis::Runtime::Tokio1);
        let error = |e: &dyn std::fmt::Display| {
            CounterError::Protocol(format!("cannot create the Redis pool: {e}"))
        };
        match target {
            Target::Single(url) => {
                let mut config = deadpool_redis::Config::from_url(url.as_str());
                config.pool = Some(pool_config);
                config
                    .create_pool(runtime)
                    .map(Pools::Single)
                    .map_err(|e| error(&e))
            }
            Target::Cluster(nodes) => {
                let mut config = deadpool_redis::cluster::Config::from_urls(nodes.clone());
                config.pool = Some(pool_config);
                config
                    .create_pool(runtime)
                    .map(Pools::Cluster)
                    .map_err(|e| error(&e))
            }
        }
    }

    /// A health-checked connection, taken out of the pool for good.
    pub async fn take(&self) -> Result<Conn, CounterError> {
        Ok(match self {
            Pools::Single(p) => Conn::Single(deadpool_redis::Connection::take(p.get().await?)),
            Pools::Cluster(p) => {
                Conn::Cluster(deadpool_redis::cluster::Connection::take(p.get().await?))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Target::parse("redis://h:1"),
            Some(Target::Single("redis://h:1".into()))
        );
        assert_eq!(
            Target::parse("redis+cluster://:pw@a:1,b:2"),
            Some(Target::Cluster(vec![
                "redis://:pw@a:1".into(),
                "redis://:pw@b:2".into()
            ]))
        );
        assert_eq!(
            Target::parse("rediss+cluster://a:1"),
            Some(Target::Cluster(vec!["rediss://a:1".into()]))
        );
        assert_eq!(Target::parse("redis+cluster://"), None);
        assert_eq!(Target::parse("http://x"), None);
    }
}
