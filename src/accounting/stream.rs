//! The distributed shape's accounting writer: a consumer of the Redis usage stream.

use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::watch;

use super::{backoff, BATCH};
use crate::db::Db;
use crate::limits::conn::{Conn, Target};
use crate::limits::redis::record_from_entry;
use crate::usage::{store, UsageRecord};

/// The one consumer group every replica reads through.
pub const GROUP: &str = "keyward-writers";
const BLOCK_MS: u64 = 1_000;

/// Creates the consumer group (and the stream) unless they exist.
pub async fn ensure_group(conn: &mut Conn, stream: &str) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, GROUP, "0").await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Reads, applies and acknowledges until `stop` is set. Entries another consumer has held
/// for `claim_idle` (it died, or its database is down) are claimed and applied here.
pub async fn run(
    target: Target,
    stream: String,
    consumer: String,
    claim_idle: Duration,
    db: Db,
    mut stop: watch::Receiver<bool>,
) {
    let claim_every = claim_idle.min(Duration::from_secs(10));
    let mut attempt = 0;
    // Start with this consumer's own unacknowledged entries (a restart under the same
    // name, or a batch that failed), then read new ones.
    let mut pending = true;
    let mut last_claim = Instant::now() - claim_every;
    let mut conn = None;
    while !*stop.borrow() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match target
                .dedicated(Duration::from_millis(BLOCK_MS + 4_000))
                .await
            {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::warn!(error = %e, "accounting: cannot reach Redis; retrying");
                    sleep_or_stop(backoff(attempt), &mut stop).await;
                    attempt += 1;
                    continue;
                }
            },
        };
        if last_claim.elapsed() >= claim_every {
            last_claim = Instant::now();
            match claim(c, &stream, &consumer, claim_idle).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        entries = n,
                        "accounting: claimed entries abandoned by another replica"
                    );
                    pending = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accounting: claiming abandoned entries failed")
                }
            }
        }
        let entries = match read(c, &stream, &consumer, pending).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "accounting: reading the usage stream failed; retrying");
                conn = None;
                sleep_or_stop(backoff(attempt), &mut stop).await;
                attempt += 1;
                continue;
            }
        };
        if entries.is_empty() {
            pending = false;
            continue;
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let records: Vec<UsageRecord> = entries
            .iter()
            .filter_map(|e| {
                let record = record_from_entry(&e.map);
                if record.is_none() {
                    tracing::error!(entry = %e.id, "accounting: malformed usage entry dropped");
                }
                record
            })
            .collect();
        let oldest = records.iter().map(|r| r.created_at).min();
        match store::apply(&db, &records).await {
            Ok(applied) => {
                crate::metrics::applied(Ok(&applied), oldest);
                attempt = 0;
                if applied.duplicates > 0 {
                    tracing::debug!(
                        duplicates = applied.duplicates,
                        "accounting: entries already applied"
                    );
                }
                let acked: redis::RedisResult<()> = async {
                    let _: i64 = c.xack(&stream, GROUP, &ids).await?;
                    let _: i64 = c.xdel(&stream, &ids).await?;
                    let depth: i64 = c.xlen(&stream).await?;
                    crate::metrics::get().accounting_queue_depth.set(depth);
                    Ok(())
                }
                .await;
                if let Err(e) = acked {
                    // Applied but not acknowledged: it will be read again and found applied.
                    tracing::warn!(error = %e, "accounting: acknowledging failed");
                    conn = None;
                }
            }
            Err(e) => {
                crate::metrics::applied(Err(()), None);
                tracing::warn!(error = %e, entries = records.len(), "accounting: database unavailable; will retry");
                pending = true;
                sleep_or_stop(backoff(attempt), &mut stop).await;
                attempt += 1;
            }
        }
    }
}

async fn sleep_or_stop(wait: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

async fn read(
    conn: &mut Conn,
    stream: &str,
    consumer: &str,
    pending: bool,
) -> redis::RedisResult<Vec<StreamId>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(BATCH);
    if !pending {
        cmd.arg("BLOCK").arg(BLOCK_MS);
    }
    cmd.arg("STREAMS")
        .arg(stream)
        .arg(if pending { "0" } else { ">" });
    let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
    Ok(reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default())
}

/// Takes over entries idle for longer than `idle`; returns how many.
async fn claim(
    conn: &mut Conn,
    stream: &str,
    consumer: &str,
    idle: Duration,
) -> redis::RedisResult<usize> {
    let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(GROUP)
        .arg(consumer)
        .arg(idle.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(BATCH)
        .query_async(conn)
        .await?;
    Ok(reply.claimed.len())
}
