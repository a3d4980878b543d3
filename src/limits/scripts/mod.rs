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
pub mod admit_window;
pub mod call;
pub mod pick;
pub mod pool_report;
pub mod pool_state;
pub mod pool_sync;
pub mod quota_read;
pub mod renew;
pub mod report;
pub mod unpick;

use redis::Script;

use super::{CounterError, LeaseId, Tenant};

/// Declares a script's KEYS or ARGV struct: the fields in the script's order, named as in
/// its header. Generates `NAMES` (those names, in order) and `push` (adds the values to a
/// [`call::ScriptArgs`] in that order, as keys or as arguments).
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
            pub fn push(&self, call: &mut impl $crate::limits::scripts::call::ScriptArgs) {
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
    pub const ADMIT_WINDOW: &str = include_str!("../../../lua/admit_window.lua");
    pub const REPORT: &str = include_str!("../../../lua/report.lua");
    pub const RENEW: &str = include_str!("../../../lua/renew.lua");
    pub const POOL_STATE: &str = include_str!("../../../lua/pool_state.lua");
    pub const POOL_SYNC: &str = include_str!("../../../lua/pool_sync.lua");
    pub const QUOTA_READ: &str = include_str!("../../../lua/quota_read.lua");
    pub const PICK: &str = include_str!("../../../lua/pick.lua");
    pub const UNPICK: &str = include_str!("../../../lua/unpick.lua");
    pub const POOL_REPORT: &str = include_str!("../../../lua/pool_report.lua");
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
pub const CONTRACTS: [Contract; 10] = [
    admit::CONTRACT,
    report::CONTRACT,
    renew::CONTRACT,
    pool_state::CONTRACT,
    pool_sync::CONTRACT,
    quota_read::CONTRACT,
    pick::CONTRACT,
    unpick::CONTRACT,
    pool_report::CONTRACT,
    admit_window::CONTRACT,
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

/// The shards a deployment's tenants spread over by default (`KEYWARD_REDIS_SHARDS`).
pub const DEFAULT_SHARDS: u16 = 16;
/// The most shards a deployment may have (a tag per shard, searched at start-up).
pub const MAX_SHARDS: u16 = 1024;
/// Redis Cluster's slot count.
const SLOTS: u32 = 16_384;

/// The names of a deployment's keys. A tenant's keys (a client key's windows, leases,
/// balance, its quota counters and its user's, duplicate guards, the accounting stream
/// its reports feed) live under its shard's hash tag `{<prefix>:<i>.<j>}`; a provider's
/// pool under `{<prefix>:p:<provider>}`; the deployment's own marks (`layout`, the
/// stream of the one-tag release before) under `{<prefix>}`. Each script touches one
/// tag, so one Redis Cluster slot (see `limits::redis` for the layout).
///
/// Shard `i`'s tag is chosen so that its slot lies in the `i`-th of `S` equal slot
/// ranges: masters that split the slots evenly (what `redis-cli --cluster create` does)
/// then hold the same number of shards, so tenants spread evenly over them.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
    legacy: String,
    /// Shard i's hash tag, braces included.
    shards: Vec<String>,
}

impl KeySpace {
    /// The names under `prefix` with `shards` tenant shards (clamped to
    /// `1..=MAX_SHARDS`); the tags are searched here, once.
    pub fn new(prefix: &str, shards: u16) -> KeySpace {
        let count = shards.clamp(1, MAX_SHARDS) as u32;
        let shards = (0..count)
            .map(|i| {
                let (lo, hi) = (i * SLOTS / count, (i + 1) * SLOTS / count);
                // About count tries per shard on average: a few thousand CRCs at most.
                let j = (0u32..)
                    .find(|j| (lo..hi).contains(&slot(&format!("{prefix}:{i}.{j}"))))
                    .unwrap_or_default();
                format!("{{{prefix}:{i}.{j}}}")
            })
            .collect();
        KeySpace {
            prefix: prefix.to_string(),
            legacy: format!("{{{prefix}}}"),
            shards,
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many tenant shards.
    pub fn shard_count(&self) -> u16 {
        self.shards.len() as u16
    }

    /// The shard of a tenant: FNV-1a 64 of `u:<user>` / `k:<key id>`, mod the count
    /// (stable across replicas and releases, for the same count).
    pub fn shard_of(&self, tenant: Tenant<'_>) -> u16 {
        let hash = match tenant {
            Tenant::User(id) => fnv1a(&[b"u:", id.as_bytes()]),
            Tenant::Key(id) => fnv1a(&[b"k:", id.as_bytes()]),
        };
        (hash % self.shards.len() as u64) as u16
    }

    /// The shard a lease's counters are on: the one it carries, else (a lease of the
    /// release before, or a caller that does not know the user) its key's own.
    pub fn shard_of_lease(&self, lease: &LeaseId) -> u16 {
        lease
            .shard
            .filter(|s| *s < self.shard_count())
            .unwrap_or_else(|| self.shard_of(Tenant::Key(&lease.key_id)))
    }

    /// Shard `shard`'s hash tag, braces included (a shard out of range is the last).
    pub fn tag(&self, shard: u16) -> &str {
        let last = self.shards.len() - 1;
        &self.shards[(shard as usize).min(last)]
    }

    /// The deployment's own tag `{prefix}` (the one-tag layout of the release before).
    pub fn legacy_tag(&self) -> &str {
        &self.legacy
    }

    /// Where the shard count is recorded: `{prefix}:layout` = `shards=S`.
    pub fn layout(&self) -> String {
        format!("{}:layout", self.legacy)
    }

    /// A client key's `rpm`, `tpm`, `leases`, `ld`, `lx` or `bal`, on `shard`.
    pub fn client(&self, shard: u16, key_id: &str, what: &str) -> String {
        // Exact capacity (`format!` grows its buffer): several per admission.
        let tag = self.tag(shard);
        let mut name = String::with_capacity(tag.len() + key_id.len() + what.len() + 4);
        name.extend([tag, ":k:", key_id, ":", what]);
        name
    }

    /// A provider pool's hash tag `{<prefix>:p:<provider>}`.
    pub fn pool_tag(&self, provider: &str) -> String {
        format!("{{{}:p:{provider}}}", self.prefix)
    }

    /// A provider key's `rpm`, `tpm`, `cd`, `susp` or `cause`, under its pool's tag.
    pub fn provider_key(&self, provider: &str, id: &str, what: &str) -> String {
        format!("{}:pk:{id}:{what}", self.pool_tag(provider))
    }

    /// A provider pool's `def` or `order`, under its own tag.
    pub fn pool(&self, provider: &str, what: &str) -> String {
        format!("{}:{what}", self.pool_tag(provider))
    }

    /// A quota scope's counters' base name on `shard` (`counter` is a
    /// [`crate::quota::Scope::counter_id`]): the scripts add `:rm`, `:td:<day>`, ….
    pub fn quota(&self, shard: u16, counter: &str) -> String {
        format!("{}:q:{counter}", self.tag(shard))
    }

    /// A report's duplicate guard, on its lease's shard.
    pub fn done(&self, shard: u16, record_id: &str) -> String {
        format!("{}:done:{record_id}", self.tag(shard))
    }

    /// A shard's accounting stream.
    pub fn usage(&self, shard: u16) -> String {
        format!("{}:usage", self.tag(shard))
    }

    /// Every shard's accounting stream, then the one-tag layout's (drained on upgrade).
    pub fn usage_streams(&self) -> Vec<String> {
        let mut all: Vec<String> = (0..self.shard_count()).map(|s| self.usage(s)).collect();
        all.push(format!("{}:usage", self.legacy));
        all
    }
}

/// The Redis Cluster slot of a hash tag's inside (CRC16-XMODEM mod 16384).
pub fn slot(tag: &str) -> u32 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc as u32 % SLOTS
}

/// FNV-1a 64 of the concatenated parts.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= *byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Every script keyward runs, loaded once.
pub struct Scripts {
    pub admit: Script,
    pub admit_window: Script,
    pub report: Script,
    pub renew: Script,
    pub pool_state: Script,
    pub pool_sync: Script,
    pub quota_read: Script,
    pub pick: Script,
    pub unpick: Script,
    pub pool_report: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            admit: Script::new(source::ADMIT),
            admit_window: Script::new(source::ADMIT_WINDOW),
            report: Script::new(source::REPORT),
            renew: Script::new(source::RENEW),
            pool_state: Script::new(source::POOL_STATE),
            pool_sync: Script::new(source::POOL_SYNC),
            quota_read: Script::new(source::QUOTA_READ),
            pick: Script::new(source::PICK),
            unpick: Script::new(source::UNPICK),
            pool_report: Script::new(source::POOL_REPORT),
        }
    }
}

impl Scripts {
    pub fn all(&self) -> [&Script; 10] {
        [
            &self.admit,
            &self.admit_window,
            &self.report,
            &self.renew,
            &self.pool_state,
            &self.pool_sync,
            &self.quota_read,
            &self.pick,
            &self.unpick,
            &self.pool_report,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // `CLUSTER KEYSLOT` of a real server (and the Redis Cluster spec's example).
        assert_eq!(slot("123456789"), 12_739);
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("bar"), 5_061);
        assert_eq!(slot("kw"), 6_560);
        assert_eq!(slot(""), 0);
    }

    #[test]
    fn shard_tags_lie_in_equal_slot_ranges() {
        for count in [1u16, 3, 16, 1024] {
            let space = KeySpace::new("kw", count);
            assert_eq!(space.shard_count(), count);
            for i in 0..count {
                let tag = space.tag(i);
                let inside = &tag[1..tag.len() - 1];
                let s = slot(inside);
                let n = count as u32;
                assert!((i as u32 * SLOTS / n..(i as u32 + 1) * SLOTS / n).contains(&s));
                assert!(inside.starts_with(&format!("kw:{i}.")), "{tag}");
            }
        }
    }

    #[test]
    fn tenants_hash_stably_and_spread() {
        let space = KeySpace::new("kw", 16);
        // FNV-1a 64 of "a" (the published test vector) and of the tenant texts.
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        let user = space.shard_of(Tenant::User("u1"));
        assert_eq!(user, (fnv1a(&[b"u:u1"]) % 16) as u16);
        assert_eq!(
            space.shard_of(Tenant::Key("k1")),
            (fnv1a(&[b"k:k1"]) % 16) as u16
        );
        let mut seen = [0; 16];
        for i in 0..1600 {
            seen[space.shard_of(Tenant::Key(&format!("key-{i}"))) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (50..150).contains(n)), "{seen:?}");
    }
}
