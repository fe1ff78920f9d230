//! `GetUsage` (from the store's rollups, callers from its events) and the prices in force.

use keypool_control::{AdminPrices, Control};
use keypool_proto::admin::v1 as pb;
use keypool_store::{Grouping, Store, UsageTotal};
use keypool_types::ErrorKind;
use tonic::Status;

use crate::{grpc, now_ms};

fn total_pb(t: UsageTotal) -> pb::UsageTotal {
    pb::UsageTotal {
        group: t.group,
        calls: t.calls,
        errors: t.errors,
        prompt_tokens: t.prompt_tokens,
        completion_tokens: t.completion_tokens,
        total_tokens: t.total_tokens,
        cache_read_tokens: t.cache_read_tokens,
        cache_write_tokens: t.cache_write_tokens,
        cache_write_1h_tokens: t.cache_write_1h_tokens,
        cost_pico: t.cost_pico,
    }
}

fn unavailable(e: &keypool_store::StoreError) -> Status {
    grpc(ErrorKind::StoreUnavailable, format!("store: {e}"))
}

/// Totals by gateway, key, model, caller and day over the request's range (default: the last
/// 24 hours), and calls per hour of its day.
pub(crate) async fn answer(
    store: &Store,
    r: &pb::GetUsageRequest,
) -> Result<pb::GetUsageResponse, Status> {
    // unix ms before the year 10000 (the store's reach)
    use keypool_store::LATEST_MS;
    for (field, ms) in [
        ("from_ms", r.from_ms),
        ("to_ms", r.to_ms),
        ("day_ms", r.day_ms),
    ] {
        if !(0..LATEST_MS).contains(&ms) {
            return Err(grpc(
                ErrorKind::InvalidRequest,
                format!(
                    "{field}: must be a unix time in milliseconds before the year 10000 (0: the default)"
                ),
            ));
        }
    }
    let now = now_ms();
    let to = if r.to_ms > 0 { r.to_ms } else { now + 1 };
    let from = if r.from_ms > 0 {
        r.from_ms
    } else {
        to - 86_400_000
    };
    // rollups are hourly: include the hour `from` falls in
    let from = from - from.rem_euclid(3_600_000);
    let gateway = Some(r.gateway.as_str()).filter(|g| !g.is_empty());
    let totals = |g: Grouping| async move {
        store
            .usage_totals(from, to, g, gateway)
            .await
            .map(|v| v.into_iter().map(total_pb).collect::<Vec<_>>())
            .map_err(|e| unavailable(&e))
    };
    let day = if r.day_ms > 0 { r.day_ms } else { now };
    let hours = store
        .calls_per_hour(day, gateway)
        .await
        .map_err(|e| unavailable(&e))?;
    let by_caller = store
        .usage_by_caller(from, to, gateway)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut by_day = totals(Grouping::Day).await?;
    by_day.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(pb::GetUsageResponse {
        by_gateway: totals(Grouping::Gateway).await?,
        by_key: totals(Grouping::Key).await?,
        by_model: totals(Grouping::Model).await?,
        calls_per_hour: hours
            .into_iter()
            .map(|h| pb::HourCalls {
                hour_ms: h.hour_ms,
                calls: h.calls,
                total_tokens: h.total_tokens,
                cost_pico: h.cost_pico,
            })
            .collect(),
        by_caller: by_caller.into_iter().map(total_pb).collect(),
        by_day,
    })
}

/// The admin API's prices and the config file's.
pub(crate) fn prices_pb(control: &Control, admin: &AdminPrices) -> pb::Prices {
    pb::Prices {
        admin: admin.entries.iter().map(pb::Price::from).collect(),
        file: control
            .config()
            .policy
            .pricing
            .iter()
            .map(pb::Price::from)
            .collect(),
        updated_at_ms: admin.updated_ms,
    }
}
