//! The PostgreSQL half of writing a batch ([`crate::write`]): the retry lock and id lookup, a
//! small batch as one insert of arrays, a large one as `COPY` text, the logs and the rollups.

use std::collections::HashSet;

use sea_orm::sqlx::{self, PgConnection, Postgres, Row};

use crate::StoredEvent;
use crate::write::{POSTGRES_EVENTS, POSTGRES_LOGS, POSTGRES_ROLLUP, rollups, runs};

/// Summarizes the complete BRIN ranges from block `$1` on (128 pages a range: PostgreSQL's
/// default, as migration 4 made `idx_usage_events_at`); answers the first block after them.
pub(crate) const SUMMARIZE: &str = "SELECT COALESCE(MAX(b) + 128, $1)::bigint FROM ( \
     SELECT b, brin_summarize_range('idx_usage_events_at'::regclass, b) \
     FROM generate_series(GREATEST($1, 0), \
         pg_relation_size('usage_events') / current_setting('block_size')::bigint - 128, 128) AS b \
     ) AS summarized";

/// `BEGIN` with the advisory lock (key `0x6b70_7573_6167_6500`, "kpusage") that orders a
/// retry's lookup after the writes in flight (module docs): `BEGIN_RETRY` takes it exclusive,
/// `BEGIN_FRESH` shared.
pub(crate) const BEGIN_FRESH: &str =
    "BEGIN; SELECT pg_advisory_xact_lock_shared(7741816897865737472)";
/// A retry's lookups also read through the time index, whatever the planner's statistics say.
pub(crate) const BEGIN_RETRY: &str =
    "BEGIN; SELECT pg_advisory_xact_lock(7741816897865737472); SET LOCAL enable_seqscan = off";

/// Events further apart than this are looked up in separate time ranges.
pub(crate) const LOOKUP_GAP_MS: i64 = 1000;

/// Which of the ids of `events[order]` are stored already. One query per run of events close
/// in time: it reads the rows stored in that time range (the BRIN index on `at_ms`), so a
/// replay of events hours apart does not read the hours between.
pub(crate) async fn stored_ids(
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
pub(crate) async fn insert_arrays(
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
        .bind(column(events, new, |e| e.cache_read_tokens))
        .bind(column(events, new, |e| e.cache_write_tokens))
        .bind(column(events, new, |e| e.cache_write_1h_tokens))
        .bind(column(events, new, |e| e.cost_pico))
        .bind(column(events, new, |e| e.requested_model.as_deref()))
        .bind(column(events, new, |e| e.cache_hit))
        .bind(column(events, new, |e| e.guardrails.as_deref()))
        .execute(conn)
        .await?;
    Ok(())
}

/// The request logs and hourly rollups of the `new` events.
pub(crate) async fn write_rest(
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
        columns.cache_read.push(r.cache_read);
        columns.cache_write.push(r.cache_write);
        columns.cache_write_1h.push(r.cache_write_1h);
        columns.cost_pico.push(r.cost_pico);
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
        .bind(columns.cache_read)
        .bind(columns.cache_write)
        .bind(columns.cache_write_1h)
        .bind(columns.cost_pico)
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
    cache_read: Vec<i64>,
    cache_write: Vec<i64>,
    cache_write_1h: Vec<i64>,
    cost_pico: Vec<i64>,
}

/// The `new` events as the rows of a `COPY ... (FORMAT text)`: tab-separated, `\N` for NULL,
/// backslash, tab, newline and carriage return escaped.
pub(crate) fn copy_text(events: &[StoredEvent], new: &[usize]) -> Vec<u8> {
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
            Int(e.cache_read_tokens),
            Int(e.cache_write_tokens),
            Int(e.cache_write_1h_tokens),
            Int(e.cost_pico),
            Text(e.requested_model.as_deref()),
            Bool(e.cache_hit),
            Text(e.guardrails.as_deref()),
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
pub(crate) fn push_int(out: &mut Vec<u8>, v: i64) {
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
