//! A frontend's usage, sent to its control plane: [`Uplink`] (one `PublishUsage` stream, a
//! batch at a time, each acknowledged once stored) as the usage writer's target.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keypool_proto::admin::v1 as pb;
use keypool_store::{BatchTarget, StoredEvent, TargetError};
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use super::{ACK_WAIT, CONNECT_WAIT, Client};

/// The control plane as the usage writer's target: one `PublishUsage` stream, a batch at a
/// time, each waiting for its acknowledgement.
pub struct Uplink {
    pub(super) client: Client,
    pub(super) conn: tokio::sync::Mutex<Option<Conn>>,
    pub(super) seq: AtomicU64,
    pub id: String,
    pub address: String,
    /// The config version applied last (sent with every batch).
    pub(super) applied: watch::Receiver<u64>,
}

pub(super) struct Conn {
    tx: mpsc::Sender<pb::UsageBatch>,
    acks: tonic::Streaming<pb::UsageAck>,
}

/// Why a batch did not reach the control plane (the writer keeps it and retries).
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("no answer from the control plane")]
    NoAnswer,
    #[error("the control plane refused: {}", .0.message())]
    Refused(#[from] tonic::Status),
    #[error("the usage stream closed")]
    Closed,
    #[error("no acknowledgement within {0:?}")]
    NoAck(std::time::Duration),
}

impl From<UplinkError> for TargetError {
    fn from(e: UplinkError) -> Self {
        Self::Other(Box::new(e))
    }
}

impl Uplink {
    async fn open(&self) -> Result<Conn, UplinkError> {
        let (tx, rx) = mpsc::channel(4);
        let opened = tokio::time::timeout(
            CONNECT_WAIT,
            self.client
                .clone()
                .publish_usage(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| UplinkError::NoAnswer)??;
        Ok(Conn {
            tx,
            acks: opened.into_inner(),
        })
    }

    /// Sends one batch and waits for its acknowledgement; returns how many events were new.
    pub(super) async fn send(&self, events: Vec<pb::UsageEvent>) -> Result<usize, UplinkError> {
        let mut conn = self.conn.lock().await;
        if conn.is_none() {
            *conn = Some(self.open().await?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(UplinkError::Closed);
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let batch = pb::UsageBatch {
            seq,
            replica_id: self.id.clone(),
            address: self.address.clone(),
            config_version: *self.applied.borrow(),
            events,
        };
        let outcome = async {
            c.tx.send(batch).await.map_err(|_| UplinkError::Closed)?;
            loop {
                match tokio::time::timeout(ACK_WAIT, c.acks.message()).await {
                    Err(_) => return Err(UplinkError::NoAck(ACK_WAIT)),
                    Ok(Err(s)) => return Err(s.into()),
                    Ok(Ok(None)) => return Err(UplinkError::Closed),
                    Ok(Ok(Some(ack))) if ack.seq == seq => return Ok(ack.stored as usize),
                    Ok(Ok(Some(_))) => {} // a late ack of an abandoned batch
                }
            }
        }
        .await;
        if outcome.is_err() {
            *conn = None;
        }
        outcome
    }
}

/// [`Uplink`] as the writer's [`BatchTarget`].
pub struct UplinkTarget(pub Arc<Uplink>);

/// Largest `PublishUsage` message a frontend sends (encoded bytes of its events).
const UPLINK_MESSAGE_BYTES: usize = 1 << 20;

impl BatchTarget for UplinkTarget {
    fn name(&self) -> &'static str {
        "control plane"
    }

    /// Sends the batch in messages of at most [`UPLINK_MESSAGE_BYTES`] (gRPC's default limit
    /// is 4 MiB, and events with request logs are large), each acknowledged once stored. If a
    /// later message fails, the whole batch is retried: the control plane skips the ids it
    /// already stored.
    async fn write(&self, batch: &[StoredEvent], _fresh: bool) -> Result<usize, TargetError> {
        let mut stored = 0;
        let mut message = Vec::new();
        let mut bytes = 0;
        for event in batch {
            let event = pb::UsageEvent::from(event);
            let len = event.encoded_len();
            if !message.is_empty() && bytes + len > UPLINK_MESSAGE_BYTES {
                stored += self.0.send(std::mem::take(&mut message)).await?;
                bytes = 0;
            }
            bytes += len;
            message.push(event);
        }
        if !message.is_empty() {
            stored += self.0.send(message).await?;
        }
        Ok(stored)
    }

    async fn ping(&self) -> Result<(), TargetError> {
        Ok(self.0.send(Vec::new()).await.map(|_| ())?)
    }
}
