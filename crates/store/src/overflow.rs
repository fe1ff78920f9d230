//! The usage writer's overflow thread: what the full queue could not take (`log.on_overflow:
//! spill` or `backpressure`), appended to the spill file in batches off the async runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keypool_config::LogPolicy;
use keypool_types::UsageEvent;

use crate::StoredEvent;
use crate::spill::Spill;
use crate::writer::{BATCH, WriterStats};

/// Events the overflow thread may hold while it appends a batch (at least; or the queue's
/// capacity when larger): one fsync'd append of 4000 events takes milliseconds.
const OVERFLOW_BUFFER: usize = 16_384;

/// What the overflow thread is handed (an event moves in whole: boxing it would cost the
/// overflow path an allocation per event).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Overflowed {
    Event(UsageEvent),
    /// Everything handed over before this is in the spill file once the sender hears back.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Starts the overflow thread; its sender, or `None` (a full queue then drops events).
pub(crate) fn start_overflow(
    policy: &LogPolicy,
    spill: &Spill,
    stats: &Arc<WriterStats>,
) -> Option<std::sync::mpsc::SyncSender<Overflowed>> {
    // the overflow thread's own queue: what the disk takes between two batches
    let (otx, orx) = std::sync::mpsc::sync_channel(policy.queue_capacity.max(OVERFLOW_BUFFER));
    let (spill, stats) = (spill.clone(), stats.clone());
    let spawned = std::thread::Builder::new()
        .name("usage-overflow".to_owned())
        .spawn(move || overflow_thread(orx, spill, stats));
    match spawned {
        Ok(_) => Some(otx),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the usage overflow thread: a full queue drops events");
            None
        }
    }
}

/// The overflow thread: batches what the full queue could not take into the spill file.
#[allow(clippy::needless_pass_by_value)] // the thread owns what it runs on
fn overflow_thread(
    rx: std::sync::mpsc::Receiver<Overflowed>,
    spill: Spill,
    stats: Arc<WriterStats>,
) {
    let mut batch: Vec<StoredEvent> = Vec::new();
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Overflowed::Event(e) => batch.push(StoredEvent::from(e)),
                Overflowed::Flush(ack) => acks.push(ack),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match spill.append(&batch) {
                Ok(dropped) => {
                    stats
                        .spilled
                        .fetch_add(n - dropped as u64, Ordering::Relaxed);
                    stats.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
                    if dropped > 0 {
                        tracing::error!(
                            dropped,
                            "spill file full (log.spill_max_bytes): usage events dropped"
                        );
                    }
                }
                Err(e) => {
                    stats.dropped.fetch_add(n, Ordering::Relaxed);
                    tracing::error!(error = %e, events = n, "cannot spill overflowing usage events: dropped");
                }
            }
            stats.overflowed.fetch_sub(n, Ordering::Relaxed);
            batch.clear();
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}
