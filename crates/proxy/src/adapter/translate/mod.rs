//! Translation between OpenAI's chat completions and Anthropic's Messages, both ways, for a
//! model that only keys of the other kind serve (the pick prefers native keys).
//!
//! - [`to_messages`]: a `/v1/chat/completions` request answered by an Anthropic key: the
//!   request becomes a Messages request, the answer (whole or streamed) a chat completion.
//! - [`to_chat`]: a `/v1/messages` request answered by an OpenAI-compatible key: the request
//!   becomes a chat completions request, the answer a Messages answer.
//!
//! What maps: system prompts, text and image content, tools, tool calls and tool results,
//! `tool_choice`, `stop`/`stop_sequences`, `max_tokens`, `temperature`, `top_p`, streaming,
//! stop reasons and usage (cache reads included). What does not is refused with a 400 naming
//! the field ([`Unsupported`]), never dropped in silence; `cache_control` hints are the one
//! exception (a hint with no counterpart, dropped). Upstream errors keep their status (so
//! cooldown and failover work) and get the client surface's error shape.

pub(crate) mod sse;
#[cfg(test)]
mod tests;
pub mod to_chat;
pub mod to_messages;

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::{BodyStream, TransportError, UpstreamResponse};

/// A field of the request with no counterpart on the other API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub param: String,
    pub why: String,
}

impl Unsupported {
    pub(crate) fn new(param: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            why: why.into(),
        }
    }
}

/// Which error shape the client expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    OpenAi,
    Anthropic,
}

/// A keypool-made error answer in the client's shape.
pub(crate) fn error(shape: Shape, status: u16, kind: &str, message: &str) -> UpstreamResponse {
    let body = match shape {
        Shape::OpenAi => {
            json!({"error": {"message": message, "type": kind, "code": null, "param": null}})
        }
        Shape::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
    };
    whole(status, HeaderMap::new(), Bytes::from(body.to_string()))
}

/// A refusal for a field that does not translate.
pub(crate) fn unsupported(shape: Shape, u: &Unsupported, target: &str) -> UpstreamResponse {
    error(
        shape,
        400,
        "invalid_request_error",
        &format!(
            "`{}` cannot be translated for a {target} upstream: {}",
            u.param, u.why
        ),
    )
}

/// A whole JSON answer with `headers` (the upstream's, for its rate-limit headers).
pub(crate) fn whole(status: u16, mut headers: HeaderMap, body: Bytes) -> UpstreamResponse {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.remove(reqwest::header::CONTENT_LENGTH);
    UpstreamResponse {
        status,
        headers,
        body: Box::pin(futures::stream::once(async move { Ok(body) })),
    }
}

/// The largest upstream body or stream event a translation reads whole.
const MAX_READ: usize = 16 * 1024 * 1024;

/// Reads a whole upstream body (bounded by [`MAX_READ`]).
pub(crate) async fn read_all(mut body: BodyStream) -> Result<Vec<u8>, TransportError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
        if out.len() > MAX_READ {
            return Err(TransportError::Broken(
                "the upstream answer is too large to translate".into(),
            ));
        }
    }
    Ok(out)
}

/// An upstream error body in the client's shape, its message kept.
pub(crate) fn error_body(shape: Shape, status: u16, body: &[u8]) -> Bytes {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(
            || String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            str::to_owned,
        );
    let kind = match shape {
        Shape::Anthropic => keypool_types::ApiError::anthropic_type(status),
        Shape::OpenAi => match status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        },
    };
    let body = match shape {
        Shape::OpenAi => {
            json!({"error": {"message": message, "type": kind, "code": null, "param": null}})
        }
        Shape::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
    };
    Bytes::from(body.to_string())
}

/// The upstream's answer translated: an error body into the client's `shape` (its status and
/// headers kept, for cooldown and failover), a stream event by event through `stream`, a
/// whole answer through `whole_answer`.
pub(crate) async fn answer(
    resp: UpstreamResponse,
    shape: Shape,
    stream: Option<impl sse::Translation>,
    whole_answer: fn(&Value) -> Value,
) -> Result<UpstreamResponse, TransportError> {
    let UpstreamResponse {
        status,
        headers,
        body,
    } = resp;
    if !(200..300).contains(&status) {
        let bytes = read_all(body).await?;
        return Ok(whole(status, headers, error_body(shape, status, &bytes)));
    }
    if let Some(t) = stream {
        return Ok(UpstreamResponse {
            status,
            headers,
            body: sse::translated(body, t),
        });
    }
    let bytes = read_all(body).await?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| TransportError::Broken("the upstream answer is not JSON".into()))?;
    Ok(whole(
        status,
        headers,
        Bytes::from(whole_answer(&v).to_string()),
    ))
}

/// The text of a content value: a string, or the `text` of its text parts.
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// A Messages request sent as chat completions through `forward` (an OpenAI-compatible
/// adapter's own sending), its answer translated back.
pub(crate) async fn via_chat<'a, F, Fut>(
    client: &'a super::super::client::UpstreamClient,
    key: &'a keypool_config::UpstreamKey,
    req: super::AttemptRequest<'a>,
    forward: F,
) -> Result<UpstreamResponse, TransportError>
where
    F: FnOnce(
        &'a super::super::client::UpstreamClient,
        &'a keypool_config::UpstreamKey,
        super::AttemptRequest<'a>,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<UpstreamResponse, TransportError>>,
{
    let Ok(m) = serde_json::from_slice::<serde_json::Map<String, Value>>(&req.body) else {
        return Ok(error(
            Shape::Anthropic,
            400,
            "invalid_request_error",
            "The request body must be a JSON object.",
        ));
    };
    let t = match to_chat::request(&m) {
        Ok(t) => t,
        Err(u) => return Ok(unsupported(Shape::Anthropic, &u, "chat completions")),
    };
    let resp = forward(
        client,
        key,
        super::AttemptRequest {
            path: "/chat/completions",
            body: t.body.clone(),
            ..req
        },
    )
    .await?;
    to_chat::response(resp, &t).await
}
