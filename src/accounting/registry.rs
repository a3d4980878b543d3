//! The registry of usage streams, `{<prefix>}:streams` (a set under the prefix's own tag):
//! every replica adds its layout's shard streams at start-up and again at each of its
//! writer's claim rounds, and the writers read every stream in it. So records queued
//! under another shard count (the count was changed, and the old layout's streams are no
//! longer the current ones) still reach the database.
//!
//! A drained stream of another layout leaves the set, but only once no replica has
//! promised to be using it: each registration also writes, in the hash
//! `{<prefix>}:streams:until`, the time until which the registering replica will register
//! it again ([`promise`]). While a replica of that layout lives its streams stay listed
//! (two layouts meeting after the layout key was lost would otherwise remove each other's
//! idle streams, and a record queued next, by a replica that then died, would be read by
//! no one). Once every promise has run out, any record its replicas queued was queued
//! before the drained check, which sees it.

use std::collections::HashMap;
use std::time::Duration;

use redis::streams::StreamPendingReply;
use redis::AsyncCommands;

use super::stream::ensure_group;
use crate::clock::now_ms;
use crate::limits::conn::Conn;

/// How many registration rounds a replica may miss (a slow round, a Redis hiccup) before
/// its streams may be removed.
const ROUNDS_MISSED: u32 = 6;

/// Until when (ms) a replica that registers every `every` promises its streams are used.
pub fn promise(every: Duration) -> i64 {
    let hold = i64::try_from((every * ROUNDS_MISSED).as_millis()).unwrap_or(i64::MAX);
    now_ms().saturating_add(hold)
}

/// The hash of each registered stream's promise (same hash tag as the set).
fn promises_key(key: &str) -> String {
    format!("{key}:until")
}

/// Adds `streams` (the current layout's) to the registry `key`, promising to register
/// them again within `every` (see [`promise`]). The promise is written before the SADD:
/// a removal that read an older promise checks it again after its SREM, and puts the
/// stream back when it changed.
pub async fn register(
    conn: &mut Conn,
    key: &str,
    streams: &[String],
    every: Duration,
) -> redis::RedisResult<()> {
    if streams.is_empty() {
        return Ok(());
    }
    let until = promise(every);
    let fields: Vec<(&String, i64)> = streams.iter().map(|s| (s, until)).collect();
    let _: () = conn.hset_multiple(promises_key(key), &fields).await?;
    let _: i64 = conn.sadd(key, streams).await?;
    Ok(())
}

/// The registered streams that are not among `current`, each with its consumer group
/// (created if missing), sorted. One that is empty and has no pending entries (drained),
/// and whose registrations' promises have all run out, is removed from the registry
/// instead, so the set does not grow.
pub async fn others(
    conn: &mut Conn,
    key: &str,
    current: &[String],
) -> redis::RedisResult<Vec<String>> {
    let members: Vec<String> = conn.smembers(key).await?;
    let promises: HashMap<String, i64> = conn.hgetall(promises_key(key)).await?;
    let mut others = Vec::new();
    for stream in members.into_iter().filter(|s| !current.contains(s)) {
        // A stream without a promise was registered by a release before promises.
        let promised = promises.get(&stream).copied().unwrap_or(0);
        if now_ms() > promised && drained(conn, &stream).await? {
            let _: i64 = conn.srem(key, &stream).await?;
            let again: Option<i64> = conn.hget(promises_key(key), &stream).await?;
            if again.unwrap_or(0) == promised {
                tracing::info!(
                    stream,
                    "accounting: an old layout's usage stream is drained"
                );
                continue;
            }
            // Registered again meanwhile: a replica of its layout uses it.
            let _: i64 = conn.sadd(key, &stream).await?;
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
