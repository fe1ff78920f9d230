//! The audit log: one row per change made through the admin API or the console.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "admin_audit")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at_ms: i64,
    /// Which surface and from where (`console 127.0.0.1`, `grpc 10.0.0.5:41234`); never a token.
    pub who: String,
    /// `gateway.create`, `key.update`, `prices.set`, `config.reload`, …
    pub action: String,
    /// The gateway's or key's name (empty for prices and the config).
    pub target: String,
    /// What changed, as JSON, secrets left out.
    pub detail: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
