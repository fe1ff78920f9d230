//! Authentication, the same for every gateway and every endpoint that needs a caller (the API
//! surfaces and the gateway's monitoring): [`GatewayRuntime::credential`] reads the credential
//! where the gateway's policy says it is, [`GatewayRuntime::authenticate`] checks it by the
//! gateway's method and says who the caller is and which keys may serve it.

use std::borrow::Cow;
use std::sync::Arc;

use keypool_config::gateway::{AuthMethod, ClientTokens, Position, secret_hash};
use keypool_pool::KeyAccess;
use keypool_types::{ApiError, ErrorKind, constant_time_eq};

use crate::gateway::GatewayRuntime;
use crate::{Caller, caller_id, strip_bearer};

/// Leeway for JWT `exp` / `nbf`, for clocks that disagree a little.
pub const JWT_LEEWAY_SECS: u64 = 5;

/// The JWT claims keypool reads (`exp` / `nbf` are checked by the validator).
#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
}

/// Where a request's credential may be: what every endpoint that authenticates a caller
/// offers [`GatewayRuntime::credential`].
pub trait CredentialSource {
    /// The value of header `name` (lower-case).
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// The decoded value of query parameter `name`.
    fn query_arg(&self, name: &str) -> Option<String>;
    /// Top-level field `name` of the JSON body, for `body:` positions. An endpoint without a
    /// body (monitoring) reads the query parameter of that name instead.
    fn body_field(&self, name: &str) -> Option<String>;
}

fn refuse(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidApiKey, message)
}

impl GatewayRuntime {
    /// Where the credential is, when the gateway has auth.
    pub fn position(&self) -> Option<&Position> {
        self.spec.auth.as_ref().map(|a| &a.position)
    }

    /// The credential is in the body: it must be read before the caller is known.
    pub fn credential_in_body(&self) -> bool {
        matches!(self.position(), Some(Position::Body(_)))
    }

    /// The credential as the request carries it (`Bearer ` not yet stripped); `None` when the
    /// gateway has no auth or the request has none. Where the policy says `Authorization`,
    /// `x-api-key` is read when `Authorization` is absent: Anthropic's SDKs and Claude Code
    /// send their key there.
    pub fn credential<'r>(&self, req: &'r impl CredentialSource) -> Option<Cow<'r, str>> {
        match self.position()? {
            Position::Header(h) if h == "authorization" => req
                .header("authorization")
                .or_else(|| req.header("x-api-key"))
                .map(String::from_utf8_lossy),
            Position::Header(h) => req.header(h.as_str()).map(String::from_utf8_lossy),
            Position::Arg(a) => req.query_arg(a.as_str()).map(Cow::Owned),
            Position::Body(f) => req.body_field(f.as_str()).map(Cow::Owned),
        }
    }

    /// Checks the credential found at the gateway's position (`Bearer ` stripped or not: both
    /// are accepted).
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Caller, ApiError> {
        let Some(auth) = &self.spec.auth else {
            return Ok(Caller::ANONYMOUS);
        };
        let missing = || {
            refuse(format!(
                "Missing credential: this gateway reads it from {}.",
                describe(&auth.position)
            ))
        };
        let wrong = || refuse("Incorrect API key provided.");
        let cred = credential
            .map(|c| std::str::from_utf8(strip_bearer(c.as_bytes())).unwrap_or(""))
            .filter(|c| !c.is_empty());
        let id = match &auth.method {
            AuthMethod::Tokens(tokens) => return client_token(tokens, cred),
            AuthMethod::Exact(hashes) => {
                let cred = cred.ok_or_else(missing)?;
                let h = secret_hash(cred.as_bytes());
                let mut ok = false;
                for stored in hashes {
                    ok |= constant_time_eq(stored, &h);
                }
                ok.then(|| caller_id(cred)).ok_or_else(wrong)?
            }
            AuthMethod::Regex(re) => {
                let cred = cred.ok_or_else(missing)?;
                re.is_match(cred)
                    .then(|| caller_id(cred))
                    .ok_or_else(wrong)?
            }
            AuthMethod::Jwt {
                key,
                algorithms,
                audience,
                issuer,
            } => {
                let expect = Expect {
                    audience: audience.as_deref(),
                    issuer: issuer.as_deref(),
                };
                jwt(cred.ok_or_else(missing)?, key, algorithms, expect)?
            }
        };
        Ok(Caller {
            id: Some(Arc::from(id)),
            keys: KeyAccess::All,
            authorization_consumed: matches!(&auth.position, Position::Header(h) if h == "authorization"),
        })
    }
}

/// The `default` gateway's check: every configured token is compared, in constant time, whatever
/// matches first, so timing tells nothing about which token is close. A caller without a valid
/// token is anonymous when some key is `noauth` (only those keys serve it), refused otherwise.
fn client_token(tokens: &ClientTokens, presented: Option<&str>) -> Result<Caller, ApiError> {
    let mut found: Option<&(Arc<str>, Arc<str>)> = None;
    if let Some(p) = presented {
        for entry in &tokens.tokens {
            if constant_time_eq(entry.0.as_bytes(), p.as_bytes()) && found.is_none() {
                found = Some(entry);
            }
        }
    }
    match found {
        Some((token, id)) => Ok(Caller {
            id: Some(id.clone()),
            keys: KeyAccess::Token(Some(token.clone())),
            authorization_consumed: true,
        }),
        None if tokens.anonymous => Ok(Caller {
            id: None,
            keys: KeyAccess::Token(None),
            authorization_consumed: false,
        }),
        None => Err(refuse(match presented {
            None => "Missing API key: send `Authorization: Bearer <token>`.",
            Some(_) => "Incorrect API key provided.",
        })),
    }
}

/// The claims a gateway requires besides the signature and times.
#[derive(Clone, Copy)]
struct Expect<'a> {
    audience: Option<&'a str>,
    issuer: Option<&'a str>,
}

/// A JWT's signature, `exp` (required), `nbf`, and `aud`/`iss` when the gateway names them;
/// a token naming `crit` header parameters is refused (keypool understands none). The caller
/// is its `sub`, else `tok-<hash>`.
fn jwt(
    cred: &str,
    key: &jsonwebtoken::DecodingKey,
    algorithms: &[jsonwebtoken::Algorithm],
    expect: Expect<'_>,
) -> Result<String, ApiError> {
    let mut v = jsonwebtoken::Validation::new(algorithms[0]);
    v.algorithms = algorithms.to_vec();
    v.leeway = JWT_LEEWAY_SECS;
    v.validate_nbf = true;
    v.validate_aud = expect.audience.is_some();
    if let Some(aud) = expect.audience {
        v.set_audience(&[aud]);
        v.required_spec_claims.insert("aud".to_owned());
    }
    if let Some(iss) = expect.issuer {
        v.set_issuer(&[iss]);
        v.required_spec_claims.insert("iss".to_owned());
    }
    match jsonwebtoken::decode::<Claims>(cred, key, &v) {
        Ok(data) if data.header.crit.as_ref().is_some_and(|c| !c.is_empty()) => Err(refuse(
            "Incorrect API key provided: the token names critical header parameters keypool does not understand.",
        )),
        Ok(data) => Ok(data
            .claims
            .sub
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| caller_id(cred))),
        Err(e) => {
            use jsonwebtoken::errors::ErrorKind as J;
            let why = match e.kind() {
                J::ExpiredSignature => "the token has expired",
                J::ImmatureSignature => "the token is not valid yet (nbf)",
                J::InvalidAlgorithm => "the token's algorithm is not accepted",
                J::InvalidSignature => "the token's signature is invalid",
                J::MissingRequiredClaim(c) if c == "exp" => "the token has no exp claim",
                J::MissingRequiredClaim(c) if c == "iss" => {
                    "the token's issuer is not accepted (iss)"
                }
                J::InvalidIssuer => "the token's issuer is not accepted (iss)",
                J::MissingRequiredClaim(_) | J::InvalidAudience => {
                    "the token is not for this gateway (aud)"
                }
                _ => "the token is malformed",
            };
            Err(refuse(format!("Incorrect API key provided: {why}.")))
        }
    }
}

fn describe(p: &Position) -> String {
    match p {
        Position::Header(h) => format!("the `{h}` header"),
        Position::Body(f) => format!("the `{f}` body field"),
        Position::Arg(a) => format!("the `{a}` query parameter"),
    }
}
