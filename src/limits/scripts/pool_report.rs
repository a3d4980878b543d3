//! `lua/pool_report.lua`: a report's provider-key part, on the pool's hash tag (settle
//! the pick's reserved tokens; cooldown, suspension, learned limits and their cause).

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::CounterError;

script_fields! {
    key
    /// KEYS of `lua/pool_report.lua`.
    pub struct PoolReportKeys {
        pub pk_tpm: String,
        pub pk_cd: String,
        pub pk_susp: String,
        pub pk_cause: String,
        /// `{pool tag}:prep:<lease token>` (`{pool tag}:prep:` without a lease: unused).
        pub guard: String,
    }
}

impl PoolReportKeys {
    /// The keys of provider key `id`'s part of a report of `lease_token` ("" = a report
    /// without a lease).
    pub fn new(space: &KeySpace, provider: &str, id: &str, lease_token: &str) -> PoolReportKeys {
        PoolReportKeys {
            pk_tpm: space.provider_key(provider, id, "tpm"),
            pk_cd: space.provider_key(provider, id, "cd"),
            pk_susp: space.provider_key(provider, id, "susp"),
            pk_cause: space.provider_key(provider, id, "cause"),
            guard: space.pool(provider, &format!("prep:{lease_token}")),
        }
    }
}

script_fields! {
    arg
    /// ARGV of `lua/pool_report.lua`.
    pub struct PoolReportArgs<'a> {
        /// -1 = nothing to settle.
        pub second: i64,
        pub reserved: i64,
        pub has_tokens: bool,
        /// Prompt + completion tokens.
        pub used: i64,
        /// "" = unknown.
        pub status: String,
        pub cooldown_ms: i64,
        pub suspend_ms: i64,
        pub cause_source: &'a str,
        pub learned_cooldown_ms: i64,
        pub learned_keep_ms: i64,
        pub learned_limits: String,
        pub time_shift_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
        /// The lease's report is run once: a repeat (the caller's, or a cluster client
        /// re-sending after a dropped connection) changes nothing. False for a report
        /// without a lease.
        pub guarded: bool,
        /// How long the guard outlives the lease's signed expiry (> 0): report.lua's.
        pub guard_ttl_ms: i64,
        /// The expiry signed into the lease id (0 = no lease).
        pub lease_expiry: i64,
    }
}

/// The outcome codes of `lua/pool_report.lua` (the reply is `{code, now_ms}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolReportCode {
    /// This lease's provider-key part ran already: nothing changed.
    Duplicate,
    Settled,
    /// Later than the guard ttl after the lease's signed expiry: nothing changed.
    TooLate,
}

/// Checks `lua/pool_report.lua`'s answer.
pub fn parse(reply: &[redis::Value]) -> Result<PoolReportCode, CounterError> {
    match int_at("pool_report", reply, 0)? {
        0 => Ok(PoolReportCode::Duplicate),
        1 => Ok(PoolReportCode::Settled),
        2 => Ok(PoolReportCode::TooLate),
        code => Err(protocol("pool_report", format_args!("code {code}"))),
    }
}

pub const CONTRACT: Contract = Contract {
    file: "lua/pool_report.lua",
    source: super::source::POOL_REPORT,
    keys: PoolReportKeys::NAMES,
    keys_repeated: &[],
    argv: PoolReportArgs::NAMES,
    argv_repeated: &[],
    codes: &[(0, "duplicate"), (1, "settled"), (2, "too_late")],
};
