//! Test harness: real keyward servers in-process on port 0, each on its own database,
//! split by concern, each file saying what it is for:
//!
//! - [`db`]: the test's own database (SQLite file or fresh Postgres database);
//! - [`server`]: keyward in-process ([`TestServer`]), its answers, and several instances
//!   of one deployment [`Shape`] ([`Cluster`]);
//! - [`redis`]: the shared Redis (a prefix of the test's own), and a private
//!   `redis-server` or Redis Cluster for tests that flush, stop or watch it;
//! - [`chaos`]: a Postgres proxy a test can cut;
//! - [`ports`]: free ports for child processes (shared with the benches);
//! - [`shipped`]: the shipped nginx and Envoy files, run as shipped (shared with the
//!   benches);
//! - [`helpers`]: polling until a condition holds, an OpenAPI document's operations;
//! - [`logs`]: the binary's log lines, captured for a test to search.
//!
//! Everything is re-exported here, so a test says `use common::TestServer`. The benches
//! include [`ports`], [`shipped`], [`helpers`] and [`redis`] by path
//! (`benches/support/mod.rs`): those files depend on nothing else in this tree but each
//! other (`redis` uses `helpers` and `ports`).
#![allow(dead_code, clippy::unwrap_used)]

pub mod chaos;
pub mod db;
pub mod helpers;
pub mod logs;
pub mod ports;
pub mod redis;
pub mod server;
pub mod shipped;

// Each test binary uses some of these: the rest would warn as unused in it.
#[allow(unused_imports)]
pub use self::redis::{
    delete_prefix, queue_usage_record, redis_url, stream_records, unique_prefix, PrivateCluster,
    PrivateRedis,
};
#[allow(unused_imports)]
pub use chaos::{reroute, PgProxy};
#[allow(unused_imports)]
pub use db::{postgres_base_url, Backend, TestDb};
#[allow(unused_imports)]
pub use helpers::{eventually, openapi_operations, own_address};
#[allow(unused_imports)]
pub use logs::captured_logs;
#[allow(unused_imports)]
pub use ports::{free_cluster_port, free_port};
#[allow(unused_imports)]
pub use server::{
    base_config, error_code, lease_record_id, Answer, Cluster, Shape, TestServer, DATA_TOKEN,
    DEFAULT_PRICE, ENCRYPTION_KEY, TOKEN,
};

/// Runs each named `async fn(Variant)` once per listed variant, in a module per variant:
/// `each_variant!(Backend { sqlite: Sqlite, postgres: Postgres } => (test_a, test_b))`.
#[macro_export]
macro_rules! each_variant {
    ($ty:ident { $($module:ident: $variant:ident),+ } => $names:tt) => {
        $( each_variant!(@one $ty $module $variant $names); )+
    };
    (@one $ty:ident $module:ident $variant:ident ($($name:ident),*)) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::$ty::$variant).await;
                }
            )*
        }
    };
}

/// Runs each named `async fn(Backend)` on SQLite and on Postgres.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        each_variant!(Backend { sqlite: Sqlite, postgres: Postgres } => ($($name),*));
    };
}

/// Runs each named `async fn(Shape)` embedded and distributed.
#[macro_export]
macro_rules! on_both_shapes {
    ($($name:ident),* $(,)?) => {
        each_variant!(Shape { embedded: Embedded, distributed: Distributed } => ($($name),*));
    };
}
