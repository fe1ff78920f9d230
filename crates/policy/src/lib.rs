//! Gateway policy: who may call, and what they may do.
//!
//! - [`ClientAuth`]: the default gateway's (`/v1/*`) client authentication:
//!   `Authorization: Bearer <token>` checked in constant time against the top-level
//!   `authorization` tokens and every upstream's own `authorization` list.
//! - [`gateway`]: the per-tenant gateways at `/llm/api/{name}/v1/*`: auth methods, lists, sliding
//!   rate limits, quotas and request transforms.

pub mod gateway;
#[cfg(test)]
mod gateway_tests;

use std::sync::Arc;

use keypool_config::Config;
use keypool_types::{ApiError, ErrorKind, constant_time_eq};

/// Who is calling, as far as the gateway could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The client token the caller presented and the gateway accepted; `None` when anonymous
    /// (an open gateway, or only `noauth` upstreams are open to it).
    pub token: Option<Arc<str>>,
    /// What usage and logs record instead of the token: `tok-<12 hex of sha256>`.
    pub id: Option<Arc<str>>,
}

impl Caller {
    pub const ANONYMOUS: Self = Self {
        token: None,
        id: None,
    };
}

/// `tok-<12 hex>` of SHA-256: identifies a token in usage and logs without revealing it.
pub fn caller_id(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(token.as_bytes());
    let mut id = String::with_capacity(16);
    id.push_str("tok-");
    for b in digest.iter().take(6) {
        use std::fmt::Write;
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// The default gateway's client authentication.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Every token that authenticates a caller (top-level and per-upstream ones), with its id.
    tokens: Vec<(Arc<str>, Arc<str>)>,
    /// Some upstream is `noauth`: callers without a valid token may still reach it.
    anonymous_allowed: bool,
}

impl ClientAuth {
    pub fn from_config(config: &Config) -> Self {
        Self::from_parts(&config.client_tokens, &config.upstreams)
    }

    /// From the top-level tokens and the keys in use (whose own `authorization` tokens and
    /// `noauth` flags count too).
    pub fn from_parts(
        client_tokens: &[String],
        upstreams: &[Arc<keypool_config::UpstreamKey>],
    ) -> Self {
        let mut tokens: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let all = client_tokens
            .iter()
            .chain(upstreams.iter().flat_map(|u| u.authorization.iter()));
        for t in all {
            if !tokens.iter().any(|(x, _)| x.as_ref() == t) {
                tokens.push((Arc::from(t.as_str()), Arc::from(caller_id(t))));
            }
        }
        let anonymous_allowed = tokens.is_empty() || upstreams.iter().any(|u| u.noauth);
        Self {
            tokens,
            anonymous_allowed,
        }
    }

    /// No token is configured anywhere: anyone may call (the start-up log warns loudly).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks an `Authorization` header value. Every configured token is compared, in constant
    /// time, whatever matches first, so timing tells nothing about which token is close.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, ApiError> {
        if self.tokens.is_empty() {
            return Ok(Caller::ANONYMOUS);
        }
        let presented = authorization.map(strip_bearer);
        let mut found: Option<&(Arc<str>, Arc<str>)> = None;
        if let Some(p) = presented {
            for entry in &self.tokens {
                if constant_time_eq(entry.0.as_bytes(), p) && found.is_none() {
                    found = Some(entry);
                }
            }
        }
        match found {
            Some((token, id)) => Ok(Caller {
                token: Some(token.clone()),
                id: Some(id.clone()),
            }),
            None if self.anonymous_allowed => Ok(Caller::ANONYMOUS),
            None => Err(ApiError::new(
                ErrorKind::InvalidApiKey,
                match presented {
                    None => "Missing API key: send `Authorization: Bearer <token>`.",
                    Some(_) => "Incorrect API key provided.",
                },
            )),
        }
    }
}

/// `Bearer abc` → `abc` (case-insensitive scheme, surrounding spaces trimmed).
pub(crate) fn strip_bearer(value: &[u8]) -> &[u8] {
    let v = value.trim_ascii();
    if v.len() >= 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        v[7..].trim_ascii()
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(yaml: &str) -> ClientAuth {
        ClientAuth::from_config(&keypool_config::from_yaml(yaml).unwrap())
    }

    #[test]
    fn tokens_and_bearer() {
        let a = auth("authorization: one,two\n");
        assert_eq!(
            a.authenticate(Some(b"Bearer two"))
                .unwrap()
                .token
                .as_deref(),
            Some("two")
        );
        assert_eq!(
            a.authenticate(Some(b"bearer  one "))
                .unwrap()
                .token
                .as_deref(),
            Some("one")
        );
        let err = a.authenticate(Some(b"Bearer three")).unwrap_err();
        assert_eq!(err.status(), 401);
        assert!(
            a.authenticate(None)
                .unwrap_err()
                .message
                .contains("Missing")
        );
    }

    #[test]
    fn upstream_tokens_count_and_noauth_admits_anonymous() {
        let a = auth(
            "authorization: g\nupstreams:\n  - {sk: k, endpoint: 'http://x/v1', authorization: u}\n",
        );
        assert!(a.authenticate(Some(b"Bearer u")).is_ok());
        assert!(a.authenticate(None).is_err());
        let open = auth(
            "authorization: g\nupstreams:\n  - {sk: k, endpoint: 'http://x/v1', noauth: true}\n",
        );
        assert_eq!(open.authenticate(None).unwrap().token, None);
        assert_eq!(open.authenticate(Some(b"Bearer nope")).unwrap().token, None);
    }

    #[test]
    fn no_tokens_is_open() {
        let a = auth("upstreams: []\n");
        assert!(a.is_open());
        assert!(a.authenticate(None).is_ok());
    }
}
