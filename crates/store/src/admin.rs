//! What the admin service persists: gateways and keys with their owner, and run-time settings.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, EntityTrait, QueryOrder};

use crate::entity::{admin_gateways, admin_keys, admin_settings};
use crate::{Store, StoreError};

/// A stored gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRow {
    pub name: String,
    pub spec: String,
    pub owner: String,
    pub updated_ms: i64,
}

/// A stored key (never its secret in clear).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub name: String,
    pub spec: String,
    pub sealed_secret: Option<String>,
    pub owner: String,
    pub enabled: bool,
    pub updated_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    pub async fn gateways(&self) -> Result<Vec<GatewayRow>, StoreError> {
        Ok(admin_gateways::Entity::find()
            .order_by_asc(admin_gateways::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| GatewayRow {
                name: m.name,
                spec: m.spec,
                owner: m.owner,
                updated_ms: m.updated_ms,
            })
            .collect())
    }

    /// Inserts or replaces a gateway; answers its `updated_ms`.
    pub async fn save_gateway(
        &self,
        name: &str,
        spec: &str,
        owner: &str,
    ) -> Result<i64, StoreError> {
        let at = now_ms();
        admin_gateways::Entity::insert(admin_gateways::ActiveModel {
            name: Set(name.to_owned()),
            spec: Set(spec.to_owned()),
            owner: Set(owner.to_owned()),
            updated_ms: Set(at),
        })
        .on_conflict(
            OnConflict::column(admin_gateways::Column::Name)
                .update_columns([
                    admin_gateways::Column::Spec,
                    admin_gateways::Column::Owner,
                    admin_gateways::Column::UpdatedMs,
                ])
                .to_owned(),
        )
        .exec(&self.db)
        .await?;
        Ok(at)
    }

    pub async fn delete_gateway(&self, name: &str) -> Result<(), StoreError> {
        admin_gateways::Entity::delete_by_id(name.to_owned())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        Ok(admin_keys::Entity::find()
            .order_by_asc(admin_keys::Column::UpdatedMs)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| KeyRow {
                name: m.name,
                spec: m.spec,
                sealed_secret: m.sealed_secret,
                owner: m.owner,
                enabled: m.enabled,
                updated_ms: m.updated_ms,
            })
            .collect())
    }

    /// Inserts or replaces a key row. `updated_ms` is kept when the row exists, so keys keep
    /// their order.
    pub async fn save_key(&self, row: &KeyRow) -> Result<(), StoreError> {
        admin_keys::Entity::insert(admin_keys::ActiveModel {
            name: Set(row.name.clone()),
            spec: Set(row.spec.clone()),
            sealed_secret: Set(row.sealed_secret.clone()),
            owner: Set(row.owner.clone()),
            enabled: Set(row.enabled),
            updated_ms: Set(if row.updated_ms == 0 {
                now_ms()
            } else {
                row.updated_ms
            }),
        })
        .on_conflict(
            OnConflict::column(admin_keys::Column::Name)
                .update_columns([
                    admin_keys::Column::Spec,
                    admin_keys::Column::SealedSecret,
                    admin_keys::Column::Owner,
                    admin_keys::Column::Enabled,
                ])
                .to_owned(),
        )
        .exec(&self.db)
        .await?;
        Ok(())
    }

    pub async fn delete_key(&self, name: &str) -> Result<(), StoreError> {
        admin_keys::Entity::delete_by_id(name.to_owned())
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

impl Store {
    /// A run-time setting's value (JSON) and when it was set; `None` when never set.
    pub async fn setting(&self, name: &str) -> Result<Option<(String, i64)>, StoreError> {
        Ok(admin_settings::Entity::find_by_id(name.to_owned())
            .one(&self.db)
            .await?
            .map(|m| (m.value, m.updated_ms)))
    }

    /// Sets a run-time setting; answers its `updated_ms`.
    pub async fn save_setting(&self, name: &str, value: &str) -> Result<i64, StoreError> {
        let at = now_ms();
        admin_settings::Entity::insert(admin_settings::ActiveModel {
            name: Set(name.to_owned()),
            value: Set(value.to_owned()),
            updated_ms: Set(at),
        })
        .on_conflict(
            OnConflict::column(admin_settings::Column::Name)
                .update_columns([
                    admin_settings::Column::Value,
                    admin_settings::Column::UpdatedMs,
                ])
                .to_owned(),
        )
        .exec(&self.db)
        .await?;
        Ok(at)
    }
}
