//! keyward on a three-master Redis Cluster of the bench's own (started the way the tests
//! start theirs, `tests/common/redis.rs`): saturation over `KEYWARD_BENCH_CLUSTER_KEYS`
//! client keys (default 1,000), without and with selection, and each master's share of
//! the script calls (`cmdstat_evalsha` per node, `CONFIG RESETSTAT` before the run).
//!
//! While a deployment's keys all live under one hash tag they are all on one master
//! (100% there, 0% on the others); with tenant shards they spread over the masters.

use crate::measure::{Probe, Summary};
use crate::support::{self, private_redis::PrivateCluster};
use crate::{create_keys, pool_size, row, saturate, start, warm, SECONDS};

pub fn cluster_keys() -> usize {
    std::env::var("KEYWARD_BENCH_CLUSTER_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000)
}

/// The nodes' ports in "redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...".
pub fn node_ports(url: &str) -> Vec<u16> {
    url.trim_start_matches("redis+cluster://")
        .split(',')
        .filter_map(|a| a.rsplit(':').next()?.parse().ok())
        .collect()
}

pub async fn run(summary: &mut Summary) {
    let cluster = PrivateCluster::start().await;
    let ports = node_ports(&cluster.url);
    let prefix = format!("kw-bench-cluster-{}", std::process::id());
    let k = start(Some((&cluster.url, &prefix))).await;
    let n = cluster_keys();
    let keys = create_keys(&k, n).await;
    support::create_pool(&k, "bench", pool_size()).await;
    warm(k.data, &keys).await;
    for select in [false, true] {
        saturate(k.data, &keys, select, 1).await; // warm-up
        let probe = Probe::start(Some(k.pid()), &ports);
        let run = saturate(k.data, &keys, select, SECONDS).await;
        let cost = probe.finish(run.latencies_us.len());
        let name = if select {
            format!("cluster of 3, {n} keys, select of {}", pool_size())
        } else {
            format!("cluster of 3, {n} keys, saturation")
        };
        row(&name, &run);
        let per_node = cost
            .redis
            .as_ref()
            .map(|r| r.calls_per_node.clone())
            .unwrap_or_default();
        let total = per_node.iter().sum::<u64>().max(1) as f64;
        let shares: Vec<String> = per_node
            .iter()
            .map(|&c| format!("{:.0}%", 100.0 * c as f64 / total))
            .collect();
        let busiest = per_node.iter().copied().max().unwrap_or(0) as f64 / total;
        summary.line(format!(
            "{name}: each master's share of script calls (cmdstat_evalsha): {} (busiest {:.0}%, even would be 33%)",
            shares.join(" / "),
            100.0 * busiest
        ));
        let p99 = support::percentile(&run.latencies_us, 0.99);
        summary.add(name, run.rate, (Some(p99), None), cost);
    }
    drop(k);
}
