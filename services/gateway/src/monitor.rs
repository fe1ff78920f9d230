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
use keypool_proxy::Frontend;
use keypool_proxy::http::error_response;
use keypool_proxy::pipeline::Incoming;
use keypool_store::Store;
use keypool_types::{ApiError, ErrorKind};
use serde_json::json;

/// What the monitoring endpoints read from.
pub struct Monitor {
    pub store: Option<Store>,
    pub pool: keypool_pool::PoolHandle,
    pub writer_stats: Option<std::sync::Arc<keypool_store::WriterStats>>,
    /// `false` on the control plane (`keypool admin`): API calls go to the frontends.
    pub proxying: bool,
    pub metrics_token: Option<keypool_types::Secret>,
    /// The registry `/metrics` serves.
    pub telemetry: keypool_telemetry::Telemetry,
}

/// `GET /metrics` and `/v1/metrics`: the Prometheus text format. Key and usage-writer gauges
/// are read now; everything else was counted as it happened.
pub async fn prometheus(req: &HttpRequest, monitor: &Monitor) -> HttpResponse {
    if let Some(token) = &monitor.metrics_token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(actix_web::http::header::HeaderValue::as_bytes)
            .map(keypool_types::strip_bearer)
            .unwrap_or_default();
        if !keypool_types::constant_time_eq(presented, token.expose().as_bytes()) {
            return error_response(
                &ApiError::new(
                    ErrorKind::InvalidApiKey,
                    "The metrics need `Authorization: Bearer <telemetry.metrics_token>`.",
                ),
                None,
            );
        }
    }
    let m = monitor.telemetry.metrics();
    let now = tokio::time::Instant::now();
    for k in monitor.pool.list().await {
        let name = [k.name.as_str()];
        let (healthy, disabled, cooling) = match &k.health {
            keypool_pool::Health::Healthy => (1, 0, 0.0),
            keypool_pool::Health::CoolingUntil(t) => {
                (0, 0, t.saturating_duration_since(now).as_secs_f64())
            }
            keypool_pool::Health::Disabled { .. } => (0, 1, 0.0),
        };
        m.key_healthy.with_label_values(&name).set(healthy);
        m.key_disabled.with_label_values(&name).set(disabled);
        m.key_cooldown.with_label_values(&name).set(cooling);
        m.key_window_requests
            .with_label_values(&name)
            .set(i64::try_from(k.window_requests).unwrap_or(i64::MAX));
        m.key_window_tokens
            .with_label_values(&name)
            .set(i64::try_from(k.window_tokens).unwrap_or(i64::MAX));
        m.key_in_flight
            .with_label_values(&name)
            .set(i64::from(k.in_flight));
        if let Some(rpm) = k.rpm {
            m.key_rpm_limit.with_label_values(&name).set(i64::from(rpm));
        }
        if let Some(tpm) = k.tpm {
            m.key_tpm_limit
                .with_label_values(&name)
                .set(i64::try_from(tpm).unwrap_or(i64::MAX));
        }
    }
    if let Some(stats) = &monitor.writer_stats {
        use std::sync::atomic::Ordering::Relaxed;
        m.usage_queue_depth
            .set(i64::try_from(stats.queued.load(Relaxed)).unwrap_or(i64::MAX));
        keypool_telemetry::metrics::Metrics::catch_up(
            &m.usage_written,
            stats.written.load(Relaxed),
        );
        keypool_telemetry::metrics::Metrics::catch_up(
            &m.usage_spilled,
            stats.spilled.load(Relaxed),
        );
        keypool_telemetry::metrics::Metrics::catch_up(
            &m.usage_dropped,
            stats.dropped.load(Relaxed),
        );
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
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
    // the gateway's own credential rule, a `body:` field read from the query
    let incoming = Incoming { req, body: None };
    gw.authenticate(gw.credential(&incoming).as_deref())?;
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
