//! Logging in and out, the session the app reloads, and the live usage stream (Server-Sent
//! Events: one `data:` line per finished request, no body, no prompt).

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use futures::StreamExt as _;
use keypool_types::{ApiError, ErrorKind};
use tokio::sync::broadcast::error::RecvError;

use crate::Console;
use crate::api::{Answer, Refusal};
use crate::session::TTL;
use crate::views::{ErrorView, LiveEvent, Login, SessionView};

/// A wrong token costs the caller this long (guessing it is slow).
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(250);

#[utoipa::path(post, path = "/api/login", tag = "session", request_body = Login,
    responses((status = 200, body = SessionView, description = "Sets the session cookie"),
        (status = 400, body = ErrorView), (status = 401, body = ErrorView)))]
pub async fn login(c: web::Data<Console>, body: web::Bytes) -> Answer {
    let login: Login = serde_json::from_slice(&body).map_err(|e| {
        Refusal(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("expected {{\"token\": \"...\"}}: {e}"),
        ))
    })?;
    if !c.sessions.admits(&login.token) {
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        return Err(Refusal(ApiError::new(
            ErrorKind::InvalidApiKey,
            "That is not the admin token.",
        )));
    }
    let (id, csrf) = c.sessions.start();
    Ok(HttpResponse::Ok()
        .insert_header(("set-cookie", c.sessions.cookie(&id, TTL)))
        .insert_header(("cache-control", "no-store"))
        .json(SessionView {
            csrf,
            open: c.sessions.open(),
        }))
}

#[utoipa::path(post, path = "/api/logout", tag = "session",
    responses((status = 204, description = "The session ended and its cookie expired")))]
pub async fn logout(req: HttpRequest, c: web::Data<Console>) -> HttpResponse {
    c.sessions.end(&req);
    HttpResponse::NoContent()
        .insert_header(("set-cookie", c.sessions.cookie("", Duration::ZERO)))
        .finish()
}

#[utoipa::path(get, path = "/api/session", tag = "session",
    responses((status = 200, body = SessionView), (status = 401, body = ErrorView)))]
pub async fn session(req: HttpRequest, c: web::Data<Console>) -> Answer {
    let access = c.sessions.check(&req)?;
    Ok(HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(SessionView {
            csrf: access.csrf.unwrap_or_default(),
            open: c.sessions.open(),
        }))
}

/// How often an idle stream sends a comment (so proxies keep it open).
const KEEPALIVE: Duration = Duration::from_secs(15);

#[utoipa::path(get, path = "/api/events", tag = "usage",
    responses((status = 200, content_type = "text/event-stream", body = LiveEvent,
        description = "One `data:` line per finished request, as it is recorded"),
        (status = 401, body = ErrorView)))]
pub async fn events(req: HttpRequest, c: web::Data<Console>) -> Answer {
    c.sessions.check(&req)?;
    let rx = c.control.feed.subscribe();
    let stop = c.shutdown.clone();
    let stream = futures::stream::unfold((rx, stop), |(mut rx, stop)| async move {
        let item = tokio::select! {
            () = stop.cancelled() => return None,
            r = tokio::time::timeout(KEEPALIVE, rx.recv()) => match r {
                Err(_) => ": keepalive\n\n".to_owned(),
                Ok(Ok(e)) => {
                    let line = serde_json::to_string(&LiveEvent::from(&*e)).unwrap_or_default();
                    format!("data: {line}\n\n")
                }
                Ok(Err(RecvError::Lagged(n))) => format!(": {n} events skipped\n\n"),
                Ok(Err(RecvError::Closed)) => return None,
            },
        };
        Some((
            Ok::<_, std::convert::Infallible>(web::Bytes::from(item)),
            (rx, stop),
        ))
    });
    // the first bytes at once: the browser's EventSource opens without waiting for traffic
    let hello = futures::stream::once(async {
        Ok::<_, std::convert::Infallible>(web::Bytes::from_static(b": connected\n\n"))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-store"))
        .streaming(hello.chain(stream)))
}

/// A method an API path does not serve.
pub fn method_not_allowed(allow: &'static str) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header(("allow", allow))
        .json(serde_json::json!({"error": {
            "message": "This method is not served on this path (see /api/openapi.json).",
            "type": "invalid_request_error",
            "code": "method_not_allowed",
            "param": null,
        }}))
}

/// An unknown `/api/*` path.
pub async fn not_found() -> Answer {
    Err(Refusal(ApiError::new(
        ErrorKind::NotFound,
        "Unknown API path (see /api/openapi.json).",
    )))
}
