//! Routing and guardrails in usage events: the model a client asked for when a fallback model
//! served it (`model` stays the one that served), whether the response cache answered, and
//! the guardrail rules that matched (by name).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageEvents {
    Table,
    RequestedModel,
    CacheHit,
    Guardrails,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // one column per statement: SQLite adds one at a time
        m.alter_table(
            Table::alter()
                .table(UsageEvents::Table)
                .add_column(ColumnDef::new(UsageEvents::RequestedModel).text().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(UsageEvents::Table)
                .add_column(
                    ColumnDef::new(UsageEvents::CacheHit)
                        .boolean()
                        .not_null()
                        .default(false),
                )
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(UsageEvents::Table)
                .add_column(ColumnDef::new(UsageEvents::Guardrails).text().null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            UsageEvents::RequestedModel,
            UsageEvents::CacheHit,
            UsageEvents::Guardrails,
        ] {
            m.alter_table(
                Table::alter()
                    .table(UsageEvents::Table)
                    .drop_column(column)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
