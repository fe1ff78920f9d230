//! Writing a batch: events once each, their logs, and the hourly rollups, in one transaction.
//!
//! This is the store's hot path (every request becomes an event). SQLite batches go to the
//! writer's own connection ([`crate::sqlite`]). PostgreSQL batches go through sqlx, sea-orm's
//! own driver, as `COPY`, PostgreSQL's bulk path (a small batch as one insert of arrays,
//! [`COPY_FROM`]); logs by inserts of a fixed shape (64, 8 and
//! 1 rows: a batch of any size is a sum of those), each prepared once per connection; the
//! rollups in one statement over arrays. Fixed costs count: at ~1,500 events a batch, each
//! statement's round trip and executor start cost about as much server CPU as 50 rows of the
//! `COPY`. sea-orm's `insert_many` built a new statement for every batch size (its SQL
//! text, then a fresh prepare of up to 18,000 parameters) and cost ~17 µs of CPU per event, as
//! much as serving the request.
//!
//! Event ids are unique without a unique index (which cost half of every stored event): a
//! batch stores each of its ids once, a fresh batch holds only ids minted for it, and a retry
//! or replay first looks up which of its ids are stored, by their time (an event's `at_ms`
//! never changes and is indexed). On PostgreSQL, where several processes write, that lookup
//! runs under an exclusive advisory lock that every fresh batch takes shared: it waits for the
//! writes in flight (a fresh batch whose commit answer was lost may still be committing) and
//! keeps new ones out until it commits. On SQLite every write transaction is exclusive.

use std::collections::{BTreeMap, HashSet};
use std::sync::LazyLock;

use sea_orm::DbBackend;
use sea_orm::sqlx::{self, Postgres};

use crate::pg_write::{
    BEGIN_FRESH, BEGIN_RETRY, SUMMARIZE, copy_text, insert_arrays, stored_ids, write_rest,
};
use crate::{Store, StoreError, StoredEvent};

pub(crate) const HOUR_MS: i64 = 3_600_000;

/// Rows per multi-row insert, largest first; the last must be 1.
pub(crate) const SHAPES: [usize; 3] = [64, 8, 1];

const EVENT_COLUMNS: &str = "id, at_ms, gateway, caller, model, key_name, provider, attempts, \
     status, stream, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, \
     client_ip, user_agent, error, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, \
     cost_pico, requested_model, cache_hit, guardrails";
pub(crate) const EVENT_ARITY: usize = 25;
const LOG_COLUMNS: &str = "event_id, at_ms, request_headers, request_body, response_body";
const LOG_ARITY: usize = 5;

/// The two dialects the writer speaks.
#[derive(Clone, Copy)]
enum Dialect {
    /// Placeholders `$1, $2, ...`.
    Postgres,
    /// Placeholders `?, ?, ...`, bound by position.
    Sqlite,
}

/// `{verb} {table} ({columns}) VALUES (...), ...`: `rows` rows of `arity` placeholders, then
/// `tail`.
fn insert(
    dialect: Dialect,
    verb: &str,
    table: &str,
    columns: &str,
    (arity, rows): (usize, usize),
    tail: &str,
) -> String {
    let mut sql = format!("{verb} {table} ({columns}) VALUES ");
    let mut n = 0;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..arity {
            if c > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match dialect {
                Dialect::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
                Dialect::Sqlite => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

const ROLLUP_COLUMNS: &str = "hour_ms, gateway, key_name, model, calls, errors, \
     prompt_tokens, completion_tokens, total_tokens, cache_read_tokens, cache_write_tokens, \
     cache_write_1h_tokens, cost_pico";
const ROLLUP_ARITY: usize = 13;

/// The token and cost columns events and rollups both sum (each rollup also counts calls and
/// errors).
pub(crate) const USAGE_SUMS: [&str; 7] = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "cost_pico",
];

/// What a rollup insert does with an existing row: adds to its sums.
fn rollup_upsert() -> String {
    let add = |c: &&str| format!("{c} = usage_hourly.{c} + excluded.{c}");
    let sums: Vec<String> = ["calls", "errors"]
        .iter()
        .chain(&USAGE_SUMS)
        .map(add)
        .collect();
    format!(
        " ON CONFLICT (hour_ms, gateway, key_name, model) DO UPDATE SET {}",
        sums.join(", ")
    )
}

/// The SQLite writer's statements, built once.
pub(crate) struct Statements {
    /// Inserts of events by shape, `INSERT OR ROLLBACK`: a statement that cannot fail halfway
    /// needs no statement journal, which copied every page a 64-row insert touched (a fifth of
    /// the writer's CPU then).
    pub events: [String; SHAPES.len()],
    pub logs: [String; SHAPES.len()],
    /// One rollup row.
    pub rollup: String,
}

pub(crate) static SQLITE: LazyLock<Statements> = LazyLock::new(|| {
    let sqlite = |verb, table, columns, shape, tail| {
        insert(Dialect::Sqlite, verb, table, columns, shape, tail)
    };
    Statements {
        events: SHAPES.map(|rows| {
            sqlite(
                "INSERT OR ROLLBACK INTO",
                "usage_events",
                EVENT_COLUMNS,
                (EVENT_ARITY, rows),
                "",
            )
        }),
        logs: SHAPES.map(|rows| {
            sqlite(
                "INSERT INTO",
                "request_logs",
                LOG_COLUMNS,
                (LOG_ARITY, rows),
                "",
            )
        }),
        rollup: sqlite(
            "INSERT INTO",
            "usage_hourly",
            ROLLUP_COLUMNS,
            (ROLLUP_ARITY, 1),
            &rollup_upsert(),
        ),
    }
});

/// PostgreSQL's inserts of request logs by shape (its events go by `COPY` or as arrays).
pub(crate) static POSTGRES_LOGS: LazyLock<[String; SHAPES.len()]> = LazyLock::new(|| {
    SHAPES.map(|rows| {
        insert(
            Dialect::Postgres,
            "INSERT INTO",
            "request_logs",
            LOG_COLUMNS,
            (LOG_ARITY, rows),
            "",
        )
    })
});

/// PostgreSQL's rollup upsert: a batch's rows in one statement, one per element of its arrays
/// (the groups are distinct, as one statement may not update a row twice).
pub(crate) static POSTGRES_ROLLUP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO usage_hourly ({ROLLUP_COLUMNS}) SELECT * FROM unnest($1::bigint[], \
         $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], \
         $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[]){}",
        rollup_upsert()
    )
});

/// From this many events a batch goes in by `COPY`, below it as one insert of arrays. Per
/// event `COPY` costs the server less (~3.1 against ~5.2 µs of CPU, `write_cost`, batches of
/// 1500), per batch more (~1.3 against ~0.7 ms; keypool's side ~0.7 against ~0.35 ms): the
/// costs cross at ~300 events. And sqlx 0.9.0 leaves Nagle on, so a small `COPY`'s end waits
/// ~40 ms for the server's delayed ACK (batches of 10: 46 ms each as `COPY`, 1.4 ms as
/// arrays); over TLS a message of several records can wait the same (arrays of 200 events).
const COPY_FROM: usize = 256;

/// A batch's events as one `INSERT ... SELECT FROM unnest(...)`, one array per column.
pub(crate) static POSTGRES_EVENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO usage_events ({EVENT_COLUMNS}) SELECT * FROM unnest($1::text[], \
         $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int[], \
         $9::int[], $10::bool[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], \
         $15::bigint[], $16::text[], $17::text[], $18::text[], $19::bigint[], $20::bigint[], \
         $21::bigint[], $22::bigint[], $23::text[], $24::bool[], $25::text[])"
    )
});

/// A rollup row's sums.
#[derive(Default)]
pub(crate) struct Rollup {
    pub calls: i64,
    pub errors: i64,
    pub prompt: i64,
    pub completion: i64,
    pub total: i64,
    pub cache_read: i64,
    pub cache_write: i64,
    pub cache_write_1h: i64,
    pub cost_pico: i64,
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
        g.cache_read += e.cache_read_tokens.unwrap_or(0);
        g.cache_write += e.cache_write_tokens.unwrap_or(0);
        g.cache_write_1h += e.cache_write_1h_tokens.unwrap_or(0);
        g.cost_pico = g.cost_pico.saturating_add(e.cost_pico.unwrap_or(0));
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

/// Splits `n` rows into runs of the [`SHAPES`]: `(shape index, rows)`.
pub(crate) fn runs(mut n: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut shape = 0;
    std::iter::from_fn(move || {
        while n > 0 {
            if SHAPES[shape] <= n {
                n -= SHAPES[shape];
                return Some((shape, SHAPES[shape]));
            }
            shape += 1;
        }
        None
    })
}

impl Store {
    /// Writes a batch in one transaction. Events whose id is already stored (a replay) are skipped,
    /// and only the new ones are rolled up, so every event counts exactly once. Returns how many
    /// were new.
    pub async fn write_batch(&self, events: &[StoredEvent]) -> Result<usize, StoreError> {
        Ok(self.write_events(events, true).await?.len())
    }

    /// [`Store::write_batch`], answering which events (indices into `events`) were new.
    pub async fn write_batch_new(&self, events: &[StoredEvent]) -> Result<Vec<usize>, StoreError> {
        self.write_events(events, true).await
    }

    /// [`Store::write_batch`] without looking for already-stored ids: for events fresh from
    /// the request path (ids minted for them), the first attempt at writing them. A retry must
    /// use `write_batch`, since a commit whose answer was lost may have landed.
    pub async fn write_new_batch(&self, events: &[StoredEvent]) -> Result<usize, StoreError> {
        Ok(self.write_events(events, false).await?.len())
    }

    async fn write_events(
        &self,
        events: &[StoredEvent],
        dedupe: bool,
    ) -> Result<Vec<usize>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(sqlite) = &self.sqlite {
            return sqlite.write(events, dedupe).await;
        }
        if self.db.get_database_backend() != DbBackend::Postgres {
            return Err(StoreError::Db(sea_orm::DbErr::Custom(
                "unsupported database backend".into(),
            )));
        }
        let pool = self.db.get_postgres_connection_pool();
        if dedupe {
            self.summarize_time_index(pool).await;
        }
        // the lock with `BEGIN`, in one round trip
        let begin = if dedupe { BEGIN_RETRY } else { BEGIN_FRESH };
        let mut tx = pool.begin_with(begin).await?;
        let mut new = unique(events);
        if dedupe {
            let stored = stored_ids(&mut tx, events, &new).await?;
            new.retain(|&i| !stored.contains(events[i].id.as_str()));
        }
        if !new.is_empty() {
            if new.len() < COPY_FROM {
                insert_arrays(&mut tx, events, &new).await?;
            } else {
                let mut copy = tx
                    .copy_in_raw(&format!(
                        "COPY usage_events ({EVENT_COLUMNS}) FROM STDIN (FORMAT text)"
                    ))
                    .await?;
                copy.send(copy_text(events, &new)).await?;
                copy.finish().await?;
            }
            write_rest(&mut tx, events, &new).await?;
        }
        tx.commit().await?;
        Ok(new)
    }

    /// Summarizes the BRIN ranges of `usage_events` that filled up since this process last did,
    /// so that a retry's lookup reads only the rows of its time ranges (BRIN scans every range
    /// it has no summary of, and only VACUUM summarizes on its own). Complete ranges only: a
    /// summarized range's summary is widened by each later insert into it, which costs. A
    /// failure (the role does not own the table, say) only makes lookups slower: logged once.
    async fn summarize_time_index(&self, pool: &sqlx::PgPool) {
        use std::sync::atomic::Ordering;
        let from = self.summarized.load(Ordering::Relaxed);
        let next = sqlx::query_scalar::<Postgres, i64>(SUMMARIZE)
            .bind(from)
            .fetch_one(pool)
            .await;
        match next {
            Ok(next) => self.summarized.store(next, Ordering::Relaxed),
            Err(e) if from >= 0 => {
                tracing::warn!(error = %e, "cannot summarize the usage events' time index: retries' lookups read more rows");
                self.summarized.store(-1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
#[path = "write_tests.rs"]
mod tests;
