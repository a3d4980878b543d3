//! `lua/pool_state.lua`: the live state of provider keys, for the admin API.

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::CounterError;
use crate::pool::learned::Learned;
use crate::pool::{Cause, LiveState};

script_fields! {
    key
    /// KEYS of `lua/pool_state.lua` for one provider key (repeated per key).
    pub struct PoolStateKeys {
        pub rpm: String,
        pub tpm: String,
        pub cd: String,
        pub susp: String,
        pub cause: String,
    }
}

impl PoolStateKeys {
    pub fn new(space: &KeySpace, provider: &str, id: &str) -> PoolStateKeys {
        PoolStateKeys {
            rpm: space.provider_key(provider, id, "rpm"),
            tpm: space.provider_key(provider, id, "tpm"),
            cd: space.provider_key(provider, id, "cd"),
            susp: space.provider_key(provider, id, "susp"),
            cause: space.provider_key(provider, id, "cause"),
        }
    }
}

script_fields! {
    arg
    /// ARGV of `lua/pool_state.lua`.
    pub struct PoolStateArgs {
        pub time_shift_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
    }
}

/// Reads the reply: 7 values per key asked, in order.
pub fn parse(reply: &[redis::Value], keys: usize) -> Result<Vec<LiveState>, CounterError> {
    const NAME: &str = "pool_state";
    if reply.len() != keys * 7 {
        return Err(protocol(NAME, format_args!("{} values", reply.len())));
    }
    let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
    reply
        .chunks(7)
        .map(|c| {
            Ok(LiveState {
                requests_last_60s: int_at(NAME, c, 0)?,
                tokens_last_60s: int_at(NAME, c, 1)?,
                cooldown_remaining_ms: int_at(NAME, c, 2)?,
                suspended_remaining_ms: int_at(NAME, c, 3)?,
                cooldown_cause: text(&c[4]).and_then(|t| Cause::decode(&t)),
                suspension_cause: text(&c[5]).and_then(|t| Cause::decode(&t)),
                learned: text(&c[6]).and_then(|t| Learned::decode(&t)),
            })
        })
        .collect()
}

pub const CONTRACT: Contract = Contract {
    file: "lua/pool_state.lua",
    source: super::source::POOL_STATE,
    keys: &[],
    keys_repeated: PoolStateKeys::NAMES,
    argv: PoolStateArgs::NAMES,
    argv_repeated: &[],
    codes: &[],
};
