//! Start-up: turns a [`Config`] into running parts (store, keyring, counters, caches,
//! services), and runs the listeners and background jobs until shutdown.
//!
//! Shutdown order matters for exactly-once accounting: the listeners drain first (so
//! every report that was answered is queued), then the background jobs are told to stop
//! (the embedded writer flushes its queue before it returns), then the pools close.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::accounting::{self, report::PoolPolicy};
use crate::admission::Admission;
use crate::client_keys::{self, ClientKeys};
use crate::config::{Config, DATABASE_URL, ENCRYPTION_KEY, REDIS_CA_FILE, REDIS_URL};
use crate::crypto::{self, Keyring};
use crate::db::{self, Backend, Db};
use crate::invalidation::{self, Bus};
use crate::limits::conn::Target;
use crate::limits::memory::MemoryCounters;
use crate::limits::redis::RedisCounters;
use crate::limits::Counters;
use crate::pool::{self, ProviderKeys};
use crate::prices::{self, Prices};
use crate::usage::UsageRecord;
use crate::{expiry, http, tls};

/// What every request handler can reach. One `Arc`: axum clones the state for every
/// extractor and middleware of every request, so a clone is one atomic increment rather
/// than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    pub db: Db,
    pub keys: ClientKeys,
    pub pools: ProviderKeys,
    /// Model prices (admin API, `KEYWARD_PRICES_FILE`, and pricing of reported tokens).
    pub prices: Prices,
    pub admission: Arc<Admission>,
    pub counters: Counters,
    pub keyring: Arc<Keyring>,
    /// Cache invalidation, here and on every other replica.
    pub bus: Arc<Bus>,
    /// What upstream 429s and 401/403s do to provider keys.
    pub pool_policy: PoolPolicy,
    /// SHA-256 of `KEYWARD_ADMIN_TOKEN`; `None` disables the admin API.
    pub admin_token_digest: Option<[u8; 32]>,
    /// SHA-256 of `KEYWARD_DATA_TOKEN`; `None` refuses the calls that need it.
    pub data_token_digest: Option<[u8; 32]>,
    /// The expiry pass deletes (rather than disables) keys without a flag of their own.
    pub expiry_auto_delete: bool,
    /// Whether the in-process accounting writer can write (reports are refused if not).
    pub accounting: accounting::embedded::WriterHealth,
}

/// Background work that [`run`] starts beside the listeners.
enum Accounting {
    Embedded(mpsc::Receiver<UsageRecord>),
    Stream {
        target: Target,
        /// For the invalidation subscription.
        pubsub: Box<redis::Client>,
        stream: String,
        /// Reports taken by the in-process twin while Redis fails (`allow`, `local`).
        fallback: mpsc::Receiver<UsageRecord>,
    },
}

pub struct Parts {
    pub state: AppState,
    accounting: Accounting,
    invalidation_channel: String,
}

/// Where the embedded shape keeps its generated encryption key: beside the SQLite file.
pub fn key_file_for(sqlite: &std::path::Path) -> PathBuf {
    let mut name = sqlite.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

async fn keyring(config: &Config, db: &Db) -> anyhow::Result<Keyring> {
    let current = match (config.encryption_key, config.backend) {
        (Some(key), _) => key,
        (None, Backend::Sqlite) => match db::sqlite_path(&config.database_url) {
            Some(path) => {
                // A new key beside stored ciphertexts would decrypt none of them.
                let may_create = !db
                    .holds_secrets()
                    .await
                    .with_context(|| format!("{DATABASE_URL}: reading the database"))?;
                crypto::load_or_create_key_file(&key_file_for(&path), may_create)?
            }
            None => {
                tracing::warn!("{ENCRYPTION_KEY} is unset and the database is in memory: using a throw-away key");
                crypto::random_key()
            }
        },
        // Config::from_raw refuses this combination; kept as an error, not a panic.
        (None, Backend::Postgres) => anyhow::bail!("{ENCRYPTION_KEY} is required with Postgres"),
    };
    Ok(Keyring::new(&current, &config.previous_keys))
}

/// Connects to the durable store; the error is one line naming `KEYWARD_DATABASE_URL`
/// and the cause, never the URL (it may hold a password).
pub async fn connect_db(url: &str) -> anyhow::Result<Db> {
    if let Some(warning) = tls::postgres_unverified(url) {
        tracing::warn!("{DATABASE_URL}: {warning}");
    }
    Db::connect(url).await.map_err(|e| {
        let cause = redact(&e.to_string(), url);
        let hint = if tls::is_certificate_error(&cause) {
            " (the server's certificate must be signed by a CA of the URL's sslrootcert or of the system roots and, with sslmode=verify-full, name the URL's host)"
        } else {
            ""
        };
        anyhow::anyhow!("{DATABASE_URL}: cannot connect to the database: {cause}{hint}")
    })
}

/// Connects to the durable store, checks that it can be written, and applies migrations.
pub async fn open_db(config: &Config) -> anyhow::Result<Db> {
    let db = connect_db(&config.database_url).await?;
    if config.backend == Backend::Sqlite {
        // A read-only SQLite file answers reads (and `/readyz`) but no write: stop here
        // instead of starting "ready" and losing every report.
        db.check_writable().await.map_err(|e| {
            anyhow::anyhow!("{DATABASE_URL}: the database is read-only (cannot write to it): {e}")
        })?;
    }
    db.migrate().await.map_err(|e| {
        anyhow::anyhow!(
            "{DATABASE_URL}: applying database migrations: {}",
            redact(&e.to_string(), &config.database_url)
        )
    })?;
    Ok(db)
}

/// `text` with the password of `url` (if any) masked: causes from drivers are shown in
/// start-up errors, and must not carry it even if a driver quoted the URL.
fn redact(text: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(user_info, _)| user_info.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => text.replace(p, "***"),
        None => text.to_string(),
    }
}

/// The distributed counter store: Redis with its failure policy (and the in-process twin
/// that serves it), the accounting stream's consumer group, the pub/sub client.
async fn connect_redis(
    config: &Config,
    url: &str,
    guard_ttl_ms: i64,
) -> anyhow::Result<(Arc<RedisCounters>, Accounting)> {
    let unreachable = |e: &dyn std::fmt::Display| {
        let cause = redact(&e.to_string(), url);
        let hint = match (tls::is_certificate_error(&cause), &config.redis_ca) {
            (false, _) => String::new(),
            (true, Some(_)) => format!(" (the server's certificate must be signed by a CA of {REDIS_CA_FILE} or of the system roots, and name the host of {REDIS_URL})"),
            (true, None) => format!(" (the server's certificate must be signed by a CA of the system roots, or of a file named by {REDIS_CA_FILE}, and name the host of {REDIS_URL})"),
        };
        anyhow::anyhow!("{REDIS_URL}: cannot connect to Redis: {cause}{hint}")
    };
    // Config::from_raw checked the URL and the CA file; kept as errors, not panics.
    let target = Target::parse(url)
        .ok_or_else(|| anyhow::anyhow!("{REDIS_URL}: not a redis:// or redis+cluster:// URL"))?;
    let target = match &config.redis_ca {
        Some(ca) => target
            .with_ca(ca)
            .map_err(|why| anyhow::anyhow!("{REDIS_CA_FILE}: {why}"))?,
        None => target,
    };
    let (tx, fallback) = accounting::embedded::channel();
    let twin = Arc::new(MemoryCounters::new(guard_ttl_ms, tx));
    let redis = RedisCounters::connect_to(target, &config.redis_prefix, guard_ttl_ms)
        .await
        .map_err(|e| unreachable(&e))?
        .with_failure_policy(config.on_backend_error, twin);
    let stream = redis.stream_key();
    let mut conn = redis.conn().await.map_err(|e| unreachable(&e))?;
    accounting::stream::ensure_group(&mut conn, &stream)
        .await
        .map_err(|e| unreachable(&e))?;
    let target = redis.target().clone();
    let pubsub = Box::new(target.pubsub_client().map_err(|e| unreachable(&e))?);
    let accounting = Accounting::Stream {
        target,
        pubsub,
        stream,
        fallback,
    };
    Ok((Arc::new(redis), accounting))
}

pub async fn build(config: &Config) -> anyhow::Result<Parts> {
    let db = open_db(config).await?;
    let keyring = Arc::new(keyring(config, &db).await?);
    let key_cache = Arc::new(client_keys::cache::new(
        db.clone(),
        config.key_cache_ttl,
        config.negative_cache_ttl,
    ));
    let pool_cache = Arc::new(pool::cache::new(
        db.clone(),
        keyring.clone(),
        config.key_cache_ttl,
        config.negative_cache_ttl,
    ));
    let price_cache = Arc::new(prices::cache::new(
        db.clone(),
        config.key_cache_ttl,
        config.negative_cache_ttl,
    ));
    let mut bus = Bus::new(key_cache.clone(), pool_cache.clone()).with_prices(price_cache.clone());
    let guard_ttl_ms = config.report_dedupe_ttl.as_millis() as i64;
    let invalidation_channel = format!("{}:invalidate", config.redis_prefix);
    let (counters, accounting) = match &config.redis_url {
        Some(url) => {
            let (redis, accounting) = connect_redis(config, url, guard_ttl_ms).await?;
            bus = bus.with_publisher(redis.clone(), invalidation_channel.clone());
            (Counters::Redis(redis), accounting)
        }
        None => {
            let (tx, rx) = accounting::embedded::channel();
            let memory = MemoryCounters::new(guard_ttl_ms, tx);
            (Counters::Memory(Arc::new(memory)), Accounting::Embedded(rx))
        }
    };
    let bus = Arc::new(bus);
    let prices = Prices::new(db.clone(), price_cache.clone(), bus.clone());
    prices
        .load(&config.prices)
        .await
        .with_context(|| format!("storing the prices of {}", crate::config::PRICES_FILE))?;
    let admission = Admission::new(
        key_cache,
        pool_cache,
        counters.clone(),
        keyring.clone(),
        price_cache,
        crate::admission::Defaults {
            lease_ttl_ms: config.lease_ttl.as_millis() as i64,
            tokens: config.default_estimated_tokens,
            price: config.default_price,
        },
    );
    let state = AppState(Arc::new(Shared {
        keys: ClientKeys::new(
            db.clone(),
            keyring.clone(),
            config.key_prefix.clone(),
            bus.clone(),
        ),
        pools: ProviderKeys::new(db.clone(), keyring.clone(), bus.clone(), counters.clone()),
        prices,
        db,
        admission: Arc::new(admission),
        counters,
        keyring,
        bus,
        pool_policy: PoolPolicy {
            default_cooldown_ms: config.provider_cooldown.as_millis() as i64,
            lease_cooldown_max_ms: config.provider_cooldown_max.as_millis() as i64,
            suspend_ms: config.provider_suspend.as_millis() as i64,
        },
        admin_token_digest: config
            .admin_token
            .as_deref()
            .map(|t| crypto::digest(t.as_bytes())),
        data_token_digest: config
            .data_token
            .as_deref()
            .map(|t| crypto::digest(t.as_bytes())),
        expiry_auto_delete: config.expiry_auto_delete,
        accounting: Default::default(),
    }));
    Ok(Parts {
        state,
        accounting,
        invalidation_channel,
    })
}

/// A name for this replica in the accounting consumer group.
fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keyward".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn spawn_background(
    parts: Parts,
    config: &Config,
    stop: &watch::Receiver<bool>,
) -> (AppState, Vec<JoinHandle<()>>) {
    let state = parts.state;
    let mut jobs = Vec::new();
    match parts.accounting {
        Accounting::Embedded(queue) => {
            jobs.push(tokio::spawn(accounting::embedded::run(
                queue,
                state.db.clone(),
                stop.clone(),
                state.accounting.clone(),
            )));
        }
        Accounting::Stream {
            target,
            pubsub,
            stream,
            fallback,
        } => {
            jobs.push(tokio::spawn(accounting::embedded::run(
                fallback,
                state.db.clone(),
                stop.clone(),
                state.accounting.clone(),
            )));
            jobs.push(tokio::spawn(accounting::stream::run(
                target,
                stream,
                consumer_name(),
                config.accounting_claim_idle,
                state.db.clone(),
                stop.clone(),
            )));
            jobs.push(tokio::spawn(invalidation::subscribe(
                *pubsub,
                parts.invalidation_channel,
                state.bus.clone(),
                stop.clone(),
            )));
        }
    }
    {
        // The in-process counters: the embedded store, or the Redis shape's outage twin.
        let (counters, mut stop) = (state.counters.clone(), stop.clone());
        jobs.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = every.tick() => counters.sweep(),
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }));
    }
    if let Some(every) = config.expiry_interval {
        jobs.push(tokio::spawn(expiry::run(
            state.keys.clone(),
            every,
            config.expiry_auto_delete,
            stop.clone(),
        )));
    }
    (state, jobs)
}

/// Runs keyward on the given listeners until `shutdown` completes.
pub async fn run(
    config: Config,
    data: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let parts = build(&config).await?;
    run_parts(parts, config, data, admin, shutdown).await
}

/// Like [`run`], with the parts already built (tests reach into `parts.state` first).
pub async fn run_parts(
    parts: Parts,
    config: Config,
    data: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let mode = match config.on_backend_error {
        crate::config::BackendErrorPolicy::Deny => "deny",
        crate::config::BackendErrorPolicy::Allow => "allow",
        crate::config::BackendErrorPolicy::Local => "local",
    };
    for m in ["deny", "allow", "local"] {
        crate::metrics::get()
            .backend_failure_mode
            .with_label_values(&[m])
            .set(i64::from(m == mode));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (state, jobs) = spawn_background(parts, &config, &stop_rx);
    tracing::info!(
        data = %data.local_addr()?,
        admin = %admin.local_addr()?,
        database = ?config.backend,
        counters = if config.redis_url.is_some() { "redis" } else { "in-process" },
        "keyward serving"
    );
    let served = http::serve(state.clone(), data, admin, config.shutdown_grace, shutdown).await;
    let _ = stop_tx.send(true);
    for job in jobs {
        let _ = job.await;
    }
    state.db.close().await;
    tracing::info!("keyward stopped");
    served
}

/// Binds the configured addresses and runs until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let data = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {} ({})", config.listen, crate::config::LISTEN))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| {
            format!(
                "binding {} ({})",
                config.admin_listen,
                crate::config::ADMIN_LISTEN
            )
        })?;
    run(config, data, admin, shutdown_signal()).await
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops keyward");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
