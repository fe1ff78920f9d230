//! The batch statements, checked without a database: shapes, escaping, numbering.

use super::*;
use crate::pg_write::push_int;

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
        cache_read_tokens: Some(2),
        cache_write_tokens: None,
        cache_write_1h_tokens: None,
        cost_pico: Some(5),
        requested_model: Some("gpt-4o".into()),
        cache_hit: false,
        guardrails: None,
        log: None,
    }
}

#[test]
fn copy_rows_escape_what_the_text_format_reserves() {
    let e = event();
    let text = String::from_utf8(copy_text(&[e], &[0])).unwrap();
    assert_eq!(
        text,
        "0123\t5\tdefault\t\\N\ta\\tb\\\\c\\nd\tk\t\\N\t1\t200\tt\t7\t\\N\t3\t4\t7\t\\N\tcurl\\r\t\\N\t2\t\\N\t\\N\t5\tgpt-4o\tf\t\\N\n"
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
        "INSERT INTO usage_events (id, at_ms, gateway, caller, model, key_name, provider, attempts, status, stream, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, client_ip, user_agent, error, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, cost_pico, requested_model, cache_hit, guardrails) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)"
    );
    assert!(events(Dialect::Postgres, 64).ends_with("$1600)"));
    assert_eq!(POSTGRES_LOGS[1].matches('$').count(), 8 * LOG_ARITY);
    assert_eq!(SQLITE.events[0].matches('?').count(), 64 * EVENT_ARITY);
    assert!(SQLITE.events[1].starts_with("INSERT OR ROLLBACK INTO usage_events ("));
    assert!(!SQLITE.events[0].contains('$'));
    assert!(
        SQLITE
            .rollup
            .ends_with(" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour_ms, gateway, key_name, model) DO UPDATE SET calls = usage_hourly.calls + excluded.calls, errors = usage_hourly.errors + excluded.errors, prompt_tokens = usage_hourly.prompt_tokens + excluded.prompt_tokens, completion_tokens = usage_hourly.completion_tokens + excluded.completion_tokens, total_tokens = usage_hourly.total_tokens + excluded.total_tokens, cache_read_tokens = usage_hourly.cache_read_tokens + excluded.cache_read_tokens, cache_write_tokens = usage_hourly.cache_write_tokens + excluded.cache_write_tokens, cache_write_1h_tokens = usage_hourly.cache_write_1h_tokens + excluded.cache_write_1h_tokens, cost_pico = usage_hourly.cost_pico + excluded.cost_pico")
    );
    assert!(POSTGRES_ROLLUP.contains("$13::bigint[]) ON CONFLICT (hour_ms"));
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
