//! Upstream keys as the admin service manages them. Never a secret in clear.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "admin_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// The key's spec as JSON (config field names) without `sk`.
    pub spec: String,
    /// Admin-added keys: the secret sealed with `admin.secret_key`; config keys: none.
    pub sealed_secret: Option<String>,
    /// `config` | `admin`.
    pub owner: String,
    pub enabled: bool,
    pub updated_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
