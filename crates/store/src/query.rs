//! Reads for monitoring and admin, key counters, retention.

use std::collections::BTreeMap;

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use crate::entity::{key_counters, request_logs, usage_events, usage_hourly};
use crate::{Store, StoreError};

const DAY_MS: i64 = 86_400_000;

/// The latest time the store reads by (unix ms of the year 10000): ranges beyond it are
/// refused by the admin API and clamped here, so no range arithmetic overflows.
pub const LATEST_MS: i64 = 253_402_300_800_000;

/// How [`Store::usage_totals`] groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    Gateway,
    Key,
    Model,
    /// UTC day (`YYYY-MM-DD` as unix ms of its midnight).
    Day,
}

/// Calls and tokens of one group over a time range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotal {
    pub group: String,
    pub calls: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Parts of `prompt_tokens`: read from the prompt cache, written to it, written for an
    /// hour.
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub cache_write_1h_tokens: i64,
    /// What the calls with a price cost, in pico-dollars.
    pub cost_pico: i64,
}

/// Calls in one hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourCalls {
    pub hour_ms: i64,
    pub calls: i64,
    pub total_tokens: i64,
    /// Pico-dollars.
    pub cost_pico: i64,
}

/// A key's persisted counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCounterRow {
    pub key_name: String,
    pub used: i64,
    pub success: i64,
    pub failure: i64,
    pub last_error: Option<String>,
}

impl Store {
    /// Calls and tokens per group for hours starting in `[from_ms, to_ms)`, from the rollups
    /// (never a scan of the event table), largest total first.
    pub async fn usage_totals(
        &self,
        from_ms: i64,
        to_ms: i64,
        grouping: Grouping,
        gateway: Option<&str>,
    ) -> Result<Vec<UsageTotal>, StoreError> {
        let mut q = usage_hourly::Entity::find()
            .filter(usage_hourly::Column::HourMs.gte(from_ms))
            .filter(usage_hourly::Column::HourMs.lt(to_ms));
        if let Some(g) = gateway {
            q = q.filter(usage_hourly::Column::Gateway.eq(g));
        }
        let mut totals: BTreeMap<String, UsageTotal> = BTreeMap::new();
        for r in q.all(&self.db).await? {
            let group = match grouping {
                Grouping::Gateway => r.gateway.clone(),
                Grouping::Key => r.key_name.clone(),
                Grouping::Model => r.model.clone(),
                Grouping::Day => (r.hour_ms - r.hour_ms.rem_euclid(DAY_MS)).to_string(),
            };
            let t = totals.entry(group.clone()).or_insert_with(|| UsageTotal {
                group,
                ..UsageTotal::default()
            });
            t.calls += r.calls;
            t.errors += r.errors;
            t.prompt_tokens += r.prompt_tokens;
            t.completion_tokens += r.completion_tokens;
            t.total_tokens += r.total_tokens;
            t.cache_read_tokens += r.cache_read_tokens;
            t.cache_write_tokens += r.cache_write_tokens;
            t.cache_write_1h_tokens += r.cache_write_1h_tokens;
            t.cost_pico = t.cost_pico.saturating_add(r.cost_pico);
        }
        let mut out: Vec<UsageTotal> = totals.into_values().collect();
        out.sort_by(|a, b| {
            b.total_tokens
                .cmp(&a.total_tokens)
                .then(a.group.cmp(&b.group))
        });
        Ok(out)
    }

    /// Calls, tokens and cost per caller (`tok-<hash>`, anonymous calls as `-`) for events in
    /// `[from_ms, to_ms)`, largest total first: from the events (the rollups do not keep
    /// callers), so only as far back as their retention.
    pub async fn usage_by_caller(
        &self,
        from_ms: i64,
        to_ms: i64,
        gateway: Option<&str>,
    ) -> Result<Vec<UsageTotal>, StoreError> {
        use sea_orm::sea_query::Expr;
        type Row = (Option<String>, i64, i64, i64, i64, i64, i64, i64, i64, i64);
        // Postgres sums a BIGINT as NUMERIC: each sum cast back
        let sum = |c: &str| Expr::cust(format!("CAST(COALESCE(SUM({c}), 0) AS BIGINT)"));
        let mut q = usage_events::Entity::find()
            .select_only()
            .column(usage_events::Column::Caller)
            .column_as(Expr::cust("COUNT(*)"), "calls")
            .column_as(
                Expr::cust(
                    "CAST(COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0) AS BIGINT)",
                ),
                "errors",
            );
        for c in crate::write::USAGE_SUMS {
            q = q.column_as(sum(c), c);
        }
        q = q
            .filter(usage_events::Column::AtMs.gte(from_ms))
            .filter(usage_events::Column::AtMs.lt(to_ms));
        if let Some(g) = gateway {
            q = q.filter(usage_events::Column::Gateway.eq(g));
        }
        let rows: Vec<Row> = q
            .group_by(usage_events::Column::Caller)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut out: Vec<UsageTotal> = rows
            .into_iter()
            .map(
                |(caller, calls, errors, p, c, t, cr, cw, cw1, cost)| UsageTotal {
                    group: caller.unwrap_or_else(|| "-".to_owned()),
                    calls,
                    errors,
                    prompt_tokens: p,
                    completion_tokens: c,
                    total_tokens: t,
                    cache_read_tokens: cr,
                    cache_write_tokens: cw,
                    cache_write_1h_tokens: cw1,
                    cost_pico: cost,
                },
            )
            .collect();
        out.sort_by(|a, b| {
            b.total_tokens
                .cmp(&a.total_tokens)
                .then(a.group.cmp(&b.group))
        });
        Ok(out)
    }

    /// Calls per hour of the UTC day that contains `day_ms` (24 entries), optionally for one
    /// gateway.
    pub async fn calls_per_hour(
        &self,
        day_ms: i64,
        gateway: Option<&str>,
    ) -> Result<Vec<HourCalls>, StoreError> {
        let day_ms = day_ms.clamp(0, LATEST_MS);
        self.hours_from(day_ms - day_ms.rem_euclid(DAY_MS), gateway)
            .await
    }

    /// Calls per hour for the 24 hours from `start_ms` (an hour boundary: a local midnight in a
    /// whole-hour timezone), optionally for one gateway.
    pub async fn hours_from(
        &self,
        start_ms: i64,
        gateway: Option<&str>,
    ) -> Result<Vec<HourCalls>, StoreError> {
        // clamped: 24 hours after it always fit in an i64, whatever the caller asked
        let start_ms = start_ms.clamp(0, LATEST_MS);
        let start = start_ms - start_ms.rem_euclid(3_600_000);
        let mut q = usage_hourly::Entity::find()
            .filter(usage_hourly::Column::HourMs.gte(start))
            .filter(usage_hourly::Column::HourMs.lt(start + DAY_MS));
        if let Some(g) = gateway {
            q = q.filter(usage_hourly::Column::Gateway.eq(g));
        }
        let mut hours: Vec<HourCalls> = (0..24)
            .map(|h| HourCalls {
                hour_ms: start + h * 3_600_000,
                calls: 0,
                total_tokens: 0,
                cost_pico: 0,
            })
            .collect();
        for r in q.all(&self.db).await? {
            let i = usize::try_from((r.hour_ms - start) / 3_600_000)
                .unwrap_or(0)
                .min(23);
            hours[i].calls += r.calls;
            hours[i].total_tokens += r.total_tokens;
            hours[i].cost_pico = hours[i].cost_pico.saturating_add(r.cost_pico);
        }
        Ok(hours)
    }

    /// What each caller of `gateway` spent (pico-dollars) in events at or after `from_ms`: the
    /// start-up restore of caller budgets (the rollups do not keep callers).
    pub async fn caller_spend(
        &self,
        gateway: &str,
        from_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        use sea_orm::sea_query::Expr;
        let rows: Vec<(Option<String>, i64)> = usage_events::Entity::find()
            .select_only()
            .column(usage_events::Column::Caller)
            // Postgres sums a BIGINT as NUMERIC: cast back
            .column_as(
                Expr::cust("CAST(COALESCE(SUM(cost_pico), 0) AS BIGINT)"),
                "spent",
            )
            .filter(usage_events::Column::Gateway.eq(gateway))
            .filter(usage_events::Column::AtMs.gte(from_ms))
            .filter(usage_events::Column::Caller.is_not_null())
            .group_by(usage_events::Column::Caller)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(c, spent)| Some((c?, spent)))
            .collect())
    }

    /// Number of stored events.
    pub async fn count_events(&self) -> Result<u64, StoreError> {
        Ok(usage_events::Entity::find().count(&self.db).await?)
    }

    /// Events at or after `since_ms`, oldest first, at most `limit`.
    pub async fn events_since(
        &self,
        since_ms: i64,
        limit: u64,
    ) -> Result<Vec<usage_events::Model>, StoreError> {
        Ok(usage_events::Entity::find()
            .filter(usage_events::Column::AtMs.gte(since_ms))
            .order_by_asc(usage_events::Column::AtMs)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// The request log of one event.
    pub async fn request_log(
        &self,
        event_id: &str,
    ) -> Result<Option<request_logs::Model>, StoreError> {
        Ok(request_logs::Entity::find_by_id(event_id.to_owned())
            .one(&self.db)
            .await?)
    }

    pub async fn key_counters(&self) -> Result<Vec<KeyCounterRow>, StoreError> {
        Ok(key_counters::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| KeyCounterRow {
                key_name: m.key_name,
                used: m.used,
                success: m.success,
                failure: m.failure,
                last_error: m.last_error,
            })
            .collect())
    }

    /// Saves absolute counter values (a snapshot of the key actors).
    pub async fn save_key_counters(
        &self,
        rows: &[KeyCounterRow],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        use key_counters::Column as C;
        if rows.is_empty() {
            return Ok(());
        }
        key_counters::Entity::insert_many(rows.iter().map(|r| key_counters::ActiveModel {
            key_name: Set(r.key_name.clone()),
            used: Set(r.used),
            success: Set(r.success),
            failure: Set(r.failure),
            last_error: Set(r.last_error.clone()),
            updated_ms: Set(now_ms),
        }))
        .on_conflict(
            OnConflict::column(C::KeyName)
                .update_columns([C::Used, C::Success, C::Failure, C::LastError, C::UpdatedMs])
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await?;
        Ok(())
    }

    /// Deletes events and request logs older than `cutoff_ms`; returns the events deleted.
    pub async fn delete_older_than(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        request_logs::Entity::delete_many()
            .filter(request_logs::Column::AtMs.lt(cutoff_ms))
            .exec(&self.db)
            .await?;
        let res = usage_events::Entity::delete_many()
            .filter(usage_events::Column::AtMs.lt(cutoff_ms))
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected)
    }
}
