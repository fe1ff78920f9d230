//! Gateway changes through the admin API: create, replace, delete, rotate a secret.

use keypool_config::{DEFAULT_GATEWAY, RawGateway, validate_gateway};

use crate::{
    Control, ControlError, GatewayEntry, OWNER_ADMIN, OWNER_CONFIG, config_owned, invalid, lock,
    now_ms, random_hex,
};

impl Control {
    /// The named gateways (what the store holds and frontends are sent besides the policy).
    pub fn gateway_entries(&self) -> Vec<GatewayEntry> {
        lock(&self.gateway_entries).values().cloned().collect()
    }

    /// Every gateway, `default` first: what `ListGateways` shows.
    pub fn listed_gateways(&self) -> Vec<GatewayEntry> {
        let mut all = vec![self.default_entry()];
        all.extend(self.gateway_entries());
        all
    }

    pub fn gateway_entry(&self, name: &str) -> Option<GatewayEntry> {
        if name == DEFAULT_GATEWAY {
            return Some(self.default_entry());
        }
        lock(&self.gateway_entries).get(name).cloned()
    }

    /// The `default` gateway as listed: its policy as written, and `auth: {method: tokens}`
    /// while some client token (top-level or a key's) is configured (the tokens themselves
    /// are never shown).
    fn default_entry(&self) -> GatewayEntry {
        let mut entry = lock(&self.default_gateway).entry.clone();
        let tokens = self
            .gateways
            .get(DEFAULT_GATEWAY)
            .is_some_and(|g| g.spec.auth.is_some());
        if tokens {
            entry.raw.auth = Some(keypool_config::gateway::RawGatewayAuth {
                method: Some("tokens".to_owned()),
                position: Some("header:Authorization".to_owned()),
                ..Default::default()
            });
        }
        entry
    }

    /// Creates (`replace: false`) or replaces an admin-owned gateway.
    pub async fn put_gateway(
        &self,
        name: Option<&str>,
        raw: RawGateway,
        replace: bool,
    ) -> Result<GatewayEntry, ControlError> {
        let mut raw = raw.hashed();
        if let Some(n) = name {
            match raw.name.as_deref() {
                Some(given) if given != n => {
                    return Err(invalid(
                        "gateway.name",
                        format!("a gateway cannot be renamed ({n:?} → {given:?})"),
                    ));
                }
                _ => raw.name = Some(n.to_owned()),
            }
        }
        validate_gateway(&raw, "gateway").map_err(ControlError::Invalid)?;
        let name = raw.name.clone().unwrap_or_default();
        if name == DEFAULT_GATEWAY {
            return Err(config_owned("gateway", &name));
        }
        {
            let entries = lock(&self.gateway_entries);
            match (entries.get(&name), replace) {
                (Some(_), false) => {
                    return Err(ControlError::Exists(format!(
                        "a gateway named {name:?} exists"
                    )));
                }
                (None, true) => {
                    return Err(ControlError::NotFound(format!("no gateway named {name:?}")));
                }
                (Some(e), true) if e.owner == OWNER_CONFIG => {
                    return Err(config_owned("gateway", &name));
                }
                _ => {}
            }
        }
        let spec = serde_json::to_string(&raw).map_err(|e| ControlError::Store(e.to_string()))?;
        let updated_ms = match &self.store {
            Some(s) => s
                .save_gateway(&name, &spec, OWNER_ADMIN)
                .await
                .map_err(|e| ControlError::Store(e.to_string()))?,
            None => now_ms(),
        };
        let entry = GatewayEntry {
            raw,
            owner: OWNER_ADMIN,
            updated_ms,
        };
        let applied = entry.clone();
        self.change(|d| {
            d.gateways.insert(name, applied);
        })
        .await?;
        self.bump();
        Ok(entry)
    }

    pub async fn delete_gateway(&self, name: &str) -> Result<(), ControlError> {
        match self.gateway_entry(name) {
            None => return Err(ControlError::NotFound(format!("no gateway named {name:?}"))),
            Some(e) if e.owner == OWNER_CONFIG => return Err(config_owned("gateway", name)),
            Some(_) => {}
        }
        if let Some(s) = &self.store {
            s.delete_gateway(name)
                .await
                .map_err(|e| ControlError::Store(e.to_string()))?;
        }
        self.change(|d| {
            d.gateways.remove(name);
        })
        .await?;
        self.bump();
        Ok(())
    }

    /// Replaces an admin gateway's exact secrets with one new random secret (returned once).
    pub async fn rotate_secret(&self, name: &str) -> Result<(GatewayEntry, String), ControlError> {
        let entry = self
            .gateway_entry(name)
            .ok_or_else(|| ControlError::NotFound(format!("no gateway named {name:?}")))?;
        if entry.owner == OWNER_CONFIG {
            return Err(config_owned("gateway", name));
        }
        let mut raw = entry.raw;
        let auth = raw.auth.get_or_insert_with(Default::default);
        if auth.method.as_deref().is_some_and(|m| m != "exact") {
            return Err(ControlError::Precondition(format!(
                "gateway {name:?} authenticates by {}: only exact secrets can be rotated",
                auth.method.as_deref().unwrap_or_default()
            )));
        }
        auth.method = Some("exact".to_owned());
        let secret = format!("kp-{}", random_hex(24));
        auth.secrets = vec![secret.clone()];
        let entry = self.put_gateway(Some(name), raw, true).await?;
        Ok((entry, secret))
    }
}
