//! Start-up: turns a [`Config`] into running parts (store, keyring, services), and runs
//! the listeners and background jobs until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::client_keys::ClientKeys;
use crate::config::{Config, ENCRYPTION_KEY};
use crate::crypto::{self, Keyring};
use crate::db::{self, Backend, Db};
use crate::{expiry, http};

/// What every request handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub keys: ClientKeys,
    /// SHA-256 of `KEYWARD_ADMIN_TOKEN`; `None` disables the admin API.
    pub admin_token_digest: Option<[u8; 32]>,
    /// The expiry pass deletes (rather than disables) keys without a flag of their own.
    pub expiry_auto_delete: bool,
}

/// Where the embedded shape keeps its generated encryption key: beside the SQLite file.
pub fn key_file_for(sqlite: &std::path::Path) -> PathBuf {
    let mut name = sqlite.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

fn keyring(config: &Config) -> anyhow::Result<Keyring> {
    let current = match (config.encryption_key, config.backend) {
        (Some(key), _) => key,
        (None, Backend::Sqlite) => match db::sqlite_path(&config.database_url) {
            Some(path) => crypto::load_or_create_key_file(&key_file_for(&path))?,
            None => {
                tracing::warn!(
                    "{ENCRYPTION_KEY} is unset and the database is in memory: using a throw-away key"
                );
                crypto::random_key()
            }
        },
        // Config::from_raw refuses this combination; kept as an error, not a panic.
        (None, Backend::Postgres) => anyhow::bail!("{ENCRYPTION_KEY} is required with Postgres"),
    };
    Ok(Keyring::new(&current, &config.previous_keys))
}

/// Connects to the durable store and applies migrations.
pub async fn open_db(config: &Config) -> anyhow::Result<Db> {
    let db = Db::connect(&config.database_url)
        .await
        .with_context(|| format!("connecting to the {:?} database", config.backend))?;
    db.migrate().await.context("applying database migrations")?;
    Ok(db)
}

pub async fn build_state(config: &Config) -> anyhow::Result<AppState> {
    let db = open_db(config).await?;
    let keyring = Arc::new(keyring(config)?);
    Ok(AppState {
        keys: ClientKeys::new(db.clone(), keyring, config.key_prefix.clone()),
        db,
        admin_token_digest: config
            .admin_token
            .as_deref()
            .map(|t| crypto::digest(t.as_bytes())),
        expiry_auto_delete: config.expiry_auto_delete,
    })
}

/// Runs keyward on the given listeners until `shutdown` completes.
pub async fn run(
    config: Config,
    data: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let state = build_state(&config).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let expiry_job = config.expiry_interval.map(|every| {
        tokio::spawn(expiry::run(
            state.keys.clone(),
            every,
            config.expiry_auto_delete,
            stop_rx.clone(),
        ))
    });
    tracing::info!(
        data = %data.local_addr()?,
        admin = %admin.local_addr()?,
        backend = ?config.backend,
        "keyward serving"
    );
    let served = http::serve(state.clone(), data, admin, config.shutdown_grace, shutdown).await;
    let _ = stop_tx.send(true);
    if let Some(job) = expiry_job {
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
