//! `lua/pool_sync.lua`: (re)write a provider pool's definition and pick order in Redis.

use super::{limit_arg, protocol, script_fields, Contract, KeySpace};
use crate::limits::CounterError;
use crate::pool::cache::Roster;

script_fields! {
    key
    /// KEYS of `lua/pool_sync.lua`.
    pub struct PoolSyncKeys {
        pub def: String,
        pub order: String,
    }
}

impl PoolSyncKeys {
    pub fn new(space: &KeySpace, provider: &str) -> PoolSyncKeys {
        PoolSyncKeys {
            def: space.pool(provider, "def"),
            order: space.pool(provider, "order"),
        }
    }
}

script_fields! {
    arg
    /// ARGV 1-2 of `lua/pool_sync.lua`.
    pub struct PoolSyncArgs<'a> {
        pub version: &'a str,
        pub stamp: i64,
    }
}

script_fields! {
    arg
    /// The ARGV of `lua/pool_sync.lua` repeated per provider key.
    pub struct PoolSyncKey<'a> {
        pub id: &'a str,
        pub max_rpm: i64,
        pub max_tpm: i64,
        /// Priority rank: 0 = the lowest priority value.
        pub rank: usize,
        /// Its index in the caller's list.
        pub index: usize,
    }
}

impl<'a> PoolSyncKey<'a> {
    /// Every candidate of `pool`, ranked by distinct priority.
    pub fn all(pool: &'a Roster) -> Vec<PoolSyncKey<'a>> {
        let mut priorities: Vec<i64> = pool.iter().map(|c| c.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        pool.iter()
            .enumerate()
            .map(|(index, c)| PoolSyncKey {
                id: &c.id,
                max_rpm: limit_arg(c.max_rpm),
                max_tpm: limit_arg(c.max_tpm),
                rank: priorities.binary_search(&c.priority).unwrap_or_default(),
                index,
            })
            .collect()
    }
}

/// What `lua/pool_sync.lua` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSyncReply {
    /// Code 0: Redis holds this version.
    InSync,
    /// Redis holds a pool stamped this, later than the caller's: nothing was written.
    Newer(i64),
}

impl PoolSyncReply {
    pub fn parse(reply: i64) -> Result<PoolSyncReply, CounterError> {
        match reply {
            0 => Ok(PoolSyncReply::InSync),
            stamp if stamp > 0 => Ok(PoolSyncReply::Newer(stamp)),
            other => Err(protocol("pool_sync", other)),
        }
    }
}

pub const CONTRACT: Contract = Contract {
    file: "lua/pool_sync.lua",
    source: super::source::POOL_SYNC,
    keys: PoolSyncKeys::NAMES,
    keys_repeated: &[],
    argv: PoolSyncArgs::NAMES,
    argv_repeated: PoolSyncKey::NAMES,
    codes: &[(0, "in_sync")],
};
