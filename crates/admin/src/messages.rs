//! The control plane's entries as the API's messages: gateways, and keys with their live state
//! (secrets masked).

use keypool_control::{Control, GatewayEntry, KeyEntry};
use keypool_proto::admin::v1 as pb;

use crate::now_ms;

/// A gateway's spec as the API shows it: exact secrets are hashes already; an HMAC `jwt_key`
/// is masked as upstream keys are (a PEM public key is shown).
fn shown_spec(raw: &keypool_config::RawGateway) -> pb::GatewaySpec {
    let mut spec = pb::GatewaySpec::from(raw);
    if let Some(auth) = spec.auth.as_mut()
        && let Some(key) = auth.jwt_key.as_mut()
        && !key.trim_start().starts_with("-----BEGIN")
    {
        *key = mask(key);
    }
    spec
}

pub(crate) fn gateway_pb(e: &GatewayEntry, control: &Control) -> pb::Gateway {
    let name = e.raw.name.clone().unwrap_or_default();
    pb::Gateway {
        tokens_used: control
            .gateways
            .get(&name)
            .map_or(0, |g| g.state.tokens_used()),
        name,
        spec: Some(shown_spec(&e.raw)),
        owner: e.owner.to_owned(),
        updated_at_ms: e.updated_ms,
    }
}

/// `sk-…abcd`: enough to tell keys apart, never enough to use one (see
/// [`keypool_types::mask`]).
pub fn mask(secret: &str) -> String {
    keypool_types::mask(secret)
}

pub(crate) fn key_pb(e: &KeyEntry, state: Option<&keypool_pool::KeyState>) -> pb::Key {
    let k = &e.key;
    let now = tokio::time::Instant::now();
    let mut out = pb::Key {
        name: k.name.to_string(),
        provider: k.kind.as_str().to_owned(),
        endpoint: k.endpoint.clone(),
        secret_masked: if k.passthrough_auth {
            "asis".to_owned()
        } else {
            mask(k.sk.expose())
        },
        enabled: e.enabled,
        health: "healthy".to_owned(),
        rpm: k.rpm,
        tpm: k.tpm,
        allow: k.allow.iter().map(rule_text).collect(),
        deny: k.deny.iter().map(rule_text).collect(),
        owner: e.owner.to_owned(),
        ..pb::Key::default()
    };
    if let Some(s) = state {
        out.enabled = s.enabled;
        match &s.health {
            keypool_pool::Health::Healthy => {}
            keypool_pool::Health::CoolingUntil(t) => {
                "cooling".clone_into(&mut out.health);
                let left = t.saturating_duration_since(now);
                out.cooling_until_ms = now_ms() + left.as_millis() as i64;
            }
            keypool_pool::Health::Disabled { .. } => "disabled".clone_into(&mut out.health),
        }
        out.window_requests = s.window_requests;
        out.window_tokens = s.window_tokens;
        out.in_flight = s.in_flight;
        out.used = s.counters.used;
        out.success = s.counters.success;
        out.failure = s.counters.failure;
        out.last_error = s.counters.last_error.clone().unwrap_or_default();
        out.latency_ms = s.latency_ms;
    }
    out
}

fn rule_text(r: &keypool_config::ModelRule) -> String {
    match r {
        keypool_config::ModelRule::Exact(s) => s.clone(),
        keypool_config::ModelRule::Prefix(p) => format!("{p}*"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masks_keep_only_a_hint() {
        assert_eq!(super::mask("sk-test-abcdefgh1234"), "sk-…1234");
        assert_eq!(super::mask("short"), "…");
        assert_eq!(super::mask("0123456789abc"), "…9abc");
    }
}
