//! `GET /llm/api/{name}/usage`: a gateway's own monitoring, for its callers (the seed's 监控):
//! tokens used against the quota, and calls per hour today in the gateway's timezone.
//!
//! The caller authenticates exactly as for the gateway's API (header, or query argument; a
//! `body:` gateway takes the same name as a query argument here). Tokens used are the live,
//! settled count; calls per hour come from the store's hourly rollups (written within about a
//! second), or are `null` with `dbtype: none`.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use chrono::{TimeZone, Utc};
use keypool_config::gateway::Position;
use keypool_proxy::Frontend;
use keypool_proxy::http::error_response;
use keypool_store::Store;
use keypool_types::{ApiError, ErrorKind};
use serde_json::json;

/// What the monitoring endpoint reads from.
pub struct Monitor {
    pub store: Option<Store>,
}

pub async fn gateway_usage(
    req: &HttpRequest,
    frontend: &Frontend,
    monitor: &Monitor,
    name: &str,
) -> HttpResponse {
    match usage(req, frontend, monitor, name).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e, None),
    }
}

async fn usage(
    req: &HttpRequest,
    frontend: &Frontend,
    monitor: &Monitor,
    name: &str,
) -> Result<HttpResponse, ApiError> {
    let gw = frontend.gateways.get(name).ok_or_else(|| {
        ApiError::new(
            ErrorKind::GatewayNotFound,
            format!("There is no gateway named `{name}`."),
        )
    })?;
    let credential = match gw.position() {
        None => None,
        Some(Position::Header(h)) => req
            .headers()
            .get(h.as_str())
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        Some(Position::Arg(a) | Position::Body(a)) => {
            keypool_policy::gateway::query_arg(req.query_string(), a)
        }
    };
    gw.authenticate(credential.as_deref())?;
    let tz = gw.spec.timezone;
    let now = Utc::now().with_timezone(&tz);
    let midnight = tz
        .from_local_datetime(&now.date_naive().and_hms_opt(0, 0, 0).unwrap_or_default())
        .earliest()
        .map_or_else(|| now.timestamp_millis(), |t| t.timestamp_millis());
    let hours = match &monitor.store {
        None => serde_json::Value::Null,
        Some(store) => {
            let rows = store.hours_from(midnight, Some(name)).await.map_err(|e| {
                tracing::warn!(error = %e, "usage query failed");
                ApiError::new(ErrorKind::Internal, "The usage store is unavailable.")
            })?;
            rows.iter()
                .map(|h| {
                    let at = Utc
                        .timestamp_millis_opt(h.hour_ms)
                        .single()
                        .map(|t| t.with_timezone(&tz).format("%H:%M").to_string())
                        .unwrap_or_default();
                    json!({"hour": at, "calls": h.calls, "total_tokens": h.total_tokens})
                })
                .collect()
        }
    };
    let body = json!({
        "object": "gateway.usage",
        "gateway": name,
        "timezone": tz.name(),
        "day": now.format("%Y-%m-%d").to_string(),
        "token_quota": gw.spec.token_quota,
        "tokens_used": gw.state.tokens_used(),
        "calls_per_hour": hours,
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(body))
}
