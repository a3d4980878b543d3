//! The durable store's connection: Postgres (distributed) or SQLite (embedded).
//!
//! Architecture invariant: the rest of the code does not know which backend it talks to.
//! Both are reached through sqlx's runtime-generic `Any` driver with the same SQL text:
//! `$N` placeholders (SQLite accepts them too), integer Unix milliseconds for time,
//! integer micro-USD for money, JSON text for lists, and aggregates cast to `BIGINT` or
//! `DOUBLE PRECISION` so both report the same types. Only the migrations differ, one
//! directory per backend, applied at start-up and by `keyward migrate`; they are embedded
//! at compile time, so a fresh clone builds with no database running.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Connection, Executor};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }
}

/// A failure of the durable store. `Unavailable` means "try again later" (connection,
/// pool or I/O trouble, a busy or read-only file, a serialization conflict); `Query` is
/// any other refusal by the database; `OutOfRange` is a value keyward itself refused to
/// write because a column would leave its range.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("value out of range: {0}")]
    OutOfRange(String),
}

impl StoreError {
    /// The database refused this data itself, and would refuse it again on every retry:
    /// a constraint, a trigger, a value it cannot store (NUL in text, BIGINT overflow),
    /// or [`StoreError::OutOfRange`]. Anything else (unreachable, busy, a missing table, a
    /// permission) may pass later, so the accounting writer keeps retrying it instead of
    /// setting the record aside.
    pub fn refused_data(&self) -> bool {
        match self {
            StoreError::OutOfRange(_) => true,
            StoreError::Query(sqlx::Error::Database(db)) => {
                code_of(db.as_ref()).is_some_and(|code| code.refuses_data())
            }
            _ => false,
        }
    }
}

/// A database error's code, by backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code<'a> {
    /// A SQLSTATE.
    Postgres(&'a str),
    /// An extended result code; its low byte is the primary code.
    Sqlite(i64),
}

fn code_of(db: &dyn sqlx::error::DatabaseError) -> Option<Code<'_>> {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return Some(Code::Postgres(pg.code()));
    }
    let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    let code = sqlx::error::DatabaseError::code(sqlite)?;
    code.parse().ok().map(Code::Sqlite)
}

impl Code<'_> {
    /// A refusal of the data itself. Postgres: class 22 (data exception: NUL in text,
    /// BIGINT out of range), 23 (integrity constraint), P0 (a PL/pgSQL `RAISE`). SQLite:
    /// TOOBIG (18), CONSTRAINT (19, including a trigger's `RAISE`), MISMATCH (20),
    /// RANGE (25).
    fn refuses_data(self) -> bool {
        match self {
            Code::Postgres(state) => ["22", "23", "P0"].iter().any(|c| state.starts_with(c)),
            Code::Sqlite(code) => matches!(code & 0xff, 18 | 19 | 20 | 25),
        }
    }

    /// "Not now" rather than "never". Postgres: classes 08 (connection), 40
    /// (serialization failure, deadlock), 53 (insufficient resources), 57 (shutdown,
    /// cannot connect now), 58 (system I/O). SQLite: BUSY (5), LOCKED (6), NOMEM (7),
    /// READONLY (8), IOERR (10), FULL (13), CANTOPEN (14).
    fn transient(self) -> bool {
        match self {
            Code::Postgres(state) => ["08", "40", "53", "57", "58"]
                .iter()
                .any(|c| state.starts_with(c)),
            Code::Sqlite(code) => matches!(code & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => StoreError::Unavailable(e),
            sqlx::Error::Database(ref db) if code_of(db.as_ref()).is_some_and(Code::transient) => {
                StoreError::Unavailable(e)
            }
            other => StoreError::Query(other),
        }
    }
}

/// The durable store: sqlx's pool of connections, held in `sql` (the project keeps the
/// word "pool" for the provider-key pool).
#[derive(Clone, Debug)]
pub struct Db {
    pub(crate) sql: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connects (creating the SQLite file if needed). Does not run migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)
            .ok_or_else(|| anyhow::anyhow!("unsupported database URL scheme"))?;
        let sql = match backend {
            Backend::Postgres => {
                let options = AnyConnectOptions::from_str(url)?;
                // One connection first: its error says why (refused, unknown host, bad
                // password), where the pool's says only that it timed out.
                let probe = tokio::time::timeout(
                    Duration::from_secs(10),
                    sqlx::AnyConnection::connect_with(&options),
                )
                .await
                .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
                probe.close().await?;
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(3))
                    .connect_with(options)
                    .await?
            }
            Backend::Sqlite => {
                let memory = url.contains(":memory:") || url.contains("mode=memory");
                let url = sqlite_url_with_create(url);
                let options = AnyConnectOptions::from_str(&url)?;
                // An in-memory database lives as long as its one connection does.
                let (max, lifetime) = if memory {
                    (1, None)
                } else {
                    (8, Some(Duration::from_secs(1800)))
                };
                AnyPoolOptions::new()
                    .max_connections(max)
                    .min_connections(if memory { 1 } else { 0 })
                    .max_lifetime(lifetime)
                    .idle_timeout(if memory { None } else { Some(Duration::from_secs(600)) })
                    .acquire_timeout(Duration::from_secs(5))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets readers proceed while the accounting writer writes;
                            // busy_timeout makes concurrent writers wait instead of failing.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    // After a failed COMMIT (a disk I/O error, a file turned read-only)
                    // sqlx's SQLite driver can believe a transaction is still open and
                    // turn the next `begin` into a SAVEPOINT inside a transaction that
                    // SQLite keeps open: its "commit" then succeeds and writes nothing.
                    // A connection handed back with a transaction SQLite still holds
                    // (its ROLLBACK succeeds) is therefore dropped, not reused.
                    .after_release(|conn, _| {
                        Box::pin(async move { Ok(conn.execute("ROLLBACK").await.is_err()) })
                    })
                    .connect_with(options)
                    .await?
            }
        };
        Ok(Db { sql, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies every pending migration of this backend (idempotent; on Postgres sqlx
    /// holds an advisory lock, so replicas starting together do not race).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = match self.backend {
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::Sqlite => &SQLITE_MIGRATIONS,
        };
        migrator.run(&self.sql).await?;
        Ok(())
    }

    /// A cheap round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.sql).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.sql.close().await;
    }

    /// Fails when the database cannot be written (a read-only file or file system):
    /// creates a table in a transaction that is rolled back, so nothing stays behind.
    /// Reads alone would succeed, and keyward would seem ready while every write failed.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let mut tx = self.sql.begin().await?;
        sqlx::query("CREATE TABLE keyward_write_check (x INTEGER)")
            .execute(&mut *tx)
            .await?;
        tx.rollback().await?;
        Ok(())
    }

    /// Whether any client or provider key secret is stored (encrypted): then a new
    /// encryption key could decrypt none of them.
    pub async fn holds_secrets(&self) -> Result<bool, StoreError> {
        let found = sqlx::query(
            "SELECT id FROM client_keys WHERE key_encrypted LIKE 'enc:v1:%' \
             UNION ALL SELECT id FROM provider_keys WHERE key_encrypted LIKE 'enc:v1:%' LIMIT 1",
        )
        .fetch_optional(&self.sql)
        .await?;
        Ok(found.is_some())
    }

    /// The `per_table` most recently created ciphertexts of each table holding secrets:
    /// what start-up tries its keyring on.
    pub async fn recent_secrets(&self, per_table: i64) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for table in ["client_keys", "provider_keys"] {
            let rows: Vec<(String,)> = sqlx::query_as(&format!(
                "SELECT key_encrypted FROM {table} WHERE key_encrypted LIKE 'enc:v1:%' \
                 ORDER BY created_at DESC LIMIT $1"
            ))
            .bind(per_table)
            .fetch_all(&self.sql)
            .await?;
            out.extend(rows.into_iter().map(|(c,)| c));
        }
        Ok(out)
    }
}

/// A table holding an encrypted secret in a `key_encrypted` column.
#[derive(Debug, Clone, Copy)]
pub enum SecretTable {
    ClientKeys,
    ProviderKeys,
}

impl Db {
    /// Replaces a ciphertext, only if it is still the one that was read (a concurrent
    /// change wins over re-encryption). `false` when it was not replaced.
    pub async fn replace_secret(
        &self,
        table: SecretTable,
        id: &str,
        old: &str,
        new: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let sql = match table {
            SecretTable::ClientKeys => {
                "UPDATE client_keys SET key_encrypted = $3, updated_at = $4 WHERE id = $1 AND key_encrypted = $2"
            }
            SecretTable::ProviderKeys => {
                "UPDATE provider_keys SET key_encrypted = $3, updated_at = $4 WHERE id = $1 AND key_encrypted = $2"
            }
        };
        let done = sqlx::query(sql)
            .bind(id)
            .bind(old)
            .bind(new)
            .bind(now)
            .execute(&self.sql)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// Adds `mode=rwc` so that sqlx creates a missing SQLite file instead of failing.
fn sqlite_url_with_create(url: &str) -> String {
    if url.contains("mode=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

/// The file behind a SQLite URL, or `None` for an in-memory database.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" || url.contains("mode=memory") {
        None
    } else {
        Some(PathBuf::from(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(Backend::of_url("postgres://x/y"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("sqlite::memory:"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("mysql://x"), None);
        assert_eq!(
            sqlite_path("sqlite://keyward.db"),
            Some(PathBuf::from("keyward.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///var/k.db?mode=rwc"),
            Some(PathBuf::from("/var/k.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        // Refusals of the data: constraint, trigger RAISE (SQLITE_CONSTRAINT_TRIGGER),
        // data exceptions, PL/pgSQL RAISE; not: busy, read-only, connection trouble.
        let refused = [
            Code::Sqlite(19),
            Code::Sqlite(1811),
            Code::Sqlite(2067),
            Code::Postgres("23505"),
            Code::Postgres("22021"),
            Code::Postgres("22003"),
            Code::Postgres("P0001"),
        ];
        for code in refused {
            assert!(code.refuses_data() && !code.transient(), "{code:?}");
        }
        let transient = [
            Code::Sqlite(5),
            Code::Sqlite(517),
            Code::Sqlite(8),
            Code::Sqlite(1032),
            Code::Postgres("08006"),
            Code::Postgres("40001"),
            Code::Postgres("57P01"),
            Code::Postgres("53300"),
        ];
        for code in transient {
            assert!(code.transient() && !code.refuses_data(), "{code:?}");
        }
        for code in [
            Code::Sqlite(1),
            Code::Postgres("42P01"),
            Code::Postgres("42501"),
            Code::Postgres("XX000"),
        ] {
            assert!(!code.transient() && !code.refuses_data(), "{code:?}");
        }
    }
}
