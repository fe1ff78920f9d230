//! [`SqliteWriter`]: the batch writer's own SQLite connection.
//!
//! Every request becomes a usage event, so on SQLite the writer is the store's hot path, and it
//! gets a connection of its own through rusqlite (the same bundled SQLite that sqlx links):
//! one `BEGIN IMMEDIATE` transaction per batch, multi-row inserts of a fixed shape (64, 8 and 1
//! rows; the statements are [`SQLITE`]'s) prepared once and only bound after that. Through sqlx
//! each bound value was copied into an owned argument, sent to the connection's worker thread
//! and bound there, which cost as much CPU as SQLite's own work on the row. Everything else
//! (queries, admin tables, migrations) stays on sea-orm's pool; WAL mode lets readers run
//! beside this writer, and both sides wait for the write lock (`busy_timeout`) instead of
//! failing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, params};

use crate::write::{EVENT_ARITY, SHAPES, SQLITE, rollups, runs, unique};
use crate::{StoreError, StoredEvent};

/// The writer's connection, opened on first use and again after an error.
pub(crate) struct SqliteWriter {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
}

impl SqliteWriter {
    /// The writer for the database file of a `sqlite:` URL (`sqlite://PATH?mode=rwc`).
    pub(crate) fn for_url(url: &str) -> Result<Arc<Self>, StoreError> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let path = rest.split('?').next().unwrap_or_default();
        if path.is_empty() || path.starts_with(":memory:") {
            return Err(StoreError::Db(sea_orm::DbErr::Custom(format!(
                "dbaddr must name a SQLite file, got {url:?}"
            ))));
        }
        Ok(Arc::new(Self {
            path: PathBuf::from(path),
            conn: Mutex::new(None),
        }))
    }

    /// Writes a batch in one transaction, on a blocking thread (this one, on a multi-thread
    /// runtime; a copy of the batch on the blocking pool otherwise); answers the indices of the
    /// events that were new. `dedupe`: skip ids already stored (retries, replays); otherwise a
    /// stored id fails the whole batch (and the writer retries it with `dedupe`).
    pub(crate) async fn write(
        self: &Arc<Self>,
        events: &[StoredEvent],
        dedupe: bool,
    ) -> Result<Vec<usize>, StoreError> {
        let sqlite =
            |e: rusqlite::Error| StoreError::Db(sea_orm::DbErr::Custom(format!("sqlite: {e}")));
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            // the batch stays where it is: this runtime thread blocks, its other tasks move on
            return tokio::task::block_in_place(|| self.write_blocking(events, dedupe))
                .map_err(sqlite);
        }
        let this = self.clone();
        let events = events.to_vec();
        tokio::task::spawn_blocking(move || this.write_blocking(&events, dedupe))
            .await
            .map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(e.to_string())))?
            .map_err(sqlite)
    }

    fn write_blocking(
        &self,
        events: &[StoredEvent],
        dedupe: bool,
    ) -> Result<Vec<usize>, rusqlite::Error> {
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let conn = match guard.as_mut() {
            Some(c) => c,
            None => guard.insert(self.open()?),
        };
        let outcome = write_batch(conn, events, dedupe);
        if outcome.is_err() {
            // a broken connection must not be reused; any other failure costs a reopen
            *guard = None;
        }
        outcome
    }

    fn open(&self) -> Result<Connection, rusqlite::Error> {
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.set_prepared_statement_cache_capacity(16);
        Ok(conn)
    }
}

/// Binds one event's 25 values from parameter `offset + 1` on.
fn bind_event(
    stmt: &mut rusqlite::CachedStatement<'_>,
    offset: usize,
    e: &StoredEvent,
) -> Result<(), rusqlite::Error> {
    let mut n = offset;
    let mut bind = |v: &dyn rusqlite::ToSql| {
        n += 1;
        stmt.raw_bind_parameter(n, v)
    };
    bind(&e.id)?;
    bind(&e.at_ms)?;
    bind(&e.gateway)?;
    bind(&e.caller)?;
    bind(&e.model)?;
    bind(&e.key_name)?;
    bind(&e.provider)?;
    bind(&e.attempts)?;
    bind(&e.status)?;
    bind(&e.stream)?;
    bind(&e.latency_ms)?;
    bind(&e.ttfb_ms)?;
    bind(&e.prompt_tokens)?;
    bind(&e.completion_tokens)?;
    bind(&e.total_tokens)?;
    bind(&e.client_ip)?;
    bind(&e.user_agent)?;
    bind(&e.error)?;
    bind(&e.cache_read_tokens)?;
    bind(&e.cache_write_tokens)?;
    bind(&e.cache_write_1h_tokens)?;
    bind(&e.cost_pico)?;
    bind(&e.requested_model)?;
    bind(&e.cache_hit)?;
    bind(&e.guardrails)
}

fn write_batch(
    conn: &mut Connection,
    events: &[StoredEvent],
    dedupe: bool,
) -> Result<Vec<usize>, rusqlite::Error> {
    // `Immediate`: the transaction holds SQLite's write lock from its start, so what a retry
    // looks up stays true until it commits
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // the statements borrow the transaction: they are done before it commits
    let new = {
        let mut new = unique(events);
        if dedupe {
            // retries and replays: skip the ids stored already, found by their time
            let mut stored = tx.prepare_cached(
                "SELECT 1 FROM usage_events WHERE at_ms = ?1 AND id = ?2 LIMIT 1",
            )?;
            let mut keep = Vec::with_capacity(new.len());
            for i in new {
                if !stored.exists(params![events[i].at_ms, events[i].id])? {
                    keep.push(i);
                }
            }
            new = keep;
        }
        let mut insert: Option<(usize, rusqlite::CachedStatement<'_>)> = None;
        let mut at = 0;
        for (shape, rows) in runs(new.len()) {
            let stmt = match &mut insert {
                Some((s, stmt)) if *s == shape => stmt,
                _ => {
                    &mut insert
                        .insert((shape, tx.prepare_cached(&SQLITE.events[shape])?))
                        .1
                }
            };
            for (n, &i) in new[at..at + rows].iter().enumerate() {
                bind_event(stmt, n * EVENT_ARITY, &events[i])?;
            }
            stmt.raw_execute()?;
            at += rows;
        }
        let mut log = tx.prepare_cached(&SQLITE.logs[SHAPES.len() - 1])?;
        for &i in &new {
            let e = &events[i];
            if let Some(l) = &e.log {
                log.execute(params![
                    e.id,
                    e.at_ms,
                    l.request_headers,
                    l.request_body,
                    l.response_body
                ])?;
            }
        }
        let mut rollup = tx.prepare_cached(&SQLITE.rollup)?;
        for ((hour, gateway, key, model), r) in rollups(events, &new) {
            rollup.execute(params![
                hour,
                gateway,
                key,
                model,
                r.calls,
                r.errors,
                r.prompt,
                r.completion,
                r.total,
                r.cache_read,
                r.cache_write,
                r.cache_write_1h,
                r.cost_pico
            ])?;
        }
        new
    };
    tx.commit()?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writers_connection_is_wal_with_synchronous_normal() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/kp.sqlite?mode=rwc", dir.path().display());
        let conn = SqliteWriter::for_url(&url).unwrap().open().unwrap();
        let synchronous: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        let journal: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!((synchronous, journal.as_str()), (1, "wal"));
    }

    #[test]
    fn the_writer_needs_a_file() {
        let w = SqliteWriter::for_url("sqlite:///tmp/x/kp.sqlite?mode=rwc").unwrap();
        assert_eq!(w.path, PathBuf::from("/tmp/x/kp.sqlite"));
        let w = SqliteWriter::for_url("sqlite:relative.db").unwrap();
        assert_eq!(w.path, PathBuf::from("relative.db"));
        assert!(SqliteWriter::for_url("sqlite::memory:").is_err());
    }
}
