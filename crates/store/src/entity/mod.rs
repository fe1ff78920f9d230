//! sea-orm entities, one module per table (see the migrations for the schema).

pub mod admin_audit;
pub mod admin_gateways;
pub mod admin_keys;
pub mod admin_settings;
pub mod key_counters;
pub mod request_logs;
pub mod usage_events;
pub mod usage_hourly;
