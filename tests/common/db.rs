//! The test's own database: a SQLite file in a fresh temporary directory, or a fresh
//! Postgres database `kw_test_<uuid>` on the server named by `KEYWARD_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the test ends;
//! nothing shared is ever flushed. Postgres tests fail, not skip, when it is unreachable:
//! `scripts/test.sh` makes sure it runs.

use keyward::db::Db;
use sqlx::{AnyPool, Executor};

/// Where a test's database lives (`on_both_backends!` runs a test on each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn postgres_base_url() -> String {
    std::env::var("KEYWARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database of this test's own, removed on drop.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}", dir.path().join("keyward.db").display()),
                pg_name: None,
                _dir: dir,
            },
            Backend::Postgres => {
                sqlx::any::install_default_drivers();
                let base = postgres_base_url();
                let name = format!("kw_test_{}", uuid::Uuid::new_v4().simple());
                let admin = AnyPool::connect(&base).await.unwrap_or_else(|e| {
                    panic!("Postgres at {base} is unreachable ({e}); run scripts/test.sh")
                });
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .unwrap();
                admin.close().await;
                let (prefix, _) = base.rsplit_once('/').unwrap();
                TestDb {
                    url: format!("{prefix}/{name}"),
                    pg_name: Some(name),
                    _dir: dir,
                }
            }
        }
    }

    /// A database on a server the test runs itself (and so removes with it): nothing is
    /// dropped on drop.
    pub fn at(url: String) -> TestDb {
        TestDb {
            url,
            pg_name: None,
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// A direct connection (migrations applied), for setting up or checking state.
    pub async fn connect(&self) -> Db {
        let db = Db::connect(&self.url).await.unwrap();
        db.migrate().await.unwrap();
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = AnyPool::connect(&postgres_base_url()).await {
                    let _ = pool
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}
