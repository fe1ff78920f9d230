//! `read body` → `inspect` → model check → `transform`: the body is read once, bounded by
//! `max_body_bytes` (413), parsed into a JSON object only when the gateway needs one (a
//! credential in it, or transforms), and inspected once for model, stream and size.
//! Reading is bounded in time (`body_timeout`, 408) and, across every connection at once, in
//! bytes (`max_buffered_request_bytes`, 503 with `Retry-After`): a slow or oversized upload
//! never holds memory for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::http::header;
use actix_web::{HttpRequest, web};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use keypool_config::gateway::Position;
use keypool_policy::gateway::GatewayRuntime;
use keypool_types::{ApiError, ErrorKind};
use serde_json::{Map, Value};

use crate::inspect::{Inspected, inspect};

/// What a body buffer reserves up front at most; larger bodies grow as they arrive.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

/// Request body bytes being received right now, across every worker, and the most allowed.
#[derive(Debug, Default)]
pub struct Receiving(AtomicUsize);

impl Receiving {
    /// Counts `n` more bytes against `cap`; `false` (and nothing counted) past it.
    fn take(&self, n: usize, cap: usize) -> bool {
        let mut now = self.0.load(Ordering::Relaxed);
        loop {
            let next = now.saturating_add(n);
            if next > cap {
                return false;
            }
            match self
                .0
                .compare_exchange_weak(now, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => now = seen,
            }
        }
    }

    fn give_back(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes being received now.
    pub fn now(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// How a body is read: its size limit, its time limit, and the budget shared by every
/// connection.
pub(super) struct Limits {
    pub max_bytes: usize,
    pub timeout: std::time::Duration,
    pub receiving: Arc<Receiving>,
    pub max_receiving: usize,
}

/// A request body, read on first need.
pub(super) struct Body {
    payload: Option<web::Payload>,
    limit: usize,
    timeout: std::time::Duration,
    receiving: Arc<Receiving>,
    max_receiving: usize,
    /// Bytes of this body counted in `receiving` (given back when the body is dropped).
    counted: usize,
    bytes: Bytes,
    /// The body as a JSON object, when a phase needed one and it is one.
    json: Option<Map<String, Value>>,
}

impl Body {
    pub fn new(payload: web::Payload, limits: Limits) -> Self {
        Self {
            payload: Some(payload),
            limit: limits.max_bytes,
            timeout: limits.timeout,
            receiving: limits.receiving,
            max_receiving: limits.max_receiving,
            counted: 0,
            bytes: Bytes::new(),
            json: None,
        }
    }

    /// The JSON object, if it was parsed.
    pub fn json(&self) -> Option<&Map<String, Value>> {
        self.json.as_ref()
    }

    /// Reads the whole body (once) and, unless it is multipart, parses it as a JSON object.
    pub async fn read_json(&mut self, req: &HttpRequest) -> Result<(), ApiError> {
        self.read(req).await?;
        if self.json.is_none() && !content_type(req).starts_with("multipart/") {
            self.json = serde_json::from_slice(&self.bytes).ok();
        }
        Ok(())
    }

    /// Reads the body once, refusing more than the limit (by `Content-Length` up front, or as
    /// it arrives) with 413.
    async fn read(&mut self, req: &HttpRequest) -> Result<(), ApiError> {
        let Some(mut payload) = self.payload.take() else {
            return Ok(());
        };
        let limit = self.limit;
        let too_large = || {
            ApiError::new(
                ErrorKind::BodyTooLarge,
                format!("The request body is larger than the {limit} bytes this gateway accepts."),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        // reserved as it arrives, never from the declared length (a client may declare 1 MB and
        // send 40 bytes); the first 64 KiB at once
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(INITIAL_BODY_CAPACITY));
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let chunk = match tokio::time::timeout_at(deadline, payload.next()).await {
                Err(_) => {
                    return Err(ApiError::new(
                        ErrorKind::RequestTimeout,
                        format!(
                            "The request body did not arrive within {} s.",
                            self.timeout.as_secs_f64()
                        ),
                    ));
                }
                Ok(None) => break,
                Ok(Some(chunk)) => chunk.map_err(|e| {
                    ApiError::new(
                        ErrorKind::InvalidRequest,
                        format!("Could not read the request body: {e}"),
                    )
                })?,
            };
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
            if !self.receiving.take(chunk.len(), self.max_receiving) {
                let mut busy = ApiError::new(
                    ErrorKind::ServerBusy,
                    "keypool is receiving too many request bytes at once; retry shortly.",
                );
                busy.retry_after_secs = Some(1);
                return Err(busy);
            }
            self.counted += chunk.len();
            buf.extend_from_slice(&chunk);
        }
        self.bytes = buf.freeze();
        Ok(())
    }

    /// The body as the upstream will get it, inspected: the model checked against the
    /// gateway's list (the model the client asked for), a `body:` credential removed, the
    /// gateway's transforms applied.
    pub async fn inspect(
        mut self,
        req: &HttpRequest,
        gw: &GatewayRuntime,
        path: &str,
    ) -> Result<Inspected, ApiError> {
        if gw.credential_in_body() || gw.spec.transforms() {
            self.read_json(req).await?;
        } else {
            self.read(req).await?;
        }
        let checked_model = self.json.is_some();
        let body = match self.json.as_mut() {
            Some(map) => {
                if let Some(m) = map.get("model").and_then(Value::as_str) {
                    gw.check_model(m)?;
                }
                if let Some(Position::Body(f)) = gw.position() {
                    map.remove(f.as_str());
                }
                keypool_policy::gateway::transform(&gw.spec, map);
                Bytes::from(serde_json::to_vec(map).map_err(|e| {
                    ApiError::new(
                        ErrorKind::InvalidRequest,
                        format!("Could not encode the body: {e}"),
                    )
                })?)
            }
            None => std::mem::take(&mut self.bytes),
        };
        let inspected = inspect(path, content_type(req), body)?;
        if inspected.model == path {
            // a gateway limited to some models serves only requests that name one
            if gw.spec.models.is_some() {
                return Err(ApiError::new(
                    ErrorKind::ModelNotFound,
                    "This gateway serves only its models: the request must name one.",
                ));
            }
        } else if !checked_model {
            gw.check_model(&inspected.model)?;
        }
        Ok(inspected)
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // received: the bytes now belong to the request (bounded by max_body_bytes each)
        self.receiving.give_back(self.counted);
    }
}

pub(crate) fn content_type(req: &HttpRequest) -> &str {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}
