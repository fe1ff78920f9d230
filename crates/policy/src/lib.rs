//! Gateway policy: who may call, and what they may do.
//!
//! Every API surface is a gateway ([`gateway`]): `/v1/*` is the gateway named `default`, whose
//! policy is the top level of the config and whose credentials are the client tokens
//! (`Authorization: Bearer <token>`, checked in constant time against the top-level
//! `authorization` tokens and every key's own); the named gateways at `/llm/api/{name}/v1/*`
//! have their own auth methods. Both go through the same checks: auth method and key position,
//! lists, sliding rate limits, quotas, model lists and request transforms.

pub mod auth;
pub mod budget;
pub mod cache;
pub mod gateway;
#[cfg(test)]
mod gateway_tests;
mod gateways;
mod slices;
pub mod transform;

use std::sync::Arc;

pub use keypool_config::caller_id;
use keypool_pool::KeyAccess;

/// Who is calling, as far as the gateway could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What limits, usage and logs record instead of the credential: the JWT `sub`, else
    /// `tok-<12 hex of sha256>` of the credential; `None` when anonymous.
    pub id: Option<Arc<str>>,
    /// Which keys may serve this caller.
    pub keys: KeyAccess,
    /// The caller's `Authorization` header was its keypool credential: it is never forwarded,
    /// so `sk: asis` keys cannot serve it.
    pub authorization_consumed: bool,
}

impl Caller {
    pub const ANONYMOUS: Self = Self {
        id: None,
        keys: KeyAccess::All,
        authorization_consumed: false,
    };
}

pub(crate) use keypool_types::strip_bearer;
