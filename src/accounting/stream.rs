//! The distributed shape's accounting writer: a consumer of the Redis usage streams
//! (one per tenant shard, the one-tag layout's of the release before, and those of other
//! shard counts found in the [`super::registry`]). Just over 400 lines: the loop and the
//! Redis commands it sends read best together.

use std::time::{Duration, Instant};

use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamPendingReply, StreamRangeReply,
    StreamReadReply,
};
use redis::AsyncCommands;
use tokio::sync::watch;

use super::{apply_batch, backoff, BATCH};
use crate::accounting::codec::record_from_entry;
use crate::clock::now_ms;
use crate::db::{Db, StoreError};
use crate::limits::conn::{Conn, Target};
use crate::usage::dead_letters;

/// The one consumer group every replica reads through.
pub const GROUP: &str = "keyward-writers";
/// The first wait of an idle writer, and the longest (see [`run`]).
const IDLE_MIN: Duration = Duration::from_millis(50);
const IDLE_MAX: Duration = Duration::from_millis(500);
/// A read answers at once (no BLOCK): this only bounds a stuck connection.
const READ_TIMEOUT_MS: u64 = 5_000;
/// How often the queue's depth and lag are measured for `/metrics`.
const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// Creates the consumer group (and the stream) unless they exist.
pub async fn ensure_group(conn: &mut Conn, stream: &str) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, GROUP, "0").await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Creates a shard stream's lost group again, from its first entry (see [`run`]).
async fn regroup(conn: &mut Conn, stream: &str) -> redis::RedisResult<()> {
    ensure_group(conn, stream).await?;
    tracing::error!(
        stream,
        "accounting: a usage stream had lost its consumer group (did Redis lose its data?); created it again"
    );
    Ok(())
}

/// How often a writer claims abandoned entries and registers its streams again.
pub fn claim_every(claim_idle: Duration) -> Duration {
    claim_idle.min(Duration::from_secs(10))
}

/// Reads, applies and acknowledges until `stop` is set, from every stream of `streams`
/// (each tenant shard's, then the one-tag layout's of the release before, read until it
/// is drained, then those of other shard counts listed in `registry`, looked up again at
/// each claim round and read until drained). Entries another consumer has held for `claim_idle` (it died, or its
/// database is down) are claimed and applied here.
///
/// Polling, not blocking: in a Redis Cluster the shards' streams live on different
/// masters, and one blocking XREADGROUP can only wait on one slot. Each pass reads every
/// stream once without BLOCK (COUNT `BATCH`); a pass that finds nothing waits
/// `IDLE_MIN`, doubling up to `IDLE_MAX` while idle, and a pass that finds something
/// goes on at once. So a record waits at most `IDLE_MAX` (plus its batch) before it is
/// read, and an idle replica costs Redis `streams / IDLE_MAX` cheap reads a second
/// (17 / 0.5 s = 34 with the default 16 shards).
pub async fn run(
    target: Target,
    mut streams: Vec<String>,
    registry: String,
    consumer: String,
    claim_idle: Duration,
    db: Db,
    mut stop: watch::Receiver<bool>,
) {
    let claim_every = claim_every(claim_idle);
    let mut attempt = 0;
    // Start with this consumer's own unacknowledged entries (a restart under the same
    // name, or a batch that failed), then read new ones.
    let mut pending = vec![true; streams.len()];
    // The legacy stream (the last) without the group (never created, or removed) is
    // skipped until the next claim round looks again. A shard's stream never is: without
    // its group (Redis lost its data, and report.lua's XADD made the stream anew) the
    // group is created again ([`regroup`]), or its records would wait forever, unseen.
    let legacy = streams.len().saturating_sub(1);
    // Streams of another layout (from the registry) follow the current ones.
    let current = streams.len();
    let mut absent = vec![false; streams.len()];
    let mut idle = IDLE_MIN;
    let mut last_claim = Instant::now() - claim_every;
    let mut last_measure = Instant::now() - MEASURE_EVERY;
    let mut conn = None;
    while !*stop.borrow() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match target
                .dedicated(Duration::from_millis(READ_TIMEOUT_MS))
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
            let others = &mut (streams.split_off(current), pending.split_off(current));
            // This layout's streams, registered again: the promise that keeps them
            // listed while this replica may queue records in them.
            if let Err(e) =
                super::registry::register(c, &registry, &streams[..legacy], claim_every).await
            {
                tracing::warn!(error = %e, "accounting: registering the usage streams failed");
            }
            if let Err(e) = super::registry::refresh(c, &registry, &streams, others).await {
                tracing::warn!(error = %e, "accounting: reading the stream registry failed");
            }
            streams.append(&mut others.0);
            pending.append(&mut others.1);
            absent = vec![false; streams.len()];
            for (i, stream) in streams.iter().enumerate() {
                match claim(c, stream, &consumer, claim_idle).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(
                            entries = n,
                            "accounting: claimed entries abandoned by another replica"
                        );
                        pending[i] = true;
                    }
                    // Only the legacy stream may be missing; a shard's is made again.
                    Err(e) if no_group(&e) && i == legacy => absent[i] = true,
                    Err(e) if no_group(&e) => {
                        if let Err(e) = regroup(c, stream).await {
                            tracing::warn!(error = %e, "accounting: creating the consumer group failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accounting: claiming abandoned entries failed")
                    }
                }
            }
        }
        if last_measure.elapsed() >= MEASURE_EVERY {
            last_measure = Instant::now();
            if let Err(e) = measure_all(c, &streams, &absent).await {
                tracing::debug!(error = %e, "accounting: measuring the queue failed");
            }
        }
        let mut found = false;
        let mut failed = false;
        for (i, stream) in streams.iter().enumerate() {
            if absent[i] {
                continue;
            }
            let mut got = read(c, stream, &consumer, pending[i]).await;
            if i != legacy && matches!(&got, Err(e) if no_group(e)) {
                got = match regroup(c, stream).await {
                    Ok(()) => read(c, stream, &consumer, pending[i]).await,
                    Err(e) => Err(e),
                };
            }
            let entries = match got {
                Ok(entries) => entries,
                Err(e) if no_group(&e) => {
                    absent[i] = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accounting: reading the usage stream failed; retrying");
                    failed = true;
                    break;
                }
            };
            if entries.is_empty() {
                pending[i] = false;
                continue;
            }
            found = true;
            match apply(c, &db, stream, &entries).await {
                Applied::Done => attempt = 0,
                Applied::Unacknowledged => {
                    failed = true;
                    break;
                }
                Applied::Failed => {
                    pending[i] = true;
                    sleep_or_stop(backoff(attempt), &mut stop).await;
                    attempt += 1;
                    break;
                }
            }
        }
        if failed {
            conn = None;
            sleep_or_stop(backoff(attempt), &mut stop).await;
            attempt += 1;
        } else if found {
            idle = IDLE_MIN;
        } else {
            sleep_or_stop(idle, &mut stop).await;
            idle = (idle * 2).min(IDLE_MAX);
        }
    }
}

/// How applying a batch went.
enum Applied {
    Done,
    /// Applied, not acknowledged (read again later and found applied): reconnect.
    Unacknowledged,
    /// The database failed: read the stream's pending entries again after a backoff.
    Failed,
}

/// Applies one batch of `stream` to the database, then acknowledges and deletes it.
async fn apply(conn: &mut Conn, db: &Db, stream: &str, entries: &[StreamId]) -> Applied {
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let mut records = Vec::with_capacity(entries.len());
    let mut malformed = Vec::new();
    for e in entries {
        match record_from_entry(&e.map) {
            Some(record) => records.push(record),
            None => malformed.push(e),
        }
    }
    // An entry that is not a usage record is kept as a dead letter too, not dropped.
    let result = async {
        for e in malformed {
            set_aside_malformed(db, e).await?;
        }
        apply_batch(db, &records).await
    }
    .await;
    match result {
        Ok(applied) => {
            crate::metrics::applied(applied.inserted, applied.duplicates);
            if applied.duplicates > 0 {
                tracing::debug!(
                    duplicates = applied.duplicates,
                    "accounting: entries already applied"
                );
            }
            let acked: redis::RedisResult<()> = async {
                let _: i64 = conn.xack(stream, GROUP, &ids).await?;
                let _: i64 = conn.xdel(stream, &ids).await?;
                Ok(())
            }
            .await;
            match acked {
                Ok(()) => Applied::Done,
                Err(e) => {
                    // Applied but not acknowledged: it will be read again and found applied.
                    tracing::warn!(error = %e, "accounting: acknowledging failed");
                    Applied::Unacknowledged
                }
            }
        }
        Err(e) => {
            crate::metrics::apply_failed();
            tracing::warn!(error = %e, entries = records.len(), "accounting: database unavailable; will retry");
            Applied::Failed
        }
    }
}

/// The stream or its group does not exist (the legacy stream of a deployment that never
/// had the one-tag layout).
fn no_group(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("no such key")
}

/// Keeps an entry that is not a usage record as a dead letter (its fields as JSON).
async fn set_aside_malformed(db: &Db, entry: &StreamId) -> Result<(), StoreError> {
    let fields: serde_json::Map<String, serde_json::Value> = entry
        .map
        .iter()
        .map(|(k, v)| {
            let text = redis::from_redis_value_ref::<String>(v).unwrap_or_default();
            (k.clone(), serde_json::Value::String(text))
        })
        .collect();
    let raw = serde_json::Value::Object(fields).to_string();
    let error = "not a usage record (a field is missing or malformed)";
    if dead_letters::put_raw(db, &format!("stream:{}", entry.id), &raw, error, now_ms()).await? {
        crate::metrics::get().accounting_dead_letters.inc();
    }
    static LOG: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
    if let Some(also) = LOG.ready() {
        tracing::error!(entry = %entry.id, also_set_aside_unlogged = also,
            "accounting: malformed usage entry set aside as a dead letter");
    }
    Ok(())
}

/// Measures the queue for `/metrics`: the records not yet applied are the group's pending
/// entries (delivered, not acknowledged: a writer that is stuck holds them here) plus
/// those not yet delivered; the lag is the age of the oldest of them. Measured from Redis
/// on every pass, also while applying fails, so a stall shows.
async fn measure(conn: &mut Conn, stream: &str) -> redis::RedisResult<(i64, Option<i64>)> {
    let info: redis::RedisResult<StreamInfoGroupsReply> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    let info = match info {
        // No stream (Redis lost its data, and no report came since): nothing waits.
        Err(e) if no_group(&e) => return Ok((0, None)),
        other => other?,
    };
    let Some(group) = info.groups.iter().find(|g| g.name == GROUP) else {
        // No group (the stream made anew after a data loss): every entry waits.
        let len: i64 = conn.xlen(stream).await?;
        let first: StreamRangeReply = conn.xrange_count(stream, "-", "+", 1).await?;
        return Ok((len, first.ids.first().and_then(|e| entry_ms(&e.id))));
    };
    let pending = group.pending as i64;
    let undelivered = match group.lag {
        Some(lag) => lag as i64,
        // Redis cannot tell (entries were deleted): count what the stream holds instead.
        None => {
            let len: i64 = conn.xlen(stream).await?;
            (len - pending).max(0)
        }
    };
    let mut oldest: Option<i64> = None;
    if pending > 0 {
        let summary: StreamPendingReply = conn.xpending(stream, GROUP).await?;
        if let StreamPendingReply::Data(data) = summary {
            oldest = entry_ms(&data.start_id);
        }
    }
    if undelivered > 0 {
        let next: StreamRangeReply = conn
            .xrange_count(stream, format!("({}", group.last_delivered_id), "+", 1)
            .await?;
        if let Some(first) = next.ids.first().and_then(|e| entry_ms(&e.id)) {
            oldest = Some(oldest.map_or(first, |o| o.min(first)));
        }
    }
    Ok((pending + undelivered, oldest))
}

/// [`measure`] summed over the streams (the oldest of all), published.
async fn measure_all(
    conn: &mut Conn,
    streams: &[String],
    absent: &[bool],
) -> redis::RedisResult<()> {
    let (mut depth, mut oldest) = (0, None::<i64>);
    for (stream, absent) in streams.iter().zip(absent) {
        if *absent {
            continue;
        }
        let (d, o) = measure(conn, stream).await?;
        depth += d;
        oldest = match (oldest, o) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    crate::metrics::accounting_queue(depth, oldest);
    Ok(())
}

/// The time part (Unix ms) of a stream entry id `<ms>-<seq>`.
fn entry_ms(id: &str) -> Option<i64> {
    id.split_once('-')?.0.parse().ok()
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
