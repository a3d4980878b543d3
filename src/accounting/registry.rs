//! The registry of usage streams, `{<prefix>}:streams` (a set under the prefix's own tag):
//! every replica adds its layout's shard streams at start-up, and the writers read every
//! stream in it. So records queued under another shard count (the count was changed, and
//! the old layout's streams are no longer the current ones) still reach the database.

use redis::streams::StreamPendingReply;
use redis::AsyncCommands;

use super::stream::ensure_group;
use crate::limits::conn::Conn;

/// Adds `streams` (the current layout's) to the registry `key`, in one SADD.
pub async fn register(conn: &mut Conn, key: &str, streams: &[String]) -> redis::RedisResult<()> {
    let _: i64 = conn.sadd(key, streams).await?;
    Ok(())
}

/// The registered streams that are not among `current`, each with its consumer group
/// (created if missing), sorted. One that is empty and has no pending entries (drained)
/// is removed from the registry instead, so the set does not grow.
pub async fn others(
    conn: &mut Conn,
    key: &str,
    current: &[String],
) -> redis::RedisResult<Vec<String>> {
    let members: Vec<String> = conn.smembers(key).await?;
    let mut others = Vec::new();
    for stream in members.into_iter().filter(|s| !current.contains(s)) {
        if drained(conn, &stream).await? {
            let _: i64 = conn.srem(key, &stream).await?;
            tracing::info!(
                stream,
                "accounting: an old layout's usage stream is drained"
            );
            continue;
        }
        ensure_group(conn, &stream).await?;
        others.push(stream);
    }
    others.sort();
    Ok(others)
}

/// Replaces `others` (streams of another layout, each with whether to read its pending
/// entries first) with [`others`]' answer: a stream read before keeps its flag, a new
/// one starts with its pending entries. On an error `others` is kept as it was.
pub async fn refresh(
    conn: &mut Conn,
    key: &str,
    current: &[String],
    others: &mut (Vec<String>, Vec<bool>),
) -> redis::RedisResult<()> {
    let now = self::others(conn, key, current).await?;
    let pending = now
        .iter()
        .map(|s| {
            others
                .0
                .iter()
                .position(|o| o == s)
                .map_or(true, |i| others.1[i])
        })
        .collect();
    *others = (now, pending);
    Ok(())
}

/// Nothing left to apply: no entry, and none delivered but not acknowledged.
async fn drained(conn: &mut Conn, stream: &str) -> redis::RedisResult<bool> {
    let len: i64 = conn.xlen(stream).await?;
    if len > 0 {
        return Ok(false);
    }
    let pending: redis::RedisResult<StreamPendingReply> =
        conn.xpending(stream, super::stream::GROUP).await;
    match pending {
        Ok(reply) => Ok(reply.count() == 0),
        // No stream or no group: nothing pending.
        Err(e) if e.code() == Some("NOGROUP") || e.to_string().contains("no such key") => Ok(true),
        Err(e) => Err(e),
    }
}
