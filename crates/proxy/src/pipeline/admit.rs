//! `admit`: whitelist/blacklist, then the rate limits (counted across replicas when the state
//! is shared), then the token quota. Returns the tightest limit's headers, which go out with
//! every answer from here on, a refusal by a limit included. Once the body is inspected,
//! `hold_budgets` holds the request's estimated cost against its USD budgets.

use std::net::IpAddr;
use std::sync::Arc;

use keypool_policy::budget::{Budgets, Hold, Refusal, request_budgets};
use keypool_policy::gateway::{GatewayRuntime, RateHeaders};
use keypool_types::ApiError;
use tokio::time::Instant;

use super::authenticate::Authenticated;
use crate::forward::Engine;
use crate::inspect::Inspected;

pub(super) async fn admit(
    gw: &GatewayRuntime,
    auth: &Authenticated,
    client_ip: Option<IpAddr>,
    rate: &mut Option<RateHeaders>,
) -> Result<(), ApiError> {
    gw.check_lists(client_ip, auth.credential.as_deref(), chrono::Utc::now)?;
    match gw
        .admit_everywhere(&auth.caller, client_ip, Instant::now())
        .await
    {
        Ok(h) => *rate = h,
        Err(refused) => {
            *rate = refused.headers;
            return Err(refused.error);
        }
    }
    gw.check_quota_everywhere().await
}

/// The request's estimated cost (its prompt, plus `max_tokens` or `completion_estimate`, at
/// its model's price) held against its gateway's and its caller's budgets: 429
/// `insufficient_quota` naming the budget without room. `None` when none applies.
pub(super) async fn hold_budgets(
    gw: &GatewayRuntime,
    auth: &Authenticated,
    inspected: &Inspected,
    engine: &Engine,
    budgets: &Arc<Budgets>,
    prices: &keypool_pricing::Prices,
) -> Result<Option<Hold>, ApiError> {
    let wanted = request_budgets(gw, &auth.caller);
    if wanted.is_empty() {
        return Ok(None);
    }
    let amount = crate::spend::estimate(
        prices,
        &inspected.model,
        inspected.est_prompt,
        inspected
            .max_output
            .unwrap_or(engine.config.completion_estimate),
        None,
    );
    budgets
        .hold(wanted, amount)
        .await
        .map_err(Refusal::into_error)
}

/// `log.on_overflow: backpressure`: while the usage queue is full a new request waits for room
/// (up to 1 s), then gets 503 with `Retry-After`; every other mode never waits here.
pub(super) async fn usage_room(sink: &dyn keypool_types::UsageSink) -> Result<(), ApiError> {
    if !sink.saturated() {
        return Ok(());
    }
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        if !sink.saturated() {
            return Ok(());
        }
    }
    let mut busy = ApiError::new(
        keypool_types::ErrorKind::ServerBusy,
        "keypool's usage writer is behind (log.on_overflow: backpressure); retry shortly.",
    );
    busy.retry_after_secs = Some(1);
    Err(busy)
}
