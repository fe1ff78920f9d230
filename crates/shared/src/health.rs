//! Key health across replicas: a key actor's [`HealthAnnouncer`] hands its key's cooldowns and
//! disablings to a publisher task, and every replica applies the others' through a Redis
//! pub/sub subscription that reconnects by itself ([`share_health`], [`subscribe`]).

use std::time::Duration;

use crate::connect::pubsub_url;
use crate::{HealthEvent, RedisState, SharedError, SharedState};

/// This process's id in health messages (its own are ignored when they come back).
pub fn process_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{:016x}", fastrand::u64(..)))
}

/// Parses a health message from another replica: `(key, event)`; `None` for this process's own
/// messages and for garbage.
pub fn parse_health(msg: &str) -> Option<(String, HealthEvent)> {
    let mut parts = msg.splitn(4, '\t');
    let (from, what, arg, key) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if from == process_id() {
        return None;
    }
    let event = match what {
        "cool" => HealthEvent::Cooling(Duration::from_millis(arg.parse().ok()?)),
        "disable" => HealthEvent::Disabled(arg.to_owned()),
        _ => return None,
    };
    Some((key.to_owned(), event))
}

/// Where a key actor tells the other replicas about its key's health: a handle on the
/// publisher task's queue, or nothing (no shared state: nobody to tell).
#[derive(Clone, Default)]
pub struct HealthAnnouncer(Option<tokio::sync::mpsc::UnboundedSender<(String, HealthEvent)>>);

/// What [`share_health`] publishes: the announcements of this process's key actors.
pub type Announcements = tokio::sync::mpsc::UnboundedReceiver<(String, HealthEvent)>;

impl HealthAnnouncer {
    /// An announcer and the queue [`share_health`] drains.
    pub fn channel() -> (Self, Announcements) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    /// Hands a health change to the publisher, if there is one (never waits).
    pub fn announce(&self, key: &str, event: HealthEvent) {
        if let Some(tx) = &self.0 {
            let _ = tx.send((key.to_owned(), event));
        }
    }
}

/// Calls `on_message` with every message another replica publishes on `channel`, through a
/// subscription that reconnects by itself, until `stop`.
pub fn subscribe<F, Fut>(
    state: &RedisState,
    channel: String,
    stop: tokio_util::sync::CancellationToken,
    on_message: F,
) where
    F: Fn(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (target, failures) = (state.target().clone(), state.failures());
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sub = async {
                let url = pubsub_url(&target, attempt, Duration::from_secs(1)).await?;
                let connected = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut ps = client.get_async_pubsub().await?;
                    ps.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(ps)
                };
                connected.await.map_err(|e| SharedError(e.to_string()))
            };
            match sub.await {
                Ok(ps) => {
                    let mut messages = ps.into_on_message();
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            m = messages.next() => match m {
                                None => break,
                                Some(m) => {
                                    let payload: String = m.get_payload().unwrap_or_default();
                                    let from_us = payload
                                        .split('\t')
                                        .next()
                                        .is_some_and(|p| p == process_id());
                                    if !from_us {
                                        on_message(payload).await;
                                    }
                                }
                            },
                        }
                    }
                }
                Err(e) => failures.background(&e),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}

/// Connects this replica to Redis health sharing: publishes its key actors' announcements and
/// hands the other replicas' to `apply` (key, event), through a subscription that reconnects by
/// itself, until `stop`.
pub fn share_health(
    state: &std::sync::Arc<RedisState>,
    mut announcements: Announcements,
    apply: impl Fn(&str, HealthEvent) + Send + Sync + 'static,
    stop: tokio_util::sync::CancellationToken,
) {
    let publisher = state.clone();
    let stop_pub = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop_pub.cancelled() => return,
                msg = announcements.recv() => match msg {
                    None => return,
                    Some((key, event)) => {
                        if let Err(e) = publisher.publish_health(&key, &event).await {
                            publisher.background_failed(&e);
                        }
                    }
                },
            }
        }
    });
    subscribe(state, state.health_channel(), stop, move |payload| {
        if let Some((key, event)) = parse_health(&payload) {
            apply(&key, event);
        }
        std::future::ready(())
    });
}
