//! The OpenAI adapter: the request goes to `{endpoint}{path}` as it came, with the key's bearer.

use futures::FutureExt;
use futures::future::BoxFuture;
use keypool_config::UpstreamKey;
use reqwest::header::{AUTHORIZATION, HeaderValue};

use super::{AttemptRequest, TransportError, UpstreamAdapter, UpstreamResponse};
use crate::client::UpstreamClient;

/// Forwards to OpenAI and OpenAI-compatible endpoints unchanged.
pub struct OpenAiAdapter;

/// `{endpoint}{path}?{query}`: the endpoint was parsed once at load; its path is the prefix.
fn upstream_url(key: &UpstreamKey, path: &str, query: Option<&str>) -> String {
    let endpoint = &key.endpoint_url;
    let origin = &endpoint[..url::Position::BeforePath];
    let base = endpoint.path().trim_end_matches('/');
    let mut url = String::with_capacity(
        origin.len() + base.len() + path.len() + query.map_or(0, |q| q.len() + 1),
    );
    url.push_str(origin);
    url.push_str(base);
    url.push_str(path);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

impl UpstreamAdapter for OpenAiAdapter {
    fn send<'a>(
        &'a self,
        client: &'a UpstreamClient,
        key: &'a UpstreamKey,
        req: AttemptRequest<'a>,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        async move {
            let url = upstream_url(key, req.path, req.query);
            let mut headers = req.headers.clone();
            // hyper would otherwise format one from the URL for every request
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
                let mut value = HeaderValue::from_str(&bearer).map_err(|_| {
                    TransportError::Connect("the key is not a valid header value".into())
                })?;
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
            client.send(req.method, &url, headers, req.body).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(endpoint: &str) -> UpstreamKey {
        UpstreamKey::plain("k", endpoint).unwrap()
    }

    #[test]
    fn the_endpoint_path_prefixes_the_request_path() {
        let k = key("https://api.openai.com/v1");
        assert_eq!(
            upstream_url(&k, "/chat/completions", None),
            "https://api.openai.com/v1/chat/completions"
        );
        let k = key("http://127.0.0.1:8080/openai/v1/");
        assert_eq!(
            upstream_url(&k, "/models", Some("limit=2&after=x")),
            "http://127.0.0.1:8080/openai/v1/models?limit=2&after=x"
        );
        let k = key("http://[::1]:9000");
        assert_eq!(
            upstream_url(&k, "/embeddings", None),
            "http://[::1]:9000/embeddings"
        );
    }
}
