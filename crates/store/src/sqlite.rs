//! [`SqliteWriter`]: the batch writer's own SQLite connection.
//!
//! Every request becomes a usage event, so on SQLite the writer is the store's hot path, and it
//! gets a connection of its own through rusqlite (the same bundled SQLite that sqlx links):
//! one `BEGIN IMMEDIATE` transaction per batch on a blocking thread, multi-row inserts of a
//! fixed shape (64, 8 and 1 rows) prepared once and only bound after that. Through sqlx each
//! bound value was copied into an owned argument, sent to the connection's worker thread and
//! bound there, which cost as much CPU as SQLite's own work on the row. Everything else (queries, admin tables, migrations)
//! stays on sea-orm's pool; WAL mode lets readers run beside this writer, and both sides wait
//! for the write lock (`busy_timeout`) instead of failing.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, params};

use crate::write::{SHAPES, runs};
use crate::{StoreError, StoredEvent};

const HOUR_MS: i64 = 3_600_000;

const INSERT_EVENT: &str = "INSERT INTO usage_events (id, at_ms, gateway, caller, model, \
     key_name, provider, attempts, status, stream, latency_ms, ttfb_ms, prompt_tokens, \
     completion_tokens, total_tokens, client_ip, user_agent, error) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)";
const SKIP_STORED: &str = " ON CONFLICT (id) DO NOTHING";
const EVENT_ARITY: usize = 18;

/// `INSERT INTO usage_events ... VALUES (...), (...)` with `rows` rows, by shape.
static INSERT_EVENTS: LazyLock<[String; SHAPES.len()]> = LazyLock::new(|| {
    SHAPES.map(|rows| {
        let (head, _) = INSERT_EVENT.split_at(INSERT_EVENT.find("VALUES").unwrap_or(0));
        let row = format!("({})", vec!["?"; EVENT_ARITY].join(", "));
        format!("{head}VALUES {}", vec![row; rows].join(", "))
    })
});
const INSERT_LOG: &str = "INSERT INTO request_logs (event_id, at_ms, request_headers, \
     request_body, response_body) VALUES (?1, ?2, ?3, ?4, ?5)";
const UPSERT_ROLLUP: &str = "INSERT INTO usage_hourly (hour_ms, gateway, key_name, model, \
     calls, errors, prompt_tokens, completion_tokens, total_tokens) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
     ON CONFLICT (hour_ms, gateway, key_name, model) DO UPDATE SET \
     calls = usage_hourly.calls + excluded.calls, \
     errors = usage_hourly.errors + excluded.errors, \
     prompt_tokens = usage_hourly.prompt_tokens + excluded.prompt_tokens, \
     completion_tokens = usage_hourly.completion_tokens + excluded.completion_tokens, \
     total_tokens = usage_hourly.total_tokens + excluded.total_tokens";

/// The writer's connection, opened on first use and again after an error.
pub(crate) struct SqliteWriter {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
}

/// A rollup row's sums.
#[derive(Default)]
pub(crate) struct Rollup {
    pub calls: i64,
    pub errors: i64,
    pub prompt: i64,
    pub completion: i64,
    pub total: i64,
}

/// The hourly rollups of the `new` events: `(hour, gateway, key, model)` → sums.
pub(crate) fn rollups<'a>(
    events: &'a [StoredEvent],
    new: &[usize],
) -> BTreeMap<(i64, &'a str, &'a str, &'a str), Rollup> {
    let mut groups: BTreeMap<(i64, &str, &str, &str), Rollup> = BTreeMap::new();
    for &i in new {
        let e = &events[i];
        let hour = e.at_ms - e.at_ms.rem_euclid(HOUR_MS);
        let g = groups
            .entry((
                hour,
                &e.gateway,
                e.key_name.as_deref().unwrap_or(""),
                &e.model,
            ))
            .or_default();
        g.calls += 1;
        g.errors += i64::from(e.status >= 400);
        g.prompt += e.prompt_tokens.unwrap_or(0);
        g.completion += e.completion_tokens.unwrap_or(0);
        g.total += e.total_tokens.unwrap_or(0);
    }
    groups
}

/// Indices of the first event with each id.
pub(crate) fn unique(events: &[StoredEvent]) -> Vec<usize> {
    let mut first = HashSet::with_capacity(events.len());
    (0..events.len())
        .filter(|&i| first.insert(events[i].id.as_str()))
        .collect()
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
            // a broken connection must not be reused; a constraint failure costs a reopen
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

/// Binds one event's 18 values from parameter `offset + 1` on.
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
    bind(&e.error)
}

fn write_batch(
    conn: &mut Connection,
    events: &[StoredEvent],
    dedupe: bool,
) -> Result<Vec<usize>, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // the statements borrow the transaction: they are done before it commits
    let new = {
        let new = if dedupe {
            // retries and replays: one row at a time, to learn which ids were already stored
            let mut insert = tx.prepare_cached(&format!("{INSERT_EVENT}{SKIP_STORED}"))?;
            let mut kept = Vec::with_capacity(events.len());
            for i in unique(events) {
                bind_event(&mut insert, 0, &events[i])?;
                if insert.raw_execute()? > 0 {
                    kept.push(i);
                }
            }
            kept
        } else {
            // a fresh batch: an id stored twice fails it on the primary key
            let mut insert: Option<(usize, rusqlite::CachedStatement<'_>)> = None;
            let mut at = 0;
            for (shape, rows) in runs(events.len()) {
                let stmt = match &mut insert {
                    Some((s, stmt)) if *s == shape => stmt,
                    _ => {
                        &mut insert
                            .insert((shape, tx.prepare_cached(&INSERT_EVENTS[shape])?))
                            .1
                    }
                };
                for (n, e) in events[at..at + rows].iter().enumerate() {
                    bind_event(stmt, n * EVENT_ARITY, e)?;
                }
                stmt.raw_execute()?;
                at += rows;
            }
            (0..events.len()).collect()
        };
        let mut log = tx.prepare_cached(INSERT_LOG)?;
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
        let mut rollup = tx.prepare_cached(UPSERT_ROLLUP)?;
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
                r.total
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
    fn the_writer_needs_a_file() {
        let w = SqliteWriter::for_url("sqlite:///tmp/x/kp.sqlite?mode=rwc").unwrap();
        assert_eq!(w.path, PathBuf::from("/tmp/x/kp.sqlite"));
        let w = SqliteWriter::for_url("sqlite:relative.db").unwrap();
        assert_eq!(w.path, PathBuf::from("relative.db"));
        assert!(SqliteWriter::for_url("sqlite::memory:").is_err());
    }
}
