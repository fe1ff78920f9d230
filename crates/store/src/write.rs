//! Writing a batch: events once each, their logs, and the hourly rollups, in one transaction.
//!
//! This is the store's hot path (every request becomes an event). SQLite batches go to the
//! writer's own connection ([`crate::sqlite`]). PostgreSQL batches go through sqlx, sea-orm's
//! own driver: a fresh batch by `COPY`, PostgreSQL's bulk path; a retry or replay (which must
//! skip ids already stored) by multi-row inserts of a fixed shape (64, 8 and 1 rows: a batch of
//! any size is a sum of those), each prepared once per connection. sea-orm's `insert_many`
//! built a new statement for every batch size (its SQL text, then a fresh prepare of up to
//! 18,000 parameters) and cost ~17 µs of CPU per event, as much as serving the request.

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

/// The batch writer's statements in one dialect, built once.
pub(crate) struct Statements {
    /// Inserts of events by shape (SQLite's fresh batches; PostgreSQL `COPY`s those). On SQLite
    /// `INSERT OR ROLLBACK`: a stored id fails the whole transaction anyway (the writer retries
    /// it deduplicating), and a statement that cannot fail halfway needs no statement journal,
    /// which copied every page a 64-row insert touched (a fifth of the writer's CPU).
    pub events: [String; SHAPES.len()],
    /// The same, skipping ids already stored and returning the ids inserted (retries, replays).
    pub events_dedupe: [String; SHAPES.len()],
    pub logs: [String; SHAPES.len()],
    pub rollup: String,
}

impl Statements {
    fn build(dialect: Dialect) -> Self {
        let insert =
            |verb: &str, table: &str, columns: &str, arity: usize, rows: usize, tail: &str| {
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
            };
        let events = |verb: &str, tail: &str| {
            SHAPES.map(|rows| insert(verb, "usage_events", EVENT_COLUMNS, EVENT_ARITY, rows, tail))
        };
        let fresh = match dialect {
            Dialect::Postgres => "INSERT INTO",
            Dialect::Sqlite => "INSERT OR ROLLBACK INTO",
        };
        let add = |c: &str| format!("{c} = usage_hourly.{c} + excluded.{c}");
        let rollup = insert(
            "INSERT INTO",
            "usage_hourly",
            "hour_ms, gateway, key_name, model, calls, errors, prompt_tokens, \
             completion_tokens, total_tokens",
            9,
            1,
            &format!(
                " ON CONFLICT (hour_ms, gateway, key_name, model) DO UPDATE SET {}",
                [
                    "calls",
                    "errors",
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens"
                ]
                .map(add)
                .join(", ")
            ),
        );
        Self {
            events: events(fresh, ""),
            events_dedupe: events("INSERT INTO", " ON CONFLICT (id) DO NOTHING RETURNING id"),
            logs: SHAPES.map(|rows| {
                insert(
                    "INSERT INTO",
                    "request_logs",
                    LOG_COLUMNS,
                    LOG_ARITY,
                    rows,
                    "",
                )
            }),
            rollup,
        }
    }
}

static POSTGRES: LazyLock<Statements> = LazyLock::new(|| Statements::build(Dialect::Postgres));
pub(crate) static SQLITE: LazyLock<Statements> =
    LazyLock::new(|| Statements::build(Dialect::Sqlite));

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

    /// [`Store::write_batch`] without looking for already-stored ids first: for events fresh
    /// from the request path (random 128-bit ids), the first attempt at writing them. A retry
    /// must use `write_batch`, since a commit whose answer was lost may have landed.
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
        let mut tx = self.db.get_postgres_connection_pool().begin().await?;
        let new = if dedupe {
            insert_skipping_stored(&mut tx, events).await?
        } else {
            // a fresh batch: COPY (a stored id, or one id twice, fails the transaction, and
            // the writer's retry takes the deduplicating insert)
            let new: Vec<usize> = (0..events.len()).collect();
            let mut copy = tx
                .copy_in_raw(&format!(
                    "COPY usage_events ({EVENT_COLUMNS}) FROM STDIN (FORMAT text)"
                ))
                .await?;
            copy.send(copy_text(events, &new)).await?;
            copy.finish().await?;
            new
        };
        write_rest(&mut tx, events, &new).await?;
        tx.commit().await?;
        Ok(new)
    }
}

/// Inserts the events whose ids are not stored yet; answers their indices.
async fn insert_skipping_stored(
    conn: &mut PgConnection,
    events: &[StoredEvent],
) -> Result<Vec<usize>, sqlx::Error> {
    let mut order = unique(events);
    let mut inserted: HashSet<String> = HashSet::new();
    let mut at = 0;
    for (shape, rows) in runs(order.len()) {
        let mut q = sqlx::query::<Postgres>(POSTGRES.events_dedupe[shape].as_str());
        for &i in &order[at..at + rows] {
            let e = &events[i];
            q = q
                .bind(e.id.as_str())
                .bind(e.at_ms)
                .bind(e.gateway.as_str())
                .bind(e.caller.as_deref())
                .bind(e.model.as_str())
                .bind(e.key_name.as_deref())
                .bind(e.provider.as_deref())
                .bind(e.attempts)
                .bind(e.status)
                .bind(e.stream)
                .bind(e.latency_ms)
                .bind(e.ttfb_ms)
                .bind(e.prompt_tokens)
                .bind(e.completion_tokens)
                .bind(e.total_tokens)
                .bind(e.client_ip.as_deref())
                .bind(e.user_agent.as_deref())
                .bind(e.error.as_deref());
        }
        at += rows;
        for row in q.fetch_all(&mut *conn).await? {
            inserted.insert(row.try_get::<String, usize>(0)?);
        }
    }
    order.retain(|&i| inserted.contains(&events[i].id));
    Ok(order)
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
        let mut q = sqlx::query::<Postgres>(POSTGRES.logs[shape].as_str());
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
    for ((hour, gateway, key, model), r) in rollups(events, new) {
        sqlx::query::<Postgres>(POSTGRES.rollup.as_str())
            .bind(hour)
            .bind(gateway)
            .bind(key)
            .bind(model)
            .bind(r.calls)
            .bind(r.errors)
            .bind(r.prompt)
            .bind(r.completion)
            .bind(r.total)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
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

    #[test]
    fn copy_rows_escape_what_the_text_format_reserves() {
        let e = StoredEvent {
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
        };
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

    #[test]
    fn statements_number_their_placeholders() {
        let pg = Statements::build(Dialect::Postgres);
        assert!(pg.events_dedupe[2].starts_with(
            "INSERT INTO usage_events (id, at_ms, gateway, caller, model, key_name, provider, attempts, status, stream, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, client_ip, user_agent, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) ON CONFLICT"
        ));
        assert!(pg.events_dedupe[0].ends_with("$1152) ON CONFLICT (id) DO NOTHING RETURNING id"));
        assert_eq!(pg.logs[1].matches('$').count(), 8 * LOG_ARITY);
        assert!(
            pg.rollup
                .contains("calls = usage_hourly.calls + excluded.calls")
        );
        let sqlite = Statements::build(Dialect::Sqlite);
        assert_eq!(sqlite.events[0].matches('?').count(), 64 * EVENT_ARITY);
        assert!(sqlite.events[1].starts_with("INSERT OR ROLLBACK INTO usage_events ("));
        assert!(sqlite.events_dedupe[1].starts_with("INSERT INTO usage_events ("));
        assert!(!sqlite.events[0].contains('$'));
        assert!(sqlite.events_dedupe[2].ends_with("?) ON CONFLICT (id) DO NOTHING RETURNING id"));
        let tail = |sql: &str| sql[sql.find(" ON CONFLICT").unwrap()..].to_owned();
        assert_eq!(tail(&sqlite.rollup), tail(&pg.rollup));
    }
}
