//! `lua/report.lua`: settle one finished request, exactly once, and queue it for the
//! database (the client's part, on the lease's tenant shard); or, in cancel mode, give
//! back an admission whose pick was refused.

use super::{int_at, protocol, script_fields, Contract, KeySpace};
use crate::limits::{CounterError, QuotaEntry, QuotaKind, Reported};

script_fields! {
    key
    /// KEYS of `lua/report.lua`.
    pub struct ReportKeys {
        pub tpm: String,
        pub leases: String,
        pub ld: String,
        pub bal: String,
        pub done: String,
        pub usage: String,
        /// The data of leases admit.lua purged after their expiry.
        pub lx: String,
        /// The key's windows: requests (cancel mode), and a light lease's tokens.
        pub rpm: String,
    }
}

script_fields! {
    key
    /// The KEYS of `lua/report.lua` repeated per spend entry of now (in cancel mode, per
    /// rm and rd entry of the admission), after KEYS 8.
    pub struct ReportQuotaKey {
        /// `{tag}:q:<counter id>`.
        pub quota: String,
    }
}

script_fields! {
    arg
    /// The ARGV of `lua/report.lua` repeated per spend entry of now (from ARGV 23).
    pub struct ReportQuotaArgs {
        /// `sd sw sm st`, or `rm rd` in cancel mode ([`crate::limits::QuotaKind::code`]).
        pub kind: &'static str,
    }
}

/// The spend entries of [`crate::limits::Report::spend_now`] (others are skipped), as
/// their KEYS and ARGV: pushed after [`ReportKeys`] and after [`ReportArgs`].
pub fn spend_entries(
    space: &KeySpace,
    shard: u16,
    entries: &[QuotaEntry],
) -> Vec<(ReportQuotaKey, ReportQuotaArgs)> {
    entries
        .iter()
        .filter(|e| matches!(e.kind, QuotaKind::Spend(_)))
        .map(|e| {
            (
                ReportQuotaKey {
                    quota: space.quota(shard, &e.counter),
                },
                ReportQuotaArgs {
                    kind: e.kind.code(),
                },
            )
        })
        .collect()
}

/// The request entries (`rm`, `rd`) of an admission's quota entries, as a cancel's KEYS
/// and ARGV.
pub fn request_entries(
    space: &KeySpace,
    shard: u16,
    entries: &[QuotaEntry],
) -> Vec<(ReportQuotaKey, ReportQuotaArgs)> {
    entries
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                QuotaKind::RequestsPerMinute | QuotaKind::RequestsPerDay
            )
        })
        .map(|e| {
            (
                ReportQuotaKey {
                    quota: space.quota(shard, &e.counter),
                },
                ReportQuotaArgs {
                    kind: e.kind.code(),
                },
            )
        })
        .collect()
}

impl ReportKeys {
    /// A client key's counters on `shard` (`key_id` "" when the report has no lease), the
    /// record's duplicate guard and the shard's accounting stream.
    pub fn new(space: &KeySpace, shard: u16, key_id: &str, record_id: &str) -> ReportKeys {
        ReportKeys {
            tpm: space.client(shard, key_id, "tpm"),
            leases: space.client(shard, key_id, "leases"),
            ld: space.client(shard, key_id, "ld"),
            bal: space.client(shard, key_id, "bal"),
            done: space.done(shard, record_id),
            usage: space.usage(shard),
            lx: space.client(shard, key_id, "lx"),
            rpm: space.client(shard, key_id, "rpm"),
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
        /// "" = none (recorded; `lua/pool_report.lua` settles it).
        pub provider_key: &'a str,
        /// "" = unknown.
        pub latency_ms: String,
        /// "" = unknown.
        pub status: String,
        pub time_shift_ms: i64,
        pub lease_expiry: i64,
        pub cached: i64,
        pub cache_write: i64,
        pub reasoning: i64,
        pub usage_source: &'static str,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
        /// Give the admission back instead (its pick was refused).
        pub cancel: bool,
        /// Cancel mode: the key's rpm window took the request.
        pub requests: bool,
        /// A light lease's data ([`light_arg`]), "" for a lease with a record.
        pub light: String,
    }
}

/// ARGV `light` of `lua/report.lua`: `<second>|<kt>|provider|model|api_format` for a
/// light lease (kt "" when its key had no TPM limit), "" otherwise.
pub fn light_arg(light: Option<&crate::limits::LightLease>) -> String {
    light.map_or_else(String::new, |l| {
        let kt = l.kt.map(|n| n.to_string()).unwrap_or_default();
        format!("{}|{kt}|{}", l.second, l.meta)
    })
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

pub const CONTRACT: Contract = Contract {
    file: "lua/report.lua",
    source: super::source::REPORT,
    keys: ReportKeys::NAMES,
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
