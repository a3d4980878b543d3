//! The accounting stream's entries (written by `lua/report.lua`'s XADD) read back as
//! usage records.

use crate::usage::{UsageRecord, UsageSource};

/// Turns one accounting-stream entry back into a usage record; `None` for an entry that
/// is not one (it becomes a dead letter).
///
/// The token classes (`cr` cached, `cw` cache write, `rs` reasoning) and `src` came with
/// a later release: an entry without them (an older release's) has none of the classes
/// and was reported; one with an unreadable value is not a usage record.
pub fn record_from_entry(
    fields: &std::collections::HashMap<String, redis::Value>,
) -> Option<UsageRecord> {
    let text = |name: &str| -> Option<String> {
        fields
            .get(name)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
    };
    let opt = |name: &str| text(name).filter(|s| !s.is_empty());
    let int = |name: &str| opt(name).and_then(|s| s.parse::<i64>().ok());
    let class = |name: &str| match fields.get(name) {
        None => Some(0),
        Some(_) => text(name)?.parse::<i64>().ok().filter(|n| *n >= 0),
    };
    let source = match fields.get("src") {
        None => UsageSource::Reported,
        Some(_) => UsageSource::parse(&text("src")?)?,
    };
    Some(UsageRecord {
        id: opt("id")?,
        key_id: opt("key"),
        provider: opt("provider"),
        model: opt("model"),
        api_format: opt("fmt"),
        provider_key_id: opt("pk"),
        prompt_tokens: int("pt").unwrap_or(0),
        completion_tokens: int("ct").unwrap_or(0),
        cost_micros: int("cost").unwrap_or(0),
        latency_ms: int("lat"),
        upstream_status: int("st"),
        created_at: int("ts")?,
        cached_tokens: class("cr")?,
        cache_write_tokens: class("cw")?,
        reasoning_tokens: class("rs")?,
        source,
    })
}
