//! `lua/unpick.lua`: give back what `lua/pick.lua` took for an admission whose client
//! side was refused, once per lease (a guard key on the pool's tag).

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::CounterError;

script_fields! {
    key
    /// KEYS of `lua/unpick.lua`.
    pub struct UnpickKeys {
        pub order: String,
        pub pk_rpm: String,
        pub pk_tpm: String,
        /// `{pool tag}:unpick:<lease token>`.
        pub guard: String,
    }
}

impl UnpickKeys {
    pub fn new(space: &KeySpace, provider: &str, picked: &str, lease_token: &str) -> UnpickKeys {
        UnpickKeys {
            order: space.pool(provider, "order"),
            pk_rpm: space.provider_key(provider, picked, "rpm"),
            pk_tpm: space.provider_key(provider, picked, "tpm"),
            guard: space.pool(provider, &format!("unpick:{lease_token}")),
        }
    }
}

script_fields! {
    arg
    /// ARGV of `lua/unpick.lua`.
    pub struct UnpickArgs<'a> {
        pub picked: &'a str,
        pub second: i64,
        pub requests: i64,
        pub tokens: i64,
        pub previous: &'a str,
        pub score: &'a str,
        pub time_shift_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
    }
}

/// Whether `lua/unpick.lua` gave the units back (`false`: a repeat, nothing changed).
pub fn parse(reply: &[redis::Value]) -> Result<bool, CounterError> {
    match int_at("unpick", reply, 0)? {
        0 => Ok(false),
        1 => Ok(true),
        code => Err(protocol("unpick", format_args!("code {code}"))),
    }
}

pub const CONTRACT: Contract = Contract {
    file: "lua/unpick.lua",
    source: super::source::UNPICK,
    keys: UnpickKeys::NAMES,
    keys_repeated: &[],
    argv: UnpickArgs::NAMES,
    argv_repeated: &[],
    codes: &[(0, "duplicate"), (1, "returned")],
};
