//! The audit log: every change made through the admin API or the console (and every reloaded
//! config file), who made it, when, and what, without secrets.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AdminAudit {
    Table,
    Id,
    AtMs,
    Who,
    Action,
    Target,
    Detail,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(AdminAudit::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(AdminAudit::Id)
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(AdminAudit::AtMs).big_integer().not_null())
                .col(ColumnDef::new(AdminAudit::Who).string().not_null())
                .col(ColumnDef::new(AdminAudit::Action).string().not_null())
                .col(ColumnDef::new(AdminAudit::Target).string().not_null())
                .col(ColumnDef::new(AdminAudit::Detail).text().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("admin_audit_at")
                .table(AdminAudit::Table)
                .col(AdminAudit::AtMs)
                .if_not_exists()
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(AdminAudit::Table).to_owned())
            .await
    }
}
