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

/// The names nearly every request and answer carries, found without parsing: one function for
/// each `http` crate's type (actix's and reqwest's). Any case matches, as HTTP names are
/// case-insensitive; a name not listed returns `None` and is parsed as usual. Parsing one costs
/// ~100 instructions (a lower-cased copy, then the standard names' table), ~11 a request.
macro_rules! common_names {
    ($($name:literal => $constant:ident),* $(,)?) => {
        /// A common header name as actix's type.
        pub(crate) fn actix_name(name: &str) -> Option<actix_web::http::header::HeaderName> {
            $(if same_name(name, $name) {
                return Some(actix_web::http::header::$constant);
            })*
            None
        }

        /// A common header name as reqwest's type.
        pub(crate) fn reqwest_name(name: &str) -> Option<HeaderName> {
            $(if same_name(name, $name) {
                return Some(reqwest::header::$constant);
            })*
            None
        }
    };
}

/// The values nearly every request and answer carries (`content-type`'s), as constants: from
/// one crate's type to the other, a value is otherwise copied into an allocation of its own.
macro_rules! common_values {
    ($($value:literal),* $(,)?) => {
        /// A common header value as actix's type.
        pub(crate) fn actix_value(value: &[u8]) -> Option<actix_web::http::header::HeaderValue> {
            $(if value == $value.as_bytes() {
                return Some(actix_web::http::header::HeaderValue::from_static($value));
            })*
            None
        }

        /// A common header value as reqwest's type.
        pub(crate) fn reqwest_value(value: &[u8]) -> Option<HeaderValue> {
            $(if value == $value.as_bytes() {
                return Some(HeaderValue::from_static($value));
            })*
            None
        }
    };
}

common_values! {
    "application/json",
    "text/event-stream",
    "text/event-stream; charset=utf-8",
}

/// Whether `name` is `lower` (a lower-case name) in any case: bytes as they are first (a
/// lower-case client's), then each lowered on `name`'s side only.
fn same_name(name: &str, lower: &str) -> bool {
    name.len() == lower.len()
        && (name == lower
            || name
                .bytes()
                .zip(lower.bytes())
                .all(|(c, l)| c.to_ascii_lowercase() == l))
}

common_names! {
    "host" => HOST,
    "content-type" => CONTENT_TYPE,
    "content-length" => CONTENT_LENGTH,
    "authorization" => AUTHORIZATION,
    "date" => DATE,
    "accept" => ACCEPT,
    "user-agent" => USER_AGENT,
    "transfer-encoding" => TRANSFER_ENCODING,
    "connection" => CONNECTION,
    "accept-encoding" => ACCEPT_ENCODING,
}

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
        let (Some(hn), Some(hv)) = (
            reqwest_name(n).or_else(|| HeaderName::from_bytes(n.as_bytes()).ok()),
            reqwest_value(value.as_bytes())
                .or_else(|| HeaderValue::from_bytes(value.as_bytes()).ok()),
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
    fn a_common_name_is_the_name_parsing_gives_in_any_case() {
        for name in [
            "host",
            "Content-Type",
            "CONTENT-LENGTH",
            "authorization",
            "Date",
            "accept",
            "User-Agent",
            "transfer-encoding",
            "Connection",
            "accept-encoding",
        ] {
            assert_eq!(
                actix_name(name),
                AName::from_bytes(name.as_bytes()).ok(),
                "{name}"
            );
            assert_eq!(
                reqwest_name(name),
                HeaderName::from_bytes(name.as_bytes()).ok(),
                "{name}"
            );
        }
        for other in ["x-request-id", "content-typ", "hosts", "", "content_type"] {
            assert_eq!(actix_name(other), None, "{other}");
            assert_eq!(reqwest_name(other), None, "{other}");
        }
        for value in ["application/json", "text/event-stream"] {
            assert_eq!(
                actix_value(value.as_bytes()),
                Some(AValue::from_static(value))
            );
            assert_eq!(
                reqwest_value(value.as_bytes()),
                Some(HeaderValue::from_static(value))
            );
        }
        // values are compared exactly (a parameter's case can matter)
        assert_eq!(actix_value(b"Application/JSON"), None);
        assert_eq!(reqwest_value(b"application/json; charset=utf-8"), None);
    }

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
