//! `lua/admit.lua`: decide one request for one client key (its windows, concurrency,
//! balance and quota entries). A provider key is picked by `lua/pick.lua`.

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::{CounterError, QuotaEntry, QuotaUse, Usage};

script_fields! {
    key
    /// KEYS of `lua/admit.lua`.
    pub struct AdmitKeys {
        /// Both windows of the key: requests, and tokens under the field prefix `t`.
        pub rpm: String,
        pub leases: String,
        pub ld: String,
        pub bal: String,
        /// The data of leases purged after their expiry, kept for their late reports.
        pub lx: String,
    }
}

impl AdmitKeys {
    /// A client key's counters, all on its tenant's `shard`.
    pub fn new(space: &KeySpace, shard: u16, key_id: &str) -> AdmitKeys {
        AdmitKeys {
            rpm: space.client(shard, key_id, "rpm"),
            leases: space.client(shard, key_id, "leases"),
            ld: space.client(shard, key_id, "ld"),
            bal: space.client(shard, key_id, "bal"),
            lx: space.client(shard, key_id, "lx"),
        }
    }

    /// All of them, for cleaning up.
    pub fn all(&self) -> [&str; 5] {
        [&self.rpm, &self.leases, &self.ld, &self.bal, &self.lx]
    }
}

script_fields! {
    key
    /// The KEYS of `lua/admit.lua` repeated per quota entry (from KEYS 6).
    pub struct AdmitQuotaKey {
        /// `{tag}:q:<counter id>`: the script names the entry's counters from it.
        pub quota: String,
    }
}

script_fields! {
    arg
    /// The ARGV of `lua/admit.lua` repeated per quota entry (from ARGV 17).
    pub struct AdmitQuotaArgs {
        /// `rm tm rd td sd sw sm st` ([`crate::limits::QuotaKind::code`]).
        pub kind: &'static str,
        pub limit: i64,
        /// The seed's start day, -1 = none.
        pub seed_day: i64,
        /// Requests, tokens or micro-USD the database had applied in that period.
        pub seed: i64,
    }
}

impl AdmitQuotaKey {
    pub fn new(space: &KeySpace, shard: u16, entry: &QuotaEntry) -> AdmitQuotaKey {
        AdmitQuotaKey {
            quota: space.quota(shard, &entry.counter),
        }
    }
}

impl AdmitQuotaArgs {
    pub fn new(entry: &QuotaEntry) -> AdmitQuotaArgs {
        let (seed_day, seed) = entry.seed.unwrap_or((-1, 0));
        AdmitQuotaArgs {
            kind: entry.kind.code(),
            limit: entry.limit,
            seed_day,
            // Within what the script's doubles hold exactly.
            seed: seed.clamp(0, crate::money::MAX_TOTAL),
        }
    }
}

/// Adds a request's quota entries' KEYS to an admit call (after [`AdmitKeys`]). Keys
/// and arguments are sent apart, so [`push_quota_args`] may follow [`AdmitArgs`].
pub fn push_quota_keys(
    space: &KeySpace,
    shard: u16,
    quotas: &[QuotaEntry],
    call: &mut impl super::call::ScriptArgs,
) {
    for entry in quotas {
        AdmitQuotaKey::new(space, shard, entry).push(call);
    }
}

/// Adds a request's quota entries' ARGV to an admit call (after [`AdmitArgs`]).
pub fn push_quota_args(quotas: &[QuotaEntry], call: &mut impl super::call::ScriptArgs) {
    for entry in quotas {
        AdmitQuotaArgs::new(entry).push(call);
    }
}

script_fields! {
    arg
    /// ARGV of `lua/admit.lua` (limits: 0 = unlimited, see [`super::limit_arg`]).
    pub struct AdmitArgs<'a> {
        pub rpm_limit: i64,
        pub tpm_limit: i64,
        pub concurrency_limit: i64,
        pub tokens: i64,
        pub lease_token: &'a str,
        pub lease_ttl_ms: i64,
        /// `provider|model|api_format`, each without `|`.
        pub lease_meta: String,
        pub balance_tracked: bool,
        pub credited: i64,
        pub used: i64,
        pub balance_version: i64,
        pub time_shift_ms: i64,
        pub hold: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
        /// How long a report's duplicate guard outlives its lease (> 0): a purged
        /// lease's data is kept that long for its late report.
        pub guard_ttl_ms: i64,
        /// Write no lease record ([`crate::limits::AdmitRequest::light_meta`]): the
        /// key has no concurrency limit, no tracked balance and no quota entry its
        /// report corrects; the signed lease carries what its report needs.
        pub light: bool,
    }
}

/// The outcome codes of `lua/admit.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitCode {
    Admitted,
    Requests,
    Tokens,
    Concurrency,
    BalanceExhausted,
    BalanceCommitted,
    /// A quota entry refuses (`quota_index`, `quota_exhausted`).
    Quota,
}

impl AdmitCode {
    /// Every code with its number and its name in the script's header.
    /// (6 and 7 were the pool's, now `lua/pick.lua`'s.)
    pub const CODES: [(AdmitCode, i64, &'static str); 7] = [
        (AdmitCode::Admitted, 0, "admitted"),
        (AdmitCode::Requests, 1, "requests"),
        (AdmitCode::Tokens, 2, "tokens"),
        (AdmitCode::Concurrency, 3, "concurrency"),
        (AdmitCode::BalanceExhausted, 4, "balance_exhausted"),
        (AdmitCode::BalanceCommitted, 5, "balance_committed"),
        (AdmitCode::Quota, 8, "quota"),
    ];

    pub fn from_code(code: i64) -> Option<AdmitCode> {
        Self::CODES
            .iter()
            .find(|(_, n, _)| *n == code)
            .map(|(c, _, _)| *c)
    }
}

/// What `lua/admit.lua` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitReply {
    pub code: AdmitCode,
    /// The lease expiry or a retry time (see the script's CODES).
    pub a: i64,
    /// With `balance_remaining` always set (-1 when the balance is not tracked).
    pub usage: Usage,
    /// The refusing quota entry's index (0-based) and whether it is full (else its spend
    /// is held by requests in flight), with [`AdmitCode::Quota`].
    pub quota: Option<(usize, bool)>,
    /// One per quota entry sent.
    pub quotas: Vec<QuotaUse>,
}

impl AdmitReply {
    pub fn parse(reply: &[redis::Value]) -> Result<AdmitReply, CounterError> {
        const NAME: &str = "admit";
        if reply.len() < 11 || (reply.len() - 11) % 2 != 0 {
            return Err(protocol(NAME, format_args!("{} values", reply.len())));
        }
        let int = |i| int_at(NAME, reply, i);
        let code = int(0)?;
        let index = int(9)?;
        let quotas = (11..reply.len())
            .step_by(2)
            .map(|i| {
                Ok(QuotaUse {
                    used: int(i)?,
                    reset_ms: int(i + 1)?,
                })
            })
            .collect::<Result<Vec<_>, CounterError>>()?;
        let quota = match usize::try_from(index) {
            Ok(0) => None,
            Ok(i) if i <= quotas.len() => Some((i - 1, int(10)? != 0)),
            _ => return Err(protocol(NAME, format_args!("quota index {index}"))),
        };
        Ok(AdmitReply {
            code: AdmitCode::from_code(code)
                .ok_or_else(|| protocol(NAME, format_args!("code {code}")))?,
            a: int(1)?,
            usage: Usage {
                now_ms: int(2)?,
                requests_used: int(3)?,
                tokens_used: int(4)?,
                requests_reset_ms: int(5)?,
                tokens_reset_ms: int(6)?,
                in_flight: int(7)?,
                balance_remaining: Some(int(8)?),
            },
            quota,
            quotas,
        })
    }
}

pub const CONTRACT: Contract = Contract {
    file: "lua/admit.lua",
    source: super::source::ADMIT,
    keys: AdmitKeys::NAMES,
    keys_repeated: AdmitQuotaKey::NAMES,
    argv: AdmitArgs::NAMES,
    argv_repeated: AdmitQuotaArgs::NAMES,
    codes: &[
        (0, "admitted"),
        (1, "requests"),
        (2, "tokens"),
        (3, "concurrency"),
        (4, "balance_exhausted"),
        (5, "balance_committed"),
        (8, "quota"),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_lists_every_code_of_the_enum() {
        let from_enum: Vec<(i64, &str)> =
            AdmitCode::CODES.iter().map(|(_, n, s)| (*n, *s)).collect();
        assert_eq!(from_enum, CONTRACT.codes);
    }
}
