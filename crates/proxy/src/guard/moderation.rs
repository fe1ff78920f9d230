//! `content_safety.moderation`: the request's texts sent to an OpenAI-compatible
//! `/v1/moderations` model through the pool (any key that serves the model, with failover, as a
//! request of its own with its own usage event), within `timeout_ms`.
//!
//! Flagged: the request is refused with 400 `content_policy_violation` (rule `moderation`).
//! The call failing, timing out or answering nonsense: `on_failure: allow` (the default) lets the
//! request go on, counted as `keypool_guardrail_hits_total{rule="moderation_unavailable"}` and
//! logged; `block` refuses it with the same 400 and a message saying it could not be checked.

use bytes::Bytes;
use keypool_types::{ApiError, ErrorKind};
use serde_json::{Value, json};

use crate::client::UpstreamClient;
use crate::ctx::RequestCtx;
use crate::forward::{Engine, Reply};

/// Whether `ctx`'s gateway asks a moderation model about requests.
pub(crate) fn wanted(ctx: &RequestCtx) -> bool {
    ctx.gateway
        .spec
        .content_safety
        .as_ref()
        .is_some_and(|s| s.moderation.is_some())
}

/// Asks the moderation model about `ctx`'s request; `Err` when it must not go on.
pub(crate) async fn check(
    engine: &Engine,
    client: &UpstreamClient,
    ctx: &mut RequestCtx,
) -> Result<(), ApiError> {
    let Some(m) = ctx
        .gateway
        .spec
        .content_safety
        .as_ref()
        .and_then(|s| s.moderation.clone())
    else {
        return Ok(());
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&ctx.inspected.body) else {
        return Ok(());
    };
    let mut texts = Vec::new();
    let _ = super::walk(&mut v, false, &mut |s: &mut String| {
        texts.push(Value::String(s.clone()));
        Ok(())
    });
    if texts.is_empty() {
        return Ok(());
    }
    let body = Bytes::from(json!({"model": m.model, "input": texts}).to_string());
    let sub = Box::new(ctx.sub_request("/v1/moderations", &m.model, body));
    let flagged = match tokio::time::timeout(m.timeout, engine.forward(client, sub)).await {
        Ok(Reply::Whole {
            status: 200, body, ..
        }) => flagged(&body),
        _ => None,
    };
    let alert = ctx
        .gateway
        .spec
        .content_safety
        .as_ref()
        .is_some_and(|s| s.alert);
    let refuse = |ctx: &mut RequestCtx, error: ApiError| {
        ctx.account(error.status(), None, Some(error.kind.wire().code));
        Err(error)
    };
    match flagged {
        Some(false) => Ok(()),
        Some(true) => {
            crate::observe::guardrail_hit(&ctx.gateway, "moderation", "request", alert);
            ctx.guardrails.push("request:moderation".to_owned());
            refuse(ctx, super::blocked("moderation"))
        }
        None => {
            crate::observe::guardrail_hit(&ctx.gateway, "moderation_unavailable", "request", false);
            tracing::warn!(gateway = %ctx.gateway.name, model = %m.model, "moderation call failed or timed out");
            if m.block_on_failure {
                ctx.guardrails
                    .push("request:moderation_unavailable".to_owned());
                refuse(
                    ctx,
                    ApiError::new(
                        ErrorKind::ContentPolicyViolation,
                        "The request could not be checked (the moderation model did not answer) and this gateway refuses unchecked requests.",
                    ),
                )
            } else {
                Ok(())
            }
        }
    }
}

/// Whether any result of a moderation answer is flagged (`None`: not such an answer).
fn flagged(body: &[u8]) -> Option<bool> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let results = v.get("results")?.as_array()?;
    Some(
        results
            .iter()
            .any(|r| r.get("flagged").and_then(Value::as_bool) == Some(true)),
    )
}
