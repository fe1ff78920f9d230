//! Error kinds and their wire form.
//!
//! Every refusal keypool makes itself is an [`ApiError`] with an [`ErrorKind`]. The kind decides
//! the HTTP status, the OpenAI `type` and the `code`, from the single table in
//! [`ErrorKind::wire`], so that SDKs raise the right exception (`AuthenticationError` for 401,
//! `RateLimitError` for 429, ...). Errors that came from an upstream are passed through with the
//! upstream's own status and body instead and never become an `ApiError`.

use serde::Serialize;

/// What went wrong, in the product's words. Codes prefixed by nothing are OpenAI's own codes where
/// OpenAI has one; the rest are keypool's and documented in the README's error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No or wrong client token (401 `invalid_api_key`).
    InvalidApiKey,
    /// The body is not valid JSON / UTF-8 / multipart, or a field has the wrong type (400).
    InvalidRequest,
    /// The body is larger than `max_body_bytes` (413).
    BodyTooLarge,
    /// No upstream key serves this model for this caller (404 `model_not_found`).
    ModelNotFound,
    /// No such route (404 `unknown_url`).
    NotFound,
    /// Every key that could serve the request is out of its configured rpm/tpm budget (429).
    PoolBudgetExhausted,
    /// Every key that could serve the request is cooling down after an upstream 429 (429).
    UpstreamRateLimited,
    /// Every key that could serve the request is disabled (503).
    NoUsableKey,
    /// Could not connect to / talk to the upstream at all (502).
    UpstreamUnreachable,
    /// The upstream did not answer (first byte) in time (504).
    UpstreamTimeout,
    /// The upstream broke off a response after it had started (sent inside a stream).
    UpstreamStreamBroken,
    /// The gateway is shutting down or a bug was caught (500).
    Internal,
    /// No gateway by that name (404 `gateway_not_found`).
    GatewayNotFound,
    /// The gateway is switched off (403 `gateway_inactive`).
    GatewayInactive,
    /// The gateway's `expires_at` has passed (403 `gateway_expired`).
    GatewayExpired,
    /// Refused by the gateway's whitelist or blacklist (403 `access_denied`).
    AccessDenied,
    /// A gateway `rate_limits` entry is exhausted (429 `rate_limit_exceeded`).
    RateLimitExceeded,
    /// The gateway's `token_quota` is used up (429 `insufficient_quota`, as OpenAI's).
    InsufficientQuota,
    /// Redis (shared state) is down and `redis.on_failure: closed` (503).
    SharedStateUnavailable,
}

/// The wire form of one kind: HTTP status, OpenAI `type`, `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub status: u16,
    pub r#type: &'static str,
    pub code: &'static str,
}

impl ErrorKind {
    /// The one table: kind → status, OpenAI `type`, `code`.
    pub const fn wire(self) -> Wire {
        let (status, r#type, code) = match self {
            Self::InvalidApiKey => (401, "invalid_request_error", "invalid_api_key"),
            Self::InvalidRequest => (400, "invalid_request_error", "invalid_request"),
            Self::BodyTooLarge => (413, "invalid_request_error", "request_too_large"),
            Self::ModelNotFound => (404, "invalid_request_error", "model_not_found"),
            Self::NotFound => (404, "invalid_request_error", "unknown_url"),
            Self::PoolBudgetExhausted => (429, "rate_limit_error", "pool_budget_exhausted"),
            Self::UpstreamRateLimited => (429, "rate_limit_error", "upstream_rate_limited"),
            Self::NoUsableKey => (503, "server_error", "no_usable_key"),
            Self::UpstreamUnreachable => (502, "server_error", "upstream_unreachable"),
            Self::UpstreamTimeout => (504, "server_error", "upstream_timeout"),
            Self::UpstreamStreamBroken => (502, "server_error", "upstream_stream_broken"),
            Self::Internal => (500, "server_error", "internal_error"),
            Self::GatewayNotFound => (404, "invalid_request_error", "gateway_not_found"),
            Self::GatewayInactive => (403, "permission_error", "gateway_inactive"),
            Self::GatewayExpired => (403, "permission_error", "gateway_expired"),
            Self::AccessDenied => (403, "permission_error", "access_denied"),
            Self::RateLimitExceeded => (429, "rate_limit_error", "rate_limit_exceeded"),
            Self::InsufficientQuota => (429, "insufficient_quota", "insufficient_quota"),
            Self::SharedStateUnavailable => (503, "server_error", "shared_state_unavailable"),
        };
        Wire {
            status,
            r#type,
            code,
        }
    }
}

/// An error keypool answers itself, OpenAI-shaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// Human-readable; must never contain a secret.
    pub message: String,
    /// Seconds the client should wait, sent as `Retry-After` (429 and 503 only).
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    r#type: &'static str,
    code: &'static str,
    param: Option<()>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.wire().status
    }

    /// `{"error":{"message","type","code","param"}}` as OpenAI sends it.
    pub fn to_json(&self) -> String {
        let wire = self.kind.wire();
        let body = Body {
            error: Inner {
                message: &self.message,
                r#type: wire.r#type,
                code: wire.code,
                param: None,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.wire().code)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let err = ApiError::new(ErrorKind::InvalidApiKey, "bad \"token\"");
        let v: serde_json::Value = serde_json::from_str(&err.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "bad \"token\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(err.status(), 401);
    }

    #[test]
    fn policy_and_upstream_429_codes_differ() {
        assert_eq!(ErrorKind::PoolBudgetExhausted.wire().status, 429);
        assert_eq!(ErrorKind::UpstreamRateLimited.wire().status, 429);
        assert_ne!(
            ErrorKind::PoolBudgetExhausted.wire().code,
            ErrorKind::UpstreamRateLimited.wire().code
        );
    }
}
