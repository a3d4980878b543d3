//! Opening the durable store at start-up: connecting, checking it can be written,
//! migrating, and the keyring that decrypts what it holds. Every error names its
//! variable and never carries the database URL's password.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::{Config, DATABASE_URL, ENCRYPTION_KEY, ENCRYPTION_KEYS_PREVIOUS};
use crate::crypto::{self, Keyring};
use crate::db::{self, Backend, Db};

/// Where the embedded shape keeps its generated encryption key: beside the SQLite file.
pub fn key_file_for(sqlite: &std::path::Path) -> PathBuf {
    let mut name = sqlite.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

pub(super) async fn keyring(config: &Config, db: &Db) -> anyhow::Result<Keyring> {
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
    let keyring = Keyring::new(&current, &config.previous_keys);
    // A replica given another key than the one the database was written with would
    // start "ready" and then fail every selection and lease check of the others: stop
    // here. (Some stored secrets under an older key are normal while a rotation runs;
    // none at all decrypting is not.)
    let recent = db
        .recent_secrets(10)
        .await
        .with_context(|| format!("{DATABASE_URL}: reading the database"))?;
    if !recent.is_empty() && recent.iter().all(|c| keyring.decrypt(c).is_err()) {
        anyhow::bail!(
            "{ENCRYPTION_KEY}: decrypts none of the stored secrets (tried the {} most recent): the database was written with another key (set that key, or list it in {ENCRYPTION_KEYS_PREVIOUS})",
            recent.len()
        );
    }
    Ok(keyring)
}

/// Connects to the durable store; the error is one line naming `KEYWARD_DATABASE_URL`
/// and the cause, never the URL (it may hold a password).
pub async fn connect_db(url: &str) -> anyhow::Result<Db> {
    if let Some(warning) = crate::tls::postgres_unverified(url) {
        tracing::warn!("{DATABASE_URL}: {warning}");
    }
    Db::connect(url).await.map_err(|e| {
        let cause = redact(&e.to_string(), url);
        let hint = if crate::tls::is_certificate_error(&cause) {
            " (the server's certificate must be signed by a CA of the URL's sslrootcert or of the system roots and, with sslmode=verify-full or verify-ca, name the URL's host)"
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
pub(super) fn redact(text: &str, url: &str) -> String {
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
