//! Usage events record the provider of the key that served them (`openai`, `replicate`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageEvents {
    Table,
    Provider,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(UsageEvents::Table)
                .add_column(ColumnDef::new(UsageEvents::Provider).string().null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(UsageEvents::Table)
                .drop_column(UsageEvents::Provider)
                .to_owned(),
        )
        .await
    }
}
