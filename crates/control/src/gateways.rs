//! Gateway changes through the admin API: create, replace, delete, rotate a secret.

use keypool_config::{DEFAULT_GATEWAY, RawGateway, validate_gateway};

use crate::owner::{Command, Owner};
use crate::{
    Control, ControlError, GatewayEntry, OWNER_ADMIN, OWNER_CONFIG, State, config_owned, invalid,
    now_ms, random_hex,
};

impl State {
    /// The named gateways (what the store holds and frontends are sent besides the policy).
    pub fn gateway_entries(&self) -> Vec<GatewayEntry> {
        self.gateways.values().cloned().collect()
    }
}

impl Control {
    /// The named gateways.
    pub fn gateway_entries(&self) -> Vec<GatewayEntry> {
        self.state.load().gateway_entries()
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
        self.state.load().gateways.get(name).cloned()
    }

    /// The `default` gateway as listed: its policy as written, and `auth: {method: tokens}`
    /// while some client token (top-level or a key's) is configured (the tokens themselves
    /// are never shown).
    fn default_entry(&self) -> GatewayEntry {
        let mut entry = self.state.load().default.entry.clone();
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
        who: &str,
        name: Option<&str>,
        raw: RawGateway,
        replace: bool,
    ) -> Result<GatewayEntry, ControlError> {
        self.ask(who, |reply| Command::PutGateway {
            name: name.map(str::to_owned),
            raw: Box::new(raw),
            replace,
            reply,
        })
        .await
    }

    pub async fn delete_gateway(&self, who: &str, name: &str) -> Result<(), ControlError> {
        self.ask(who, |reply| Command::DeleteGateway {
            name: name.to_owned(),
            reply,
        })
        .await
    }

    /// Replaces an admin gateway's exact secrets with one new random secret (returned once).
    pub async fn rotate_secret(
        &self,
        who: &str,
        name: &str,
    ) -> Result<(GatewayEntry, String), ControlError> {
        self.ask(who, |reply| Command::RotateSecret {
            name: name.to_owned(),
            reply,
        })
        .await
    }
}

impl Owner {
    pub(crate) async fn put_gateway(
        &mut self,
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
        match (self.state.gateways.get(&name), replace) {
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
        let spec = self.stored_gateway(&raw, OWNER_ADMIN)?;
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

    pub(crate) async fn delete_gateway(&mut self, name: &str) -> Result<(), ControlError> {
        if name == DEFAULT_GATEWAY {
            return Err(config_owned("gateway", name));
        }
        match self.state.gateways.get(name) {
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

    pub(crate) async fn rotate_secret(
        &mut self,
        name: &str,
    ) -> Result<(GatewayEntry, String), ControlError> {
        if name == DEFAULT_GATEWAY {
            return Err(config_owned("gateway", name));
        }
        let entry = self
            .state
            .gateways
            .get(name)
            .cloned()
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

/// What a gateway's `jwt_key` is stored as when it came from the config file (the file keeps
/// it; the store never holds it in clear).
const IN_THE_FILE: &str = "(in the config file)";

impl Owner {
    /// A gateway's spec as the store keeps it: exact secrets hashed (already), an HMAC
    /// `jwt_key` sealed with `admin.secret_key` (an admin-owned one needs that key; a
    /// config-owned one is not stored at all: the file has it). A PEM public key is no secret.
    pub(crate) fn stored_gateway(
        &self,
        raw: &RawGateway,
        owner: &str,
    ) -> Result<String, ControlError> {
        let mut raw = raw.clone();
        if let Some(key) = raw.auth.as_mut().and_then(|a| a.jwt_key.as_mut())
            && !key.trim_start().starts_with("-----BEGIN")
        {
            *key = if owner == OWNER_CONFIG {
                IN_THE_FILE.to_owned()
            } else {
                let sealing = self.state.config.admin.secret_key.as_ref().ok_or_else(|| {
                    ControlError::Precondition(
                        "admin.secret_key (or KEYPOOL_SECRET_KEY) is needed to keep a gateway's jwt_key".to_owned(),
                    )
                })?;
                format!("sealed:{}", crate::seal::seal(sealing, key)?)
            };
        }
        serde_json::to_string(&raw).map_err(|e| ControlError::Store(e.to_string()))
    }

    /// A stored admin-owned gateway with its `jwt_key` unsealed.
    pub(crate) fn unseal_gateway(&self, mut raw: RawGateway) -> Result<RawGateway, ControlError> {
        if let Some(key) = raw.auth.as_mut().and_then(|a| a.jwt_key.as_mut())
            && let Some(sealed) = key.strip_prefix("sealed:")
        {
            let sealing = self.state.config.admin.secret_key.as_ref().ok_or_else(|| {
                ControlError::Precondition("admin.secret_key is not set: cannot unseal".to_owned())
            })?;
            *key = crate::seal::open(sealing, sealed)?;
        }
        Ok(raw)
    }
}
