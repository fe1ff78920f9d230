//! `keypoolctl prices`: the prices in force before the built-in catalog (the admin API's, then
//! the config file's), and setting or clearing the admin API's.

use std::path::Path;

use keypool_pricing::RawPrice;
use keypool_proto::admin::v1 as pb;
use serde_json::json;

use crate::Client;
use crate::cli::{Cli, PriceCmd};
use crate::print::{table, time};

pub async fn run(c: &mut Client, cli: &Cli, cmd: &PriceCmd) -> anyhow::Result<()> {
    let prices = match cmd {
        PriceCmd::List => c.get_prices(pb::GetPricesRequest {}).await?,
        PriceCmd::Set { file } => {
            let pricing = read(file)?.iter().map(pb::Price::from).collect();
            c.set_prices(pb::SetPricesRequest { pricing }).await?
        }
        PriceCmd::Clear => c.set_prices(pb::SetPricesRequest::default()).await?,
    }
    .into_inner();
    print(cli, &prices);
    Ok(())
}

/// A YAML or JSON file holding a `pricing:` list (a config file's included) or the list itself.
fn read(path: &Path) -> anyhow::Result<Vec<RawPrice>> {
    let bad = |e: serde_norway::Error| anyhow::anyhow!("{}: {e}", path.display());
    let text = crate::read(&path.to_path_buf())?;
    let value: serde_norway::Value = serde_norway::from_str(&text).map_err(bad)?;
    let entries = match value {
        serde_norway::Value::Mapping(mut m) => m
            .remove("pricing")
            .ok_or_else(|| anyhow::anyhow!("{}: no `pricing:` list in it", path.display()))?,
        list => list,
    };
    serde_norway::from_value(entries).map_err(bad)
}

fn number(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

fn print(cli: &Cli, p: &pb::Prices) {
    let raw =
        |v: &[pb::Price]| -> Vec<RawPrice> { v.iter().cloned().map(RawPrice::from).collect() };
    if cli.json {
        println!(
            "{}",
            json!({"admin": raw(&p.admin), "file": raw(&p.file),
                "updated_at_ms": p.updated_at_ms})
        );
        return;
    }
    let mut rows = Vec::new();
    for (source, list) in [("admin", &p.admin), ("file", &p.file)] {
        for e in list {
            let above = e.above.as_ref().map_or_else(
                || "-".to_owned(),
                |a| format!("{} tokens: {} / {}", a.tokens, a.input, a.output),
            );
            rows.push(vec![
                source.to_owned(),
                e.models.join(","),
                e.input.to_string(),
                e.output.to_string(),
                number(e.cached_input),
                number(e.cache_write_5m),
                number(e.cache_write_1h),
                above,
            ]);
        }
    }
    table(
        &[
            "SOURCE",
            "MODELS",
            "INPUT",
            "OUTPUT",
            "CACHED INPUT",
            "CACHE WRITE 5M",
            "CACHE WRITE 1H",
            "ABOVE",
        ],
        &rows,
    );
    if p.updated_at_ms > 0 {
        println!(
            "\nadmin prices set {} UTC (USD per million tokens; the first entry naming a model wins, then the built-in catalog)",
            time(p.updated_at_ms)
        );
    }
}
