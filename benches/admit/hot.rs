//! `hot`: one hash tag is one master's ceiling. On a three-master Redis Cluster of the
//! bench's own, all the load on ONE client key (one tenant shard, so one tag, one slot,
//! one master), then admit+select of `KEYWARD_BENCH_CLUSTER_KEYS` keys (default 1,000)
//! on ONE pool (every pick on the pool's tag). For each: each master's share of the
//! script calls, and the busiest master's Redis CPU (% of one core over the run) and
//! the decisions per second that reached it, with what that master would carry at 100%
//! of its core (decisions/s ÷ its CPU share), which is the ceiling of a single tag:
//! no number of masters raises it, since a tag cannot be split.

use crate::cluster::{cluster_keys, node_ports};
use crate::measure::{Probe, Summary};
use crate::support::{self, private_redis::PrivateCluster};
use crate::{create_key, create_keys, pool_size, row, saturate, start, warm, SECONDS};

pub async fn run(summary: &mut Summary) {
    let cluster = PrivateCluster::start().await;
    let ports = node_ports(&cluster.url);
    let prefix = format!("kw-bench-hot-{}", std::process::id());
    let k = start(Some((&cluster.url, &prefix))).await;
    support::create_pool(&k, "bench", pool_size()).await;
    let one = vec![create_key(&k).await];
    let n = cluster_keys();
    let many = create_keys(&k, n).await;
    warm(k.data, &many).await;
    for (name, secrets, select) in [
        ("hot key: cluster of 3, 1 key".to_string(), &one, false),
        (
            format!(
                "hot pool: cluster of 3, {n} keys, select of {} (1 pool)",
                pool_size()
            ),
            &many,
            true,
        ),
    ] {
        saturate(k.data, secrets, select, 1).await; // warm-up
        let probe = Probe::start(Some(k.pid()), &ports);
        let run = saturate(k.data, secrets, select, SECONDS).await;
        let cost = probe.finish(run.latencies_us.len());
        row(&name, &run);
        if let Some(redis) = &cost.redis {
            let total = redis.calls_per_node.iter().sum::<u64>().max(1) as f64;
            let shares: Vec<String> = redis
                .calls_per_node
                .iter()
                .map(|&c| format!("{:.0}%", 100.0 * c as f64 / total))
                .collect();
            let (busiest, &calls) = redis
                .calls_per_node
                .iter()
                .enumerate()
                .max_by_key(|(_, &c)| c)
                .unwrap_or((0, &0));
            let cpu = redis.cpu_s_per_node.get(busiest).copied().unwrap_or(0.0) / SECONDS as f64;
            // Every decision of the run touched the busiest master: the hot key's admit
            // or the pool's pick.
            let ceiling = if cpu > 0.0 { run.rate / cpu } else { f64::NAN };
            summary.line(format!(
                "{name}: each master's share of script calls: {} (busiest: node {busiest}, {:.0}% of the calls, Redis CPU {:.0}% of one core, {:.0} decisions/s reached it, {:.0} script calls/s; at 100% of its core: about {ceiling:.0} decisions/s, the ceiling of one tag)",
                shares.join(" / "),
                100.0 * calls as f64 / total,
                100.0 * cpu,
                run.rate,
                calls as f64 / SECONDS as f64,
            ));
        }
        let p99 = support::percentile(&run.latencies_us, 0.99);
        summary.add(name, run.rate, (Some(p99), None), cost);
    }
    drop(k);
}
