//! The store's test suite, run against SQLite (a temp file) and the real PostgreSQL on this
//! machine (a fresh database per test, dropped afterwards).

#![allow(clippy::unwrap_used)]

use keypool_store::{Grouping, KeyCounterRow, Store, StoredEvent, StoredLog};
use sea_orm::{ConnectionTrait, Database};

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

/// A database that exists for one test.
enum TestDb {
    Sqlite { _dir: tempfile::TempDir },
    Postgres(String),
}

impl TestDb {
    fn sqlite() -> (Self, String) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/kp.sqlite?mode=rwc", dir.path().display());
        (Self::Sqlite { _dir: dir }, url)
    }

    async fn postgres() -> (Self, String) {
        let name = format!("kp_store_{:016x}", fastrand::u64(..));
        let admin = Database::connect(PG_ADMIN).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.close().await.unwrap();
        (
            Self::Postgres(name.clone()),
            format!("postgres://postgres@127.0.0.1:5432/{name}"),
        )
    }

    async fn drop_db(self) {
        if let Self::Postgres(name) = self {
            let admin = Database::connect(PG_ADMIN).await.unwrap();
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .unwrap();
        }
    }
}

fn event(
    id: &str,
    at_ms: i64,
    key: &str,
    model: &str,
    tokens: (i64, i64),
    status: i32,
) -> StoredEvent {
    StoredEvent {
        id: id.to_owned(),
        at_ms,
        gateway: "default".into(),
        caller: Some("tok-abc".into()),
        model: model.into(),
        key_name: Some(key.into()),
        provider: Some("openai".into()),
        attempts: 1,
        status,
        stream: false,
        latency_ms: 12,
        ttfb_ms: Some(5),
        prompt_tokens: Some(tokens.0),
        completion_tokens: Some(tokens.1),
        total_tokens: Some(tokens.0 + tokens.1),
        client_ip: Some("127.0.0.1".into()),
        user_agent: Some("test".into()),
        error: None,
        cache_read_tokens: Some(tokens.0 / 2),
        cache_write_tokens: Some(1),
        cache_write_1h_tokens: Some(0),
        cost_pico: Some(tokens.0 * 1_000_000),
        requested_model: None,
        cache_hit: false,
        guardrails: None,
        log: None,
    }
}

async fn migrations_up_down_up(url: String) {
    let store = Store::connect_only(&url).await.unwrap();
    store.migrate_up().await.unwrap();
    assert_eq!(
        store.applied_migrations().await.unwrap(),
        vec![
            "m20261122_000001_usage",
            "m20261122_000002_provider",
            "m20261122_000003_admin",
            "m20261201_000004_pg_time_indexes",
            "m20261201_000005_event_ids_unindexed",
            "m20261205_000006_cache_tokens",
            "m20261205_000007_cost",
            "m20261205_000008_settings",
            "m20261206_000009_routing",
            "m20261207_000010_audit"
        ]
    );
    // run-time settings: upserted by name
    assert_eq!(store.setting("pricing").await.unwrap(), None);
    store.save_setting("pricing", "[]").await.unwrap();
    store.save_setting("pricing", "[1]").await.unwrap();
    let (value, at) = store.setting("pricing").await.unwrap().unwrap();
    assert!(value == "[1]" && at > 0);
    // the admin tables: gateways and keys with their owner, upserted by name
    store.save_gateway("g", "{}", "admin").await.unwrap();
    store
        .save_gateway("g", "{\"active\":false}", "admin")
        .await
        .unwrap();
    let rows = store.gateways().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].spec, "{\"active\":false}");
    let key = keypool_store::KeyRow {
        name: "k".into(),
        spec: "{}".into(),
        sealed_secret: Some("v1:abc".into()),
        owner: "admin".into(),
        enabled: true,
        updated_ms: 0,
    };
    store.save_key(&key).await.unwrap();
    store
        .save_key(&keypool_store::KeyRow {
            enabled: false,
            ..key.clone()
        })
        .await
        .unwrap();
    let keys = store.keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].enabled && keys[0].sealed_secret.as_deref() == Some("v1:abc"));
    store.delete_key("k").await.unwrap();
    store.delete_gateway("g").await.unwrap();
    assert!(store.keys().await.unwrap().is_empty() && store.gateways().await.unwrap().is_empty());
    store
        .write_batch(&[event("a", 1, "k", "m", (1, 1), 200)])
        .await
        .unwrap();
    store.migrate_down().await.unwrap();
    assert!(store.applied_migrations().await.unwrap().is_empty());
    assert!(store.count_events().await.is_err(), "tables are gone");
    store.migrate_up().await.unwrap();
    assert_eq!(store.count_events().await.unwrap(), 0);
    store.close().await;
}

async fn each_event_is_written_once_and_rolled_up_once(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let day = 1_700_000_000_000 - 1_700_000_000_000 % DAY;
    let batch = vec![
        event("e1", day + 10, "k1", "gpt-4o-mini", (10, 5), 200),
        event("e2", day + HOUR + 10, "k2", "gpt-4o-mini", (20, 5), 200),
        event("e3", day + HOUR + 20, "k1", "gpt-4o", (1, 1), 500),
    ];
    assert_eq!(store.write_batch(&batch).await.unwrap(), 3);
    // a replay of the same batch, plus one new event and a duplicate inside the batch
    let mut again = batch.clone();
    again.push(event("e4", day + 30, "k2", "gpt-4o", (2, 2), 200));
    again.push(event("e4", day + 30, "k2", "gpt-4o", (2, 2), 200));
    assert_eq!(store.write_batch(&again).await.unwrap(), 1);
    assert_eq!(store.count_events().await.unwrap(), 4);
    let stored = store.events_since(0, 10).await.unwrap();
    assert!(
        stored
            .iter()
            .all(|e| e.provider.as_deref() == Some("openai"))
    );

    let by_model = store
        .usage_totals(day, day + DAY, Grouping::Model, None)
        .await
        .unwrap();
    assert_eq!(by_model.len(), 2);
    assert_eq!(
        (
            by_model[0].group.as_str(),
            by_model[0].calls,
            by_model[0].total_tokens
        ),
        ("gpt-4o-mini", 2, 40)
    );
    // cache tokens are rolled up in their own columns, once per event: 10/2 + 20/2 read
    assert_eq!(
        (
            by_model[0].cache_read_tokens,
            by_model[0].cache_write_tokens,
            by_model[0].cache_write_1h_tokens
        ),
        (15, 2, 0)
    );
    // and the cost, summed exactly: (10 + 20) x 1e6 pico-dollars
    assert_eq!(by_model[0].cost_pico, 30_000_000);
    assert_eq!(
        (
            by_model[1].group.as_str(),
            by_model[1].calls,
            by_model[1].errors,
            by_model[1].total_tokens
        ),
        ("gpt-4o", 2, 1, 6)
    );
    let by_key = store
        .usage_totals(day, day + DAY, Grouping::Key, Some("default"))
        .await
        .unwrap();
    assert_eq!(
        by_key
            .iter()
            .map(|t| (t.group.as_str(), t.calls))
            .collect::<Vec<_>>(),
        vec![("k2", 2), ("k1", 2)]
    );
    let by_day = store
        .usage_totals(0, i64::MAX, Grouping::Day, None)
        .await
        .unwrap();
    assert_eq!(
        (by_day[0].group.clone(), by_day[0].calls),
        (day.to_string(), 4)
    );
    let hours = store.calls_per_hour(day + 5, None).await.unwrap();
    assert_eq!(hours.len(), 24);
    assert_eq!((hours[0].calls, hours[1].calls, hours[2].calls), (2, 2, 0));
    assert_eq!(
        store.calls_per_hour(day, Some("other")).await.unwrap()[0].calls,
        0
    );
    store.close().await;
}

async fn request_logs_and_retention(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let mut old = event("old", 1_000, "k", "m", (1, 1), 200);
    old.log = Some(StoredLog {
        request_headers: Some("{}".into()),
        request_body: Some("{\"model\":\"m\"}".into()),
        response_body: Some("hi".into()),
    });
    let new = event("new", 10 * DAY, "k", "m", (1, 1), 200);
    store.write_batch(&[old, new]).await.unwrap();
    assert_eq!(
        store
            .request_log("old")
            .await
            .unwrap()
            .unwrap()
            .response_body
            .as_deref(),
        Some("hi")
    );
    assert_eq!(store.delete_older_than(5 * DAY).await.unwrap(), 1);
    assert!(store.request_log("old").await.unwrap().is_none());
    assert_eq!(store.count_events().await.unwrap(), 1);
    // rollups outlive retention of the raw events
    assert_eq!(
        store
            .usage_totals(0, i64::MAX, Grouping::Key, None)
            .await
            .unwrap()[0]
            .calls,
        2
    );
    store.close().await;
}

async fn key_counters_are_saved_and_restored(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let row = |used, last_error: Option<&str>| KeyCounterRow {
        key_name: "k1".into(),
        used,
        success: used - 1,
        failure: 1,
        last_error: last_error.map(str::to_owned),
    };
    store
        .save_key_counters(&[row(5, Some("upstream 429"))], 1)
        .await
        .unwrap();
    store.save_key_counters(&[row(9, None)], 2).await.unwrap();
    let restored = Store::connect(&url)
        .await
        .unwrap()
        .key_counters()
        .await
        .unwrap();
    assert_eq!(restored, vec![row(9, None)]);
    store.close().await;
}

/// How many stored events share an id with an earlier one (the store keeps ids unique without
/// an index, so the tests look).
async fn repeated_ids(url: &str) -> i64 {
    let db = Database::connect(url).await.unwrap();
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) - COUNT(DISTINCT id) AS n FROM usage_events",
        ))
        .await
        .unwrap()
        .unwrap();
    let n = row.try_get::<i64>("", "n").unwrap();
    db.close().await.unwrap();
    n
}

/// A stored row as the event it was written from (without its log).
fn from_row(e: &keypool_store::entity::usage_events::Model) -> StoredEvent {
    StoredEvent {
        id: e.id.clone(),
        at_ms: e.at_ms,
        gateway: e.gateway.clone(),
        caller: e.caller.clone(),
        model: e.model.clone(),
        key_name: e.key_name.clone(),
        provider: e.provider.clone(),
        attempts: e.attempts,
        status: e.status,
        stream: e.stream,
        latency_ms: e.latency_ms,
        ttfb_ms: e.ttfb_ms,
        prompt_tokens: e.prompt_tokens,
        completion_tokens: e.completion_tokens,
        total_tokens: e.total_tokens,
        client_ip: e.client_ip.clone(),
        user_agent: e.user_agent.clone(),
        error: e.error.clone(),
        cache_read_tokens: e.cache_read_tokens,
        cache_write_tokens: e.cache_write_tokens,
        cache_write_1h_tokens: e.cache_write_1h_tokens,
        cost_pico: e.cost_pico,
        requested_model: e.requested_model.clone(),
        cache_hit: e.cache_hit,
        guardrails: e.guardrails.clone(),
        log: None,
    }
}

/// The writer's fast path for fresh batches (multi-row inserts on SQLite; on PostgreSQL COPY,
/// or one insert of arrays for a small batch):
/// large batches of every shape land whole and rolled up, an id repeated inside one lands once,
/// and a retry of a batch that landed (its commit answer lost) stores only what is new.
async fn fresh_batches_land_whole_and_retries_store_only_the_new(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let hour = 1_700_000_000_000 - 1_700_000_000_000 % HOUR;
    let mut fresh: Vec<StoredEvent> = (0..1000)
        .map(|i| event(&format!("f{i:04}"), hour + i, "k", "m", (1, 2), 200))
        .collect();
    // text that COPY's text format must escape comes back as it was sent
    fresh[7].user_agent = Some("tab\there\\back\nline\rret".into());
    assert_eq!(store.write_new_batch(&fresh[..1000]).await.unwrap(), 1000);
    assert_eq!(store.count_events().await.unwrap(), 1000);
    let stored = store.events_since(0, 2000).await.unwrap();
    assert_eq!(
        stored
            .iter()
            .find(|e| e.id == "f0007")
            .unwrap()
            .user_agent
            .as_deref(),
        Some("tab\there\\back\nline\rret")
    );
    // a small batch (on PostgreSQL one insert of arrays, not COPY) stores every field as sent,
    // NULLs included, as the large one did
    let mut small = vec![
        event("s1", hour + 1500, "k", "m", (1, 2), 200),
        event("s2", hour + 1501, "k", "m", (1, 2), 502),
    ];
    small[0].user_agent = Some("tab\there\\back\nline\rret".into());
    small[1].caller = None;
    small[1].ttfb_ms = None;
    small[1].prompt_tokens = None;
    small[1].error = Some("upstream_5xx".into());
    assert_eq!(store.write_new_batch(&small).await.unwrap(), 2);
    let stored = store.events_since(0, 2000).await.unwrap();
    for sent in [&fresh[7], &fresh[999], &small[0], &small[1]] {
        let e = stored.iter().find(|e| e.id == sent.id).unwrap();
        let back = from_row(e);
        assert_eq!(&back, sent);
    }
    // the retry of a batch that landed, with new events of the same millisecond and far from it
    let mut retry: Vec<StoredEvent> = fresh[..70].to_vec();
    retry.push(event("n1", hour + 3, "k", "m", (1, 2), 200));
    retry.push(event("n2", hour + 5 * HOUR, "k", "m", (1, 2), 200));
    retry.extend(fresh[900..].iter().cloned());
    assert_eq!(store.write_batch_new(&retry).await.unwrap(), [70, 71]);
    assert_eq!(
        store.write_batch(&retry).await.unwrap(),
        0,
        "all stored now"
    );
    // one id twice in a fresh batch is stored once
    let twice = vec![
        event("d1", hour, "k", "m", (1, 2), 200),
        event("d1", hour, "k", "m", (1, 2), 200),
    ];
    assert_eq!(store.write_new_batch(&twice).await.unwrap(), 1);
    assert_eq!(store.count_events().await.unwrap(), 1005);
    assert_eq!(repeated_ids(&url).await, 0);
    let totals = store
        .usage_totals(0, i64::MAX, Grouping::Model, None)
        .await
        .unwrap();
    assert_eq!((totals[0].calls, totals[0].total_tokens), (1005, 3015));
    store.close().await;
}

/// Writes of the same events at once store each event once: retries racing each other (on
/// PostgreSQL on separate connections of the pool), a frontend's batch sent twice to the
/// control plane, and on PostgreSQL retries that start while the first attempt is still
/// committing (its answer lost, say).
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn concurrent_writes_of_the_same_events_store_them_once(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let at = 1_700_000_000_000;
    let batch = |name: &str, n: i64| -> Vec<StoredEvent> {
        (0..n)
            .map(|i| event(&format!("{name}-{i:05}"), at + i / 7, "k", "m", (1, 1), 200))
            .collect()
    };
    let mut expected = 0;
    for round in 0..5 {
        let b = batch(&format!("r{round}"), 300);
        let (x, y, z) = tokio::join!(
            store.write_batch(&b),
            store.write_batch(&b),
            store.write_batch(&b[100..]),
        );
        assert_eq!(x.unwrap() + y.unwrap() + z.unwrap(), 300, "round {round}");
        expected += 300;
    }
    if store.backend() == sea_orm::DbBackend::Postgres {
        // the first attempt is in flight (its COPY holds the shared write lock) when the
        // retries start: they wait for it, then find everything stored. (`pg_locks` shows the
        // whole server's locks: tests writing to other databases hold the same key.)
        let watch = Database::connect(url.as_str()).await.unwrap();
        let mut seen_in_flight = 0;
        for round in 0..3 {
            let b = batch(&format!("f{round}"), 20_000);
            let first = tokio::spawn({
                let (store, b) = (store.clone(), b.clone());
                async move { store.write_new_batch(&b).await.unwrap() }
            });
            while !first.is_finished() {
                let held = watch
                    .query_one_raw(sea_orm::Statement::from_string(
                        sea_orm::DbBackend::Postgres,
                        "SELECT COUNT(*) AS n FROM pg_locks \
                         WHERE locktype = 'advisory' AND mode = 'ShareLock' AND granted \
                         AND database = (SELECT oid FROM pg_database \
                         WHERE datname = current_database())",
                    ))
                    .await
                    .unwrap()
                    .unwrap()
                    .try_get::<i64>("", "n")
                    .unwrap();
                if held > 0 {
                    seen_in_flight += 1;
                    break;
                }
            }
            let (x, y) = tokio::join!(store.write_batch(&b), store.write_batch(&b[5000..]));
            assert_eq!(first.await.unwrap() + x.unwrap() + y.unwrap(), 20_000);
            expected += 20_000;
        }
        assert!(
            seen_in_flight > 0,
            "no retry started while a first attempt ran"
        );
        // the retries summarized the time index's complete ranges (60,000+ rows fill several),
        // so their lookups read only their own time range
        let unsummarized = watch
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT brin_summarize_range('idx_usage_events_at'::regclass, 0) \
                 + brin_summarize_range('idx_usage_events_at'::regclass, 128) AS n",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i32>("", "n")
            .unwrap();
        assert_eq!(unsummarized, 0);
        watch.close().await.unwrap();
    }
    assert_eq!(store.count_events().await.unwrap(), expected);
    assert_eq!(repeated_ids(&url).await, 0);
    let totals = store
        .usage_totals(0, i64::MAX, Grouping::Model, None)
        .await
        .unwrap();
    assert_eq!(
        totals[0].calls,
        i64::try_from(expected).unwrap(),
        "rolled up once"
    );
    store.close().await;
}

macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let (db, url) = super::TestDb::sqlite();
                super::$name(url).await;
                db.drop_db().await;
            }

            #[tokio::test]
            async fn postgres() {
                let (db, url) = super::TestDb::postgres().await;
                super::$name(url).await;
                db.drop_db().await;
            }
        }
    )*};
}

/// Any i64 is a day to read hours of (clamped to the store's reach), never an overflow.
async fn any_day_is_read_without_overflow(url: String) {
    let store = Store::connect(&url).await.unwrap();
    for far in [i64::MAX, i64::MIN, keypool_store::LATEST_MS] {
        assert_eq!(store.calls_per_hour(far, None).await.unwrap().len(), 24);
        assert_eq!(store.hours_from(far, None).await.unwrap().len(), 24);
    }
    store.close().await;
}

on_both_databases!(
    migrations_up_down_up,
    any_day_is_read_without_overflow,
    each_event_is_written_once_and_rolled_up_once,
    request_logs_and_retention,
    key_counters_are_saved_and_restored,
    fresh_batches_land_whole_and_retries_store_only_the_new,
    concurrent_writes_of_the_same_events_store_them_once,
);

/// On a multi-thread runtime (as in `keypool serve`) the SQLite writer runs in place instead of
/// on a copy in the blocking pool: the same outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_batches_written_in_place_on_a_multi_thread_runtime() {
    let (db, url) = TestDb::sqlite();
    fresh_batches_land_whole_and_retries_store_only_the_new(url).await;
    db.drop_db().await;
    let (db, url) = TestDb::sqlite();
    each_event_is_written_once_and_rolled_up_once(url).await;
    db.drop_db().await;
}

/// A database on the same host is best reached over its Unix socket (no TCP, no TLS: the
/// benchmark's `pglocal`): openai-api-route's key/value form with a socket directory as the
/// host, as libpq takes it, writes both kinds of batch (an insert of arrays and a `COPY`).
#[tokio::test]
async fn postgres_over_the_unix_socket() {
    let (db, _) = TestDb::postgres().await;
    let TestDb::Postgres(name) = &db else {
        unreachable!()
    };
    let url = keypool_store::database_url(&keypool_config::StoreConfig::Postgres {
        dsn: format!("host=/var/run/postgresql user=postgres dbname={name}"),
    })
    .unwrap();
    assert!(url.contains("?host=/var/run/postgresql"), "{url}");
    // the connection is the socket's: the server sees no client address
    let conn = Database::connect(&url).await.unwrap();
    let row = conn
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT inet_client_addr() IS NULL AS local",
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(row.try_get::<bool>("", "local").unwrap());
    conn.close().await.unwrap();
    fresh_batches_land_whole_and_retries_store_only_the_new(url).await;
    db.drop_db().await;
}
