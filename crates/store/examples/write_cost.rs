//! The batch writer's cost per usage event (a program, not a test): writes `EVENTS` events in
//! batches of `BATCH` through [`Store::write_new_batch`], as the writer does, and prints the
//! process's CPU time and the wall time per event.
//!
//!   cargo run --release -p keypool-store --example write_cost             # SQLite, temp file
//!   cargo run --release -p keypool-store --example write_cost -- postgres://postgres@127.0.0.1/scratch
//!
//! `EVENTS` (default 300000) and `BATCH` (default 2500) come from the environment; with
//! `RETRY=1` every batch goes through [`Store::write_batch`], the deduplicating write of a
//! retry or replay, instead. A PostgreSQL
//! database is migrated and keeps the events: point it at a scratch database. The CPU time is
//! this process's; PostgreSQL's own (its backend parses the `COPY` and maintains the indexes)
//! shows on the server's processes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keypool_store::{Store, StoredEvent};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User plus system CPU time of this process so far (Linux: `/proc/self/stat`, in 10 ms ticks).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn event(n: usize, at_ms: i64) -> StoredEvent {
    StoredEvent {
        id: keypool_types::event_id_hex(keypool_types::new_event_id()),
        at_ms,
        gateway: "default".into(),
        caller: Some("tok-3f2a9c01b7de".into()),
        model: "gpt-4o-mini".into(),
        key_name: Some(format!("k{}", n % 3 + 1)),
        provider: Some("openai".into()),
        attempts: 1,
        status: 200,
        stream: false,
        latency_ms: 1,
        ttfb_ms: Some(1),
        prompt_tokens: Some(12),
        completion_tokens: Some(9),
        total_tokens: Some(21),
        client_ip: Some("127.0.0.1".into()),
        user_agent: Some("wrk".into()),
        error: None,
        cache_read_tokens: Some(0),
        cache_write_tokens: Some(0),
        cache_write_1h_tokens: Some(0),
        cost_pico: Some(2_020_000),
        requested_model: None,
        cache_hit: false,
        guardrails: None,
        log: None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let events = env("EVENTS", 300_000);
    let batch = env("BATCH", 2500).max(1);
    let retry = env("RETRY", 0) == 1;
    let dir = tempfile::tempdir()?;
    let url = std::env::args().nth(1).unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("cost.sqlite").display()
        )
    });
    let store = Store::connect(&url).await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let mut written = 0;
    let (cpu0, wall0) = (cpu(), Instant::now());
    let mut made = Duration::ZERO;
    while written < events {
        let n = batch.min(events - written);
        let t = Instant::now();
        let chunk: Vec<StoredEvent> = (0..n)
            .map(|i| event(written + i, now + i64::try_from(written / 50).unwrap_or(0)))
            .collect();
        made += t.elapsed();
        let stored = if retry {
            store.write_batch(&chunk).await?
        } else {
            store.write_new_batch(&chunk).await?
        };
        anyhow::ensure!(stored == n, "{stored} of {n} events stored");
        written += n;
    }
    let (cpu1, wall1) = (cpu(), wall0.elapsed());
    let per = |d: Duration| d.as_secs_f64() * 1e6 / events as f64;
    println!(
        "{} events in batches of {batch}: {:.2} µs CPU per event ({:.2} µs building them), {:.2} µs wall",
        events,
        per(cpu1.saturating_sub(cpu0)),
        per(made),
        per(wall1),
    );
    store.close().await;
    Ok(())
}
