//! keyward: a rate-limiting and key-pool sidecar for LLM API gateways.
//!
//! A request's path through keyward (see `ARCHITECTURE.md` for the whole map):
//!
//! 1. `main.rs` parses flags and environment into a [`config::Config`]
//!    ([`config::Config::from_raw`] reports every bad value, each naming its variable),
//!    sets up [`telemetry`], and calls [`app::serve`].
//! 2. [`app`] opens the durable store ([`db`]: Postgres or SQLite behind one SQL text),
//!    applies migrations, builds the [`crypto::Keyring`], and starts the two listeners
//!    of [`http`] plus the [`expiry`] job.
//! 3. An admin call enters [`http::admin`], passes the constant-time token check, has
//!    its body parsed by [`http::extract`] (unknown fields refused), and reaches
//!    [`client_keys::ClientKeys`], which validates, encrypts and writes through
//!    [`client_keys::store`]. Usage statistics come from [`usage`].
//! 4. Any error on the way becomes the contract's JSON error body in exactly one place,
//!    [`http::error`].
#![forbid(unsafe_code)]

pub mod accounting;
pub mod admission;
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
pub mod reporting;
pub mod rotation;
pub mod telemetry;
pub mod usage;
