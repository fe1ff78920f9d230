//! `authenticate`: the credential, read where the gateway's policy says it is, checked by the
//! gateway's method. What the caller's credential occupied (a header, a query parameter) does
//! not travel upstream.

use actix_web::HttpRequest;
use keypool_config::gateway::Position;
use keypool_policy::Caller;
use keypool_policy::auth::CredentialSource;
use keypool_policy::gateway::{GatewayRuntime, query_arg, remove_query_arg};
use keypool_types::ApiError;

use super::body::Body;

/// Who the caller is, and what of the request carried its credential.
pub(super) struct Authenticated {
    pub caller: Caller,
    /// The query string to forward (without an `arg:` credential); `None` when empty.
    pub query: Option<String>,
    /// The header that carried the credential: dropped from what goes upstream.
    pub header: Option<String>,
    /// The credential itself, kept only for the gateway's `secret:` list rules.
    pub credential: Option<String>,
}

/// An HTTP request as a place to find a credential.
pub struct Incoming<'a> {
    pub req: &'a HttpRequest,
    pub body: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl CredentialSource for Incoming<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.req
            .headers()
            .get(name)
            .map(actix_web::http::header::HeaderValue::as_bytes)
    }

    fn query_arg(&self, name: &str) -> Option<String> {
        query_arg(self.req.query_string(), name)
    }

    fn body_field(&self, name: &str) -> Option<String> {
        match self.body {
            Some(map) => keypool_policy::gateway::body_credential(map, name),
            // an endpoint without a JSON body takes the query parameter of that name
            None => self.query_arg(name),
        }
    }
}

pub(super) fn caller(
    gw: &GatewayRuntime,
    req: &HttpRequest,
    body: &Body,
) -> Result<Authenticated, ApiError> {
    let incoming = Incoming {
        req,
        body: body.json(),
    };
    let credential = gw.credential(&incoming);
    let caller = gw.authenticate(credential.as_deref())?;
    let lists = !(gw.spec.whitelist.is_empty() && gw.spec.blacklist.is_empty());
    let q = req.query_string();
    let (query, header) = match gw.position() {
        Some(Position::Arg(a)) => (remove_query_arg(q, a), None),
        Some(Position::Header(h)) if h != "authorization" => (q.to_owned(), Some(h.clone())),
        _ => (q.to_owned(), None),
    };
    Ok(Authenticated {
        caller,
        query: Some(query).filter(|q| !q.is_empty()),
        header,
        credential: credential
            .filter(|_| lists)
            .map(std::borrow::Cow::into_owned),
    })
}
