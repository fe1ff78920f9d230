//! Error kinds and their wire form.
//!
//! Every refusal keypool makes itself is an [`ApiError`] with an [`ErrorKind`]. The kind decides
//! the HTTP status, the OpenAI `type`, the `code` and the admin API's gRPC code, from the single
//! table in [`ErrorKind::wire`], so that SDKs raise the right exception (`AuthenticationError` for 401,
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
    // The control plane's own (the admin API):
    /// A gateway or key spec that does not validate; the message names each field.
    InvalidSpec,
    /// A gateway or key by that name exists already.
    AlreadyExists,
    /// The change is not allowed as things are (a config-owned entry, no `secret_key`, ...).
    FailedPrecondition,
    /// The store is unreachable.
    StoreUnavailable,
    /// A live-usage subscriber fell too far behind and was dropped.
    SubscriberTooSlow,
    /// An upstream answer larger than keypool buffers (`max_response_bytes`,
    /// `max_stream_event_bytes`).
    ResponseTooLarge,
    /// The request body did not arrive within `body_timeout`.
    RequestTimeout,
    /// Too many request bytes are being received at once (`max_buffered_request_bytes`).
    ServerBusy,
    /// A gateway's `content_safety` rule blocked the request or the answer (400).
    ContentPolicyViolation,
}

/// A gRPC status code (its number), the admin API's column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum GrpcCode {
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// The wire form of one kind: HTTP status, OpenAI `type`, `code`, and the gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub status: u16,
    pub r#type: &'static str,
    pub code: &'static str,
    pub grpc: GrpcCode,
}

impl ErrorKind {
    /// The one table: kind → HTTP status, OpenAI `type`, `code`, gRPC code.
    #[rustfmt::skip] // one row per kind: the table reads as a table
    pub const fn wire(self) -> Wire {
        use GrpcCode as G;
        let (status, r#type, code, grpc) = match self {
            Self::InvalidApiKey          => (401, "invalid_request_error", "invalid_api_key",          G::Unauthenticated),
            Self::InvalidRequest         => (400, "invalid_request_error", "invalid_request",          G::InvalidArgument),
            Self::BodyTooLarge           => (413, "invalid_request_error", "request_too_large",        G::InvalidArgument),
            Self::ModelNotFound          => (404, "invalid_request_error", "model_not_found",          G::NotFound),
            Self::NotFound               => (404, "invalid_request_error", "unknown_url",              G::NotFound),
            Self::PoolBudgetExhausted    => (429, "rate_limit_error",      "pool_budget_exhausted",    G::ResourceExhausted),
            Self::UpstreamRateLimited    => (429, "rate_limit_error",      "upstream_rate_limited",    G::ResourceExhausted),
            Self::NoUsableKey            => (503, "server_error",          "no_usable_key",            G::Unavailable),
            Self::UpstreamUnreachable    => (502, "server_error",          "upstream_unreachable",     G::Unavailable),
            Self::UpstreamTimeout        => (504, "server_error",          "upstream_timeout",         G::DeadlineExceeded),
            Self::UpstreamStreamBroken   => (502, "server_error",          "upstream_stream_broken",   G::Unavailable),
            Self::Internal               => (500, "server_error",          "internal_error",           G::Internal),
            Self::GatewayNotFound        => (404, "invalid_request_error", "gateway_not_found",        G::NotFound),
            Self::GatewayInactive        => (403, "permission_error",      "gateway_inactive",         G::PermissionDenied),
            Self::GatewayExpired         => (403, "permission_error",      "gateway_expired",          G::PermissionDenied),
            Self::AccessDenied           => (403, "permission_error",      "access_denied",            G::PermissionDenied),
            Self::RateLimitExceeded      => (429, "rate_limit_error",      "rate_limit_exceeded",      G::ResourceExhausted),
            Self::InsufficientQuota      => (429, "insufficient_quota",    "insufficient_quota",       G::ResourceExhausted),
            Self::SharedStateUnavailable => (503, "server_error",          "shared_state_unavailable", G::Unavailable),
            Self::InvalidSpec            => (400, "invalid_request_error", "invalid_spec",             G::InvalidArgument),
            Self::AlreadyExists          => (409, "invalid_request_error", "already_exists",           G::AlreadyExists),
            Self::FailedPrecondition     => (409, "invalid_request_error", "failed_precondition",      G::FailedPrecondition),
            Self::StoreUnavailable       => (503, "server_error",          "store_unavailable",        G::Unavailable),
            Self::SubscriberTooSlow      => (429, "rate_limit_error",      "subscriber_too_slow",      G::ResourceExhausted),
            Self::ResponseTooLarge       => (502, "server_error",          "response_too_large",       G::Unavailable),
            Self::RequestTimeout         => (408, "invalid_request_error", "request_timeout",          G::DeadlineExceeded),
            Self::ServerBusy             => (503, "server_error",          "server_busy",              G::Unavailable),
            Self::ContentPolicyViolation => (400, "invalid_request_error", "content_policy_violation", G::InvalidArgument),
        };
        Wire { status, r#type, code, grpc }
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

/// The API a request speaks, which decides the shape of keypool's own errors on it and which
/// keys can answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Surface {
    /// OpenAI's API (`/v1/chat/completions`, `/v1/embeddings`, ...).
    #[default]
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`).
    Anthropic,
    /// OpenAI's Responses API (`/v1/responses`, `/v1/responses/{id}/...`): OpenAI's errors,
    /// its own stream events, answered by OpenAI keys only.
    Responses,
}

impl Surface {
    /// The surface of an API path (`/v1/...`, already normalised).
    pub fn of_path(path: &str) -> Self {
        if let Some(rest) = path.strip_prefix("/v1/responses")
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return Self::Responses;
        }
        match path.strip_prefix("/v1/messages") {
            Some("" | "/count_tokens") => Self::Anthropic,
            _ => Self::OpenAi,
        }
    }
}

/// Anthropic's error `type` for a status (its documented set).
pub(crate) fn anthropic_type(status: u16) -> &'static str {
    match status {
        400 | 408 | 409 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
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

impl ApiError {
    /// Anthropic's error `type` for an HTTP status (its documented set).
    pub fn anthropic_type(status: u16) -> &'static str {
        anthropic_type(status)
    }

    /// The error body in the shape of `surface`: OpenAI's ([`Self::to_json`]) or Anthropic's
    /// `{"type":"error","error":{"type","message"}}`.
    pub fn to_json_for(&self, surface: Surface) -> String {
        match surface {
            Surface::OpenAi | Surface::Responses => self.to_json(),
            Surface::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": anthropic_type(self.status()), "message": self.message},
            })
            .to_string(),
        }
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
    fn anthropic_surface_gets_anthropic_errors() {
        assert_eq!(Surface::of_path("/v1/messages"), Surface::Anthropic);
        assert_eq!(
            Surface::of_path("/v1/messages/count_tokens"),
            Surface::Anthropic
        );
        assert_eq!(Surface::of_path("/v1/messagesx"), Surface::OpenAi);
        assert_eq!(Surface::of_path("/v1/chat/completions"), Surface::OpenAi);
        assert_eq!(Surface::of_path("/v1/responses"), Surface::Responses);
        assert_eq!(
            Surface::of_path("/v1/responses/resp_1/input_items"),
            Surface::Responses
        );
        assert_eq!(Surface::of_path("/v1/responsesx"), Surface::OpenAi);
        let err = ApiError::new(ErrorKind::InvalidApiKey, "no");
        let v: serde_json::Value =
            serde_json::from_str(&err.to_json_for(Surface::Anthropic)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["message"], "no");
        let busy = ApiError::new(ErrorKind::PoolBudgetExhausted, "wait");
        assert!(
            busy.to_json_for(Surface::Anthropic)
                .contains("rate_limit_error")
        );
    }

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
    fn the_grpc_column_follows_the_http_one() {
        let agree = |kind: ErrorKind| {
            let w = kind.wire();
            let expected = match w.status {
                400 | 413 => GrpcCode::InvalidArgument,
                401 => GrpcCode::Unauthenticated,
                403 => GrpcCode::PermissionDenied,
                404 => GrpcCode::NotFound,
                429 => GrpcCode::ResourceExhausted,
                500 => GrpcCode::Internal,
                502 | 503 => GrpcCode::Unavailable,
                504 => GrpcCode::DeadlineExceeded,
                _ => w.grpc, // 409: AlreadyExists or FailedPrecondition, by kind
            };
            assert_eq!(w.grpc, expected, "{kind:?}");
        };
        for kind in [
            ErrorKind::InvalidApiKey,
            ErrorKind::BodyTooLarge,
            ErrorKind::GatewayExpired,
            ErrorKind::ModelNotFound,
            ErrorKind::InsufficientQuota,
            ErrorKind::Internal,
            ErrorKind::NoUsableKey,
            ErrorKind::UpstreamTimeout,
            ErrorKind::InvalidSpec,
            ErrorKind::StoreUnavailable,
        ] {
            agree(kind);
        }
        assert_eq!(ErrorKind::AlreadyExists.wire().grpc as i32, 6);
        assert_eq!(ErrorKind::FailedPrecondition.wire().grpc as i32, 9);
        assert_eq!(ErrorKind::InvalidApiKey.wire().grpc as i32, 16);
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
