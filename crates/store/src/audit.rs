//! The audit log: who changed what through the admin API or the console, and when.

use sea_orm::ColumnTrait;
use sea_orm::{ActiveValue::Set, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use crate::entity::admin_audit;
use crate::{Store, StoreError};

/// One audited change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub who: String,
    pub action: String,
    pub target: String,
    /// JSON, secrets left out.
    pub detail: String,
}

impl Store {
    /// Appends one change to the audit log (its `id` is the store's).
    pub async fn record_audit(&self, row: &AuditRow) -> Result<(), StoreError> {
        admin_audit::Entity::insert(admin_audit::ActiveModel {
            at_ms: Set(row.at_ms),
            who: Set(row.who.clone()),
            action: Set(row.action.clone()),
            target: Set(row.target.clone()),
            detail: Set(row.detail.clone()),
            ..Default::default()
        })
        .exec(&self.db)
        .await?;
        Ok(())
    }

    /// The latest `limit` changes before `before_ms` (0: now), newest first.
    pub async fn audit(&self, limit: u64, before_ms: i64) -> Result<Vec<AuditRow>, StoreError> {
        let mut q = admin_audit::Entity::find();
        if before_ms > 0 {
            q = q.filter(admin_audit::Column::AtMs.lt(before_ms));
        }
        Ok(q.order_by_desc(admin_audit::Column::AtMs)
            .order_by_desc(admin_audit::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| AuditRow {
                id: m.id,
                at_ms: m.at_ms,
                who: m.who,
                action: m.action,
                target: m.target,
                detail: m.detail,
            })
            .collect())
    }
}
