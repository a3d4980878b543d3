//! `lua/quota_read.lua`: the live figures of quota counters and of client keys' own
//! minute windows, read only (see [`crate::limits::live`]).

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::live::{LiveCounter, LiveFigure, LiveFigures};
use crate::limits::CounterError;

script_fields! {
    key
    /// The KEYS of `lua/quota_read.lua`, one per counter read.
    pub struct QuotaReadKey {
        /// `{tag}:q:<counter id>` (the base name admit.lua takes), or for a key's own
        /// window `{tag}:k:<key id>:rpm|tpm`.
        pub counter: String,
    }
}

script_fields! {
    arg
    /// ARGV of `lua/quota_read.lua`.
    pub struct QuotaReadArgs {
        pub time_shift_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
    }
}

script_fields! {
    arg
    /// The ARGV of `lua/quota_read.lua` repeated per counter (from ARGV 3).
    pub struct QuotaReadEntryArgs {
        /// [`crate::limits::QuotaKind::code`], or a key's own window: `kw` its
        /// requests, `kt` its tokens (both in its `rpm` hash).
        pub kind: &'static str,
        /// Day counts and spend: the seed's start day, -1 = none.
        pub seed_day: i64,
        pub seed_micros: i64,
    }
}

impl QuotaReadKey {
    pub fn new(space: &KeySpace, shard: u16, counter: &LiveCounter) -> QuotaReadKey {
        QuotaReadKey {
            counter: match counter {
                LiveCounter::KeyWindow { key_id, .. } => space.client(shard, key_id, "rpm"),
                LiveCounter::Quota { counter, .. } => space.quota(shard, counter),
            },
        }
    }
}

impl QuotaReadEntryArgs {
    pub fn new(counter: &LiveCounter) -> QuotaReadEntryArgs {
        match counter {
            LiveCounter::KeyWindow { tokens, .. } => QuotaReadEntryArgs {
                kind: if *tokens { "kt" } else { "kw" },
                seed_day: -1,
                seed_micros: 0,
            },
            LiveCounter::Quota { kind, seed, .. } => {
                let (seed_day, seed_micros) = seed.unwrap_or((-1, 0));
                QuotaReadEntryArgs {
                    kind: kind.code(),
                    seed_day,
                    // Within what the script's doubles hold exactly (as admit's seeds).
                    seed_micros: seed_micros.clamp(0, crate::money::MAX_TOTAL),
                }
            }
        }
    }
}

/// Reads the reply: the clock, then 3 values per counter asked, in order.
pub fn parse(reply: &[redis::Value], counters: usize) -> Result<LiveFigures, CounterError> {
    const NAME: &str = "quota_read";
    if reply.len() != 1 + 3 * counters {
        return Err(protocol(NAME, format_args!("{} values", reply.len())));
    }
    let figures = (0..counters)
        .map(|i| {
            let at = 1 + 3 * i;
            Ok(LiveFigure {
                used: int_at(NAME, reply, at)?,
                held: int_at(NAME, reply, at + 1)?,
                reset_ms: int_at(NAME, reply, at + 2)?,
            })
        })
        .collect::<Result<Vec<_>, CounterError>>()?;
    Ok(LiveFigures {
        now_ms: int_at(NAME, reply, 0)?,
        figures,
    })
}

pub const CONTRACT: Contract = Contract {
    file: "lua/quota_read.lua",
    source: super::source::QUOTA_READ,
    keys: &[],
    keys_repeated: QuotaReadKey::NAMES,
    argv: QuotaReadArgs::NAMES,
    argv_repeated: QuotaReadEntryArgs::NAMES,
    codes: &[],
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::QuotaKind;
    use crate::quota::Period;

    #[test]
    fn entries_are_named_and_replies_read_as_the_script_writes_them() {
        let space = KeySpace::new("kw", 1);
        let tag = space.tag(0).to_string();
        let window = LiveCounter::KeyWindow {
            key_id: "k1".into(),
            tokens: true,
        };
        let spend = LiveCounter::Quota {
            counter: "c".into(),
            kind: QuotaKind::Spend(Period::Month),
            seed: Some((20_000, i64::MAX)),
        };
        assert_eq!(
            QuotaReadKey::new(&space, 0, &window).counter,
            format!("{tag}:k:k1:rpm")
        );
        assert_eq!(
            QuotaReadKey::new(&space, 0, &spend).counter,
            format!("{tag}:q:c")
        );
        assert_eq!(QuotaReadEntryArgs::new(&window).kind, "kt");
        let args = QuotaReadEntryArgs::new(&spend);
        assert_eq!(
            (args.kind, args.seed_day, args.seed_micros),
            ("sm", 20_000, crate::money::MAX_TOTAL)
        );
        let int = redis::Value::Int;
        let reply = [
            int(1_000),
            int(3),
            int(0),
            int(41_000),
            int(5),
            int(2),
            int(9),
        ];
        let read = parse(&reply, 2).unwrap_or_default();
        assert_eq!(read.now_ms, 1_000);
        assert_eq!(
            read.figures,
            [
                LiveFigure {
                    used: 3,
                    held: 0,
                    reset_ms: 41_000
                },
                LiveFigure {
                    used: 5,
                    held: 2,
                    reset_ms: 9
                }
            ]
        );
        assert!(parse(&reply, 3).is_err(), "a reply of the wrong length");
    }
}
