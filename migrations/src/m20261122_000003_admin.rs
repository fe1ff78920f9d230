//! What the admin service manages: gateways and keys, with who owns them (`config` | `admin`).
//! Upstream secrets are never stored in clear: admin-added keys keep theirs sealed
//! (ChaCha20-Poly1305 under `admin.secret_key`); config-owned keys keep none.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AdminGateways {
    Table,
    Name,
    Spec,
    Owner,
    UpdatedMs,
}

#[derive(DeriveIden)]
enum AdminKeys {
    Table,
    Name,
    Spec,
    SealedSecret,
    Owner,
    Enabled,
    UpdatedMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(AdminGateways::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(AdminGateways::Name)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(AdminGateways::Spec).text().not_null())
                .col(ColumnDef::new(AdminGateways::Owner).string().not_null())
                .col(
                    ColumnDef::new(AdminGateways::UpdatedMs)
                        .big_integer()
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(AdminKeys::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(AdminKeys::Name)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(AdminKeys::Spec).text().not_null())
                .col(ColumnDef::new(AdminKeys::SealedSecret).text().null())
                .col(ColumnDef::new(AdminKeys::Owner).string().not_null())
                .col(ColumnDef::new(AdminKeys::Enabled).boolean().not_null())
                .col(
                    ColumnDef::new(AdminKeys::UpdatedMs)
                        .big_integer()
                        .not_null(),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(AdminKeys::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(AdminGateways::Table).to_owned())
            .await
    }
}
