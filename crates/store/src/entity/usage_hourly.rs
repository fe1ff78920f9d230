//! Hourly rollups per gateway / key / model, maintained by the writer.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_hourly")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub hour_ms: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub gateway: String,
    /// Empty when no key was leased.
    #[sea_orm(primary_key, auto_increment = false)]
    pub key_name: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub model: String,
    pub calls: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub cache_write_1h_tokens: i64,
    /// Pico-dollars.
    pub cost_pico: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
