//! Which headers cross keypool, in each direction.
//!
//! Upstream: by default only the headers an OpenAI request needs (content type, accept, OpenAI's
//! own, user agent, trace context); with `keep_header`, every client header except hop-by-hop
//! ones, `host`, `content-length`, `accept-encoding` and credentials. The client's credentials
//! never travel on; the adapter adds the key's own.
//! Downstream: the upstream's headers minus hop-by-hop ones and the framing headers actix-web
//! computes itself.

use actix_web::http::header::HeaderMap as ActixHeaders;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Forwarded by default (lower-case).
const DEFAULT_FORWARD: &[&str] = &[
    "content-type",
    "accept",
    "user-agent",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "anthropic-version",
    "anthropic-beta",
    "traceparent",
    "tracestate",
    "x-request-id",
];

/// Never forwarded upstream, even with `keep_header`.
const NEVER_FORWARD: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "cookie",
    "host",
    "content-length",
    "accept-encoding",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Never copied back to the client.
const NEVER_RETURN: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
    "date",
    "server",
    // an upstream's cookies are for keypool's own connection to it, never for its callers
    "set-cookie",
];

/// The request headers to send upstream, for both kinds of key: `(default set, keep_header set)`.
/// Computed once per request; the attempt picks by its key's `keep_header`. The second set is
/// only filled when `keep_all` (some key has `keep_header`).
pub fn upstream_headers(client: &ActixHeaders, keep_all: bool) -> (HeaderMap, HeaderMap) {
    let mut default = HeaderMap::new();
    let mut all = HeaderMap::new();
    for (name, value) in client {
        let n = name.as_str();
        if NEVER_FORWARD.contains(&n) || !(keep_all || DEFAULT_FORWARD.contains(&n)) {
            continue;
        }
        let (Ok(hn), Ok(hv)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) else {
            continue;
        };
        if keep_all {
            all.append(hn.clone(), hv.clone());
        }
        if DEFAULT_FORWARD.contains(&n) {
            default.append(hn, hv);
        }
    }
    (default, all)
}

/// Whether an upstream response header goes back to the client.
pub fn returns_to_client(name: &str) -> bool {
    !NEVER_RETURN.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName as AName, HeaderValue as AValue};

    #[test]
    fn credentials_never_forwarded() {
        let mut h = ActixHeaders::new();
        for (n, v) in [
            ("authorization", "Bearer client-token"),
            ("x-api-key", "k"),
            ("cookie", "c=1"),
            ("content-type", "application/json"),
            ("x-custom", "1"),
            ("connection", "keep-alive"),
        ] {
            h.append(AName::from_static(n), AValue::from_static(v));
        }
        let (default, all) = upstream_headers(&h, true);
        assert!(upstream_headers(&h, false).1.is_empty());
        assert_eq!(default.len(), 1);
        assert!(default.contains_key("content-type"));
        assert_eq!(all.len(), 2);
        assert!(all.contains_key("x-custom"));
        assert!(!all.contains_key("authorization") && !all.contains_key("cookie"));
        assert!(returns_to_client("x-request-id"));
        assert!(!returns_to_client("transfer-encoding"));
        assert!(!returns_to_client("set-cookie"));
    }
}
