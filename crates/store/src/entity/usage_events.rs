//! One row per client request.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub at_ms: i64,
    pub gateway: String,
    pub caller: Option<String>,
    pub model: String,
    pub key_name: Option<String>,
    pub attempts: i32,
    pub status: i32,
    pub stream: bool,
    pub latency_ms: i64,
    pub ttfb_ms: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub error: Option<String>,
    pub provider: Option<String>,
    /// Parts of `prompt_tokens`: read from the provider's prompt cache, written to it, and of
    /// those written the ones kept an hour.
    pub cache_read_tokens: Option<i64>,
    pub cache_write_tokens: Option<i64>,
    pub cache_write_1h_tokens: Option<i64>,
    /// What it cost, in pico-dollars; none for a model without a price.
    pub cost_pico: Option<i64>,
    /// The model asked for, when a fallback (`model`) served it.
    pub requested_model: Option<String>,
    /// Answered from the response cache.
    pub cache_hit: bool,
    /// Guardrail rules that matched, by name.
    pub guardrails: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
