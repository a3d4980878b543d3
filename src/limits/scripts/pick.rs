//! `lua/pick.lua`: pick a provider key from a pool and take the request's units from it,
//! on the pool's own hash tag (beside `lua/admit.lua`'s client part, or alone for
//! `POST /v1/select`).

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::{CounterError, PickTaken};

script_fields! {
    key
    /// KEYS of `lua/pick.lua`.
    pub struct PickKeys {
        pub def: String,
        pub order: String,
    }
}

impl PickKeys {
    pub fn new(space: &KeySpace, provider: &str) -> PickKeys {
        PickKeys {
            def: space.pool(provider, "def"),
            order: space.pool(provider, "order"),
        }
    }
}

script_fields! {
    arg
    /// ARGV of `lua/pick.lua`.
    pub struct PickArgs<'a> {
        pub tokens: i64,
        /// The caller's version of the pool.
        pub pool_version: &'a str,
        pub time_shift_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
    }
}

/// The outcome codes of `lua/pick.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickCode {
    Picked,
    PoolExhausted,
    /// The pool in Redis is another version: sync it (`pool_sync.lua`) and ask again.
    PoolVersion,
}

impl PickCode {
    pub const CODES: [(PickCode, i64, &'static str); 3] = [
        (PickCode::Picked, 0, "picked"),
        (PickCode::PoolExhausted, 1, "pool_exhausted"),
        (PickCode::PoolVersion, 2, "pool_version"),
    ];

    pub fn from_code(code: i64) -> Option<PickCode> {
        Self::CODES
            .iter()
            .find(|(_, n, _)| *n == code)
            .map(|(c, _, _)| *c)
    }
}

/// What `lua/pick.lua` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickReply {
    pub code: PickCode,
    /// A retry time, or the pool's stamp (see the script's CODES).
    pub a: i64,
    pub now_ms: i64,
    /// The picked provider key's id, or empty.
    pub picked: String,
    /// Where its units went (with [`PickCode::Picked`]).
    pub taken: PickTaken,
    /// The request it took (0 when the key has no RPM limit).
    pub requests: i64,
    /// Its order score before and after the pick (for `lua/unpick.lua`).
    pub previous: String,
    pub score: String,
}

impl PickReply {
    pub fn parse(reply: &[redis::Value]) -> Result<PickReply, CounterError> {
        const NAME: &str = "pick";
        if reply.len() != 9 {
            return Err(protocol(NAME, format_args!("{} values", reply.len())));
        }
        let int = |i| int_at(NAME, reply, i);
        let text = |i: usize| {
            redis::from_redis_value_ref::<String>(&reply[i])
                .map_err(|_| protocol(NAME, format_args!("a non-text at {}", i + 1)))
        };
        let code = int(0)?;
        Ok(PickReply {
            code: PickCode::from_code(code)
                .ok_or_else(|| protocol(NAME, format_args!("code {code}")))?,
            a: int(1)?,
            now_ms: int(2)?,
            picked: text(3)?,
            taken: PickTaken {
                second: int(4)?,
                tokens: int(6)?,
            },
            requests: int(5)?,
            previous: text(7)?,
            score: text(8)?,
        })
    }
}

pub const CONTRACT: Contract = Contract {
    file: "lua/pick.lua",
    source: super::source::PICK,
    keys: PickKeys::NAMES,
    keys_repeated: &[],
    argv: PickArgs::NAMES,
    argv_repeated: &[],
    codes: &[(0, "picked"), (1, "pool_exhausted"), (2, "pool_version")],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_lists_every_code_of_the_enum() {
        let from_enum: Vec<(i64, &str)> =
            PickCode::CODES.iter().map(|(_, n, s)| (*n, *s)).collect();
        assert_eq!(from_enum, CONTRACT.codes);
    }
}
