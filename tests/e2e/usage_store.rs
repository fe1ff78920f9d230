//! Usage reaches the store exactly, durably and without secrets — on SQLite and PostgreSQL.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_wrap,
    clippy::type_complexity
)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use keypool_e2e::{Behavior, FaultProxy, Gateway, MockServer, PgDb, config, hello, json, mock};
use keypool_store::{Grouping, Store};
use serde_json::{Value, json};

const T: &str = "client-token-e2e-store";
const SK: &str = "sk-test-a-0123456789";

/// Waits until the store holds `n` events (or fails after `limit`).
async fn wait_for_events(url: &str, n: u64, limit: Duration) -> anyhow::Result<Store> {
    let store = Store::connect_only(url).await?;
    let deadline = Instant::now() + limit;
    loop {
        let have = store.count_events().await.unwrap_or(0);
        if have == n {
            return Ok(store);
        }
        anyhow::ensure!(
            have <= n,
            "{have} events stored, expected {n}: some were written twice"
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {have} of {n} events stored after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stream_req(include_usage: bool) -> Value {
    let mut v = json!({"model": "gpt-4o-mini", "stream": true,
                       "messages": [{"role": "user", "content": "Tell me a story"}]});
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v
}

/// (dbtype line, dbaddr line, URL to read the store with).
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(PgDb),
}

impl Db {
    fn sqlite() -> anyhow::Result<Self> {
        Ok(Self::Sqlite(tempfile::tempdir()?))
    }

    fn postgres() -> anyhow::Result<Self> {
        Ok(Self::Postgres(PgDb::create()?))
    }

    fn yaml(&self) -> (String, String) {
        match self {
            Self::Sqlite(dir) => (
                "sqlite".into(),
                format!("\"{}/usage.sqlite\"", dir.path().display()),
            ),
            Self::Postgres(db) => ("postgres".into(), format!("\"{}\"", db.url())),
        }
    }

    fn url(&self) -> String {
        match self {
            Self::Sqlite(dir) => format!("sqlite://{}/usage.sqlite?mode=rwc", dir.path().display()),
            Self::Postgres(db) => db.url(),
        }
    }

    /// Everything the database holds, as bytes (SQLite file + WAL, or `pg_dump`).
    fn dump(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::Sqlite(dir) => {
                let mut all = Vec::new();
                for entry in std::fs::read_dir(dir.path())? {
                    all.extend(std::fs::read(entry?.path())?);
                }
                Ok(all)
            }
            Self::Postgres(db) => Ok(db.dump()?.into_bytes()),
        }
    }
}

fn gateway_yaml(db: &Db, upstream: &MockServer, extra: &str) -> String {
    let (dbtype, dbaddr) = db.yaml();
    let mut y = config()
        .token(T)
        .set("dbtype", &dbtype)
        .set("dbaddr", &dbaddr)
        .key(upstream, "a", "")
        .yaml();
    y.push_str(extra);
    y
}

async fn exact_usage_for_plain_and_streamed_requests(db: Db) -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(&gateway_yaml(&db, &a, "")).await?;
    assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    let unasked = gw.chat(T, stream_req(false)).await?.text().await?;
    assert!(
        !unasked.contains("\"usage\""),
        "the client never sees the usage chunk keypool asked for"
    );
    let asked = gw.chat(T, stream_req(true)).await?.text().await?;
    assert!(asked.contains("\"usage\""));

    let store = wait_for_events(&db.url(), 3, Duration::from_secs(10)).await?;
    let events = store.events_since(0, 10).await?;
    let tokens: Vec<(bool, Option<i64>, Option<i64>, Option<i64>)> = events
        .iter()
        .map(|e| {
            (
                e.stream,
                e.prompt_tokens,
                e.completion_tokens,
                e.total_tokens,
            )
        })
        .collect();
    // "Hello there friend" = 3 words + 2; "Tell me a story" = 4 words + 2; replies are 5 words
    assert_eq!(
        tokens,
        vec![
            (false, Some(5), Some(5), Some(10)),
            (true, Some(6), Some(5), Some(11)),
            (true, Some(6), Some(5), Some(11)),
        ]
    );
    // at gpt-4o-mini's catalog prices (0.15 in, 0.60 out per million), streams included:
    // 5 x 0.15 + 5 x 0.60 and 6 x 0.15 + 5 x 0.60 micro-dollars, in pico-dollars
    let costs: Vec<Option<i64>> = events.iter().map(|e| e.cost_pico).collect();
    assert_eq!(costs, [Some(3_750_000), Some(3_900_000), Some(3_900_000)]);
    for e in &events {
        assert_eq!(
            (e.gateway.as_str(), e.key_name.as_deref(), e.status),
            ("default", Some("a"), 200)
        );
        assert_eq!(e.attempts, 1);
        assert_eq!(e.provider.as_deref(), Some("openai"));
        assert!(e.caller.as_deref().is_some_and(|c| c.starts_with("tok-")));
        assert_eq!(e.client_ip.as_deref(), Some("127.0.0.1"));
        assert!(e.ttfb_ms.is_some());
        assert_eq!(e.id.len(), 32);
    }
    let totals = store
        .usage_totals(0, i64::MAX, Grouping::Model, None)
        .await?;
    assert_eq!(
        (totals[0].calls, totals[0].total_tokens, totals[0].cost_pico),
        (3, 32, 11_550_000)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_usage_sqlite() -> anyhow::Result<()> {
    exact_usage_for_plain_and_streamed_requests(Db::sqlite()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_usage_postgres() -> anyhow::Result<()> {
    exact_usage_for_plain_and_streamed_requests(Db::postgres()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_nothing_and_writes_nothing_twice() -> anyhow::Result<()> {
    let pg = PgDb::create()?;
    let proxy = FaultProxy::start("127.0.0.1:5432").await?;
    let a = mock("a", Behavior::default());
    let dir = tempfile::tempdir()?;
    let spill = dir.path().join("spill.jsonl");
    let yaml = config()
        .token(T)
        .set("dbtype", "postgres")
        .set("dbaddr", &format!("\"{}\"", pg.url_via(&proxy.hostport())))
        .set("log", &format!("{{spill_path: \"{}\"}}", spill.display()))
        .key(&a, "a", "")
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    let send = |n: usize| {
        let gw = &gw;
        async move {
            let statuses: Vec<u16> = futures::stream::iter(0..n)
                .map(|_| async move {
                    gw.chat(T, hello("gpt-4o-mini"))
                        .await
                        .map_or(0, |r| r.status().as_u16())
                })
                .buffer_unordered(16)
                .collect()
                .await;
            assert!(
                statuses.iter().all(|s| *s == 200),
                "requests never depend on the store"
            );
        }
    };
    send(20).await;
    wait_for_events(&pg.url(), 20, Duration::from_secs(10)).await?;

    proxy.set_up(false);
    send(500).await;
    // the writer noticed, and the events are safe on disk
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spill.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        spill.exists(),
        "events were spilled while the database was away"
    );
    assert!(gw.logs().contains("usage store unavailable"));

    proxy.set_up(true);
    let store = match wait_for_events(&pg.url(), 520, Duration::from_secs(30)).await {
        Ok(s) => s,
        Err(e) => anyhow::bail!("{e}\nkeypool log:\n{}", gw.logs()),
    };
    let totals = store.usage_totals(0, i64::MAX, Grouping::Key, None).await?;
    assert_eq!(totals[0].calls, 520, "rollups counted each event once");
    let deadline = Instant::now() + Duration::from_secs(5);
    while spill.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!spill.exists(), "the replayed spill file is removed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_flushes_every_event() -> anyhow::Result<()> {
    let db = Db::sqlite()?;
    let a = mock(
        "a",
        Behavior {
            latency_ms: 20,
            ..Behavior::default()
        },
    );
    let mut gw = Gateway::start(&gateway_yaml(&db, &a, "")).await?;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = {
        let (http, url, answered) = (
            gw.http().clone(),
            gw.url("/v1/chat/completions"),
            answered.clone(),
        );
        tokio::spawn(async move {
            futures::stream::iter(0..400)
                .for_each_concurrent(16, |_| {
                    let (http, url, answered) = (http.clone(), url.clone(), answered.clone());
                    async move {
                        let resp = http
                            .post(url)
                            .bearer_auth(T)
                            .json(&hello("gpt-4o-mini"))
                            .send()
                            .await;
                        if let Ok(r) = resp
                            && r.bytes().await.is_ok()
                        {
                            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                })
                .await;
        })
    };
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.terminate()?;
    let status = gw.wait(Duration::from_secs(30)).await?;
    assert!(status.success(), "{status:?}");
    load.await?;
    let n = answered.load(std::sync::atomic::Ordering::SeqCst);
    assert!((100..400).contains(&n), "{n}");
    let store = Store::connect_only(&db.url()).await?;
    assert_eq!(
        store.count_events().await?,
        n,
        "every answered request's event was flushed"
    );
    Ok(())
}

async fn full_request_logging_stores_no_secret(db: Db) -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let log = "log: {request_body: true, response_body: true, headers: true, redact_headers: [x-team-secret]}\n";
    let mut gw = Gateway::start(&gateway_yaml(&db, &a, log)).await?;
    let resp = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(T)
        .header("x-team-secret", "team-secret-value")
        .header("x-api-key", "another-client-secret")
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let streamed = gw.chat(T, stream_req(false)).await?.text().await?;
    assert!(streamed.contains("[DONE]"));
    let mut bad = hello("gpt-4o-mini");
    bad["temperature"] = json!(9);
    assert_eq!(gw.chat(T, bad).await?.status(), 400);
    let _ = gw.chat("wrong-token", hello("gpt-4o-mini")).await?;

    let store = wait_for_events(&db.url(), 3, Duration::from_secs(10)).await?;
    let events = store.events_since(0, 10).await?;
    // by what they were, not by their order: two events in the same millisecond sort either way
    let event = |stream: bool| {
        events
            .iter()
            .find(|e| e.status == 200 && e.stream == stream)
            .map(|e| e.id.clone())
            .expect("the event")
    };
    let plain = store.request_log(&event(false)).await?.expect("logged");
    assert_eq!(
        plain.response_body.as_deref(),
        Some("Hello from a the mock")
    );
    assert!(
        plain
            .request_body
            .as_deref()
            .unwrap_or("")
            .contains("Hello there friend")
    );
    let headers: Value = serde_json::from_str(plain.request_headers.as_deref().unwrap_or("{}"))?;
    assert_eq!(headers["authorization"], "[redacted]");
    assert_eq!(headers["x-team-secret"], "[redacted]");
    assert_eq!(headers["x-api-key"], "[redacted]");
    let stream = store.request_log(&event(true)).await?.expect("logged");
    assert_eq!(
        stream.response_body.as_deref(),
        Some("Hello from a the mock"),
        "stream deltas joined"
    );

    gw.terminate()?;
    gw.wait(Duration::from_secs(10)).await?;
    let dump = String::from_utf8_lossy(&db.dump()?).into_owned();
    let logs = gw.logs();
    for secret in [
        T,
        SK,
        "team-secret-value",
        "another-client-secret",
        "wrong-token",
    ] {
        assert!(!dump.contains(secret), "{secret} found in the database");
        assert!(!logs.contains(secret), "{secret} found in the logs");
    }
    assert!(
        dump.contains("Hello from a the mock"),
        "the dump is readable (the test can see text)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_sqlite_or_logs() -> anyhow::Result<()> {
    full_request_logging_stores_no_secret(Db::sqlite()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_postgres_or_logs() -> anyhow::Result<()> {
    full_request_logging_stores_no_secret(Db::postgres()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_counters_survive_a_restart() -> anyhow::Result<()> {
    let db = Db::sqlite()?;
    let a = mock("a", Behavior::default());
    let yaml = gateway_yaml(&db, &a, "");
    for round in 1..=2u64 {
        let mut gw = Gateway::start(&yaml).await?;
        for _ in 0..3 {
            assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
        }
        gw.terminate()?;
        assert!(gw.wait(Duration::from_secs(10)).await?.success());
        let store = Store::connect_only(&db.url()).await?;
        let counters = store.key_counters().await?;
        assert_eq!(counters.len(), 1);
        assert_eq!(
            (counters[0].used, counters[0].success),
            (3 * round as i64, 3 * round as i64)
        );
    }
    let models = json(
        Gateway::start(&yaml)
            .await?
            .http()
            .get(a.url() + "/models")
            .send()
            .await?,
    )
    .await?;
    assert!(models["data"].is_array());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let send = |gw: &Gateway| {
        gw.http()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(T)
            .header("x-forwarded-for", "203.0.113.9, 127.0.0.1")
            .json(&hello("gpt-4o-mini"))
            .send()
    };
    for (trusted, expected) in [
        ("[127.0.0.1/32]", "203.0.113.9"),
        ("[10.0.0.0/8]", "127.0.0.1"),
    ] {
        let db = Db::sqlite()?;
        let gw = Gateway::start(&gateway_yaml(
            &db,
            &a,
            &format!("trusted_proxies: {trusted}\n"),
        ))
        .await?;
        assert_eq!(send(&gw).await?.status(), 200);
        let store = wait_for_events(&db.url(), 1, Duration::from_secs(10)).await?;
        let events = store.events_since(0, 1).await?;
        assert_eq!(
            events[0].client_ip.as_deref(),
            Some(expected),
            "trusted_proxies {trusted}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_events_at_start_up_and_keeps_new_ones() -> anyhow::Result<()> {
    let db = Db::sqlite()?;
    let seeded = Store::connect(&db.url()).await?;
    let old_ms = 1_000_000; // 1970: far beyond any retention
    let mut old = keypool_store::StoredEvent {
        id: "0".repeat(32),
        at_ms: old_ms,
        gateway: "default".into(),
        caller: None,
        model: "m".into(),
        key_name: Some("a".into()),
        provider: Some("openai".into()),
        attempts: 1,
        status: 200,
        stream: false,
        latency_ms: 1,
        ttfb_ms: None,
        prompt_tokens: Some(1),
        completion_tokens: Some(1),
        total_tokens: Some(2),
        client_ip: None,
        user_agent: None,
        error: None,
        cache_read_tokens: Some(0),
        cache_write_tokens: Some(0),
        cache_write_1h_tokens: Some(0),
        cost_pico: None,
        requested_model: None,
        cache_hit: false,
        guardrails: None,
        log: None,
    };
    seeded.write_batch(std::slice::from_ref(&old)).await?;
    old.id = "1".repeat(32);
    old.at_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    seeded.write_batch(std::slice::from_ref(&old)).await?;
    seeded.close().await;

    let a = mock("a", Behavior::default());
    let _gw = Gateway::start(&gateway_yaml(&db, &a, "log: {retention_days: 30}\n")).await?;
    // retention runs in the background right after start-up: both events may still be there
    let store = Store::connect_only(&db.url()).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.count_events().await? != 1 {
        anyhow::ensure!(Instant::now() < deadline, "retention did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        store.events_since(0, 10).await?[0].id,
        "1".repeat(32),
        "the recent event stays"
    );
    Ok(())
}

/// Sustained load with a writer queue of 2 events: what the queue cannot take goes to the
/// spill file and is replayed; after SIGTERM the store holds one event per answered request,
/// none dropped (`log.on_overflow: spill`, the default). With `drop`, the overflow is
/// counted instead; with `backpressure`, requests wait (or get 503) and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_writer_loses_no_event() -> anyhow::Result<()> {
    for mode in ["spill", "backpressure"] {
        let db = Db::sqlite()?;
        let a = mock("a", Behavior::default());
        let log = format!("log: {{queue_capacity: 2, on_overflow: {mode}}}\n");
        let mut gw = Gateway::start(&gateway_yaml(&db, &a, &log)).await?;
        let (http, url) = (gw.http().clone(), gw.url("/v1/chat/completions"));
        let statuses: Vec<u16> = futures::stream::iter(0..600)
            .map(|_| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    match http
                        .post(url)
                        .bearer_auth(T)
                        .json(&hello("gpt-4o-mini"))
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            if r.bytes().await.is_ok() { s } else { 0 }
                        }
                        Err(_) => 0,
                    }
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let answered = statuses.iter().filter(|s| **s == 200).count() as u64;
        assert!(
            statuses
                .iter()
                .all(|s| *s == 200 || (mode == "backpressure" && *s == 503)),
            "{mode}: {statuses:?}"
        );
        gw.terminate()?;
        assert!(gw.wait(Duration::from_secs(30)).await?.success());
        let store = Store::connect_only(&db.url()).await?;
        assert_eq!(
            store.count_events().await?,
            answered,
            "{mode}: {}",
            gw.logs()
        );
        assert!(gw.logs().contains("dropped=0"), "{mode}: {}", gw.logs());
    }
    Ok(())
}

/// A model without a price: no `x-keypool-cost`, a null cost (never 0), counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpriced_model_has_no_cost_never_zero() -> anyhow::Result<()> {
    let db = Db::sqlite()?;
    let (dbtype, dbaddr) = db.yaml();
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token("t")
            .set("dbtype", &dbtype)
            .set("dbaddr", &dbaddr)
            .key(&up, "up", "")
            .yaml(),
    )
    .await?;
    let resp = gw.chat("t", hello("my-fine-tune")).await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-keypool-cost").is_none());
    let priced = gw.chat("t", hello("gpt-4o-mini")).await?;
    assert!(priced.headers().get("x-keypool-cost").is_some());
    let events = keypool_e2e::stored_events(&db.url(), 2).await?;
    let costs: Vec<_> = events
        .iter()
        .map(|e| (e.model.as_str(), e.cost_pico.is_some()))
        .collect();
    assert!(costs.contains(&("my-fine-tune", false)), "{costs:?}");
    assert!(costs.contains(&("gpt-4o-mini", true)), "{costs:?}");
    let metrics = gw.metrics().await?;
    assert!(
        metrics.contains("keypool_unpriced_requests_total 1"),
        "{metrics}"
    );
    Ok(())
}
