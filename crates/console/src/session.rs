//! Who may use the REST API and the console: the admin token, presented once at the login page
//! and kept in a session cookie (HttpOnly, SameSite=Strict, `Secure` over TLS) with a CSRF token
//! every write must echo; or presented on each call as `Authorization: Bearer` (scripts; no
//! cookie, so no CSRF). Without an admin token anyone who reaches the address may use it (the
//! config refuses a non-loopback address without one).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use actix_web::http::Method;
use keypool_types::{ApiError, ErrorKind, Secret};

/// The session cookie's name.
pub const COOKIE: &str = "kp_session";
/// How long a session lasts.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept (the oldest goes first): logins cannot grow memory without bound.
const MAX_SESSIONS: usize = 256;

struct Session {
    csrf: String,
    until: Instant,
}

/// The admin token and the console's sessions.
pub struct Sessions {
    token: Option<Secret>,
    secure: bool,
    live: Mutex<HashMap<String, Session>>,
}

/// A caller let in, and how.
pub struct Access {
    /// For the audit log: `console <ip>` or `api <ip>`, never a credential.
    pub who: String,
    /// The session's CSRF token (none for a bearer caller or an open console).
    pub csrf: Option<String>,
}

/// The session cookie's value, from the request's `Cookie` headers.
fn session_id(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE && !value.is_empty()).then_some(value)
        })
}

fn denied(message: &str) -> ApiError {
    ApiError::new(ErrorKind::InvalidApiKey, message)
}

impl Sessions {
    pub fn new(token: Option<Secret>, secure: bool) -> Self {
        Self {
            token,
            secure,
            live: Mutex::default(),
        }
    }

    /// No admin token: the console is open.
    pub fn open(&self) -> bool {
        self.token.is_none()
    }

    /// Whether `presented` is the admin token (any value when there is none).
    pub fn admits(&self, presented: &str) -> bool {
        self.token.as_ref().is_none_or(|t| {
            keypool_types::constant_time_eq(presented.as_bytes(), t.expose().as_bytes())
        })
    }

    /// Starts a session: its id (the cookie's value) and its CSRF token.
    pub fn start(&self) -> (String, String) {
        let (id, csrf) = (
            keypool_control::random_hex(32),
            keypool_control::random_hex(16),
        );
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        live.retain(|_, s| s.until > now);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.until)
                .map(|(k, _)| k.clone())
        {
            live.remove(&oldest);
        }
        live.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                until: now + TTL,
            },
        );
        (id, csrf)
    }

    /// Ends the request's session, if it has one.
    pub fn end(&self, req: &HttpRequest) {
        if let Some(id) = session_id(req) {
            self.live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(id);
        }
    }

    /// The session cookie's attributes after its value.
    pub fn cookie(&self, value: &str, max_age: Duration) -> String {
        format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            max_age.as_secs(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// Lets a caller in: a bearer admin token, or a live session (whose writes carry its CSRF
    /// token), or anyone when the console is open.
    pub fn check(&self, req: &HttpRequest) -> Result<Access, ApiError> {
        let ip = req
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        if let Some(auth) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
            let presented = keypool_types::strip_bearer(auth.as_bytes());
            return match &self.token {
                Some(t) if keypool_types::constant_time_eq(presented, t.expose().as_bytes()) => {
                    Ok(Access {
                        who: format!("api {ip}"),
                        csrf: None,
                    })
                }
                Some(_) => Err(denied("The admin token is not valid.")),
                None => Ok(Access {
                    who: format!("api {ip}"),
                    csrf: None,
                }),
            };
        }
        let session = session_id(req).and_then(|id| {
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            live.get(id)
                .filter(|s| s.until > Instant::now())
                .map(|s| s.csrf.clone())
        });
        let csrf = match (session, &self.token) {
            (Some(csrf), _) => csrf,
            (None, None) => {
                return Ok(Access {
                    who: format!("console {ip}"),
                    csrf: None,
                });
            }
            (None, Some(_)) => {
                return Err(denied(
                    "Log in with the admin token (POST /api/login), or send `Authorization: Bearer <admin token>`.",
                ));
            }
        };
        let reads = matches!(*req.method(), Method::GET | Method::HEAD);
        let echoed = req
            .headers()
            .get("x-csrf-token")
            .map(actix_web::http::header::HeaderValue::as_bytes)
            .unwrap_or_default();
        if !reads && !keypool_types::constant_time_eq(echoed, csrf.as_bytes()) {
            return Err(ApiError::new(
                ErrorKind::AccessDenied,
                "A write from the console must send its session's `x-csrf-token`.",
            ));
        }
        Ok(Access {
            who: format!("console {ip}"),
            csrf: Some(csrf),
        })
    }
}
