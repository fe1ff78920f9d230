//! The HTTP stack of a frontend, declared in one place, top to bottom.

use actix_web::http::header;
use actix_web::middleware::DefaultHeaders;
use actix_web::{App, HttpRequest, HttpResponse, web};
use keypool_proxy::Frontend;

use crate::monitor::Monitor;
use keypool_proxy::http::error_response;
use keypool_proxy::pipeline;
use keypool_types::{ApiError, ErrorKind};

/// Builds one worker's app around its [`Frontend`].
pub fn app(
    frontend: web::Data<Frontend>,
    monitor: web::Data<Monitor>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(frontend)
        .app_data(monitor)
        // CORS as openai-api-route does it: any origin may call; preflights answered here.
        .wrap(
            DefaultHeaders::new()
                .add((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
                .add((
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    "GET, POST, PUT, PATCH, DELETE, OPTIONS",
                )),
        )
        // liveness / readiness for load balancers
        .route(
            "/healthz",
            web::get().to(|| async { HttpResponse::Ok().body("ok") }),
        )
        // the default gateway: every method on /v1/*, routed by prefix (a `{tail:.*}` pattern
        // costs a regex match per request); anything else gets an OpenAI-shaped 404
        .default_service(web::to(route))
}

/// `/v1/*` → CORS preflight or the proxy; anything else → an OpenAI-shaped 404.
async fn route(
    req: HttpRequest,
    payload: web::Payload,
    frontend: web::Data<Frontend>,
    monitor: web::Data<Monitor>,
) -> HttpResponse {
    if req.method() == actix_web::http::Method::OPTIONS {
        return preflight(&req);
    }
    if matches!(req.path(), "/metrics" | "/v1/metrics")
        && req.method() == actix_web::http::Method::GET
    {
        return crate::monitor::prometheus(&req, &monitor).await;
    }
    if !monitor.proxying
        && (req.path().starts_with("/v1/") || req.path().contains("/v1/"))
        && !req.path().ends_with("/usage")
    {
        return error_response(
            &ApiError::new(
                ErrorKind::NotFound,
                "This is keypool's control plane (`keypool admin`): send API calls to a frontend.",
            ),
            None,
        );
    }
    // `/v1/...` (the `default` gateway) and `/llm/api/{name}/v1/...`: one pipeline
    if pipeline::route(req.path()).is_some() {
        return pipeline::handle(req, payload, frontend).await;
    }
    if let Some(name) = req
        .path()
        .strip_prefix("/llm/api/")
        .and_then(|r| r.strip_suffix("/usage"))
        && !name.contains('/')
        && req.method() == actix_web::http::Method::GET
    {
        return crate::monitor::gateway_usage(&req, &frontend, &monitor, name).await;
    }
    not_found(&req)
}

/// A CORS preflight: allow the headers the browser asks for (a `*` would not cover
/// `Authorization`).
fn preflight(req: &HttpRequest) -> HttpResponse {
    let asked = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Authorization, Content-Type")
        .to_owned();
    HttpResponse::Ok()
        .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, asked))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "86400"))
        .finish()
}

fn not_found(req: &HttpRequest) -> HttpResponse {
    error_response(
        &ApiError::new(
            ErrorKind::NotFound,
            format!(
                "Unknown request URL: {} {}. keypool serves /v1/* and /llm/api/{{gateway}}/v1/*.",
                req.method(),
                req.path()
            ),
        ),
        None,
    )
}
