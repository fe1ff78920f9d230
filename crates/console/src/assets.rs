//! The console app, embedded in the binary: `/` and `/assets/*`, with a content security policy
//! that lets the page load nothing but its own files and talk to nothing but this server.

use actix_web::{HttpResponse, web};

/// Path, content type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/app.css"),
    ),
    (
        "vendor/uplot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vendor/uplot.iife.min.js"),
    ),
    (
        "vendor/uplot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/vendor/uplot.min.css"),
    ),
];

const INDEX: &str = include_str!("../assets/index.html");

/// Only this server's own scripts, styles and API; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn secured(mut resp: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    resp.insert_header(("content-security-policy", CSP))
        .insert_header(("x-content-type-options", "nosniff"))
        .insert_header(("referrer-policy", "no-referrer"))
        .insert_header(("x-frame-options", "DENY"));
    resp
}

async fn index() -> HttpResponse {
    secured(HttpResponse::Ok())
        .content_type("text/html; charset=utf-8")
        .insert_header(("cache-control", "no-cache"))
        .body(INDEX)
}

async fn asset(path: web::Path<String>) -> HttpResponse {
    let path = path.into_inner();
    match FILES.iter().find(|(p, _, _)| *p == path) {
        Some((_, kind, bytes)) => secured(HttpResponse::Ok())
            .content_type(*kind)
            .insert_header(("cache-control", "no-cache"))
            .body(*bytes),
        None => secured(HttpResponse::NotFound())
            .content_type("text/plain; charset=utf-8")
            .body("not found"),
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/favicon.ico", web::get().to(HttpResponse::NoContent))
        .route("/assets/{path:.*}", web::get().to(asset));
}
