//! [`Failure`]: a failed attempt, what metrics and alerts call it, and the reply it becomes
//! when it is the last.

use std::sync::Arc;

use bytes::Bytes;
use keypool_pool::{Lease, Outcome};
use keypool_types::{ApiError, ErrorKind};
use reqwest::header::HeaderMap;

use crate::adapter::TransportError;
use crate::ctx::RequestCtx;
use crate::forward::Reply;

/// A failed attempt, kept in case it is the last.
pub(crate) enum Failure {
    /// The upstream answered with this status and body.
    Upstream {
        status: u16,
        headers: HeaderMap,
        body: Bytes,
        key: Arc<str>,
    },
    /// No HTTP answer.
    Transport { error: ApiError, key: Arc<str> },
    /// No HTTP answer on a kept-alive connection the upstream closed as it was reused
    /// ([`TransportError::Stale`]): the key may serve the request again, on a new connection.
    Stale { error: ApiError, key: Arc<str> },
}

impl Failure {
    /// No HTTP answer, for `error`: [`Self::Stale`] for a kept-alive connection closed as it
    /// was reused, else [`Self::Transport`].
    pub(super) fn unanswered(error: &TransportError, key: Arc<str>) -> Self {
        let api = ApiError::new(ErrorKind::UpstreamUnreachable, error.to_string());
        if matches!(error, TransportError::Stale(_)) {
            Self::Stale { error: api, key }
        } else {
            Self::Transport { error: api, key }
        }
    }

    /// The failover reason, as metrics label it.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Upstream { status: 429, .. } => "rate_limited",
            Self::Upstream {
                status: 401 | 403, ..
            } => "auth_failed",
            Self::Upstream { .. } => "server_error",
            Self::Transport { error, .. } if error.kind == ErrorKind::UpstreamTimeout => "timeout",
            Self::Transport { .. } => "connect",
            Self::Stale { .. } => "stale_connection",
        }
    }

    /// What the alert says about the last failure.
    fn describe(&self) -> String {
        match self {
            Self::Upstream { status, key, .. } => format!("key {key} answered {status}"),
            Self::Transport { error, key } | Self::Stale { error, key } => {
                format!("key {key}: {}", error.message)
            }
        }
    }

    /// Every attempt failed: the client gets the last failure, operators an alert.
    pub(crate) fn give_up(self, ctx: &RequestCtx) -> Reply {
        let why = format!(
            " ({} attempt{}; last: {})",
            ctx.attempts,
            if ctx.attempts == 1 { "" } else { "s" },
            self.describe()
        );
        crate::observe::all_failed(ctx, &why);
        self.into_reply()
    }

    fn into_reply(self) -> Reply {
        match self {
            Self::Upstream {
                status,
                headers,
                body,
                key,
            } => Reply::Whole {
                status,
                headers,
                body,
                key: Some(key),
                usage: None,
            },
            Self::Transport { error, key } | Self::Stale { error, key } => Reply::Error {
                error,
                key: Some(key),
            },
        }
    }
}

/// The attempt timed out before its answer (or its first byte, for a stream): the lease settled
/// as a timeout.
pub(super) fn timed_out(lease: Lease, stream: bool) -> Failure {
    let key = lease.key.name.clone();
    let limit = if stream {
        lease.key.stream_timeout
    } else {
        lease.key.timeout
    };
    lease.settle(Outcome::Timeout);
    tracing::warn!(key = %key, "upstream timed out");
    Failure::Transport {
        error: ApiError::new(
            ErrorKind::UpstreamTimeout,
            format!(
                "The upstream did not answer within {:.1} s.",
                limit.as_secs_f64()
            ),
        ),
        key,
    }
}
