//! The long-lived calls' loops: `StreamUsage` (to admins), `WatchConfig` and `PublishUsage` (with
//! frontends). Each runs as its own task and ends with its client or on shutdown.

use std::sync::Arc;

use keypool_control::Control;
use keypool_proto::admin::v1 as pb;
use keypool_types::ErrorKind;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{grpc, saw_frontend};

/// `PublishUsage`: stores each batch of a frontend's usage events, then acknowledges it; a
/// batch with an event without an id, or one the store could not take, ends the stream
/// unacknowledged (the frontend keeps the batch and sends it again).
pub(crate) async fn collect_usage(
    store: keypool_store::Store,
    control: Arc<Control>,
    stop: CancellationToken,
    mut batches: tonic::Streaming<pb::UsageBatch>,
    tx: mpsc::Sender<Result<pb::UsageAck, Status>>,
) {
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => return,
            b = batches.message() => b,
        };
        let Ok(Some(batch)) = batch else { return };
        saw_frontend(
            &control,
            &batch.replica_id,
            &batch.address,
            batch.config_version,
            None,
        );
        if batch.events.iter().any(|e| e.id.is_empty()) {
            let _ = tx
                .send(Err(grpc(
                    ErrorKind::InvalidRequest,
                    "events: a usage event without an id",
                )))
                .await;
            return;
        }
        let events: Vec<keypool_store::StoredEvent> =
            batch.events.into_iter().map(Into::into).collect();
        // acknowledged only once stored; a failed write ends the stream unacknowledged,
        // and the frontend keeps (spools) the batch and sends it again
        let new = match store.write_batch_new(&events).await {
            Ok(new) => new,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store a frontend's usage batch");
                let _ = tx
                    .send(Err(grpc(
                        ErrorKind::StoreUnavailable,
                        format!("store: {e}"),
                    )))
                    .await;
                return;
            }
        };
        if control.feed.receiver_count() > 0 {
            for &i in &new {
                let mut e = events[i].clone();
                e.log = None;
                let _ = control.feed.send(Arc::new(e));
            }
        }
        let ack = pb::UsageAck {
            seq: batch.seq,
            stored: u32::try_from(new.len()).unwrap_or(u32::MAX),
        };
        if tx.send(Ok(ack)).await.is_err() {
            return;
        }
    }
}

/// `WatchConfig`: a snapshot now and after every change, until the frontend or this process
/// goes away.
pub(crate) async fn push_snapshots(
    control: Arc<Control>,
    stop: CancellationToken,
    who: pb::WatchConfigRequest,
    mut changed: watch::Receiver<u64>,
    tx: mpsc::Sender<Result<pb::ConfigSnapshot, Status>>,
) {
    loop {
        changed.borrow_and_update();
        let sent = tx.send(Ok(control.snapshot())).await;
        if sent.is_err() {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tx.closed() => break,
            r = changed.changed() => if r.is_err() { break },
        }
    }
    saw_frontend(&control, &who.replica_id, "", 0, Some(false));
    tracing::info!(replica = %who.replica_id, "frontend stopped watching config");
}

/// `StreamUsage`: every usage event the filter wants, as it is recorded; a subscriber that falls
/// `stream_buffer` events behind is ended with `RESOURCE_EXHAUSTED`.
pub(crate) async fn feed_usage(
    filter: pb::StreamUsageRequest,
    mut rx: broadcast::Receiver<Arc<keypool_store::StoredEvent>>,
    tx: mpsc::Sender<Result<pb::UsageEvent, Status>>,
) {
    loop {
        let e = match rx.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let _ = tx
                    .send(Err(grpc(
                        ErrorKind::SubscriberTooSlow,
                        format!("subscriber too slow: {n} usage events were missed; reconnect"),
                    )))
                    .await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let wanted = (filter.gateway.is_empty() || filter.gateway == e.gateway)
            && (filter.model.is_empty() || filter.model == e.model)
            && (filter.key.is_empty() || Some(&filter.key) == e.key_name.as_ref());
        if !wanted {
            continue;
        }
        // the feed's events carry no request log
        let ev = pb::UsageEvent::from(&*e);
        if tx.send(Ok(ev)).await.is_err() {
            return; // the subscriber went away
        }
    }
}
