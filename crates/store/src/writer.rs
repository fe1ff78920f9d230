//! [`UsageWriter`]: takes usage events off the request path and writes them in batches.
//!
//! - The request path only `try_send`s into a bounded queue ([`WriterSink`]); it never waits on
//!   the database. When the queue is full (past `log.queue_capacity`), `log.on_overflow`
//!   decides: `spill` (default) hands the event to an overflow thread that appends batches to
//!   the spill file (one fsync per batch), replayed in order like any spill; `backpressure`
//!   also makes new requests wait for room (the pipeline asks [`UsageSink::saturated`]);
//!   `drop` drops it. Every event is counted: written, spilled or dropped.
//! - Batches (up to 4000 events; what arrived within 200 ms of the first) are written in one
//!   transaction, so a busy gateway commits a few times a second, not per request. A failed
//!   write is retried twice (100 ms, 400 ms); then the batch is appended to the spill file
//!   (fsync'd) and the writer treats the database as down: further batches go straight to the
//!   spill file, and once a second a write is tried again.
//! - When a write succeeds again, the spill file is replayed in batches and removed. Event ids
//!   make replays idempotent: nothing is written twice, even after a crash mid-replay.
//! - [`UsageWriter::shutdown`] drains the queue into the database (or the spill file) and
//!   replays what it can.
//!
//! The writer is generic over its [`BatchTarget`]: the [`Store`] itself, or, on a `keypool
//! frontend`, the control plane (batches sent over gRPC and acknowledged once stored), so a
//! frontend's spool is this same spill file with the same retry and replay rules.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keypool_config::LogPolicy;
use keypool_types::{UsageEvent, UsageSink};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::overflow::{Overflowed, start_overflow};
use crate::spill::Spill;
use crate::{Store, StoredEvent};

/// The most events in one batch.
pub(crate) const BATCH: usize = 4000;
const RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a batch that is not full waits for more events before it is written. A batch costs
/// PostgreSQL ~2 ms of CPU and the writer ~0.8 ms whatever its size (`write_cost`: 7.8 µs of
/// server CPU per event in batches of 500, 4.0 in batches of 5000); at 50 ms a saturated gateway
/// wrote batches of ~900, and the store's CPU per request fell by 15% at 200 ms.
const LINGER: Duration = Duration::from_millis(200);

/// Counters of the writer, shared with metrics and tests.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Events written to the database (replays included, duplicates not).
    pub written: AtomicU64,
    /// Events appended to the spill file.
    pub spilled: AtomicU64,
    /// Events dropped past a configured cap (queue full, spill file full).
    pub dropped: AtomicU64,
    /// Events currently waiting in the queue.
    pub queued: AtomicU64,
    /// Events handed to the overflow thread, not yet in the spill file.
    pub overflowed: AtomicU64,
}

/// The request path's side of the writer: cheap to clone, never blocks.
#[derive(Clone)]
pub struct WriterSink {
    tx: mpsc::Sender<UsageEvent>,
    stats: Arc<WriterStats>,
    /// Where events go when the queue is full (`on_overflow: spill` or `backpressure`).
    overflow: Option<std::sync::mpsc::SyncSender<Overflowed>>,
    backpressure: bool,
}

impl WriterSink {
    fn dropped(&self, why: &str) {
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(1000) {
            tracing::error!(dropped = n, "usage event dropped: {why}");
        }
    }
}

impl UsageSink for WriterSink {
    fn record(&self, event: UsageEvent) {
        // converted to the stored form on the writer's side: the request path only moves it
        let event = match self.tx.try_send(event) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) => e,
        };
        let Some(overflow) = &self.overflow else {
            self.dropped("usage queue full (log.queue_capacity, on_overflow: drop)");
            return;
        };
        match overflow.try_send(Overflowed::Event(event)) {
            Ok(()) => {
                self.stats.overflowed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.dropped("usage queue and overflow queue full"),
        }
    }

    fn saturated(&self) -> bool {
        self.backpressure && self.tx.capacity() == 0
    }
}

/// Why a batch did not reach its target: the writer keeps it (spill file, retry) either way.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Store(#[from] crate::StoreError),
    /// Another target's own error (a frontend's link to its control plane).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Where the writer's batches go.
pub trait BatchTarget: Send + Sync + 'static {
    /// What the logs and alerts call it (`usage store`, `control plane`).
    fn name(&self) -> &'static str;
    /// Writes a batch; returns how many events were new. `fresh`: the events come straight from
    /// the queue and were never offered before (a target may skip looking for stored ids).
    fn write(
        &self,
        batch: &[StoredEvent],
        fresh: bool,
    ) -> impl std::future::Future<Output = Result<usize, TargetError>> + Send;
    /// Whether the target is reachable again.
    fn ping(&self) -> impl std::future::Future<Output = Result<(), TargetError>> + Send;
}

impl BatchTarget for Store {
    fn name(&self) -> &'static str {
        "usage store"
    }

    async fn write(&self, batch: &[StoredEvent], fresh: bool) -> Result<usize, TargetError> {
        let written = if fresh {
            self.write_new_batch(batch).await
        } else {
            self.write_batch(batch).await
        };
        Ok(written?)
    }

    async fn ping(&self) -> Result<(), TargetError> {
        Ok(Store::ping(self).await?)
    }
}

/// The writer task and its controls.
pub struct UsageWriter {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    pub stats: Arc<WriterStats>,
    /// To flush the overflow thread before the last replay.
    overflow: Option<std::sync::mpsc::SyncSender<Overflowed>>,
}

impl UsageWriter {
    /// Starts the writer on the current tokio runtime; a target that goes away is alerted
    /// through `telemetry`.
    pub fn start(
        store: impl BatchTarget,
        policy: &LogPolicy,
        telemetry: keypool_telemetry::Telemetry,
    ) -> (Self, WriterSink) {
        let (tx, rx) = mpsc::channel(policy.queue_capacity);
        let (stop_tx, stop_rx) = oneshot::channel();
        let stats = Arc::new(WriterStats::default());
        let spill = Spill::new(policy.spill_path.clone(), policy.spill_max_bytes);
        let overflow = (policy.on_overflow != keypool_config::Overflow::Drop)
            .then(|| start_overflow(policy, &spill, &stats))
            .flatten();
        let task = tokio::spawn(
            Loop {
                store,
                spill,
                stats: stats.clone(),
                db_ok: true,
                last_try: Instant::now(),
                telemetry,
            }
            .run(rx, stop_rx),
        );
        let backpressure = policy.on_overflow == keypool_config::Overflow::Backpressure;
        (
            Self {
                stop: Some(stop_tx),
                task,
                stats: stats.clone(),
                overflow: overflow.clone(),
            },
            WriterSink {
                tx,
                stats,
                overflow,
                backpressure,
            },
        )
    }

    /// Drains the queue and stops, waiting at most `limit`: what overflowed is in the spill
    /// file first, so the writer's last replay stores it too.
    pub async fn shutdown(mut self, limit: Duration) {
        if let Some(overflow) = self.overflow.take() {
            let _ = tokio::task::spawn_blocking(move || {
                let (ack_tx, ack_rx) = std::sync::mpsc::channel();
                if overflow.send(Overflowed::Flush(ack_tx)).is_ok() {
                    let _ = ack_rx.recv_timeout(limit);
                }
            })
            .await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(limit, &mut self.task).await.is_err() {
            tracing::error!("usage writer did not finish flushing within {limit:?}");
            self.task.abort();
        }
    }
}

struct Loop<T> {
    store: T,
    spill: Spill,
    stats: Arc<WriterStats>,
    db_ok: bool,
    last_try: Instant,
    telemetry: keypool_telemetry::Telemetry,
}

impl<T: BatchTarget> Loop<T> {
    async fn run(mut self, mut rx: mpsc::Receiver<UsageEvent>, mut stop: oneshot::Receiver<()>) {
        self.replay().await;
        let mut incoming = Vec::with_capacity(BATCH);
        loop {
            // while something waits in the spill file, wake up once a second to retry it even
            // when no new event arrives
            let pending = !self.db_ok || self.spill.len() > 0;
            let stopping = tokio::select! {
                _ = &mut stop => true,
                n = rx.recv_many(&mut incoming, BATCH) => n == 0,
                () = tokio::time::sleep(PROBE_EVERY), if pending => {
                    self.probe().await;
                    continue;
                }
            };
            // a commit costs the same for 10 events as for 1000: let a small batch fill up a
            // little (events are at most LINGER late in the store; the request path never
            // waits). Asleep on the timer, not on the queue, so senders wake nobody meanwhile.
            let mut stopping = stopping;
            if !stopping && incoming.len() < BATCH {
                tokio::select! {
                    _ = &mut stop => stopping = true,
                    () = tokio::time::sleep(LINGER) => {}
                }
                let room = BATCH - incoming.len();
                if !rx.is_empty() && rx.recv_many(&mut incoming, room).await == 0 {
                    stopping = true;
                }
            }
            let mut batch: Vec<StoredEvent> = incoming.drain(..).map(StoredEvent::from).collect();
            if stopping {
                rx.close();
                while let Some(e) = rx.recv().await {
                    batch.push(StoredEvent::from(e));
                    if batch.len() == BATCH {
                        self.flush(std::mem::take(&mut batch)).await;
                    }
                }
                self.flush(batch).await;
                if self.spill.len() > 0 {
                    self.replay().await;
                }
                tracing::info!(
                    written = self.stats.written.load(Ordering::Relaxed),
                    spilled = self.stats.spilled.load(Ordering::Relaxed),
                    dropped = self.stats.dropped.load(Ordering::Relaxed),
                    pending_in_spill_file = self.spill.len() > 0,
                    "usage writer stopped"
                );
                return;
            }
            self.flush(batch).await;
            if self.db_ok && self.spill.len() > 0 {
                self.replay().await;
            }
        }
    }

    /// Writes a batch, or spills it when the database is (or turns out to be) down.
    async fn flush(&mut self, batch: Vec<StoredEvent>) {
        if batch.is_empty() {
            return;
        }
        self.stats
            .queued
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        let probe_due = self.last_try.elapsed() >= PROBE_EVERY;
        if self.db_ok || probe_due {
            if self.write(&batch, true).await {
                if !self.db_ok {
                    tracing::info!(target_name = self.store.name(), "reachable again");
                    self.db_ok = true;
                    self.replay().await;
                }
                return;
            }
            if self.db_ok {
                let name = self.store.name();
                tracing::error!(spill = %self.spill_path(), "{name} unavailable: spilling usage events to disk");
                self.telemetry.alert(
                    keypool_telemetry::Cause::StoreUnavailable,
                    "store",
                    format!(
                        "the {name} is unavailable: usage events are being spilled to local disk and will be replayed"
                    ),
                );
            }
            self.db_ok = false;
        }
        self.to_spill(batch).await;
    }

    /// One write with retries (fewer when the database is already known to be down). `fresh`:
    /// the events come straight from the queue, so the first attempt need not look for ids that
    /// are already stored; retries and replays always do.
    async fn write(&mut self, batch: &[StoredEvent], fresh: bool) -> bool {
        self.last_try = Instant::now();
        let retries: &[Duration] = if self.db_ok { &RETRIES } else { &[] };
        let mut attempt = 0;
        loop {
            match self.store.write(batch, fresh && attempt == 0).await {
                Ok(n) => {
                    self.stats.written.fetch_add(n as u64, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), target_name = self.store.name(), "usage batch write failed");
                    let Some(wait) = retries.get(attempt) else {
                        return false;
                    };
                    tokio::time::sleep(*wait).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn to_spill(&self, batch: Vec<StoredEvent>) {
        let spill = self.spill.clone();
        let n = batch.len() as u64;
        match tokio::task::spawn_blocking(move || spill.append(&batch)).await {
            Ok(Ok(dropped)) => {
                self.stats
                    .spilled
                    .fetch_add(n - dropped as u64, Ordering::Relaxed);
                if dropped > 0 {
                    self.stats
                        .dropped
                        .fetch_add(dropped as u64, Ordering::Relaxed);
                    tracing::error!(
                        dropped,
                        "spill file full (log.spill_max_bytes): usage events dropped"
                    );
                }
            }
            Ok(Err(e)) => {
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::error!(error = %e, events = n, "cannot spill usage events: dropped");
            }
            Err(_) => {
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Checks whether the database is back; if so, replays the spill file.
    async fn probe(&mut self) {
        self.last_try = Instant::now();
        match self.store.ping().await {
            Ok(()) => {
                if !self.db_ok {
                    tracing::info!(target_name = self.store.name(), "reachable again");
                }
                self.db_ok = true;
                self.replay().await;
            }
            Err(e) => {
                tracing::debug!(error = %e, target_name = self.store.name(), "still unavailable");
            }
        }
    }

    /// Writes the spill file's events to the database and removes the file on success.
    async fn replay(&mut self) {
        let spill = self.spill.clone();
        let events = match tokio::task::spawn_blocking(move || spill.read_all()).await {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the spill file");
                return;
            }
            Err(_) => return,
        };
        if events.is_empty() {
            return;
        }
        tracing::info!(events = events.len(), "replaying spilled usage events");
        for chunk in events.chunks(BATCH) {
            if !self.write(chunk, false).await {
                self.db_ok = false;
                return;
            }
        }
        if let Err(e) = self.spill.clear() {
            tracing::error!(error = %e, "cannot remove the replayed spill file");
        }
    }

    fn spill_path(&self) -> String {
        self.spill.path().display().to_string()
    }
}
