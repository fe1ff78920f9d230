//! The OpenAI adapter: the request goes to `{endpoint}{path}` as it came, with the key's bearer.

use futures::FutureExt;
use futures::future::BoxFuture;
use keypool_config::UpstreamKey;
use reqwest::header::{AUTHORIZATION, HeaderValue};

use super::{AttemptRequest, TransportError, UpstreamAdapter, UpstreamResponse, body_of};

/// Forwards to OpenAI and OpenAI-compatible endpoints unchanged.
pub struct OpenAiAdapter;

impl UpstreamAdapter for OpenAiAdapter {
    fn send<'a>(
        &'a self,
        client: &'a reqwest::Client,
        key: &'a UpstreamKey,
        req: AttemptRequest<'a>,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        async move {
            // the endpoint was parsed once at load; only the path and query change per request
            let mut url = key.endpoint_url.clone();
            let base = key.endpoint_url.path().trim_end_matches('/');
            let mut path = String::with_capacity(base.len() + req.path.len());
            path.push_str(base);
            path.push_str(req.path);
            url.set_path(&path);
            url.set_query(req.query);
            let mut builder = client
                .request(req.method, url)
                .headers(req.headers.clone())
                .body(req.body);
            if key.passthrough_auth {
                if let Some(v) = req.client_authorization {
                    builder = builder.header(AUTHORIZATION, v.clone());
                }
            } else {
                let mut bearer = String::with_capacity(7 + key.sk.expose().len());
                bearer.push_str("Bearer ");
                bearer.push_str(key.sk.expose());
                let mut value = HeaderValue::from_str(&bearer).map_err(|_| {
                    TransportError::Connect("the key is not a valid header value".into())
                })?;
                value.set_sensitive(true);
                builder = builder.header(AUTHORIZATION, value);
            }
            let resp = builder
                .send()
                .await
                .map_err(|e| TransportError::from_reqwest(&e))?;
            Ok(UpstreamResponse {
                status: resp.status().as_u16(),
                headers: resp.headers().clone(),
                body: body_of(resp),
            })
        }
        .boxed()
    }
}
