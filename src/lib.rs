//! keyward: a rate-limiting and key-pool sidecar for LLM API gateways.
//!
//! One admission, end to end (`ARCHITECTURE.md` has the whole map, and the other paths):
//!
//! 1. **The request.** A proxy sends `POST /v1/admit` (a JSON body naming the client key)
//!    or calls `/authz/{*path}` with the client's own request (key in a header, model
//!    and token estimate read from the forwarded body by [`http::scan`]). The handlers,
//!    [`http::data`] and [`http::authz`], only parse: a body is at most 256 KiB (1 MiB
//!    for `/authz`), a JSON object, unknown fields refused ([`http::extract`]).
//! 2. **The key.** [`admission::Admission::admit`] hashes the secret and asks the
//!    in-process key cache ([`client_keys::cache`], over the generic [`cache`]); the
//!    database is read only on a miss, and an unknown key is remembered as unknown for a
//!    few seconds. *Invariant (in [`cache`]):* a load that raced an invalidation is not
//!    stored, and every admin change drops the entry on every replica
//!    ([`invalidation`], implemented by [`bus`]).
//! 3. **The static checks**, in process and before any counter: disabled, expired, the
//!    provider/model/API-format allow-lists ([`names`] is the one rule for names), an
//!    estimate over the key's TPM limit, and the price of the hold ([`prices`]).
//!    *Invariant (in [`admission`]):* a refusal here has counted nothing.
//! 4. **The counters.** One call to [`limits::Counters::admit`]: one `EVALSHA` of
//!    `lua/admit.lua` in the distributed shape, or [`limits::memory`] under the key's
//!    lock in the embedded one. It checks balance, RPM, TPM and concurrency, picks a
//!    provider key from the provider's roster ([`pool::cache::Roster`]) when asked, and
//!    takes everything or nothing. *Invariants (in `lua/` and [`limits`]):* the check
//!    and the take are one atomic step; windows are exact to the second; time is the
//!    counter store's clock.
//! 5. **The answer.** [`admission`] signs the lease ([`lease::SignedLease`]: key, pick,
//!    expiry, hold and price under an HMAC of the keyring); [`http::data`] answers 200
//!    with the lease and the rate-limit headers ([`http::ratelimit`]). A refusal becomes
//!    the contract's error body in one place, [`http::error`], with a code from the
//!    closed list [`http::error_code::ErrorCode`] and an exact `Retry-After`.
//!
//! The request's report closes what the admission opened: [`reporting::Reports`]
//! checks the lease binds it, prices it, and settles it in the counter store, which
//! queues the usage record; [`accounting`] applies it to the database exactly once
//! (*invariant:* acknowledged only after its batch committed, applied idempotently by
//! lease id, in [`usage::store::apply`]).
//!
//! Start-up is [`app`]: `main.rs` parses flags and environment into a
//! [`config::Config`] (every bad value reported, each naming its variable); [`app`]
//! opens the store ([`db`]), builds the keyring ([`crypto`]), the counters, caches and
//! services, and hands them to [`http`] as its [`http::AppState`]. Nothing imports
//! [`app`], and only [`app`] imports [`http`] (tests/architecture.rs keeps the import
//! graph free of circles).
#![forbid(unsafe_code)]

pub mod accounting;
pub mod admission;
pub mod alerts;
pub mod app;
pub mod bus;
pub mod cache;
pub mod cli;
pub mod client_keys;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod db;
pub mod expiry;
pub mod http;
pub mod invalidation;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod money;
pub mod names;
pub mod pool;
pub mod prices;
pub mod probe;
pub mod provider_keys;
pub mod quota;
pub mod quota_live;
pub mod quota_usage;
pub mod reporting;
pub mod rotation;
pub mod telemetry;
pub mod tls;
pub mod usage;
pub mod users;
