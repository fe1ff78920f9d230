//! Settings the admin API changes at run time that are neither a gateway nor a key (the prices
//! set through `SetPrices`), one row each: a name and its value as JSON.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AdminSettings {
    Table,
    Name,
    Value,
    UpdatedMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(AdminSettings::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(AdminSettings::Name)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(AdminSettings::Value).text().not_null())
                .col(
                    ColumnDef::new(AdminSettings::UpdatedMs)
                        .big_integer()
                        .not_null(),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(AdminSettings::Table).to_owned())
            .await
    }
}
