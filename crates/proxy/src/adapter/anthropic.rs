//! The Anthropic adapter: the request goes to `{endpoint}{path}` as it came (the body untouched),
//! with the key as `x-api-key` and an `anthropic-version` when the client sent none.
//! `anthropic-beta` and the client's own `anthropic-version` pass through. A chat completions
//! request (for a model only Anthropic keys serve) is translated to Messages and its answer
//! back ([`super::translate::to_messages`]).

use futures::FutureExt;
use futures::future::BoxFuture;
use keypool_config::UpstreamKey;
use reqwest::header::{HeaderName, HeaderValue};

use super::{AttemptRequest, TransportError, UpstreamAdapter, UpstreamResponse};
use crate::client::{Target, UpstreamClient};

/// The API version sent when the client names none (Anthropic requires one).
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// Forwards to Anthropic's Messages API.
pub struct AnthropicAdapter;

impl UpstreamAdapter for AnthropicAdapter {
    fn send<'a>(
        &'a self,
        client: &'a UpstreamClient,
        key: &'a UpstreamKey,
        req: AttemptRequest<'a>,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        async move {
            if req.path == "/chat/completions" {
                return via_messages(client, key, req).await;
            }
            forward(client, key, req).await
        }
        .boxed()
    }
}

/// A chat completions request, translated to Messages and back.
async fn via_messages(
    client: &UpstreamClient,
    key: &UpstreamKey,
    req: AttemptRequest<'_>,
) -> Result<UpstreamResponse, TransportError> {
    use super::translate::{Shape, error, to_messages, unsupported};
    let Ok(chat) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&req.body)
    else {
        return Ok(error(
            Shape::OpenAi,
            400,
            "invalid_request_error",
            "The request body must be a JSON object.",
        ));
    };
    let t = match to_messages::request(&chat) {
        Ok(t) => t,
        Err(u) => return Ok(unsupported(Shape::OpenAi, &u, "Anthropic")),
    };
    let resp = forward(
        client,
        key,
        AttemptRequest {
            path: "/messages",
            body: t.body.clone(),
            ..req
        },
    )
    .await?;
    to_messages::response(resp, &t).await
}

/// Sends a Messages request as it is.
async fn forward(
    client: &UpstreamClient,
    key: &UpstreamKey,
    req: AttemptRequest<'_>,
) -> Result<UpstreamResponse, TransportError> {
    let target = Target::new(&key.endpoint_url, req.path, req.query)?;
    // `sk: asis`: the caller's own credential (an OAuth bearer token)
    let mut headers = super::upstream_headers(key, &req, HeaderName::from_static("x-api-key"), "")?;
    let version = HeaderName::from_static("anthropic-version");
    if !headers.contains_key(&version) {
        headers.insert(version, HeaderValue::from_static(DEFAULT_VERSION));
    }
    client.send(req.method, &target, headers, req.body).await
}
