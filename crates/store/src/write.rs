//! Writing a batch: events once each, their logs, and the hourly rollups, in one transaction.

use std::collections::{BTreeMap, HashSet};

use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
    TransactionTrait,
};

use crate::entity::{request_logs, usage_events, usage_hourly};
use crate::{Store, StoreError, StoredEvent};

const HOUR_MS: i64 = 3_600_000;

#[derive(Default)]
struct Rollup {
    calls: i64,
    errors: i64,
    prompt: i64,
    completion: i64,
    total: i64,
}

impl Store {
    /// Writes a batch in one transaction. Events whose id is already stored (a replay) are skipped,
    /// and only the new ones are rolled up, so every event counts exactly once. Returns how many
    /// were new.
    pub async fn write_batch(&self, events: &[StoredEvent]) -> Result<usize, StoreError> {
        Ok(self.write_events(events, true).await?.len())
    }

    /// [`Store::write_batch`], answering which events (indices into `events`) were new.
    pub async fn write_batch_new(&self, events: &[StoredEvent]) -> Result<Vec<usize>, StoreError> {
        self.write_events(events, true).await
    }

    /// [`Store::write_batch`] without looking for already-stored ids first: for events fresh
    /// from the request path (random 128-bit ids), the first attempt at writing them. A retry
    /// must use `write_batch`, since a commit whose answer was lost may have landed.
    pub async fn write_new_batch(&self, events: &[StoredEvent]) -> Result<usize, StoreError> {
        Ok(self.write_events(events, false).await?.len())
    }

    async fn write_events(
        &self,
        events: &[StoredEvent],
        dedupe: bool,
    ) -> Result<Vec<usize>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.db.begin().await?;
        let existing: HashSet<String> = if dedupe {
            let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
            usage_events::Entity::find()
                .select_only()
                .column(usage_events::Column::Id)
                .filter(usage_events::Column::Id.is_in(ids))
                .into_tuple::<String>()
                .all(&txn)
                .await?
                .into_iter()
                .collect()
        } else {
            HashSet::new()
        };
        let mut seen = HashSet::new();
        let new: Vec<usize> = (0..events.len())
            .filter(|&i| !existing.contains(&events[i].id) && seen.insert(events[i].id.as_str()))
            .collect();
        let fresh: Vec<&StoredEvent> = new.iter().map(|&i| &events[i]).collect();
        if fresh.is_empty() {
            txn.commit().await?;
            return Ok(new);
        }
        usage_events::Entity::insert_many(fresh.iter().map(|e| event_row(e)))
            .exec_without_returning(&txn)
            .await?;
        let logs: Vec<request_logs::ActiveModel> = fresh
            .iter()
            .filter_map(|e| {
                e.log.as_ref().map(|l| request_logs::ActiveModel {
                    event_id: Set(e.id.clone()),
                    at_ms: Set(e.at_ms),
                    request_headers: Set(l.request_headers.clone()),
                    request_body: Set(l.request_body.clone()),
                    response_body: Set(l.response_body.clone()),
                })
            })
            .collect();
        if !logs.is_empty() {
            request_logs::Entity::insert_many(logs)
                .exec_without_returning(&txn)
                .await?;
        }
        let mut groups: BTreeMap<(i64, &str, &str, &str), Rollup> = BTreeMap::new();
        for e in &fresh {
            let hour = e.at_ms - e.at_ms.rem_euclid(HOUR_MS);
            let g = groups
                .entry((
                    hour,
                    &e.gateway,
                    e.key_name.as_deref().unwrap_or(""),
                    &e.model,
                ))
                .or_default();
            g.calls += 1;
            g.errors += i64::from(e.status >= 400);
            g.prompt += e.prompt_tokens.unwrap_or(0);
            g.completion += e.completion_tokens.unwrap_or(0);
            g.total += e.total_tokens.unwrap_or(0);
        }
        upsert_rollups(&txn, &groups).await?;
        txn.commit().await?;
        Ok(new)
    }
}

fn event_row(e: &StoredEvent) -> usage_events::ActiveModel {
    usage_events::ActiveModel {
        id: Set(e.id.clone()),
        at_ms: Set(e.at_ms),
        gateway: Set(e.gateway.clone()),
        caller: Set(e.caller.clone()),
        model: Set(e.model.clone()),
        key_name: Set(e.key_name.clone()),
        attempts: Set(e.attempts),
        status: Set(e.status),
        stream: Set(e.stream),
        latency_ms: Set(e.latency_ms),
        ttfb_ms: Set(e.ttfb_ms),
        prompt_tokens: Set(e.prompt_tokens),
        completion_tokens: Set(e.completion_tokens),
        total_tokens: Set(e.total_tokens),
        client_ip: Set(e.client_ip.clone()),
        user_agent: Set(e.user_agent.clone()),
        error: Set(e.error.clone()),
        provider: Set(e.provider.clone()),
    }
}

/// `INSERT ... ON CONFLICT (hour, gateway, key, model) DO UPDATE SET calls = calls + excluded.calls, ...`
async fn upsert_rollups<C: ConnectionTrait>(
    db: &C,
    groups: &BTreeMap<(i64, &str, &str, &str), Rollup>,
) -> Result<(), StoreError> {
    use usage_hourly::Column as C;
    let mut stmt = Query::insert();
    stmt.into_table(usage_hourly::Entity).columns([
        C::HourMs,
        C::Gateway,
        C::KeyName,
        C::Model,
        C::Calls,
        C::Errors,
        C::PromptTokens,
        C::CompletionTokens,
        C::TotalTokens,
    ]);
    for ((hour, gateway, key, model), r) in groups {
        stmt.values([
            (*hour).into(),
            (*gateway).into(),
            (*key).into(),
            (*model).into(),
            r.calls.into(),
            r.errors.into(),
            r.prompt.into(),
            r.completion.into(),
            r.total.into(),
        ])
        .map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?;
    }
    let add = |c: C| {
        (
            c,
            Expr::col((usage_hourly::Entity, c)).add(Expr::col((Alias::new("excluded"), c))),
        )
    };
    stmt.on_conflict(
        OnConflict::columns([C::HourMs, C::Gateway, C::KeyName, C::Model])
            .values([
                add(C::Calls),
                add(C::Errors),
                add(C::PromptTokens),
                add(C::CompletionTokens),
                add(C::TotalTokens),
            ])
            .to_owned(),
    );
    db.execute(&stmt).await?;
    Ok(())
}
