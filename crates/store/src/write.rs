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
use sea_orm::sqlx::{self, PgConnection, Postgres, Row};

use crate::{Store, StoreError, StoredEvent};

const HOUR_MS: i64 = 3_600_000;

/// Rows per multi-row insert, largest first; the last must be 1.
pub(crate) const SHAPES: [usize; 3] = [64, 8, 1];

const EVENT_COLUMNS: &str = "id, at_ms, gateway, caller, model, key_name, provider, attempts, \
     status, stream, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, \
     client_ip, user_agent, error";
pub(crate) const EVENT_ARITY: usize = 18;
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
     prompt_tokens, completion_tokens, total_tokens";

/// What a rollup insert does with an existing row: adds to its sums.
fn rollup_upsert() -> String {
    let add = |c: &str| format!("{c} = usage_hourly.{c} + excluded.{c}");
    let sums = [
        "calls",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ];
    format!(
        " ON CONFLICT (hour_ms, gateway, key_name, model) DO UPDATE SET {}",
        sums.map(add).join(", ")
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
            (9, 1),
            &rollup_upsert(),
        ),
    }
});

/// PostgreSQL's inserts of request logs by shape (its events go by `COPY` or as arrays).
static POSTGRES_LOGS: LazyLock<[String; SHAPES.len()]> = LazyLock::new(|| {
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
static POSTGRES_ROLLUP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO usage_hourly ({ROLLUP_COLUMNS}) SELECT * FROM unnest($1::bigint[], \
         $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], \
         $8::bigint[], $9::bigint[]){}",
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
static POSTGRES_EVENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO usage_events ({EVENT_COLUMNS}) SELECT * FROM unnest($1::text[], \
         $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int[], \
         $9::int[], $10::bool[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], \
         $15::bigint[], $16::text[], $17::text[], $18::text[])"
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

/// Summarizes the complete BRIN ranges from block `$1` on (128 pages a range: PostgreSQL's
/// default, as migration 4 made `idx_usage_events_at`); answers the first block after them.
const SUMMARIZE: &str = "SELECT COALESCE(MAX(b) + 128, $1)::bigint FROM ( \
     SELECT b, brin_summarize_range('idx_usage_events_at'::regclass, b) \
     FROM generate_series(GREATEST($1, 0), \
         pg_relation_size('usage_events') / current_setting('block_size')::bigint - 128, 128) AS b \
     ) AS summarized";

/// `BEGIN` with the advisory lock (key `0x6b70_7573_6167_6500`, "kpusage") that orders a
/// retry's lookup after the writes in flight (module docs): `BEGIN_RETRY` takes it exclusive,
/// `BEGIN_FRESH` shared.
const BEGIN_FRESH: &str = "BEGIN; SELECT pg_advisory_xact_lock_shared(7741816897865737472)";
/// A retry's lookups also read through the time index, whatever the planner's statistics say.
const BEGIN_RETRY: &str =
    "BEGIN; SELECT pg_advisory_xact_lock(7741816897865737472); SET LOCAL enable_seqscan = off";

/// Events further apart than this are looked up in separate time ranges.
const LOOKUP_GAP_MS: i64 = 1000;

/// Which of the ids of `events[order]` are stored already. One query per run of events close
/// in time: it reads the rows stored in that time range (the BRIN index on `at_ms`), so a
/// replay of events hours apart does not read the hours between.
async fn stored_ids(
    conn: &mut PgConnection,
    events: &[StoredEvent],
    order: &[usize],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut by_time: Vec<(i64, &str)> = order
        .iter()
        .map(|&i| (events[i].at_ms, events[i].id.as_str()))
        .collect();
    by_time.sort_unstable();
    let mut stored = HashSet::new();
    for run in by_time.chunk_by(|a, b| b.0 - a.0 <= LOOKUP_GAP_MS) {
        let ids: Vec<&str> = run.iter().map(|&(_, id)| id).collect();
        let rows = sqlx::query::<Postgres>(
            "SELECT id FROM usage_events WHERE at_ms BETWEEN $1 AND $2 AND id = ANY($3)",
        )
        .bind(run[0].0)
        .bind(run[run.len() - 1].0)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            stored.insert(row.try_get::<String, usize>(0)?);
        }
    }
    Ok(stored)
}

/// Inserts the `new` events as [`POSTGRES_EVENTS`] (a batch below [`COPY_FROM`]).
async fn insert_arrays(
    conn: &mut PgConnection,
    events: &[StoredEvent],
    new: &[usize],
) -> Result<(), sqlx::Error> {
    // one column of the new events, as an array parameter
    fn column<'a, T>(
        events: &'a [StoredEvent],
        new: &[usize],
        f: impl Fn(&'a StoredEvent) -> T,
    ) -> Vec<T> {
        new.iter().map(|&i| f(&events[i])).collect()
    }
    sqlx::query::<Postgres>(POSTGRES_EVENTS.as_str())
        .bind(column(events, new, |e| e.id.as_str()))
        .bind(column(events, new, |e| e.at_ms))
        .bind(column(events, new, |e| e.gateway.as_str()))
        .bind(column(events, new, |e| e.caller.as_deref()))
        .bind(column(events, new, |e| e.model.as_str()))
        .bind(column(events, new, |e| e.key_name.as_deref()))
        .bind(column(events, new, |e| e.provider.as_deref()))
        .bind(column(events, new, |e| e.attempts))
        .bind(column(events, new, |e| e.status))
        .bind(column(events, new, |e| e.stream))
        .bind(column(events, new, |e| e.latency_ms))
        .bind(column(events, new, |e| e.ttfb_ms))
        .bind(column(events, new, |e| e.prompt_tokens))
        .bind(column(events, new, |e| e.completion_tokens))
        .bind(column(events, new, |e| e.total_tokens))
        .bind(column(events, new, |e| e.client_ip.as_deref()))
        .bind(column(events, new, |e| e.user_agent.as_deref()))
        .bind(column(events, new, |e| e.error.as_deref()))
        .execute(conn)
        .await?;
    Ok(())
}

/// The request logs and hourly rollups of the `new` events.
async fn write_rest(
    conn: &mut PgConnection,
    events: &[StoredEvent],
    new: &[usize],
) -> Result<(), sqlx::Error> {
    let logged: Vec<&StoredEvent> = new
        .iter()
        .map(|&i| &events[i])
        .filter(|e| e.log.is_some())
        .collect();
    let mut at = 0;
    for (shape, rows) in runs(logged.len()) {
        let mut q = sqlx::query::<Postgres>(POSTGRES_LOGS[shape].as_str());
        for e in &logged[at..at + rows] {
            let log = e.log.as_ref();
            q = q
                .bind(e.id.as_str())
                .bind(e.at_ms)
                .bind(log.and_then(|l| l.request_headers.as_deref()))
                .bind(log.and_then(|l| l.request_body.as_deref()))
                .bind(log.and_then(|l| l.response_body.as_deref()));
        }
        at += rows;
        q.execute(&mut *conn).await?;
    }
    // all of the batch's rollup rows in one statement
    let groups = rollups(events, new);
    let mut columns = RollupColumns::default();
    for ((hour, gateway, key, model), r) in groups {
        columns.hour.push(hour);
        columns.gateway.push(gateway);
        columns.key.push(key);
        columns.model.push(model);
        columns.calls.push(r.calls);
        columns.errors.push(r.errors);
        columns.prompt.push(r.prompt);
        columns.completion.push(r.completion);
        columns.total.push(r.total);
    }
    sqlx::query::<Postgres>(POSTGRES_ROLLUP.as_str())
        .bind(columns.hour)
        .bind(columns.gateway)
        .bind(columns.key)
        .bind(columns.model)
        .bind(columns.calls)
        .bind(columns.errors)
        .bind(columns.prompt)
        .bind(columns.completion)
        .bind(columns.total)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A batch's rollup rows as columns, bound as arrays.
#[derive(Default)]
struct RollupColumns<'a> {
    hour: Vec<i64>,
    gateway: Vec<&'a str>,
    key: Vec<&'a str>,
    model: Vec<&'a str>,
    calls: Vec<i64>,
    errors: Vec<i64>,
    prompt: Vec<i64>,
    completion: Vec<i64>,
    total: Vec<i64>,
}

/// The `new` events as the rows of a `COPY ... (FORMAT text)`: tab-separated, `\N` for NULL,
/// backslash, tab, newline and carriage return escaped.
fn copy_text(events: &[StoredEvent], new: &[usize]) -> Vec<u8> {
    enum Field<'a> {
        Text(Option<&'a str>),
        Int(Option<i64>),
        Bool(bool),
    }
    use Field::{Bool, Int, Text};
    let mut out = Vec::with_capacity(new.len() * 160);
    for &i in new {
        let e = &events[i];
        let row = [
            Text(Some(&e.id)),
            Int(Some(e.at_ms)),
            Text(Some(&e.gateway)),
            Text(e.caller.as_deref()),
            Text(Some(&e.model)),
            Text(e.key_name.as_deref()),
            Text(e.provider.as_deref()),
            Int(Some(i64::from(e.attempts))),
            Int(Some(i64::from(e.status))),
            Bool(e.stream),
            Int(Some(e.latency_ms)),
            Int(e.ttfb_ms),
            Int(e.prompt_tokens),
            Int(e.completion_tokens),
            Int(e.total_tokens),
            Text(e.client_ip.as_deref()),
            Text(e.user_agent.as_deref()),
            Text(e.error.as_deref()),
        ];
        for (n, field) in row.iter().enumerate() {
            if n > 0 {
                out.push(b'\t');
            }
            match field {
                Text(None) | Int(None) => out.extend_from_slice(b"\\N"),
                Int(Some(v)) => push_int(&mut out, *v),
                Bool(v) => out.push(if *v { b't' } else { b'f' }),
                Text(Some(v))
                    if !v
                        .bytes()
                        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
                {
                    out.extend_from_slice(v.as_bytes());
                }
                Text(Some(v)) => {
                    for &b in v.as_bytes() {
                        match b {
                            b'\\' => out.extend_from_slice(b"\\\\"),
                            b'\t' => out.extend_from_slice(b"\\t"),
                            b'\n' => out.extend_from_slice(b"\\n"),
                            b'\r' => out.extend_from_slice(b"\\r"),
                            b => out.push(b),
                        }
                    }
                }
            }
        }
        out.push(b'\n');
    }
    out
}

/// Appends `v` in decimal.
fn push_int(out: &mut Vec<u8>, v: i64) {
    let mut digits = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_of_any_size_are_sums_of_the_shapes() {
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 1000] {
            let r: Vec<(usize, usize)> = runs(n).collect();
            assert_eq!(r.iter().map(|(_, rows)| rows).sum::<usize>(), n, "{n}");
            assert!(r.iter().all(|&(s, rows)| SHAPES[s] == rows));
        }
        assert_eq!(runs(1000).count(), 15 + 5);
    }

    /// An event with text the `COPY` format must escape.
    fn event() -> StoredEvent {
        StoredEvent {
            id: "0123".into(),
            at_ms: 5,
            gateway: "default".into(),
            caller: None,
            model: "a\tb\\c\nd".into(),
            key_name: Some("k".into()),
            provider: None,
            attempts: 1,
            status: 200,
            stream: true,
            latency_ms: 7,
            ttfb_ms: None,
            prompt_tokens: Some(3),
            completion_tokens: Some(4),
            total_tokens: Some(7),
            client_ip: None,
            user_agent: Some("curl\r".into()),
            error: None,
            log: None,
        }
    }

    #[test]
    fn copy_rows_escape_what_the_text_format_reserves() {
        let e = event();
        let text = String::from_utf8(copy_text(&[e], &[0])).unwrap();
        assert_eq!(
            text,
            "0123\t5\tdefault\t\\N\ta\\tb\\\\c\\nd\tk\t\\N\t1\t200\tt\t7\t\\N\t3\t4\t7\t\\N\tcurl\\r\t\\N\n"
        );
    }

    #[test]
    fn integers_in_decimal() {
        for v in [0, 7, -7, 1_234_567_890_123, i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            push_int(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
    }

    const WRITE_LOCK: i64 = 0x6b70_7573_6167_6500;

    #[test]
    fn statements_number_their_placeholders() {
        let events = |dialect, rows| {
            insert(
                dialect,
                "INSERT INTO",
                "usage_events",
                EVENT_COLUMNS,
                (EVENT_ARITY, rows),
                "",
            )
        };
        assert_eq!(
            events(Dialect::Postgres, 1),
            "INSERT INTO usage_events (id, at_ms, gateway, caller, model, key_name, provider, attempts, status, stream, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, client_ip, user_agent, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
        );
        assert!(events(Dialect::Postgres, 64).ends_with("$1152)"));
        assert_eq!(POSTGRES_LOGS[1].matches('$').count(), 8 * LOG_ARITY);
        assert_eq!(SQLITE.events[0].matches('?').count(), 64 * EVENT_ARITY);
        assert!(SQLITE.events[1].starts_with("INSERT OR ROLLBACK INTO usage_events ("));
        assert!(!SQLITE.events[0].contains('$'));
        assert!(
            SQLITE
                .rollup
                .ends_with(" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour_ms, gateway, key_name, model) DO UPDATE SET calls = usage_hourly.calls + excluded.calls, errors = usage_hourly.errors + excluded.errors, prompt_tokens = usage_hourly.prompt_tokens + excluded.prompt_tokens, completion_tokens = usage_hourly.completion_tokens + excluded.completion_tokens, total_tokens = usage_hourly.total_tokens + excluded.total_tokens")
        );
        assert!(POSTGRES_ROLLUP.contains("$9::bigint[]) ON CONFLICT (hour_ms"));
        let lock = WRITE_LOCK.to_string();
        assert!(BEGIN_FRESH.ends_with(&format!("pg_advisory_xact_lock_shared({lock})")));
        assert!(BEGIN_RETRY.contains(&format!("pg_advisory_xact_lock({lock});")));
    }

    #[test]
    fn a_batch_keeps_the_first_event_of_each_id() {
        let e = |id: &str| StoredEvent {
            id: id.into(),
            ..event()
        };
        assert_eq!(unique(&[e("a"), e("b"), e("a"), e("c"), e("b")]), [0, 1, 3]);
    }
}
