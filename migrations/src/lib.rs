//! keypool's schema migrations (sea-orm-migration). Append-only: a released migration is never
//! edited; changes come as new `mYYYYMMDD_HHMMSS_name` files with `up` and `down`.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_usage;
mod m20261122_000002_provider;
mod m20261122_000003_admin;
mod m20261201_000004_pg_time_indexes;
mod m20261201_000005_event_ids_unindexed;
mod m20261205_000006_cache_tokens;
mod m20261205_000007_cost;
mod m20261205_000008_settings;
mod m20261206_000009_routing;
mod m20261207_000010_audit;

/// All migrations, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_usage::Migration),
            Box::new(m20261122_000002_provider::Migration),
            Box::new(m20261122_000003_admin::Migration),
            Box::new(m20261201_000004_pg_time_indexes::Migration),
            Box::new(m20261201_000005_event_ids_unindexed::Migration),
            Box::new(m20261205_000006_cache_tokens::Migration),
            Box::new(m20261205_000007_cost::Migration),
            Box::new(m20261205_000008_settings::Migration),
            Box::new(m20261206_000009_routing::Migration),
            Box::new(m20261207_000010_audit::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "keypool_migrations".into_iden()
    }
}
