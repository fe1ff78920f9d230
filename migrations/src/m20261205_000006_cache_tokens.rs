//! Cache tokens get their own columns, in events and in the hourly rollups: prompt tokens read
//! from a provider's prompt cache, written to it, and of those written the ones kept an hour.
//! They are parts of `prompt_tokens`, never added to it (docs/DECISIONS.md, "Prompt tokens
//! include the cache tokens, once").
//!
//! One column per statement: SQLite alters a table one change at a time.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Cache {
    #[sea_orm(iden = "cache_read_tokens")]
    Read,
    #[sea_orm(iden = "cache_write_tokens")]
    Write,
    #[sea_orm(iden = "cache_write_1h_tokens")]
    Write1h,
}

const COLUMNS: [Cache; 3] = [Cache::Read, Cache::Write, Cache::Write1h];

#[derive(DeriveIden)]
enum UsageEvents {
    Table,
}

#[derive(DeriveIden)]
enum UsageHourly {
    Table,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in COLUMNS {
            // an event without usage has none (as its prompt_tokens)
            m.alter_table(
                Table::alter()
                    .table(UsageEvents::Table)
                    .add_column(ColumnDef::new(column).big_integer().null())
                    .to_owned(),
            )
            .await?;
            m.alter_table(
                Table::alter()
                    .table(UsageHourly::Table)
                    .add_column(ColumnDef::new(column).big_integer().not_null().default(0))
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in COLUMNS {
            m.alter_table(
                Table::alter()
                    .table(UsageEvents::Table)
                    .drop_column(column)
                    .to_owned(),
            )
            .await?;
            m.alter_table(
                Table::alter()
                    .table(UsageHourly::Table)
                    .drop_column(column)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
