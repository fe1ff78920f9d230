//! Model fallbacks: when no key for the requested model can serve, the next model its gateway
//! names (`fallbacks: {gpt-4o: [gpt-4o-mini, claude-sonnet-4-5]}`) is tried through the same
//! attempt loop; after an answer `400 context_length_exceeded`, the next of
//! `context_fallbacks`.
//!
//! - "Can serve" is the attempt loop's: a key was picked and answered. It ends *exhausted* when
//!   no key serves the model, every key is disabled, cooling down or out of budget, or every
//!   attempt failed with a retryable error. While a fallback is next, a busy pool is not
//!   waited for: the fallback is tried at once (the last model of the chain waits as usual).
//! - The list is the requested model's, in its order; each model is tried once; one the
//!   gateway's `models` does not allow is skipped. Each model gets the gateway's `retries`.
//! - The body's `model` is rewritten; the answer carries `x-keypool-model` (the model that
//!   served); the usage event records both, priced at the served model's prices.
//! - A fallback happens before any byte reached the client, so streams fall back too.

use bytes::Bytes;
use keypool_policy::gateway::GatewayRuntime;

use crate::client::UpstreamClient;
use crate::ctx::RequestCtx;
use crate::forward::{Engine, Reply};

/// How the attempt loop for one model ended.
pub(crate) enum Ended {
    /// A key answered: the reply goes to the client (unless it asks for a context fallback).
    Served(Reply),
    /// No key could serve: the reply is what the client gets if no fallback follows.
    Exhausted(Reply),
}

impl Ended {
    fn into_reply(self) -> Reply {
        match self {
            Self::Served(r) | Self::Exhausted(r) => r,
        }
    }
}

/// The model that served, on every answer a key gave.
pub const MODEL_HEADER: &str = "x-keypool-model";

impl Engine {
    /// The attempt loop for the requested model, then for each fallback its gateway names
    /// while the one before could not serve.
    pub(crate) async fn attempts(&self, client: &UpstreamClient, ctx: &mut RequestCtx) -> Reply {
        let gw = ctx.gateway.clone();
        let routing = &gw.spec.routing;
        if routing.fallbacks.is_empty() && routing.context_fallbacks.is_empty() {
            return self.model_attempts(client, ctx, false).await.into_reply();
        }
        let mut tried = vec![ctx.inspected.model.clone()];
        loop {
            let on_exhausted = next(&gw, &tried, false);
            let ended = self
                .model_attempts(client, ctx, on_exhausted.is_some())
                .await;
            let (model, reason) = match &ended {
                Ended::Exhausted(_) => (on_exhausted, "exhausted"),
                Ended::Served(reply) if context_exceeded(reply) => {
                    (next(&gw, &tried, true), "context_length")
                }
                Ended::Served(_) => (None, ""),
            };
            let Some(model) = model else {
                return ended.into_reply();
            };
            let Some(body) = with_model(&ctx.inspected.body, &model) else {
                return ended.into_reply();
            };
            tracing::info!(
                from = %ctx.inspected.model,
                to = %model,
                reason,
                "falling back to another model"
            );
            crate::observe::fell_back(&gw, &tried[0], &model, reason);
            ctx.inspected.body = body;
            let from = std::mem::replace(&mut ctx.inspected.model, model.clone());
            ctx.requested_model.get_or_insert(from);
            tried.push(model);
        }
    }
}

/// The first model of the requested model's list (`tried[0]`) for this reason that was not
/// tried yet and that the gateway allows.
fn next(gw: &GatewayRuntime, tried: &[String], context: bool) -> Option<String> {
    gw.spec
        .routing
        .fallbacks_for(&tried[0], context)
        .iter()
        .find(|m| !tried.contains(m) && gw.spec.allows_model(m))
        .cloned()
}

/// A 400 whose error is the prompt being longer than the model's context: OpenAI's
/// `context_length_exceeded`, Anthropic's "prompt is too long".
fn context_exceeded(reply: &Reply) -> bool {
    let Reply::Whole {
        status: 400, body, ..
    } = reply
    else {
        return false;
    };
    crate::sse::contains(body, b"context_length_exceeded")
        || crate::sse::contains(body, b"prompt is too long")
}

/// The JSON body with its `model` replaced; `None` for a body that is not a JSON object.
fn with_model(body: &Bytes, model: &str) -> Option<Bytes> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    v.insert("model".to_owned(), serde_json::Value::from(model));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_names_the_fallback() {
        let b = with_model(
            &Bytes::from_static(br#"{"model":"gpt-4o","stream":true,"messages":[]}"#),
            "gpt-4o-mini",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["stream"], true);
        assert!(with_model(&Bytes::from_static(b"not json"), "m").is_none());
    }

    #[test]
    fn a_context_error_is_recognised() {
        let whole = |status, body: &'static [u8]| Reply::Whole {
            status,
            headers: reqwest::header::HeaderMap::new(),
            body: Bytes::from_static(body),
            key: None,
            usage: None,
        };
        assert!(context_exceeded(&whole(
            400,
            br#"{"error":{"code":"context_length_exceeded"}}"#
        )));
        assert!(context_exceeded(&whole(
            400,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#
        )));
        assert!(!context_exceeded(&whole(400, br#"{"error":{}}"#)));
        assert!(!context_exceeded(&whole(
            500,
            br#"{"error":{"code":"context_length_exceeded"}}"#
        )));
    }
}
