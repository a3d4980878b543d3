//! What a run cost, and the summary table that collects every part's figures.
//!
//! A [`Probe`] is started before a run and finished after it: the process's CPU time
//! (`/proc/<pid>/stat`, user + system) and, on every Redis node given, `CONFIG RESETSTAT`
//! before and `INFO commandstats` / `INFO cpu` after, divided by the decisions of the run.
//! `INFO commandstats` counts the time Redis spent executing the script calls, `INFO cpu`
//! the whole server's CPU (every command, parsing, replies, the event loop too).
//! (commandstats also counts each command a script calls under that command's name, so
//! a sum over all its lines would count the scripts' work twice: the whole server's
//! figure is `INFO cpu`'s.) RESETSTAT clears the statistics of the server for all its clients and changes no
//! data: the bench runs on a Redis of its own unless `KEYWARD_BENCH_REDIS_PORT` names one.

use std::process::Command;

use crate::support;

/// The script commands whose time is a script's (keyward sends EVALSHA; EVAL after a
/// NOSCRIPT; the read-only and function forms for completeness).
const SCRIPT_COMMANDS: [&str; 5] = ["eval", "evalsha", "eval_ro", "evalsha_ro", "fcall"];

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Redis's user + system CPU so far, in seconds (`INFO cpu`: the whole server).
pub fn redis_cpu_s(port: u16) -> f64 {
    let info = redis_cli(port, &["INFO", "cpu"]);
    ["used_cpu_user:", "used_cpu_sys:"]
        .iter()
        .filter_map(|field| {
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .sum()
}

/// Since the last RESETSTAT: (script calls, their µs).
pub fn command_stats(port: u16) -> (u64, u64) {
    let info = redis_cli(port, &["INFO", "commandstats"]);
    let (mut calls, mut script_us) = (0, 0);
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |f: &str| -> u64 {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        if SCRIPT_COMMANDS.contains(&name) {
            calls += field("calls");
            script_us += field("usec");
        }
    }
    (calls, script_us)
}

/// Starts measuring a run of the process `pid` (if any) against the Redis nodes `redis`.
pub struct Probe {
    pid: Option<u32>,
    ticks: u64,
    redis: Vec<u16>,
    /// Each node's `INFO cpu` seconds at the start.
    redis_cpu_s: Vec<f64>,
}

/// What a run cost, per decision (µs).
#[derive(Clone, Default)]
pub struct Cost {
    pub sidecar_us: Option<f64>,
    pub redis: Option<RedisCost>,
}

#[derive(Clone, Default)]
pub struct RedisCost {
    /// `INFO cpu` of all nodes.
    pub cpu_us: f64,
    /// `INFO commandstats`: script calls' time.
    pub scripts_us: f64,
    /// µs of one script call, and script calls per decision.
    pub us_per_call: f64,
    pub calls_per_decision: f64,
    /// Script calls on each node (in the order given).
    pub calls_per_node: Vec<u64>,
    /// `INFO cpu` seconds each node spent during the run (in the order given).
    pub cpu_s_per_node: Vec<f64>,
}

impl Probe {
    pub fn start(pid: Option<u32>, redis: &[u16]) -> Probe {
        for &p in redis {
            redis_cli(p, &["CONFIG", "RESETSTAT"]);
        }
        Probe {
            pid,
            ticks: pid.map_or(0, support::cpu_ticks),
            redis: redis.to_vec(),
            redis_cpu_s: redis.iter().map(|&p| redis_cpu_s(p)).collect(),
        }
    }

    /// The cost of `decisions` decisions since [`Probe::start`].
    pub fn finish(self, decisions: usize) -> Cost {
        let n = decisions.max(1) as f64;
        let sidecar_us = self.pid.map(|pid| {
            let ticks = support::cpu_ticks(pid) - self.ticks;
            ticks as f64 * 1e6 / support::clock_ticks_per_s() as f64 / n
        });
        let redis = (!self.redis.is_empty()).then(|| {
            let cpu_s_per_node: Vec<f64> = (self.redis.iter().zip(&self.redis_cpu_s))
                .map(|(&p, start)| redis_cpu_s(p) - start)
                .collect();
            let cpu: f64 = cpu_s_per_node.iter().sum();
            let stats: Vec<(u64, u64)> = self.redis.iter().map(|&p| command_stats(p)).collect();
            let calls: u64 = stats.iter().map(|s| s.0).sum();
            let script_us: u64 = stats.iter().map(|s| s.1).sum();
            RedisCost {
                cpu_us: cpu * 1e6 / n,
                scripts_us: script_us as f64 / n,
                us_per_call: script_us as f64 / calls.max(1) as f64,
                calls_per_decision: calls as f64 / n,
                calls_per_node: stats.iter().map(|s| s.0).collect(),
                cpu_s_per_node,
            }
        });
        Cost { sidecar_us, redis }
    }
}

/// One row of the final table.
pub struct Row {
    pub name: String,
    pub rate: f64,
    pub p99_ms: Option<f64>,
    /// Open loops: the p99 of how late sends left against the schedule.
    pub lag_p99_ms: Option<f64>,
    pub cost: Cost,
}

/// Every part's rows and the lines under them, printed once at the end.
#[derive(Default)]
pub struct Summary {
    pub rows: Vec<Row>,
    pub lines: Vec<String>,
}

impl Summary {
    pub fn add(
        &mut self,
        name: impl Into<String>,
        rate: f64,
        (p99_ms, lag_p99_ms): (Option<f64>, Option<f64>),
        cost: Cost,
    ) {
        self.rows.push(Row {
            name: name.into(),
            rate,
            p99_ms,
            lag_p99_ms,
            cost,
        });
    }

    pub fn line(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        self.lines.push(line);
    }

    /// The row named `name`, if that part ran.
    pub fn get(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    pub fn print(&self) {
        println!("\n## Summary\n");
        println!("| run | decisions/s | p99 ms | lag p99 ms | sidecar CPU µs/dec | Redis CPU µs/dec | Redis scripts µs/dec | Redis µs/script call | script calls/dec |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let f = |v: Option<f64>, digits: usize| {
            v.filter(|v| v.is_finite())
                .map_or("-".to_string(), |v| format!("{v:.digits$}"))
        };
        for r in &self.rows {
            let redis = r.cost.redis.as_ref();
            println!(
                "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                r.rate,
                f(r.p99_ms, 3),
                f(r.lag_p99_ms, 3),
                f(r.cost.sidecar_us, 1),
                f(redis.map(|c| c.cpu_us), 1),
                f(redis.map(|c| c.scripts_us), 1),
                f(redis.map(|c| c.us_per_call), 1),
                f(redis.map(|c| c.calls_per_decision), 2),
            );
        }
        println!();
        for l in &self.lines {
            println!("{l}");
        }
    }
}
