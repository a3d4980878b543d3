//! The typed contracts of the Lua scripts: one module per script, each with a type for
//! its KEYS, one for its ARGV and one for its reply. They are the only way any code
//! (the store, tests, benches) calls a script, so a script's positional contract is
//! written once in Rust.
//!
//! The KEYS and ARGV types are declared with [`script_fields!`], which derives from the
//! struct itself both the order the values are sent in and the list of their names
//! (`NAMES`): the field order *is* the contract. `tests/script_contracts.rs` reads each
//! script's header table (`--   N  name  …` under `KEYS:`, `ARGV:` and `CODES:`) and
//! checks it against these lists and the reply enums' codes, so neither side can drift.

pub mod admit;
pub mod pool_state;
pub mod pool_sync;
pub mod quota_read;
pub mod renew;
pub mod report;

use redis::Script;

use super::CounterError;

/// Declares a script's KEYS or ARGV struct: the fields in the script's order, named as in
/// its header. Generates `NAMES` (those names, in order) and `push` (adds the values to a
/// `redis::ScriptInvocation` in that order, as keys or as arguments).
macro_rules! script_fields {
    (
        $kind:ident
        $(#[$meta:meta])*
        pub struct $name:ident $(<$lt:lifetime>)? {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name $(<$lt>)? {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $(<$lt>)? $name $(<$lt>)? {
            /// The names of the fields, in the order the script takes them.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Adds every field to `call`, in the script's order.
            pub fn push(&self, call: &mut ::redis::ScriptInvocation<'_>) {
                $( call.$kind(&self.$field); )*
            }

            /// The values as text, in order (for tools that take a command line, such as
            /// `redis-benchmark` in `benches/admit.rs`).
            pub fn to_strings(&self) -> Vec<String> {
                use ::redis::ToRedisArgs;
                let mut out = Vec::new();
                $(
                    for part in self.$field.to_redis_args() {
                        out.push(String::from_utf8_lossy(&part).into_owned());
                    }
                )*
                out
            }
        }
    };
}
pub(crate) use script_fields;

/// The Lua sources, compiled into the binary.
pub mod source {
    pub const ADMIT: &str = include_str!("../../../lua/admit.lua");
    pub const REPORT: &str = include_str!("../../../lua/report.lua");
    pub const RENEW: &str = include_str!("../../../lua/renew.lua");
    pub const POOL_STATE: &str = include_str!("../../../lua/pool_state.lua");
    pub const POOL_SYNC: &str = include_str!("../../../lua/pool_sync.lua");
    pub const QUOTA_READ: &str = include_str!("../../../lua/quota_read.lua");
}

/// What one script promises, for the header check: its file, its KEYS and ARGV by name
/// (`*_repeated`: the group repeated after them, per provider key or per quota entry),
/// and its reply codes.
#[derive(Debug, Clone, Copy)]
pub struct Contract {
    pub file: &'static str,
    pub source: &'static str,
    pub keys: &'static [&'static str],
    pub keys_repeated: &'static [&'static str],
    pub argv: &'static [&'static str],
    pub argv_repeated: &'static [&'static str],
    pub codes: &'static [(i64, &'static str)],
}

/// Every script's contract.
pub const CONTRACTS: [Contract; 6] = [
    admit::CONTRACT,
    report::CONTRACT,
    renew::CONTRACT,
    pool_state::CONTRACT,
    pool_sync::CONTRACT,
    quota_read::CONTRACT,
];

/// The script clock: what every script takes as its last two time arguments. In
/// production both are 0 (the Redis server's `TIME`); tests move it (see
/// [`super::TimeShift`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScriptClock {
    /// Added to the clock.
    pub shift_ms: i64,
    /// 0 = the Redis server's `TIME`; else this instant (before the shift).
    pub pinned_ms: i64,
}

/// How a limit is sent to a script: 0 means no limit, so `None` (and, as in the
/// in-process twin, anything below 1, which input validation refuses anyway) is 0.
pub fn limit_arg(limit: Option<i64>) -> i64 {
    super::effective_limit(limit).unwrap_or(0)
}

/// The names of a deployment's keys, all under one hash tag `{prefix}` (one Redis
/// Cluster slot; see `limits::redis` for the layout).
#[derive(Debug, Clone)]
pub struct KeySpace {
    tag: String,
}

impl KeySpace {
    pub fn new(prefix: &str) -> KeySpace {
        KeySpace {
            tag: format!("{{{prefix}}}"),
        }
    }

    /// The hash tag, braces included.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// A client key's `rpm`, `tpm`, `leases`, `ld` or `bal`.
    pub fn client(&self, key_id: &str, what: &str) -> String {
        format!("{}:k:{key_id}:{what}", self.tag)
    }

    /// A provider key's `rpm`, `tpm`, `cd`, `susp` or `cause`.
    pub fn provider_key(&self, id: &str, what: &str) -> String {
        format!("{}:pk:{id}:{what}", self.tag)
    }

    /// A provider pool's `def` or `order`.
    pub fn pool(&self, provider: &str, what: &str) -> String {
        format!("{}:p:{provider}:{what}", self.tag)
    }

    /// A quota scope's counters' base name (`counter` is a
    /// [`crate::quota::Scope::counter_id`]): the scripts add `:rm`, `:td:<day>`, ….
    pub fn quota(&self, counter: &str) -> String {
        format!("{}:q:{counter}", self.tag)
    }

    /// A report's duplicate guard.
    pub fn done(&self, record_id: &str) -> String {
        format!("{}:done:{record_id}", self.tag)
    }

    /// The accounting stream.
    pub fn usage(&self) -> String {
        format!("{}:usage", self.tag)
    }
}

/// Every script keyward runs, loaded once.
pub struct Scripts {
    pub admit: Script,
    pub report: Script,
    pub renew: Script,
    pub pool_state: Script,
    pub pool_sync: Script,
    pub quota_read: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            admit: Script::new(source::ADMIT),
            report: Script::new(source::REPORT),
            renew: Script::new(source::RENEW),
            pool_state: Script::new(source::POOL_STATE),
            pool_sync: Script::new(source::POOL_SYNC),
            quota_read: Script::new(source::QUOTA_READ),
        }
    }
}

impl Scripts {
    pub fn all(&self) -> [&Script; 6] {
        [
            &self.admit,
            &self.report,
            &self.renew,
            &self.pool_state,
            &self.pool_sync,
            &self.quota_read,
        ]
    }
}

/// A reply that is not what the script promises.
fn protocol(script: &str, what: impl std::fmt::Display) -> CounterError {
    CounterError::Protocol(format!("{script} returned {what}"))
}

/// Item `i` of a reply as an integer.
fn int_at(script: &str, reply: &[redis::Value], i: usize) -> Result<i64, CounterError> {
    let value = reply
        .get(i)
        .ok_or_else(|| protocol(script, format_args!("{} values", reply.len())))?;
    redis::from_redis_value_ref::<i64>(value)
        .map_err(|_| protocol(script, format_args!("a non-integer at {}", i + 1)))
}
