//! `lua/admit_window.lua`: the light admission of a key whose limits are its windows
//! (RPM and/or TPM) and its concurrency limit (no tracked balance, no quota entry): under
//! a concurrency limit its lease takes a slot in the key's lease set, without a record.
//! It answers [`super::admit::AdmitReply`] without quota entries, so the rest of the path
//! is `lua/admit.lua`'s.

use super::{script_fields, Contract, KeySpace};

script_fields! {
    key
    /// KEYS of `lua/admit_window.lua`.
    pub struct AdmitWindowKeys {
        /// Both windows of the key, the same hash (and fields) as
        /// [`super::admit::AdmitKeys::rpm`].
        pub rpm: String,
        /// [`super::admit::AdmitKeys::leases`]: the slots (read under a concurrency
        /// limit only).
        pub leases: String,
        /// [`super::admit::AdmitKeys::ld`]: never written; its records keep their members
        /// from this script's purge, and it lives as long as the lease set.
        pub ld: String,
    }
}

impl AdmitWindowKeys {
    /// A client key's windows, on its tenant's `shard`.
    pub fn new(space: &KeySpace, shard: u16, key_id: &str) -> AdmitWindowKeys {
        AdmitWindowKeys {
            rpm: space.client(shard, key_id, "rpm"),
            leases: space.client(shard, key_id, "leases"),
            ld: space.client(shard, key_id, "ld"),
        }
    }
}

script_fields! {
    arg
    /// ARGV of `lua/admit_window.lua` (limits: 0 = unlimited, see [`super::limit_arg`]).
    pub struct AdmitWindowArgs<'a> {
        pub rpm_limit: i64,
        pub tpm_limit: i64,
        pub tokens: i64,
        pub lease_ttl_ms: i64,
        pub time_shift_ms: i64,
        /// 0 = the Redis server's `TIME`.
        pub now_ms: i64,
        /// 0 = none: the lease set is not read.
        pub concurrency_limit: i64,
        /// The lease's member in the lease set (under a concurrency limit).
        pub lease_token: &'a str,
    }
}

pub const CONTRACT: Contract = Contract {
    file: "lua/admit_window.lua",
    source: super::source::ADMIT_WINDOW,
    keys: AdmitWindowKeys::NAMES,
    keys_repeated: &[],
    argv: AdmitWindowArgs::NAMES,
    argv_repeated: &[],
    codes: &[
        (0, "admitted"),
        (1, "requests"),
        (2, "tokens"),
        (3, "concurrency"),
    ],
};

#[cfg(test)]
mod tests {
    use super::super::admit::AdmitCode;
    use super::*;

    /// Its codes are `lua/admit.lua`'s, with the same numbers and names.
    #[test]
    fn its_codes_are_admits() {
        for (n, name) in CONTRACT.codes {
            assert!(AdmitCode::CODES
                .iter()
                .any(|(_, m, other)| m == n && other == name));
        }
    }
}
