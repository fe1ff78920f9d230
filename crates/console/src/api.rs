//! The REST API: each handler lets the caller in ([`crate::session`]), then calls the gRPC
//! admin service's own handler (the same validation, persistence, push to frontends and audit
//! as `keypoolctl`) and answers its message as JSON. Errors are OpenAI-shaped, their status
//! from the one error table.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use keypool_admin::Who;
use keypool_proto::admin::v1 as pb;
use keypool_proto::admin::v1::admin_server::Admin as _;
use keypool_types::{ApiError, ErrorKind};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::Console;
use crate::session::Access;
use crate::views::{
    AuditView, ErrorView, GatewayCreated, GatewayInput, GatewayView, KeyPatch, KeyView, NewKey,
    PricesInput, PricesView, StatusView, UsageView,
};

/// A refusal, answered as its error table row says.
#[derive(Debug)]
pub struct Refusal(pub ApiError);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl ResponseError for Refusal {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .content_type("application/json")
            .body(self.0.to_json())
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

/// The admin service's status as the error table's row with that gRPC code.
impl From<tonic::Status> for Refusal {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code as C;
        let kind = match s.code() {
            C::InvalidArgument => ErrorKind::InvalidSpec,
            C::NotFound => ErrorKind::NotFound,
            C::AlreadyExists => ErrorKind::AlreadyExists,
            C::FailedPrecondition => ErrorKind::FailedPrecondition,
            C::Unauthenticated => ErrorKind::InvalidApiKey,
            C::PermissionDenied => ErrorKind::AccessDenied,
            C::Unavailable => ErrorKind::StoreUnavailable,
            C::ResourceExhausted => ErrorKind::RateLimitExceeded,
            _ => ErrorKind::Internal,
        };
        Self(ApiError::new(kind, s.message()))
    }
}

pub type Answer = Result<HttpResponse, Refusal>;

/// A call to the admin service on behalf of `access` (its audit log's "who").
fn call<T>(access: &Access, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut().insert(Who(access.who.clone()));
    r
}

/// A query string that does not parse: 400 in the API's own shape.
#[allow(clippy::needless_pass_by_value)] // actix's error handler signature
pub fn bad_query(e: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    Refusal(ApiError::new(
        ErrorKind::InvalidRequest,
        format!("query: {e}"),
    ))
    .into()
}

fn invalid(what: &str, e: &impl std::fmt::Display) -> Refusal {
    Refusal(ApiError::new(
        ErrorKind::InvalidSpec,
        format!("{what}: {e}"),
    ))
}

/// `name` of the path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct Named {
    /// The key's or gateway's name.
    pub name: String,
}

#[utoipa::path(get, path = "/api/status", tag = "status",
    responses((status = 200, body = StatusView), (status = 401, body = ErrorView)))]
pub async fn status(req: HttpRequest, c: web::Data<Console>) -> Answer {
    let access = c.sessions.check(&req)?;
    let s = c
        .service
        .get_status(call(&access, pb::GetStatusRequest {}))
        .await?;
    Ok(HttpResponse::Ok().json(StatusView::from(s.into_inner())))
}

#[utoipa::path(get, path = "/api/keys", tag = "keys",
    responses((status = 200, body = Vec<KeyView>), (status = 401, body = ErrorView)))]
pub async fn list_keys(req: HttpRequest, c: web::Data<Console>) -> Answer {
    let access = c.sessions.check(&req)?;
    let keys = c
        .service
        .list_keys(call(&access, pb::ListKeysRequest {}))
        .await?;
    let keys: Vec<KeyView> = keys
        .into_inner()
        .keys
        .into_iter()
        .map(KeyView::from)
        .collect();
    Ok(HttpResponse::Ok().json(keys))
}

#[utoipa::path(post, path = "/api/keys", tag = "keys", request_body = NewKey,
    responses((status = 201, body = KeyView), (status = 400, body = ErrorView),
        (status = 409, body = ErrorView), (status = 401, body = ErrorView)))]
pub async fn add_key(req: HttpRequest, c: web::Data<Console>, body: web::Bytes) -> Answer {
    let access = c.sessions.check(&req)?;
    let k: NewKey = serde_json::from_slice(&body).map_err(|e| invalid("key", &e))?;
    let raw = keypool_config::raw::RawUpstream {
        name: k.name,
        sk: Some(k.sk),
        endpoint: Some(k.endpoint),
        r#type: k.kind,
        rpm: k.rpm,
        tpm: k.tpm,
        allow: k.allow,
        deny: k.deny,
        ..Default::default()
    };
    let key = Some(pb::UpstreamSpec::from(&raw));
    let added = c
        .service
        .add_key(call(&access, pb::AddKeyRequest { key }))
        .await?;
    Ok(HttpResponse::Created().json(KeyView::from(added.into_inner())))
}

#[utoipa::path(patch, path = "/api/keys/{name}", tag = "keys", params(Named), request_body = KeyPatch,
    responses((status = 200, body = KeyView), (status = 400, body = ErrorView),
        (status = 404, body = ErrorView), (status = 401, body = ErrorView)))]
pub async fn update_key(
    req: HttpRequest,
    c: web::Data<Console>,
    path: web::Path<Named>,
    body: web::Bytes,
) -> Answer {
    let access = c.sessions.check(&req)?;
    let p: KeyPatch = serde_json::from_slice(&body).map_err(|e| invalid("key change", &e))?;
    let update = pb::UpdateKeyRequest {
        name: path.into_inner().name,
        rpm: p.rpm.flatten(),
        clear_rpm: p.rpm == Some(None),
        tpm: p.tpm.flatten(),
        clear_tpm: p.tpm == Some(None),
        allow: p.allow.map(|entries| pb::AllowDeny { entries }),
        deny: p.deny.map(|entries| pb::AllowDeny { entries }),
        enabled: p.enabled,
    };
    let key = c.service.update_key(call(&access, update)).await?;
    Ok(HttpResponse::Ok().json(KeyView::from(key.into_inner())))
}

#[utoipa::path(delete, path = "/api/keys/{name}", tag = "keys", params(Named),
    responses((status = 204), (status = 404, body = ErrorView), (status = 409, body = ErrorView)))]
pub async fn remove_key(req: HttpRequest, c: web::Data<Console>, path: web::Path<Named>) -> Answer {
    let access = c.sessions.check(&req)?;
    let name = path.into_inner().name;
    c.service
        .remove_key(call(&access, pb::RemoveKeyRequest { name }))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/gateways", tag = "gateways",
    responses((status = 200, body = Vec<GatewayView>), (status = 401, body = ErrorView)))]
pub async fn list_gateways(req: HttpRequest, c: web::Data<Console>) -> Answer {
    let access = c.sessions.check(&req)?;
    let all = c
        .service
        .list_gateways(call(&access, pb::ListGatewaysRequest {}))
        .await?;
    let all: Vec<GatewayView> = all
        .into_inner()
        .gateways
        .into_iter()
        .map(GatewayView::from)
        .collect();
    Ok(HttpResponse::Ok().json(all))
}

#[utoipa::path(get, path = "/api/gateways/{name}", tag = "gateways", params(Named),
    responses((status = 200, body = GatewayView), (status = 404, body = ErrorView)))]
pub async fn get_gateway(
    req: HttpRequest,
    c: web::Data<Console>,
    path: web::Path<Named>,
) -> Answer {
    let access = c.sessions.check(&req)?;
    let name = path.into_inner().name;
    let g = c
        .service
        .get_gateway(call(&access, pb::GetGatewayRequest { name }))
        .await?;
    Ok(HttpResponse::Ok().json(GatewayView::from(g.into_inner())))
}

/// A gateway spec from the body, and the secret given to it when one is to be generated.
fn gateway_spec(
    input: GatewayInput,
    name: Option<&str>,
) -> Result<(pb::GatewaySpec, Option<String>), Refusal> {
    let mut raw: keypool_config::RawGateway =
        serde_json::from_value(input.spec).map_err(|e| invalid("gateway", &e))?;
    if let Some(n) = name
        && raw.name.is_none()
    {
        raw.name = Some(n.to_owned());
    }
    let secret = input.generate_secret.then(|| {
        let secret = format!("kp-{}", keypool_control::random_hex(24));
        let auth = raw.auth.get_or_insert_with(Default::default);
        auth.method = Some("exact".to_owned());
        auth.secrets = vec![secret.clone()];
        secret
    });
    Ok((pb::GatewaySpec::from(&raw), secret))
}

#[utoipa::path(post, path = "/api/gateways", tag = "gateways", request_body = GatewayInput,
    responses((status = 201, body = GatewayCreated), (status = 400, body = ErrorView),
        (status = 409, body = ErrorView), (status = 401, body = ErrorView)))]
pub async fn create_gateway(req: HttpRequest, c: web::Data<Console>, body: web::Bytes) -> Answer {
    let access = c.sessions.check(&req)?;
    let input: GatewayInput = serde_json::from_slice(&body).map_err(|e| invalid("gateway", &e))?;
    let (spec, secret) = gateway_spec(input, None)?;
    let created = pb::CreateGatewayRequest {
        gateway: Some(spec),
    };
    let g = c.service.create_gateway(call(&access, created)).await?;
    Ok(HttpResponse::Created().json(GatewayCreated {
        gateway: GatewayView::from(g.into_inner()),
        secret,
    }))
}

#[utoipa::path(put, path = "/api/gateways/{name}", tag = "gateways", params(Named),
    request_body = GatewayInput,
    responses((status = 200, body = GatewayView), (status = 400, body = ErrorView),
        (status = 404, body = ErrorView), (status = 409, body = ErrorView)))]
pub async fn replace_gateway(
    req: HttpRequest,
    c: web::Data<Console>,
    path: web::Path<Named>,
    body: web::Bytes,
) -> Answer {
    let access = c.sessions.check(&req)?;
    let name = path.into_inner().name;
    let input: GatewayInput = serde_json::from_slice(&body).map_err(|e| invalid("gateway", &e))?;
    let (spec, _) = gateway_spec(input, Some(&name))?;
    let update = pb::UpdateGatewayRequest {
        name,
        gateway: Some(spec),
    };
    let g = c.service.update_gateway(call(&access, update)).await?;
    Ok(HttpResponse::Ok().json(GatewayView::from(g.into_inner())))
}

#[utoipa::path(delete, path = "/api/gateways/{name}", tag = "gateways", params(Named),
    responses((status = 204), (status = 404, body = ErrorView), (status = 409, body = ErrorView)))]
pub async fn delete_gateway(
    req: HttpRequest,
    c: web::Data<Console>,
    path: web::Path<Named>,
) -> Answer {
    let access = c.sessions.check(&req)?;
    let name = path.into_inner().name;
    let gone = pb::DeleteGatewayRequest { name };
    c.service.delete_gateway(call(&access, gone)).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(post, path = "/api/gateways/{name}/rotate", tag = "gateways", params(Named),
    responses((status = 200, body = GatewayCreated), (status = 404, body = ErrorView),
        (status = 409, body = ErrorView)))]
pub async fn rotate_gateway(
    req: HttpRequest,
    c: web::Data<Console>,
    path: web::Path<Named>,
) -> Answer {
    let access = c.sessions.check(&req)?;
    let name = path.into_inner().name;
    let r = c
        .service
        .rotate_gateway_secret(call(&access, pb::RotateGatewaySecretRequest { name }))
        .await?
        .into_inner();
    Ok(HttpResponse::Ok().json(GatewayCreated {
        gateway: GatewayView::from(r.gateway.unwrap_or_default()),
        secret: Some(r.secret),
    }))
}

/// The range and gateway usage is totalled over.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Unix ms (default: 24 hours before `to_ms`).
    #[param(minimum = 0, maximum = 253_402_300_799_999_i64)]
    pub from_ms: Option<i64>,
    /// Unix ms (default: now).
    #[param(minimum = 0, maximum = 253_402_300_799_999_i64)]
    pub to_ms: Option<i64>,
    /// Only this gateway.
    pub gateway: Option<String>,
    /// The day whose calls per hour are counted (unix ms within it; default: today).
    #[param(minimum = 0, maximum = 253_402_300_799_999_i64)]
    pub day_ms: Option<i64>,
}

#[utoipa::path(get, path = "/api/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, body = UsageView), (status = 400, body = ErrorView),
        (status = 409, body = ErrorView),
        (status = 401, body = ErrorView)))]
pub async fn usage(req: HttpRequest, c: web::Data<Console>, q: web::Query<UsageQuery>) -> Answer {
    let access = c.sessions.check(&req)?;
    let q = q.into_inner();
    let ask = pb::GetUsageRequest {
        from_ms: q.from_ms.unwrap_or(0),
        to_ms: q.to_ms.unwrap_or(0),
        gateway: q.gateway.unwrap_or_default(),
        day_ms: q.day_ms.unwrap_or(0),
    };
    let u = c.service.get_usage(call(&access, ask)).await?;
    Ok(HttpResponse::Ok().json(UsageView::from(u.into_inner())))
}

#[utoipa::path(get, path = "/api/prices", tag = "spend",
    responses((status = 200, body = PricesView), (status = 401, body = ErrorView)))]
pub async fn prices(req: HttpRequest, c: web::Data<Console>) -> Answer {
    let access = c.sessions.check(&req)?;
    let p = c
        .service
        .get_prices(call(&access, pb::GetPricesRequest {}))
        .await?;
    Ok(HttpResponse::Ok().json(PricesView::from(p.into_inner())))
}

#[utoipa::path(put, path = "/api/prices", tag = "spend", request_body = PricesInput,
    responses((status = 200, body = PricesView), (status = 400, body = ErrorView),
        (status = 401, body = ErrorView)))]
pub async fn set_prices(req: HttpRequest, c: web::Data<Console>, body: web::Bytes) -> Answer {
    let access = c.sessions.check(&req)?;
    let input: PricesInput = serde_json::from_slice(&body).map_err(|e| invalid("prices", &e))?;
    let mut pricing = Vec::with_capacity(input.pricing.len());
    for (i, entry) in input.pricing.into_iter().enumerate() {
        let raw: keypool_pricing::RawPrice =
            serde_json::from_value(entry).map_err(|e| invalid(&format!("pricing[{i}]"), &e))?;
        pricing.push(pb::Price::from(&raw));
    }
    let p = c
        .service
        .set_prices(call(&access, pb::SetPricesRequest { pricing }))
        .await?;
    Ok(HttpResponse::Ok().json(PricesView::from(p.into_inner())))
}

/// Which changes to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only changes before this (unix ms).
    #[param(minimum = 0, maximum = 253_402_300_799_999_i64)]
    pub before_ms: Option<i64>,
}

#[utoipa::path(get, path = "/api/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = Vec<AuditView>), (status = 400, body = ErrorView),
        (status = 409, body = ErrorView),
        (status = 401, body = ErrorView)))]
pub async fn audit(req: HttpRequest, c: web::Data<Console>, q: web::Query<AuditQuery>) -> Answer {
    c.sessions.check(&req)?;
    let Some(store) = &c.control.store else {
        return Err(Refusal(ApiError::new(
            ErrorKind::FailedPrecondition,
            "no store (dbtype: none): the audit log is kept in the log only",
        )));
    };
    let limit = q.limit.unwrap_or(100);
    if q.before_ms
        .is_some_and(|ms| !(0..keypool_store::LATEST_MS).contains(&ms))
    {
        return Err(Refusal(ApiError::new(
            ErrorKind::InvalidRequest,
            "before_ms: must be a unix time in milliseconds before the year 10000",
        )));
    }
    if !(1..=1000).contains(&limit) {
        return Err(Refusal(ApiError::new(
            ErrorKind::InvalidRequest,
            "limit: must be between 1 and 1000",
        )));
    }
    let rows = store
        .audit(u64::from(limit), q.before_ms.unwrap_or(0))
        .await
        .map_err(|e| {
            Refusal(ApiError::new(
                ErrorKind::StoreUnavailable,
                format!("store: {e}"),
            ))
        })?;
    let rows: Vec<AuditView> = rows.into_iter().map(AuditView::from).collect();
    Ok(HttpResponse::Ok().json(rows))
}
