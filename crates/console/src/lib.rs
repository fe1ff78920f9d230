//! The operators' console: a JSON REST API mirroring the gRPC admin service (its handlers call
//! that service's own), its OpenAPI 3 document generated from the handlers' types
//! (`/api/openapi.json`), the live usage stream as Server-Sent Events, and a single-page app
//! served from the binary (assets embedded, no CDN).
//!
//! Files: `session.rs` (who is let in: login, session cookie, CSRF), `api.rs` (the REST
//! handlers), `views.rs` (the JSON shapes), `live.rs` (login, logout and the live stream),
//! `assets.rs` (the app).

mod api;
mod assets;
mod live;
pub mod session;
pub mod views;

use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};
use keypool_admin::AdminService;
use keypool_control::Control;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

pub use session::Sessions;

/// What every handler shares.
pub struct Console {
    pub control: Arc<Control>,
    pub service: AdminService,
    pub sessions: Sessions,
    /// Ends the live streams on shutdown.
    pub shutdown: CancellationToken,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keypool admin API",
        description = "The control plane's REST API: the gRPC admin service (`keypool.admin.v1`) as JSON. Authenticate with `Authorization: Bearer <admin token>`, or log in (`POST /api/login`) and send the session's `x-csrf-token` with every write."
    ),
    paths(
        live::login,
        live::logout,
        live::session,
        live::events,
        api::status,
        api::list_keys,
        api::add_key,
        api::update_key,
        api::remove_key,
        api::list_gateways,
        api::get_gateway,
        api::create_gateway,
        api::replace_gateway,
        api::delete_gateway,
        api::rotate_gateway,
        api::usage,
        api::prices,
        api::set_prices,
        api::audit,
    )
)]
pub struct ApiDoc;

/// The OpenAPI document, as `/api/openapi.json` serves it.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi_json())
}

/// One API path serving `allow`: another method is 405 naming them.
fn path(p: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(p).default_service(web::to(
        move || async move { live::method_not_allowed(allow) },
    ))
}

/// The routes: `/api/*` and the app.
pub fn routes(cfg: &mut web::ServiceConfig) {
    use web::{delete, get, patch, post, put};
    cfg.service(
        web::scope("/api")
            .app_data(web::QueryConfig::default().error_handler(api::bad_query))
            .service(path("/openapi.json", "GET").route(get().to(openapi)))
            .service(path("/login", "POST").route(post().to(live::login)))
            .service(path("/logout", "POST").route(post().to(live::logout)))
            .service(path("/session", "GET").route(get().to(live::session)))
            .service(path("/events", "GET").route(get().to(live::events)))
            .service(path("/status", "GET").route(get().to(api::status)))
            .service(
                path("/keys", "GET, POST")
                    .route(get().to(api::list_keys))
                    .route(post().to(api::add_key)),
            )
            .service(
                path("/keys/{name}", "PATCH, DELETE")
                    .route(patch().to(api::update_key))
                    .route(delete().to(api::remove_key)),
            )
            .service(
                path("/gateways", "GET, POST")
                    .route(get().to(api::list_gateways))
                    .route(post().to(api::create_gateway)),
            )
            .service(
                path("/gateways/{name}", "GET, PUT, DELETE")
                    .route(get().to(api::get_gateway))
                    .route(put().to(api::replace_gateway))
                    .route(delete().to(api::delete_gateway)),
            )
            .service(path("/gateways/{name}/rotate", "POST").route(post().to(api::rotate_gateway)))
            .service(path("/usage", "GET").route(get().to(api::usage)))
            .service(
                path("/prices", "GET, PUT")
                    .route(get().to(api::prices))
                    .route(put().to(api::set_prices)),
            )
            .service(path("/audit", "GET").route(get().to(api::audit)))
            .default_service(web::to(live::not_found)),
    )
    .configure(assets::routes);
}

/// The TLS the admin API has (`admin.tls_cert`/`tls_key`), for the console.
fn tls(tls: &keypool_config::AdminTls) -> std::io::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::other(format!("admin TLS for the console: {what}: {e}"))
    };
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("admin.tls_cert", &e))?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.expose().as_bytes())
        .map_err(|e| bad("admin.tls_key", &e))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate", &e))
}

/// Serves the console on `listener` until `shutdown` (one worker: an operator's browser and a
/// few scripts, never API traffic), over TLS when the admin API has it (its session cookie then
/// `Secure`).
pub fn serve(
    control: Arc<Control>,
    listener: std::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<actix_web::dev::Server> {
    let config = control.config();
    let tls = config.admin.tls.as_ref().map(tls).transpose()?;
    let sessions = Sessions::new(control.token(), tls.is_some());
    let console = web::Data::new(Console {
        service: AdminService::new(control.clone(), shutdown.clone()),
        control,
        sessions,
        shutdown: shutdown.clone(),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(console.clone())
            .app_data(web::PayloadConfig::new(1 << 20))
            .configure(routes)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
    let server = match tls {
        Some(tls) => server.listen_rustls_0_23(listener, tls)?,
        None => server.listen(listener)?,
    }
    .run();
    let handle = server.handle();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.stop(true).await;
    });
    Ok(server)
}

#[cfg(test)]
mod tests {
    /// The document's bounds are literals (utoipa's attributes take no paths): they must stay
    /// what the code enforces.
    #[test]
    fn the_documents_bounds_are_the_codes() {
        let doc: serde_json::Value = serde_json::from_str(&super::openapi_json()).unwrap();
        let schemas = &doc["components"]["schemas"];
        for schema in ["KeyPatch", "NewKey"] {
            let tpm = &schemas[schema]["properties"]["tpm"]["maximum"];
            assert_eq!(tpm.as_u64(), Some(keypool_config::MAX_TPM), "{schema}");
        }
        let params = doc["paths"]["/api/audit"]["get"]["parameters"]
            .as_array()
            .unwrap();
        let before = params.iter().find(|p| p["name"] == "before_ms").unwrap();
        assert_eq!(
            before["schema"]["maximum"].as_i64(),
            Some(keypool_store::LATEST_MS - 1)
        );
    }
}
