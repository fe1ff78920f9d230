//! The audit log: every change made through the admin API or the console, and every reloaded
//! config file, with who asked (the surface and where from, never a token), when, and what
//! changed (field names and settings, never a secret). Kept in the store; without one, logged.

use serde_json::{Value, json};

use crate::owner::{Command, Owner};
use crate::{KeyChange, now_ms};

/// What the audit log says of a command: its action, its target (a gateway's or key's name,
/// empty for prices and the config), and what changed. `None`: not audited (what keypool does
/// by itself: another replica's change, a pushed snapshot).
pub(crate) fn described(command: &Command) -> Option<(&'static str, String, Value)> {
    Some(match command {
        Command::PutGateway {
            name, raw, replace, ..
        } => {
            let action = if *replace {
                "gateway.update"
            } else {
                "gateway.create"
            };
            let target = name
                .clone()
                .or_else(|| raw.name.clone())
                .unwrap_or_default();
            (action, target, json!({ "fields": fields(raw) }))
        }
        Command::DeleteGateway { name, .. } => ("gateway.delete", name.clone(), json!({})),
        Command::RotateSecret { name, .. } => ("gateway.rotate_secret", name.clone(), json!({})),
        Command::AddKey { raw, .. } => (
            "key.add",
            raw.name.clone().unwrap_or_default(),
            json!({ "endpoint": raw.endpoint, "type": raw.r#type, "rpm": raw.rpm, "tpm": raw.tpm }),
        ),
        Command::UpdateKey { name, change, .. } => ("key.update", name.clone(), changed(change)),
        Command::RemoveKey { name, .. } => ("key.remove", name.clone(), json!({})),
        Command::SetPrices { entries, .. } => {
            let models: Vec<&String> = entries.iter().flat_map(|p| &p.models).collect();
            ("prices.set", String::new(), json!({ "models": models }))
        }
        Command::ApplyFile { config, .. } => (
            "config.reload",
            String::new(),
            json!({ "gateways": config.raw_gateways.len(), "keys": config.upstreams.len() }),
        ),
        Command::ApplySnapshot { .. } | Command::Reload { .. } => return None,
    })
}

/// The fields a gateway spec sets (their values may hold secrets' hashes: names only).
fn fields(raw: &keypool_config::RawGateway) -> Vec<String> {
    match serde_json::to_value(raw) {
        Ok(Value::Object(m)) => m
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| k)
            .collect(),
        _ => Vec::new(),
    }
}

/// The settings an `UpdateKey` gave.
fn changed(c: &KeyChange) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(rpm) = c.rpm {
        out.insert("rpm".into(), json!(rpm));
    }
    if let Some(tpm) = c.tpm {
        out.insert("tpm".into(), json!(tpm));
    }
    if let Some(a) = &c.allow {
        out.insert("allow".into(), json!(a));
    }
    if let Some(d) = &c.deny {
        out.insert("deny".into(), json!(d));
    }
    if let Some(e) = c.enabled {
        out.insert("enabled".into(), json!(e));
    }
    Value::Object(out)
}

impl Owner {
    /// Records an applied change: in the store's audit log (a store that fails is logged; the
    /// change stands), and in the log.
    pub(crate) async fn audit(&self, who: &str, action: &str, target: String, detail: &Value) {
        tracing::info!(who, action, target = %target, detail = %detail, "admin change");
        let Some(store) = &self.store else {
            return;
        };
        let row = keypool_store::AuditRow {
            id: 0,
            at_ms: now_ms(),
            who: if who.is_empty() { "keypool" } else { who }.to_owned(),
            action: action.to_owned(),
            target,
            detail: detail.to_string(),
        };
        if let Err(e) = store.record_audit(&row).await {
            tracing::error!(error = %e, action, "audit log not written");
        }
    }
}
