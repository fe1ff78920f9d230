//! `usage_events` loses its primary key: ids stay unique, kept so by the writer, not by an index.
//!
//! The unique index on `id` was half of every stored event's cost (SQLite writer 3.4–3.8 →
//! 1.7–1.9 µs of CPU per event, PostgreSQL server 5.8 → 3.6 µs, measured with
//! `crates/store/examples/write_cost.rs`), while the only reads by event id go to
//! `request_logs`, which keeps its own. The store's writer keeps each id once instead: a fresh
//! batch holds ids minted for it, and a retry or replay looks its ids up by `at_ms` (an event's
//! time never changes, and that index stays) before inserting, under a lock that orders it
//! after every write in flight (docs/DECISIONS.md, "Event ids unique without an index").
//!
//! SQLite cannot drop a primary key: the table is rebuilt with the same columns and its time
//! index. `down` restores the key; it fails if some id was stored twice.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const PG_UP: &str = "ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_pkey";
const PG_DOWN: &str = "ALTER TABLE usage_events ADD CONSTRAINT usage_events_pkey PRIMARY KEY (id)";

/// The columns after `id`, as migrations 1 and 2 created them on SQLite.
const SQLITE_COLUMNS: &str = r#""at_ms" bigint NOT NULL, "gateway" varchar NOT NULL,
    "caller" varchar NULL, "model" varchar NOT NULL, "key_name" varchar NULL,
    "attempts" integer NOT NULL, "status" integer NOT NULL, "stream" boolean NOT NULL,
    "latency_ms" bigint NOT NULL, "ttfb_ms" bigint NULL, "prompt_tokens" bigint NULL,
    "completion_tokens" bigint NULL, "total_tokens" bigint NULL, "client_ip" varchar NULL,
    "user_agent" varchar NULL, "error" varchar NULL, "provider" varchar NULL"#;

const SQLITE_NAMES: &str = "id, at_ms, gateway, caller, model, key_name, attempts, status, \
     stream, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, client_ip, \
     user_agent, error, provider";

/// Rebuilds SQLite's `usage_events` with `id` declared as `id` (`"id" varchar(32) NOT NULL`,
/// then ` PRIMARY KEY` or nothing).
fn sqlite_rebuild(id: &str) -> String {
    format!(
        r#"CREATE TABLE "usage_events_next" ({id}, {SQLITE_COLUMNS});
INSERT INTO "usage_events_next" ({SQLITE_NAMES}) SELECT {SQLITE_NAMES} FROM "usage_events";
DROP TABLE "usage_events";
ALTER TABLE "usage_events_next" RENAME TO "usage_events";
CREATE INDEX "idx_usage_events_at" ON "usage_events" ("at_ms");"#
    )
}

/// Runs `postgres` on PostgreSQL, or rebuilds the table on SQLite with `id` declared as
/// `sqlite_id`.
async fn apply(m: &SchemaManager<'_>, postgres: &str, sqlite_id: &str) -> Result<(), DbErr> {
    let sql = match m.get_database_backend() {
        DbBackend::Postgres => postgres.to_owned(),
        DbBackend::Sqlite => sqlite_rebuild(sqlite_id),
        _ => return Ok(()),
    };
    m.get_connection().execute_unprepared(&sql).await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        apply(m, PG_UP, r#""id" varchar(32) NOT NULL"#).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        apply(m, PG_DOWN, r#""id" varchar(32) NOT NULL PRIMARY KEY"#).await
    }
}
