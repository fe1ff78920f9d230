//! Usage events, request logs, hourly rollups and per-key counters.
//!
//! Times are unix milliseconds (`BIGINT`), identical on SQLite and PostgreSQL.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageEvents {
    Table,
    Id,
    AtMs,
    Gateway,
    Caller,
    Model,
    KeyName,
    Attempts,
    Status,
    Stream,
    LatencyMs,
    TtfbMs,
    PromptTokens,
    CompletionTokens,
    TotalTokens,
    ClientIp,
    UserAgent,
    Error,
}

#[derive(DeriveIden)]
enum RequestLogs {
    Table,
    EventId,
    AtMs,
    RequestHeaders,
    RequestBody,
    ResponseBody,
}

#[derive(DeriveIden)]
enum UsageHourly {
    Table,
    HourMs,
    Gateway,
    KeyName,
    Model,
    Calls,
    Errors,
    PromptTokens,
    CompletionTokens,
    TotalTokens,
}

#[derive(DeriveIden)]
enum KeyCounters {
    Table,
    KeyName,
    Used,
    Success,
    Failure,
    LastError,
    UpdatedMs,
}

fn big(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col)
        .big_integer()
        .not_null()
        .default(0)
        .to_owned()
}

#[allow(clippy::too_many_lines)] // a released migration: its tables column by column, never edited
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(UsageEvents::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(UsageEvents::Id)
                        .string_len(32)
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(UsageEvents::AtMs).big_integer().not_null())
                .col(ColumnDef::new(UsageEvents::Gateway).string().not_null())
                .col(ColumnDef::new(UsageEvents::Caller).string().null())
                .col(ColumnDef::new(UsageEvents::Model).string().not_null())
                .col(ColumnDef::new(UsageEvents::KeyName).string().null())
                .col(ColumnDef::new(UsageEvents::Attempts).integer().not_null())
                .col(ColumnDef::new(UsageEvents::Status).integer().not_null())
                .col(ColumnDef::new(UsageEvents::Stream).boolean().not_null())
                .col(
                    ColumnDef::new(UsageEvents::LatencyMs)
                        .big_integer()
                        .not_null(),
                )
                .col(ColumnDef::new(UsageEvents::TtfbMs).big_integer().null())
                .col(
                    ColumnDef::new(UsageEvents::PromptTokens)
                        .big_integer()
                        .null(),
                )
                .col(
                    ColumnDef::new(UsageEvents::CompletionTokens)
                        .big_integer()
                        .null(),
                )
                .col(
                    ColumnDef::new(UsageEvents::TotalTokens)
                        .big_integer()
                        .null(),
                )
                .col(ColumnDef::new(UsageEvents::ClientIp).string().null())
                .col(ColumnDef::new(UsageEvents::UserAgent).string().null())
                .col(ColumnDef::new(UsageEvents::Error).string().null())
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_usage_events_at")
                .table(UsageEvents::Table)
                .col(UsageEvents::AtMs)
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(RequestLogs::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(RequestLogs::EventId)
                        .string_len(32)
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(RequestLogs::AtMs).big_integer().not_null())
                .col(ColumnDef::new(RequestLogs::RequestHeaders).text().null())
                .col(ColumnDef::new(RequestLogs::RequestBody).text().null())
                .col(ColumnDef::new(RequestLogs::ResponseBody).text().null())
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_request_logs_at")
                .table(RequestLogs::Table)
                .col(RequestLogs::AtMs)
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(UsageHourly::Table)
                .if_not_exists()
                .col(ColumnDef::new(UsageHourly::HourMs).big_integer().not_null())
                .col(ColumnDef::new(UsageHourly::Gateway).string().not_null())
                .col(ColumnDef::new(UsageHourly::KeyName).string().not_null())
                .col(ColumnDef::new(UsageHourly::Model).string().not_null())
                .col(big(UsageHourly::Calls))
                .col(big(UsageHourly::Errors))
                .col(big(UsageHourly::PromptTokens))
                .col(big(UsageHourly::CompletionTokens))
                .col(big(UsageHourly::TotalTokens))
                .primary_key(
                    Index::create()
                        .col(UsageHourly::HourMs)
                        .col(UsageHourly::Gateway)
                        .col(UsageHourly::KeyName)
                        .col(UsageHourly::Model),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(KeyCounters::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(KeyCounters::KeyName)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(big(KeyCounters::Used))
                .col(big(KeyCounters::Success))
                .col(big(KeyCounters::Failure))
                .col(ColumnDef::new(KeyCounters::LastError).string().null())
                .col(big(KeyCounters::UpdatedMs))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(KeyCounters::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(UsageHourly::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(RequestLogs::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(UsageEvents::Table).to_owned())
            .await
    }
}
