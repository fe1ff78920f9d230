//! The store: usage events, request logs, hourly rollups and per-key counters in SQLite or
//! PostgreSQL through sea-orm, and the batched, durable writer that feeds it.
//!
//! Lifecycle: [`Store::connect`] opens the database and runs the migrations; [`UsageWriter::start`]
//! takes events from the request path through a bounded queue ([`WriterSink`]) and writes them in
//! batches; while the database is unavailable it spills batches to an fsync'd file and replays them
//! later; [`UsageWriter::shutdown`] flushes. Each event id is written once, replays included.

mod admin;
mod audit;
pub mod entity;
mod event;
mod overflow;
mod pg_write;
mod query;
mod spill;
mod sqlite;
mod write;
mod writer;

use std::time::Duration;

use keypool_config::StoreConfig;
use keypool_migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbBackend};

pub use admin::{GatewayRow, KeyRow};
pub use audit::AuditRow;
pub use event::{StoredEvent, StoredLog};
pub use query::{Grouping, HourCalls, KeyCounterRow, LATEST_MS, UsageTotal};
pub use writer::{BatchTarget, TargetError, UsageWriter, WriterSink, WriterStats};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// From the batch writer, which talks to sqlx directly (see `write.rs`).
    #[error("database: {0}")]
    Sql(#[from] sea_orm::sqlx::Error),
    #[error("spill file {path}: {source}")]
    Spill {
        path: String,
        source: std::io::Error,
    },
}

/// An open database with keypool's schema.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// On SQLite: the batch writer's own connection (see `sqlite.rs`).
    sqlite: Option<std::sync::Arc<sqlite::SqliteWriter>>,
    /// On PostgreSQL: the first heap block whose BRIN range this process has not summarized
    /// (see `write.rs`).
    summarized: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// The connection URL for a store config: SQLite files are created when missing; PostgreSQL
/// accepts a URL or openai-api-route's `host=... port=... user=... dbname=...` form.
pub fn database_url(config: &StoreConfig) -> Option<String> {
    match config {
        StoreConfig::None => None,
        StoreConfig::Sqlite { path } => Some(format!("sqlite://{path}?mode=rwc")),
        StoreConfig::Postgres { dsn } => Some(postgres_url(dsn)),
    }
}

/// `host=h port=p user=u password=w dbname=d sslmode=m` → `postgres://u:w@h:p/d?sslmode=m`. A
/// host that starts with `/` is the directory of the server's Unix socket, as for libpq
/// (`?host=/dir` in the URL).
fn postgres_url(dsn: &str) -> String {
    if dsn.contains("://") {
        return dsn.to_owned();
    }
    let mut host = "127.0.0.1";
    let mut port = "5432";
    let (mut user, mut password, mut dbname, mut sslmode) = ("postgres", "", "postgres", "");
    for pair in dsn.split_whitespace() {
        if let Some((k, v)) = pair.split_once('=') {
            match k {
                "host" => host = v,
                "port" => port = v,
                "user" => user = v,
                "password" => password = v,
                "dbname" => dbname = v,
                "sslmode" => sslmode = v,
                _ => {}
            }
        }
    }
    let auth = if password.is_empty() {
        user.to_owned()
    } else {
        format!("{user}:{password}")
    };
    let mut query = Vec::new();
    if host.starts_with('/') {
        query.push(format!("host={host}"));
        host = "localhost";
    }
    if !sslmode.is_empty() {
        query.push(format!("sslmode={sslmode}"));
    }
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    format!("postgres://{auth}@{host}:{port}/{dbname}{query}")
}

impl Store {
    /// Connects and runs pending migrations.
    ///
    /// Replicas starting together on a fresh database race to migrate it; the loser's attempt
    /// fails on what the winner created, so a failed migration is retried (it then finds the
    /// migrations applied).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect_only(url).await?;
        let mut tries = 0;
        loop {
            match store.migrate_up().await {
                Ok(()) => return Ok(store),
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::warn!(error = %e, "migrating the store failed; retrying (another replica migrating?)");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connects without migrating (for `keypool migrate` and tests).
    pub async fn connect_only(url: &str) -> Result<Self, StoreError> {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.max_connections(4)
            .min_connections(0)
            .connect_timeout(Duration::from_secs(3))
            .acquire_timeout(Duration::from_secs(3))
            .sqlx_logging(false)
            // on every pooled connection (a PRAGMA run once reaches only one of them):
            // readers never block the writer; fsync at checkpoints, not at every commit
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(5))
            });
        let db = Database::connect(opts).await?;
        let sqlite = match db.get_database_backend() {
            DbBackend::Sqlite => Some(sqlite::SqliteWriter::for_url(url)?),
            _ => None,
        };
        Ok(Self {
            db,
            sqlite,
            summarized: std::sync::Arc::default(),
        })
    }

    pub async fn migrate_up(&self) -> Result<(), StoreError> {
        Migrator::up(&self.db, None).await?;
        Ok(())
    }

    /// Reverts every migration (tests, and `keypool migrate --down`).
    pub async fn migrate_down(&self) -> Result<(), StoreError> {
        Migrator::down(&self.db, None).await?;
        Ok(())
    }

    /// Names of the migrations applied.
    pub async fn applied_migrations(&self) -> Result<Vec<String>, StoreError> {
        Ok(Migrator::get_applied_migrations(&self.db)
            .await?
            .iter()
            .map(|m| m.name().to_owned())
            .collect())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub async fn close(self) {
        let _ = self.db.close().await;
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::sqlx;

    /// WAL and `synchronous=NORMAL` on every pooled SQLite connection, not only the first (a
    /// PRAGMA run once reached one connection of four): the pool's four held at once.
    #[tokio::test]
    async fn every_pooled_sqlite_connection_is_wal_with_synchronous_normal() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/kp.sqlite?mode=rwc", dir.path().display());
        let store = super::Store::connect(&url).await.unwrap();
        let pool = store.db.get_sqlite_connection_pool();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(pool.acquire().await.unwrap());
        }
        for conn in &mut held {
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!((synchronous, journal.as_str()), (1, "wal"));
        }
        drop(held);
        store.close().await;
    }

    #[test]
    fn postgres_key_value_form() {
        assert_eq!(
            super::postgres_url(
                "host=127.0.0.1 port=5432 user=postgres dbname=openai_api_route sslmode=disable password=woshimima"
            ),
            "postgres://postgres:woshimima@127.0.0.1:5432/openai_api_route?sslmode=disable"
        );
        assert_eq!(super::postgres_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            super::postgres_url("host=/var/run/postgresql user=kp dbname=usage sslmode=disable"),
            "postgres://kp@localhost:5432/usage?host=/var/run/postgresql&sslmode=disable"
        );
    }
}
