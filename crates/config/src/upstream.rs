//! One upstream key as the runtime sees it.

use std::time::Duration;

use keypool_types::Secret;

/// The provider an upstream key belongs to; decides which adapter forwards to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    OpenAi,
    /// Anthropic's Messages API (`x-api-key`, `anthropic-version`).
    Anthropic,
    /// Azure OpenAI: OpenAI's API under `/openai/deployments/{deployment}`, with `api-key`.
    Azure,
    Replicate,
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Azure => "azure",
            Self::Replicate => "replicate",
        }
    }

    /// Whether keys of this kind answer requests of `surface`: Anthropic keys the Messages
    /// API, OpenAI keys the Responses API, all but Anthropic keys the rest of OpenAI's.
    pub fn serves(self, surface: keypool_types::Surface) -> bool {
        use keypool_types::Surface;
        match surface {
            Surface::Anthropic => self == Self::Anthropic,
            Surface::Responses => self == Self::OpenAi,
            Surface::OpenAi => self != Self::Anthropic,
        }
    }

    /// Whether keys of this kind can answer `path` of `surface` by translation: Anthropic keys
    /// chat completions, OpenAI and Azure keys the Messages API (not `count_tokens`).
    pub fn translates(self, surface: keypool_types::Surface, path: &str) -> bool {
        use keypool_types::Surface;
        match surface {
            Surface::OpenAi => self == Self::Anthropic && path == "/v1/chat/completions",
            Surface::Anthropic => {
                matches!(self, Self::OpenAi | Self::Azure) && path == "/v1/messages"
            }
            Surface::Responses => false,
        }
    }
}

/// An `allow` / `deny` entry: a model name or a URL path (`/v1/audio/transcriptions`), exact, or a
/// prefix when it ends with `*` (`gpt-4o*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRule {
    Exact(String),
    Prefix(String),
}

impl ModelRule {
    pub fn parse(entry: &str) -> Self {
        match entry.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(entry.to_owned()),
        }
    }

    /// The entry as written.
    pub fn to_entry(&self) -> String {
        match self {
            Self::Exact(s) => s.clone(),
            Self::Prefix(p) => format!("{p}*"),
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => s == value,
            Self::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

/// One credential at one endpoint. Immutable once validated; live state (windows, health,
/// counters) belongs to the key's `KeyActor`.
#[derive(Debug, Clone)]
pub struct UpstreamKey {
    /// Stable, secret-free name: shown in `x-keypool-upstream`, logs, metrics and the admin API.
    pub name: std::sync::Arc<str>,
    /// The credential sent upstream as `Authorization: Bearer <sk>`.
    pub sk: Secret,
    /// `sk: asis`: forward the client's own `Authorization` header instead.
    pub passthrough_auth: bool,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub endpoint: String,
    /// `endpoint`, parsed once (the request path appends to its path).
    pub endpoint_url: url::Url,
    pub kind: UpstreamKind,
    pub timeout: Duration,
    pub stream_timeout: Duration,
    pub allow: Vec<ModelRule>,
    pub deny: Vec<ModelRule>,
    /// Client tokens that may use this key; empty = every token the gateway accepts.
    pub authorization: Vec<String>,
    /// Usable by anyone, even without a client token.
    pub noauth: bool,
    /// Forward the client's request headers (minus hop-by-hop and credentials).
    pub keep_header: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    /// Set when the key is loaded but cannot be used; the pool keeps it disabled and the reason
    /// is logged at start-up.
    pub unusable: Option<String>,
    /// Replicate only: the chat template (`None`: chosen from the model name).
    pub chat_template: Option<ChatTemplate>,
    /// Azure only: the API version and the deployments.
    pub azure: Option<Azure>,
    /// What the key may spend a period (past it, it is not picked until the next).
    pub budget: Option<crate::Budget>,
    /// Its own prices or multiplier (`None`: the config's and the built-in prices as they are).
    pub pricing: Option<std::sync::Arc<keypool_pricing::KeyPricing>>,
}

/// The `api-version` an Azure key sends unless it names one (Azure OpenAI's latest GA
/// data-plane version when this was written).
pub const AZURE_API_VERSION: &str = "2024-10-21";

/// Where an Azure OpenAI key sends a model's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Azure {
    pub api_version: String,
    /// Model → deployment name.
    pub deployments: std::collections::BTreeMap<String, String>,
}

impl Azure {
    /// The deployment serving `model`: the mapped one, or the model's own name.
    pub fn deployment<'a>(&'a self, model: &'a str) -> &'a str {
        self.deployments.get(model).map_or(model, String::as_str)
    }
}

/// How a Replicate upstream renders chat messages into one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<s>[INST] ... [/INST]` (Mistral / Mixtral).
    Mistral,
    /// `<|start_header_id|>...` (Llama 3).
    Llama3,
    /// A template with `{{system}}` and `{{prompt}}` (the conversation as `User:`/`Assistant:`
    /// lines ending in `Assistant:`).
    Custom(String),
}

impl UpstreamKey {
    /// An OpenAI key at `endpoint` with every optional setting unset (1 s timeouts): for tests
    /// of the parts that take a key.
    pub fn plain(name: &str, endpoint: &str) -> Result<Self, url::ParseError> {
        Ok(Self {
            name: name.into(),
            sk: Secret::new(format!("sk-{name}")),
            passthrough_auth: false,
            endpoint: endpoint.to_owned(),
            endpoint_url: url::Url::parse(endpoint)?,
            kind: UpstreamKind::OpenAi,
            timeout: Duration::from_secs(1),
            stream_timeout: Duration::from_secs(1),
            allow: vec![],
            deny: vec![],
            authorization: vec![],
            noauth: false,
            keep_header: false,
            rpm: None,
            tpm: None,
            unusable: None,
            chat_template: None,
            azure: None,
            budget: None,
            pricing: None,
        })
    }

    /// The key as a config `upstreams:` entry (secret included: for the control plane's pushes
    /// to its frontends only). Validating it gives this key back.
    pub fn to_raw(&self) -> crate::raw::RawUpstream {
        crate::raw::RawUpstream {
            name: Some(self.name.to_string()),
            sk: Some(if self.passthrough_auth {
                "asis".to_owned()
            } else {
                self.sk.expose().to_owned()
            }),
            endpoint: Some(self.endpoint.clone()),
            r#type: Some(self.kind.as_str().to_owned()),
            timeout: Some(self.timeout.as_secs_f64()),
            stream_timeout: Some(self.stream_timeout.as_secs_f64()),
            allow: self.allow.iter().map(ModelRule::to_entry).collect(),
            deny: self.deny.iter().map(ModelRule::to_entry).collect(),
            authorization: (!self.authorization.is_empty())
                .then(|| crate::raw::StringOrList::Many(self.authorization.clone())),
            noauth: self.noauth,
            keep_header: self.keep_header,
            rpm: self.rpm,
            tpm: self.tpm,
            chat_template: self.chat_template.as_ref().map(|t| match t {
                ChatTemplate::Mistral => "mistral".to_owned(),
                ChatTemplate::Llama3 => "llama3".to_owned(),
                ChatTemplate::Custom(c) => c.clone(),
            }),
            api_version: self.azure.as_ref().map(|a| a.api_version.clone()),
            deployments: self
                .azure
                .as_ref()
                .map(|a| a.deployments.clone())
                .unwrap_or_default(),
            budget: self.budget.map(crate::Budget::to_raw),
            pricing: self
                .pricing
                .as_ref()
                .map(|p| p.raw.clone())
                .unwrap_or_default(),
            price_multiplier: self.pricing.as_ref().and_then(|p| p.factor()),
        }
    }

    /// Allow is checked before deny: with an allow list, the model or path must match one entry;
    /// then no deny entry may match either.
    pub fn allows_model(&self, model: &str, path: &str) -> bool {
        let hit = |rules: &[ModelRule]| rules.iter().any(|r| r.matches(model) || r.matches(path));
        if !self.allow.is_empty() && !hit(&self.allow) {
            return false;
        }
        !hit(&self.deny)
    }

    /// Whether a caller may use this key. `token` is `None` for an anonymous caller.
    pub fn allows_caller(&self, token: Option<&str>) -> bool {
        if self.noauth {
            return true;
        }
        match token {
            None => false,
            Some(t) => self.authorization.is_empty() || self.authorization.iter().any(|a| a == t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(allow: &[&str], deny: &[&str]) -> UpstreamKey {
        UpstreamKey {
            allow: allow.iter().map(|s| ModelRule::parse(s)).collect(),
            deny: deny.iter().map(|s| ModelRule::parse(s)).collect(),
            ..UpstreamKey::plain("k", "http://x/v1").unwrap()
        }
    }

    #[test]
    fn allow_then_deny() {
        let k = key(&["gpt-4o*", "/v1/audio/transcriptions"], &["gpt-4o-mini"]);
        assert!(k.allows_model("gpt-4o", "/v1/chat/completions"));
        assert!(!k.allows_model("gpt-4o-mini", "/v1/chat/completions"));
        assert!(!k.allows_model("gpt-3.5", "/v1/chat/completions"));
        assert!(k.allows_model("", "/v1/audio/transcriptions"));
        let open = key(&[], &["gpt-4"]);
        assert!(open.allows_model("gpt-3.5", "/v1/chat/completions"));
        assert!(!open.allows_model("gpt-4", "/v1/chat/completions"));
        // deny matches the path too
        let no_audio = key(&[], &["/v1/audio/transcriptions"]);
        assert!(!no_audio.allows_model("whisper-1", "/v1/audio/transcriptions"));
    }

    #[test]
    fn caller_rules() {
        let mut k = key(&[], &[]);
        assert!(k.allows_caller(Some("a")));
        assert!(!k.allows_caller(None));
        k.authorization = vec!["a".into()];
        assert!(!k.allows_caller(Some("b")));
        k.noauth = true;
        assert!(k.allows_caller(None));
    }
}
