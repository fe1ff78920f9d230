//! The OpenAI adapter: the request goes to `{endpoint}{path}` as it came, with the key's bearer.
//! A Messages request (for a model only OpenAI-compatible keys serve) is translated to chat
//! completions and its answer back ([`super::translate::to_chat`]).

use futures::FutureExt;
use futures::future::BoxFuture;
use keypool_config::UpstreamKey;
use reqwest::header::AUTHORIZATION;

use super::{AttemptRequest, TransportError, UpstreamAdapter, UpstreamResponse};
use crate::client::{Target, UpstreamClient};

/// Forwards to OpenAI and OpenAI-compatible endpoints unchanged.
pub struct OpenAiAdapter;

impl UpstreamAdapter for OpenAiAdapter {
    fn send<'a>(
        &'a self,
        client: &'a UpstreamClient,
        key: &'a UpstreamKey,
        req: AttemptRequest<'a>,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        async move {
            if req.path == "/messages" {
                return super::translate::via_chat(client, key, req, forward).await;
            }
            forward(client, key, req).await
        }
        .boxed()
    }
}

/// Sends an OpenAI request as it is, with the key's bearer.
async fn forward(
    client: &UpstreamClient,
    key: &UpstreamKey,
    req: AttemptRequest<'_>,
) -> Result<UpstreamResponse, TransportError> {
    let target = Target::new(&key.endpoint_url, req.path, req.query)?;
    let headers = super::upstream_headers(key, &req, AUTHORIZATION, "Bearer ")?;
    client.send(req.method, &target, headers, req.body).await
}
