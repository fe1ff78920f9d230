//! Per-key counters, snapshotted from the key actors and restored at start-up.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "key_counters")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub key_name: String,
    pub used: i64,
    pub success: i64,
    pub failure: i64,
    pub last_error: Option<String>,
    pub updated_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
