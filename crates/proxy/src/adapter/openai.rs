//! The OpenAI adapter: the request goes to `{endpoint}{path}` as it came, with the key's bearer.
//! A Messages request (for a model only OpenAI-compatible keys serve) is translated to chat
//! completions and its answer back ([`super::translate::to_chat`]).

use futures::FutureExt;
use futures::future::BoxFuture;
use keypool_config::UpstreamKey;
use reqwest::header::{AUTHORIZATION, HeaderValue};

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
    let mut headers = req.headers.clone();
    // HTTP/1.1 wants a Host; the origin-form request target carries none
    let authority = &key.endpoint_url[url::Position::BeforeHost..url::Position::AfterPort];
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(reqwest::header::HOST, host);
    }
    if key.passthrough_auth {
        if let Some(v) = req.client_authorization {
            headers.insert(AUTHORIZATION, v.clone());
        }
    } else {
        let mut bearer = String::with_capacity(7 + key.sk.expose().len());
        bearer.push_str("Bearer ");
        bearer.push_str(key.sk.expose());
        let mut value = HeaderValue::from_str(&bearer)
            .map_err(|_| TransportError::Connect("the key is not a valid header value".into()))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    client.send(req.method, &target, headers, req.body).await
}
