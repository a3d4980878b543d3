//! `lua/renew.lua`: extend a live lease, and the spend holds its data lists (their
//! counters are named in the lease's data, under the same hash tag, not in KEYS); a
//! light lease (no record) is put in the lease set (or moved there, under a concurrency
//! limit) unless reported or expired.

use super::{protocol, script_fields, Contract, KeySpace};
use crate::limits::CounterError;

script_fields! {
    key
    /// KEYS of `lua/renew.lua`.
    pub struct RenewKeys {
        pub leases: String,
        pub ld: String,
        /// The lease's report duplicate guard (read for a light lease only).
        pub done: String,
    }
}

impl RenewKeys {
    /// The counters of `lease`'s key on `shard`, and its duplicate guard.
    pub fn new(space: &KeySpace, shard: u16, lease: &crate::limits::LeaseId) -> RenewKeys {
        RenewKeys {
            leases: space.client(shard, &lease.key_id, "leases"),
            ld: space.client(shard, &lease.key_id, "ld"),
            done: space.done(shard, &lease.to_string()),
        }
    }
}

script_fields! {
    arg
    /// ARGV of `lua/renew.lua`.
    pub struct RenewArgs<'a> {
        pub lease_token: &'a str,
        pub lease_ttl_ms: i64,
        pub time_shift_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
        /// A light lease's signed expiry; 0 = a lease with a record.
        pub light_expiry: i64,
    }
}

/// What `lua/renew.lua` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewReply {
    /// The new expiry (ms).
    Renewed(i64),
    /// Code -1: the lease is unknown, reported or already expired.
    Gone,
}

impl RenewReply {
    pub fn parse(reply: i64) -> Result<RenewReply, CounterError> {
        match reply {
            -1 => Ok(RenewReply::Gone),
            expiry if expiry > 0 => Ok(RenewReply::Renewed(expiry)),
            other => Err(protocol("renew", other)),
        }
    }

    pub fn expiry(self) -> Option<i64> {
        match self {
            RenewReply::Renewed(expiry) => Some(expiry),
            RenewReply::Gone => None,
        }
    }
}

pub const CONTRACT: Contract = Contract {
    file: "lua/renew.lua",
    source: super::source::RENEW,
    keys: RenewKeys::NAMES,
    keys_repeated: &[],
    argv: RenewArgs::NAMES,
    argv_repeated: &[],
    codes: &[(-1, "gone")],
};
