//! Serving the admin API: the token check on every `keypool.admin.v1` call, gRPC health and
//! reflection (v1 and v1alpha), TLS when configured, until shutdown.

use std::sync::Arc;
use std::time::Duration;

use keypool_control::Control;
use keypool_proto::admin::v1::admin_server::AdminServer;
use keypool_types::ErrorKind;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::{AdminService, grpc};

/// Why the admin API stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the admin API, health and reflection on `listener` until `shutdown`.
pub async fn serve(
    control: Arc<Control>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let token = control.token().map(|t| t.expose().as_bytes().to_vec());
    let tls = control.config().admin.tls.clone();
    let check = move |req: Request<()>| -> Result<Request<()>, Status> {
        let Some(token) = &token else {
            return Ok(req);
        };
        let presented = req
            .metadata()
            .get("authorization")
            .map(tonic::metadata::MetadataValue::as_bytes)
            .unwrap_or_default();
        let presented = keypool_types::strip_bearer(presented);
        if keypool_types::constant_time_eq(presented, token) {
            Ok(req)
        } else {
            Err(grpc(
                ErrorKind::InvalidApiKey,
                "the admin API needs `authorization: Bearer <admin token>`",
            ))
        }
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<AdminService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keypool_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keypool_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let admin = AdminServer::with_interceptor(AdminService::new(control, shutdown.clone()), check);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server.tls_config(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, tls.key_pem.expose()),
        ))?;
    }
    server
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}
