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
            "m20261201_000004_pg_time_indexes"
        ]
    );
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

/// A fresh batch that must fail as a whole: `write_new_batch` errs and stores nothing; the
/// deduplicating retry stores the events at `new`.
async fn refused_then_retried(store: &Store, batch: &[StoredEvent], new: &[usize]) {
    let before = store.count_events().await.unwrap();
    assert!(
        store.write_new_batch(batch).await.is_err(),
        "{} events",
        batch.len()
    );
    assert_eq!(
        store.count_events().await.unwrap(),
        before,
        "nothing of it landed"
    );
    assert_eq!(store.write_batch_new(batch).await.unwrap(), new);
}

/// The writer's fast path for fresh batches (multi-row inserts on SQLite, COPY on PostgreSQL):
/// large batches of every shape land whole and rolled up; a batch with an id already stored
/// fails as a whole (wherever in the batch it is), and its retry through `write_batch` stores
/// only what is new.
async fn fresh_batches_land_whole_and_a_stored_id_fails_them(url: String) {
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
    // a stored id: nothing of the batch lands, the retry stores what is new
    let mixed = vec![
        event("f0003", hour, "k", "m", (1, 2), 200),
        event("n1", hour, "k", "m", (1, 2), 200),
    ];
    refused_then_retried(&store, &mixed, &[1]).await;
    // a stored id in a later statement than the first: what the earlier ones inserted goes too
    let mut late: Vec<StoredEvent> = (0..70)
        .map(|i| event(&format!("l{i:02}"), hour, "k", "m", (1, 2), 200))
        .collect();
    late.push(event("f0009", hour, "k", "m", (1, 2), 200));
    refused_then_retried(&store, &late, &(0..70).collect::<Vec<_>>()).await;
    // one id twice in a fresh batch fails it too; the retry stores it once
    let twice = vec![
        event("d1", hour, "k", "m", (1, 2), 200),
        event("d1", hour, "k", "m", (1, 2), 200),
    ];
    refused_then_retried(&store, &twice, &[0]).await;
    let totals = store
        .usage_totals(0, i64::MAX, Grouping::Model, None)
        .await
        .unwrap();
    assert_eq!((totals[0].calls, totals[0].total_tokens), (1072, 3216));
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

on_both_databases!(
    migrations_up_down_up,
    each_event_is_written_once_and_rolled_up_once,
    request_logs_and_retention,
    key_counters_are_saved_and_restored,
    fresh_batches_land_whole_and_a_stored_id_fails_them,
);

/// On a multi-thread runtime (as in `keypool serve`) the SQLite writer runs in place instead of
/// on a copy in the blocking pool: the same outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_batches_written_in_place_on_a_multi_thread_runtime() {
    let (db, url) = TestDb::sqlite();
    fresh_batches_land_whole_and_a_stored_id_fails_them(url).await;
    db.drop_db().await;
    let (db, url) = TestDb::sqlite();
    each_event_is_written_once_and_rolled_up_once(url).await;
    db.drop_db().await;
}
