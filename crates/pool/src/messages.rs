//! Every message the pool's actors take, in one place.
//!
//! Request tasks pick through a [`PoolHandle`](crate::PoolHandle), which reserves on a
//! [`KeyActor`](crate::KeyActor) with [`Reserve`] (keys with a budget) or counts in its
//! [`KeyTally`](crate::tally::KeyTally) (keys without), and returns a [`Lease`](crate::Lease);
//! the lease settles a failure with its key actor through [`Settle`] and counts a success in the
//! tally (also when dropped, so a cancelled request never leaks in-flight counts).

use std::time::Duration;

use actix::Message;
use tokio::time::Instant;

use crate::KeyState;

/// Why no key could be leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKey {
    /// No key allows this model/path for this caller (or every such key was already tried).
    NoneServes,
    /// Keys would serve it, but every one is disabled.
    AllDisabled,
    /// Keys would serve it, but none has budget / is out of cooldown before `until`.
    Busy { until: Instant, cause: BusyCause },
    /// The shared state is down and limits must not be enforced locally (`on_failure: closed`).
    SharedUnavailable,
}

/// What keeps the earliest key busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyCause {
    /// rpm / tpm budgets configured on the keys.
    Budget,
    /// Cooling down after an upstream 429 or repeated failures.
    Cooling,
}

/// The classified result of one upstream attempt; drives counters, health and tpm settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx (or 3xx) answer. `tokens` is the real total usage when known.
    Success {
        tokens: Option<u64>,
        latency: Duration,
    },
    /// 400/404/413/422 and friends: the request was wrong, the key is fine.
    ClientError { status: u16 },
    /// Upstream 429; `cooldown` from `Retry-After` / `x-ratelimit-reset-*` when it said so.
    RateLimited { cooldown: Option<Duration> },
    /// Upstream 401/403: the key is bad; disable it.
    AuthFailed { status: u16 },
    /// Upstream 5xx.
    ServerError { status: u16 },
    /// Could not connect or the connection broke before an answer.
    Connect,
    /// No answer (or no first byte) in time.
    Timeout,
    /// The stream broke after it had started.
    StreamBroken,
    /// The client went away; the upstream request was cancelled. Not the key's fault.
    Cancelled,
    /// A kept-alive connection the upstream closed as it was reused, before any byte of an
    /// answer: the upstream's idle timeout crossing the reuse, the connection's fault, not
    /// the key's (a new connection that fails so is [`Outcome::Connect`]).
    StaleConnection,
}

impl Outcome {
    /// Short, stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Success { .. } => "success",
            Self::ClientError { .. } => "client_error",
            Self::RateLimited { .. } => "rate_limited",
            Self::AuthFailed { .. } => "auth_failed",
            Self::ServerError { .. } => "server_error",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::StreamBroken => "stream_broken",
            Self::Cancelled => "cancelled",
            Self::StaleConnection => "stale_connection",
        }
    }
}

/// Reserve one request (and `est_tokens`) on a key with an rpm/tpm budget, if it has room.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), Refusal>")]
pub struct Reserve {
    /// Chosen by the requester; names the reservation in the key's windows.
    pub lease_id: u64,
    pub est_tokens: u64,
    /// The key's rpm and tpm are divided by this (its share while the shared state is
    /// unavailable, `redis.replicas_hint`); 1 otherwise.
    pub share_of: u32,
}

/// Why a key actor refused a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Disabled,
    Cooling { until: Instant },
    Budget { until: Instant },
}

/// Report how an attempt on a lease ended. Sent by the lease to its key actor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Settle {
    pub lease_id: u64,
    pub outcome: Outcome,
    /// Lease to settlement: the attempt's duration (for streams, to the stream's end).
    pub elapsed: Duration,
    /// When the lease was taken.
    pub admitted: Instant,
}

/// Ask a key actor for its live state.
#[derive(Debug, Message)]
#[rtype(result = "KeyState")]
pub struct Snapshot;

/// Ask the pool for the live state of every key, in config order.
#[derive(Debug, Message)]
#[rtype(result = "Vec<KeyState>")]
pub struct ListKeys;

/// Why the pool refused a change to its key set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("a key named {0:?} exists")]
    Exists(String),
    #[error("no key named {0:?}")]
    NoSuchKey(String),
    /// The supervisor is gone (the process is stopping).
    #[error("the key pool has stopped")]
    Stopped,
}

/// Add a key to the pool (the supervisor starts its actor).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), PoolError>")]
pub struct AddKey(pub std::sync::Arc<keypool_config::UpstreamKey>);

/// Take a key out of the pool: no new picks at once; its actor lives on until the leases in
/// flight settle. Answers the actor, so the caller can wait for it to drain.
#[derive(Debug, Message)]
#[rtype(result = "Option<actix::Addr<crate::KeyActor>>")]
pub struct RemoveKey(pub String);

/// Replace a key's spec (limits, allow/deny, ...), keeping its state. The name must not change.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), PoolError>")]
pub struct UpdateKey(pub std::sync::Arc<keypool_config::UpstreamKey>);

/// Enable or disable a key by hand.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), PoolError>")]
pub struct SetEnabled {
    pub name: String,
    pub enabled: bool,
}

/// A key actor's new spec.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct ReplaceSpec(pub std::sync::Arc<keypool_config::UpstreamKey>);

/// A key actor's admin switch.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Enable(pub bool);

/// Health another replica saw for this key (applied without being published again).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct RemoteHealth(pub crate::HealthEvent);
