//! Start-up: turns a [`Config`] into running parts (store, keyring, counters, caches,
//! services), hands them to [`http`] as its [`AppState`], and runs the listeners and
//! background jobs until shutdown. Nothing below imports this module: it is the one
//! place that knows every concrete part (`app::store` opens the database).
//!
//! Shutdown order matters for exactly-once accounting: the listeners drain first (so
//! every report that was answered is queued), then the background jobs are told to stop
//! (the embedded writer flushes its queue before it returns), then the database's
//! connections close.

mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::accounting;
use crate::admission::Admission;
use crate::alerts;
use crate::bus::{self, Bus};
use crate::client_keys::{self, ClientKeys};
use crate::config::{Config, REDIS_CA_FILE, REDIS_URL};
use crate::crypto;
use crate::http::state::Shared;
use crate::http::AppState;
use crate::invalidation::Invalidator;
use crate::limits::conn::Target;
use crate::limits::memory::MemoryCounters;
use crate::limits::redis::RedisCounters;
use crate::limits::{CounterError, Counters};
use crate::pool;
use crate::prices::{self, Prices};
use crate::provider_keys::ProviderKeys;
use crate::reporting::body::ProviderKeyPolicy;
use crate::reporting::Reports;
use crate::usage::UsageRecord;
use crate::users::{self, Users};
use crate::{expiry, http, tls};
pub use store::{connect_db, key_file_for, open_db};

/// Background work that [`run`] starts beside the listeners.
enum Accounting {
    Embedded(mpsc::Receiver<UsageRecord>),
    Stream {
        target: Target,
        /// For the invalidation subscription.
        pubsub: Box<redis::Client>,
        /// Every shard's stream, then the one-tag layout's.
        streams: Vec<String>,
        /// The registry of every layout's streams (`{prefix}:streams`), read by the writer.
        registry: String,
        /// Reports taken by the in-process twin while Redis fails (`allow`, `local`).
        fallback: mpsc::Receiver<UsageRecord>,
    },
}

pub struct Parts {
    pub state: AppState,
    accounting: Accounting,
    invalidation_channel: String,
    /// This replica's caches and their pub/sub channel, for the subscription.
    bus: Arc<Bus>,
}

/// The distributed counter store: Redis with its failure policy (and the in-process twin
/// that serves it), the accounting stream's consumer group, the pub/sub client.
async fn connect_redis(
    config: &Config,
    url: &str,
    guard_ttl_ms: i64,
) -> anyhow::Result<(Arc<RedisCounters>, Accounting)> {
    let unreachable = |e: &dyn std::fmt::Display| {
        let cause = store::redact(&e.to_string(), url);
        let hint = match (tls::is_certificate_error(&cause), &config.redis_ca) {
            // A node of a cluster answers a standalone client's commands with MOVED.
            (false, _) if cause.contains("Moved") || cause.contains("MOVED") => format!(
                " (the node is part of a Redis Cluster: give {REDIS_URL} as redis+cluster://host:port,host:port,…)"
            ),
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
        .with_shards(config.redis_shards)
        .with_failure_policy(config.on_backend_error, twin);
    redis.check_layout().await.map_err(|e| match e {
        CounterError::Layout(why) => anyhow::anyhow!(why),
        e => unreachable(&e),
    })?;
    let streams = redis.stream_keys();
    let mut conn = redis.conn().await.map_err(|e| unreachable(&e))?;
    // Not the legacy stream (the last): it is only drained if it exists.
    for stream in &streams[..streams.len() - 1] {
        accounting::stream::ensure_group(&mut conn, stream)
            .await
            .map_err(|e| unreachable(&e))?;
    }
    // Listed so the writers read them even after the shard count changes.
    let registry = redis.stream_registry();
    accounting::registry::register(
        &mut conn,
        &registry,
        &streams[..streams.len() - 1],
        accounting::stream::claim_every(config.accounting_claim_idle),
    )
    .await
    .map_err(|e| unreachable(&e))?;
    let target = redis.target().clone();
    let pubsub = Box::new(target.pubsub_client().map_err(|e| unreachable(&e))?);
    let accounting = Accounting::Stream {
        target,
        pubsub,
        streams,
        registry,
        fallback,
    };
    Ok((Arc::new(redis), accounting))
}

pub async fn build(config: &Config) -> anyhow::Result<Parts> {
    let db = open_db(config).await?;
    let keyring = Arc::new(store::keyring(config, &db).await?);
    let key_cache = Arc::new(client_keys::cache::new(
        db.clone(),
        config.key_cache_ttl,
        config.negative_cache_ttl,
    ));
    let roster_cache = Arc::new(pool::cache::new(
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
    let user_cache = Arc::new(users::cache::new(
        db.clone(),
        config.key_cache_ttl,
        config.negative_cache_ttl,
    ));
    let mut bus = Bus::new(key_cache.clone(), roster_cache.clone())
        .with_prices(price_cache.clone())
        .with_users(user_cache.clone());
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
    let invalidator: Invalidator = bus.clone();
    let prices = Prices::new(db.clone(), price_cache.clone(), invalidator.clone());
    prices
        .load(&config.prices)
        .await
        .with_context(|| format!("storing the prices of {}", crate::config::PRICES_FILE))?;
    let admission = Admission::new(
        key_cache.clone(),
        roster_cache,
        counters.clone(),
        keyring.clone(),
        price_cache,
        user_cache.clone(),
        crate::admission::Defaults {
            lease_ttl_ms: config.lease_ttl.as_millis() as i64,
            tokens: config.default_estimated_tokens,
            price: config.default_price,
        },
    );
    let admission = Arc::new(admission);
    let provider_keys = ProviderKeys::new(
        db.clone(),
        keyring.clone(),
        invalidator.clone(),
        counters.clone(),
    );
    let accounting_health = accounting::embedded::WriterHealth::default();
    let reports = Reports::new(
        admission.clone(),
        provider_keys.clone(),
        prices.clone(),
        counters.clone(),
        accounting_health.clone(),
        ProviderKeyPolicy {
            default_cooldown_ms: config.provider_cooldown.as_millis() as i64,
            lease_cooldown_max_ms: config.provider_cooldown_max.as_millis() as i64,
            suspend_ms: config.provider_suspend.as_millis() as i64,
        },
    );
    let state = AppState::new(Shared {
        keys: ClientKeys::new(
            db.clone(),
            keyring.clone(),
            config.key_prefix.clone(),
            invalidator.clone(),
        ),
        key_cache,
        users: Users::new(db.clone(), invalidator.clone()),
        user_cache,
        provider_keys,
        prices,
        db,
        admission,
        reports,
        counters,
        keyring,
        invalidator,
        admin_token_digest: config
            .admin_token
            .as_deref()
            .map(|t| crypto::digest(t.as_bytes())),
        data_token_digest: config
            .data_token
            .as_deref()
            .map(|t| crypto::digest(t.as_bytes())),
        expiry_auto_delete: config.expiry_auto_delete,
        accounting: accounting_health,
    });
    Ok(Parts {
        state,
        accounting,
        invalidation_channel,
        bus,
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

/// Starts the background jobs; the receiver, when given, hears when the invalidation
/// subscription is up.
fn spawn_background(
    parts: Parts,
    config: &Config,
    stop: &watch::Receiver<bool>,
) -> (
    AppState,
    Vec<JoinHandle<()>>,
    Option<tokio::sync::oneshot::Receiver<()>>,
) {
    let state = parts.state;
    let mut jobs = Vec::new();
    let mut listening = None;
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
            streams,
            registry,
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
                streams,
                registry,
                consumer_name(),
                config.accounting_claim_idle,
                state.db.clone(),
                stop.clone(),
            )));
            let (heard, told) = tokio::sync::oneshot::channel();
            listening = Some(told);
            jobs.push(tokio::spawn(bus::subscribe(
                *pubsub,
                parts.invalidation_channel,
                parts.bus.clone(),
                stop.clone(),
                heard,
            )));
        }
    }
    if let Counters::Redis(redis) = &state.counters {
        jobs.push(tokio::spawn(redis.clone().guard_layout(stop.clone())));
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
    // Every replica delivers spend alerts (claims keep two from sending one at once).
    jobs.push(tokio::spawn(alerts::run(
        state.db.clone(),
        config.webhook.clone(),
        stop.clone(),
    )));
    if let Some(every) = config.expiry_interval {
        jobs.push(tokio::spawn(expiry::run(
            state.keys.clone(),
            every,
            config.expiry_auto_delete,
            stop.clone(),
        )));
    }
    (state, jobs, listening)
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
        crate::limits::BackendErrorPolicy::Deny => "deny",
        crate::limits::BackendErrorPolicy::Allow => "allow",
        crate::limits::BackendErrorPolicy::Local => "local",
    };
    for m in ["deny", "allow", "local"] {
        crate::metrics::get()
            .backend_failure_mode
            .with_label_values(&[m])
            .set(i64::from(m == mode));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (state, jobs, listening) = spawn_background(parts, &config, &stop_rx);
    // Serve once this replica hears invalidations: the subscription's first clear then
    // finds the caches still empty (see `bus`). Redis down: serve anyway, later.
    if let Some(listening) = listening {
        if tokio::time::timeout(bus::LISTEN_WAIT, listening)
            .await
            .is_err()
        {
            tracing::warn!(
                "serving before the cache invalidation subscription is up; the caches are cleared once it is"
            );
        }
    }
    tracing::info!(
        data = %data.local_addr()?,
        admin = %admin.local_addr()?,
        database = ?config.backend,
        counters = match config.redis_url.as_deref() {
            Some(url) if url.starts_with("redis+cluster") || url.starts_with("rediss+cluster") => {
                "redis cluster"
            }
            Some(_) => "redis",
            None => "in-process",
        },
        // Where the counters live: a tenant's shard among this many hash tags.
        shards = %config
            .redis_url
            .as_ref()
            .map_or_else(|| "none".to_string(), |_| config.redis_shards.to_string()),
        // Not the URL: its path may hold a receiver's token.
        alerts = if config.webhook.is_some() { "webhook" } else { "queued, no webhook" },
        "keyward serving"
    );
    let served = http::serve(
        state.clone(),
        data,
        admin,
        config.shutdown_grace,
        config.max_connections_per_peer,
        shutdown,
    )
    .await;
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
    let data = listen(config.listen, crate::config::LISTEN)?;
    let admin = listen(config.admin_listen, crate::config::ADMIN_LISTEN)?;
    run(config, data, admin, shutdown_signal()).await
}

/// Binds `addr` (the setting `name`) with a listen queue of 4,096 (the kernel caps it at
/// `net.core.somaxconn`). The standard library's 128 overflowed under a burst of
/// connections that the listener closes at once (over a peer's cap), and a loopback
/// client's connection then waited a second for its SYN to be sent again.
fn listen(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<TcpListener> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    bound().with_context(|| format!("binding {addr} ({name})"))
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
