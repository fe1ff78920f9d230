//! What each request cost, in pico-dollars (10⁻¹² USD, exact integers), in events and in the
//! hourly rollups. An event without a price has none (never 0); rollups add what is known.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageEvents {
    Table,
    CostPico,
}

#[derive(DeriveIden)]
enum UsageHourly {
    Table,
    CostPico,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(UsageEvents::Table)
                .add_column(ColumnDef::new(UsageEvents::CostPico).big_integer().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(UsageHourly::Table)
                .add_column(
                    ColumnDef::new(UsageHourly::CostPico)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(UsageEvents::Table)
                .drop_column(UsageEvents::CostPico)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(UsageHourly::Table)
                .drop_column(UsageHourly::CostPico)
                .to_owned(),
        )
        .await
    }
}
