//! `read body` → `inspect` → model check → `transform`: the body is read once, bounded by
//! `max_body_bytes` (413), parsed into a JSON object only when the gateway needs one (a
//! credential in it, or transforms), and inspected once for model, stream and size.

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

/// A request body, read on first need.
pub(super) struct Body {
    payload: Option<web::Payload>,
    limit: usize,
    bytes: Bytes,
    /// The body as a JSON object, when a phase needed one and it is one.
    json: Option<Map<String, Value>>,
}

impl Body {
    pub fn new(payload: web::Payload, limit: usize) -> Self {
        Self {
            payload: Some(payload),
            limit,
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
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("Could not read the request body: {e}"),
                )
            })?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
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
            None => self.bytes,
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

pub(crate) fn content_type(req: &HttpRequest) -> &str {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}
