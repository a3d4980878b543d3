//! `lua/report.lua`: settle one finished request, exactly once, and queue it for the
//! database.

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::{CounterError, QuotaEntry, QuotaKind, Reported};

script_fields! {
    key
    /// KEYS 1-7 of `lua/report.lua`.
    pub struct ReportKeys {
        pub tpm: String,
        pub leases: String,
        pub ld: String,
        pub bal: String,
        pub done: String,
        pub usage: String,
        /// The data of leases admit.lua purged after their expiry.
        pub lx: String,
    }
}

script_fields! {
    key
    /// KEYS 8-11 of `lua/report.lua`, given only when a provider key is named.
    pub struct ReportProviderKeys {
        pub pk_tpm: String,
        pub pk_cd: String,
        pub pk_susp: String,
        pub pk_cause: String,
    }
}

script_fields! {
    key
    /// The KEYS of `lua/report.lua` repeated per spend entry of now (after KEYS 7, or 11
    /// with a provider key).
    pub struct ReportQuotaKey {
        /// `{tag}:q:<counter id>`.
        pub quota: String,
    }
}

script_fields! {
    arg
    /// The ARGV of `lua/report.lua` repeated per spend entry of now (from ARGV 26).
    pub struct ReportQuotaArgs {
        /// `sd sw sm st` ([`crate::limits::QuotaKind::code`]).
        pub kind: &'static str,
    }
}

/// The spend entries of [`crate::limits::Report::spend_now`] (others are skipped), as
/// their KEYS and ARGV: pushed after the provider key's KEYS and after [`ReportArgs`].
pub fn spend_entries(
    space: &KeySpace,
    entries: &[QuotaEntry],
) -> Vec<(ReportQuotaKey, ReportQuotaArgs)> {
    entries
        .iter()
        .filter(|e| matches!(e.kind, QuotaKind::Spend(_)))
        .map(|e| {
            (
                ReportQuotaKey {
                    quota: space.quota(&e.counter),
                },
                ReportQuotaArgs {
                    kind: e.kind.code(),
                },
            )
        })
        .collect()
}

impl ReportKeys {
    /// A client key's counters (`key_id` "" when the report has no lease) and the record's
    /// duplicate guard.
    pub fn new(space: &KeySpace, key_id: &str, record_id: &str) -> ReportKeys {
        ReportKeys {
            tpm: space.client(key_id, "tpm"),
            leases: space.client(key_id, "leases"),
            ld: space.client(key_id, "ld"),
            bal: space.client(key_id, "bal"),
            done: space.done(record_id),
            usage: space.usage(),
            lx: space.client(key_id, "lx"),
        }
    }
}

impl ReportProviderKeys {
    pub fn new(space: &KeySpace, id: &str) -> ReportProviderKeys {
        ReportProviderKeys {
            pk_tpm: space.provider_key(id, "tpm"),
            pk_cd: space.provider_key(id, "cd"),
            pk_susp: space.provider_key(id, "susp"),
            pk_cause: space.provider_key(id, "cause"),
        }
    }
}

script_fields! {
    arg
    /// ARGV of `lua/report.lua`.
    pub struct ReportArgs<'a> {
        /// "" = a report without a lease.
        pub lease_token: &'a str,
        pub record_id: &'a str,
        pub key_id: &'a str,
        pub has_tokens: bool,
        pub prompt: i64,
        pub completion: i64,
        pub cost: i64,
        pub guard_ttl_ms: i64,
        /// "" = the one given at admission.
        pub model: &'a str,
        /// "" = none (then [`ReportProviderKeys`] are not given).
        pub provider_key: &'a str,
        /// "" = unknown.
        pub latency_ms: String,
        /// "" = unknown.
        pub status: String,
        pub time_shift_ms: i64,
        pub cooldown_ms: i64,
        pub suspend_ms: i64,
        pub cause_source: &'a str,
        pub lease_expiry: i64,
        pub cached: i64,
        pub cache_write: i64,
        pub reasoning: i64,
        pub usage_source: &'static str,
        pub learned_cooldown_ms: i64,
        pub learned_limits: String,
        pub learned_keep_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
    }
}

/// The outcome codes of `lua/report.lua` (the reply is `{code, now_ms}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportCode {
    Duplicate,
    Recorded,
    TooLate,
}

impl ReportCode {
    pub fn from_code(code: i64) -> Option<ReportCode> {
        match code {
            0 => Some(ReportCode::Duplicate),
            1 => Some(ReportCode::Recorded),
            2 => Some(ReportCode::TooLate),
            _ => None,
        }
    }

    pub fn parse(reply: &[redis::Value]) -> Result<ReportCode, CounterError> {
        if reply.len() != 2 {
            return Err(protocol("report", format_args!("{} values", reply.len())));
        }
        let code = int_at("report", reply, 0)?;
        Self::from_code(code).ok_or_else(|| protocol("report", format_args!("code {code}")))
    }
}

impl From<ReportCode> for Reported {
    fn from(code: ReportCode) -> Reported {
        match code {
            ReportCode::Duplicate => Reported::Duplicate,
            ReportCode::Recorded => Reported::Recorded,
            ReportCode::TooLate => Reported::TooLate,
        }
    }
}

/// All eleven KEYS' names (the provider key's four follow the seven).
const KEYS: [&str; 11] = {
    let mut all = [""; 11];
    let mut i = 0;
    while i < 7 {
        all[i] = ReportKeys::NAMES[i];
        i += 1;
    }
    while i < 11 {
        all[i] = ReportProviderKeys::NAMES[i - 7];
        i += 1;
    }
    all
};

pub const CONTRACT: Contract = Contract {
    file: "lua/report.lua",
    source: super::source::REPORT,
    keys: &KEYS,
    keys_repeated: ReportQuotaKey::NAMES,
    argv: ReportArgs::NAMES,
    argv_repeated: ReportQuotaArgs::NAMES,
    codes: &[(0, "duplicate"), (1, "recorded"), (2, "too_late")],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_parse_to_the_enum_and_nothing_else() {
        for (n, _) in CONTRACT.codes {
            assert!(ReportCode::from_code(*n).is_some());
        }
        assert_eq!(ReportCode::from_code(3), None);
        assert!(ReportCode::parse(&[redis::Value::Int(7), redis::Value::Int(0)]).is_err());
    }
}
