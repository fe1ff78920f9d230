//! The Azure OpenAI adapter: OpenAI's API under a deployment. `/chat/completions` for model
//! `gpt-4o` goes to `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=…`
//! (the deployment from the key's `deployments`, else the model's own name), the key as
//! `api-key`. Bodies and answers are OpenAI's, untouched.

use futures::FutureExt;
use futures::future::BoxFuture;
use keypool_config::UpstreamKey;
use reqwest::header::HeaderName;

use super::{AttemptRequest, TransportError, UpstreamAdapter, UpstreamResponse};
use crate::client::{Target, UpstreamClient};

/// Forwards to an Azure OpenAI resource.
pub struct AzureAdapter;

impl UpstreamAdapter for AzureAdapter {
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

/// Sends an OpenAI request under the model's deployment.
async fn forward(
    client: &UpstreamClient,
    key: &UpstreamKey,
    req: AttemptRequest<'_>,
) -> Result<UpstreamResponse, TransportError> {
    let Some(azure) = &key.azure else {
        return Err(TransportError::Connect(
            "an Azure key without its settings".into(),
        ));
    };
    let deployment = segment(azure.deployment(req.model));
    let path = format!("/openai/deployments/{deployment}{}", req.path);
    let query = match req.query {
        Some(q) if !q.is_empty() => format!("{q}&api-version={}", azure.api_version),
        _ => format!("api-version={}", azure.api_version),
    };
    let target = Target::new(&key.endpoint_url, &path, Some(&query))?;
    // `sk: asis`: the caller's own credential (an Entra ID bearer token)
    let headers = super::upstream_headers(key, &req, HeaderName::from_static("api-key"), "")?;
    client.send(req.method, &target, headers, req.body).await
}

/// `name` as one path segment: unreserved characters as they are, every other byte
/// percent-encoded, so a model name can never add a segment or a query (Azure then answers
/// its own 404 for a deployment that does not exist).
fn segment(name: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'~')
            || (b == b'.' && !name.trim_matches('.').is_empty())
        {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_model_is_one_path_segment() {
        assert_eq!(super::segment("gpt-4o"), "gpt-4o");
        assert_eq!(super::segment("gpt-4.1_mini"), "gpt-4.1_mini");
        assert_eq!(super::segment("a/../b?x=1"), "a%2F..%2Fb%3Fx%3D1");
        assert_eq!(super::segment(".."), "%2E%2E");
        assert_eq!(super::segment(""), "");
    }
}
