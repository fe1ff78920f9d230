//! The admin gRPC service (`keypool.admin.v1.Admin`), with gRPC health and server reflection.
//!
//! Every `keypool.admin.v1` call needs `authorization: Bearer <admin token>` (compared in
//! constant time); health and reflection are open. The service is a thin translation between
//! protobuf and [`Control`], which validates, applies and persists.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use keypool_config::RawGateway;
use keypool_config::raw::RawUpstream;
use keypool_proto::admin::v1 as pb;
use keypool_proto::admin::v1::admin_server::Admin;
use keypool_types::ErrorKind;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use keypool_control::{Control, ControlError, KeyEntry};

mod messages;
mod serve;
mod streams;
mod usage;
pub use messages::mask;
use messages::{gateway_pb, key_pb};
pub use serve::{ServeError, serve};

pub struct AdminService {
    control: Arc<Control>,
    /// Ends the long-lived streams (`WatchConfig`, `PublishUsage`) on shutdown.
    shutdown: CancellationToken,
}

impl AdminService {
    /// The service the gRPC server runs, for another surface (the console's REST API) to call
    /// the very same handlers.
    pub fn new(control: Arc<Control>, shutdown: CancellationToken) -> Self {
        Self { control, shutdown }
    }
}

/// Who asks, for a call that did not come over gRPC (the console puts it in the request's
/// extensions): the audit log's "who".
#[derive(Debug, Clone)]
pub struct Who(pub String);

/// A refusal as a gRPC status, its code from the one error table ([`ErrorKind::wire`]).
fn grpc(kind: ErrorKind, message: impl Into<String>) -> Status {
    Status::new(tonic::Code::from(kind.wire().grpc as i32), message)
}

/// A control-plane refusal as a gRPC status (its kind's row of the table).
fn status(e: &ControlError) -> Status {
    grpc(e.kind(), e.to_string())
}

/// `?` for the control plane's results inside a handler.
trait OrStatus<T> {
    fn or_status(self) -> Result<T, Status>;
}

impl<T> OrStatus<T> for Result<T, ControlError> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(|e| status(&e))
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl AdminService {
    async fn key_with_state(&self, e: &KeyEntry) -> pb::Key {
        let states = self.control.pool.list().await;
        key_pb(e, states.iter().find(|s| s.name == *e.key.name))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::UsageEvent, Status>> + Send + 'static>>;
type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<pb::ConfigSnapshot, Status>> + Send + 'static>>;
type AckStream = Pin<Box<dyn Stream<Item = Result<pb::UsageAck, Status>> + Send + 'static>>;

/// Who made a change, for the audit log: `grpc` and the peer's address (never the token).
fn who<T>(req: &Request<T>) -> String {
    if let Some(Who(w)) = req.extensions().get::<Who>() {
        return w.clone();
    }
    match req.remote_addr() {
        Some(a) => format!("grpc {a}"),
        None => "grpc".to_owned(),
    }
}

/// Notes a frontend as seen now.
fn saw_frontend(control: &Control, id: &str, address: &str, version: u64, watching: Option<bool>) {
    control.frontends.saw(id, address, version, watching);
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_gateways(
        &self,
        _: Request<pb::ListGatewaysRequest>,
    ) -> Result<Response<pb::ListGatewaysResponse>, Status> {
        let gateways = self
            .control
            .listed_gateways()
            .iter()
            .map(|e| gateway_pb(e, &self.control))
            .collect();
        Ok(Response::new(pb::ListGatewaysResponse { gateways }))
    }

    async fn get_gateway(
        &self,
        req: Request<pb::GetGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        let name = req.into_inner().name;
        let e = self
            .control
            .gateway_entry(&name)
            .ok_or_else(|| grpc(ErrorKind::NotFound, format!("no gateway named {name:?}")))?;
        Ok(Response::new(gateway_pb(&e, &self.control)))
    }

    async fn create_gateway(
        &self,
        req: Request<pb::CreateGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        let who = who(&req);
        let raw = RawGateway::from(req.into_inner().gateway.unwrap_or_default());
        let e = self
            .control
            .put_gateway(&who, None, raw, false)
            .await
            .or_status()?;
        Ok(Response::new(gateway_pb(&e, &self.control)))
    }

    async fn update_gateway(
        &self,
        req: Request<pb::UpdateGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let raw = RawGateway::from(r.gateway.unwrap_or_default());
        let e = self
            .control
            .put_gateway(&who, Some(&r.name), raw, true)
            .await
            .or_status()?;
        Ok(Response::new(gateway_pb(&e, &self.control)))
    }

    async fn delete_gateway(
        &self,
        req: Request<pb::DeleteGatewayRequest>,
    ) -> Result<Response<pb::DeleteGatewayResponse>, Status> {
        self.control
            .delete_gateway(&who(&req), &req.into_inner().name)
            .await
            .or_status()?;
        Ok(Response::new(pb::DeleteGatewayResponse {}))
    }

    async fn rotate_gateway_secret(
        &self,
        req: Request<pb::RotateGatewaySecretRequest>,
    ) -> Result<Response<pb::RotateGatewaySecretResponse>, Status> {
        let (e, secret) = self
            .control
            .rotate_secret(&who(&req), &req.into_inner().name)
            .await
            .or_status()?;
        Ok(Response::new(pb::RotateGatewaySecretResponse {
            gateway: Some(gateway_pb(&e, &self.control)),
            secret,
        }))
    }

    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let states = self.control.pool.list().await;
        let keys = self
            .control
            .key_entries()
            .iter()
            .map(|e| key_pb(e, states.iter().find(|s| s.name == *e.key.name)))
            .collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn add_key(&self, req: Request<pb::AddKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let e = self
            .control
            .add_key(
                &who(&req),
                RawUpstream::from(req.into_inner().key.unwrap_or_default()),
            )
            .await
            .or_status()?;
        Ok(Response::new(self.key_with_state(&e).await))
    }

    async fn update_key(
        &self,
        req: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let rpm = if r.clear_rpm {
            Some(None)
        } else {
            r.rpm.map(Some)
        };
        let tpm = if r.clear_tpm {
            Some(None)
        } else {
            r.tpm.map(Some)
        };
        let change = keypool_control::KeyChange {
            rpm,
            tpm,
            allow: r.allow.map(|a| a.entries),
            deny: r.deny.map(|d| d.entries),
            enabled: r.enabled,
        };
        let e = self
            .control
            .update_key(&who, &r.name, change)
            .await
            .or_status()?;
        Ok(Response::new(self.key_with_state(&e).await))
    }

    async fn remove_key(
        &self,
        req: Request<pb::RemoveKeyRequest>,
    ) -> Result<Response<pb::RemoveKeyResponse>, Status> {
        self.control
            .remove_key(&who(&req), &req.into_inner().name)
            .await
            .or_status()?;
        Ok(Response::new(pb::RemoveKeyResponse {}))
    }

    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let store = self.control.store.as_ref().ok_or_else(|| {
            grpc(
                ErrorKind::FailedPrecondition,
                "no store (dbtype: none): usage is not kept",
            )
        })?;
        usage::answer(store, &req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_prices(
        &self,
        _req: Request<pb::GetPricesRequest>,
    ) -> Result<Response<pb::Prices>, Status> {
        Ok(Response::new(usage::prices_pb(
            &self.control,
            &self.control.admin_prices(),
        )))
    }

    async fn set_prices(
        &self,
        req: Request<pb::SetPricesRequest>,
    ) -> Result<Response<pb::Prices>, Status> {
        let who = who(&req);
        let entries = req
            .into_inner()
            .pricing
            .into_iter()
            .map(keypool_pricing::RawPrice::from)
            .collect();
        let set = self.control.set_prices(&who, entries).await.or_status()?;
        Ok(Response::new(usage::prices_pb(&self.control, &set)))
    }

    type StreamUsageStream = EventStream;

    async fn stream_usage(
        &self,
        req: Request<pb::StreamUsageRequest>,
    ) -> Result<Response<Self::StreamUsageStream>, Status> {
        let filter = req.into_inner();
        let rx = self.control.feed.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::UsageEvent, Status>>(64);
        tokio::spawn(streams::feed_usage(filter, rx, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    type WatchConfigStream = SnapshotStream;

    async fn watch_config(
        &self,
        req: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        let who = req.into_inner();
        let (control, stop) = (self.control.clone(), self.shutdown.clone());
        let changed = control.watch_changes();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::ConfigSnapshot, Status>>(2);
        tracing::info!(replica = %who.replica_id, address = %who.address, "frontend watching config");
        saw_frontend(
            &control,
            &who.replica_id,
            &who.address,
            who.have_version,
            Some(true),
        );
        tokio::spawn(streams::push_snapshots(control, stop, who, changed, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    type PublishUsageStream = AckStream;

    async fn publish_usage(
        &self,
        req: Request<tonic::Streaming<pb::UsageBatch>>,
    ) -> Result<Response<Self::PublishUsageStream>, Status> {
        let Some(store) = self.control.store.clone() else {
            return Err(grpc(
                ErrorKind::FailedPrecondition,
                "this control plane has no store (dbtype: none): it cannot collect usage",
            ));
        };
        let batches = req.into_inner();
        let (control, stop) = (self.control.clone(), self.shutdown.clone());
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::UsageAck, Status>>(4);
        tokio::spawn(streams::collect_usage(store, control, stop, batches, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        let store = match &self.control.store {
            None => "none",
            Some(s) if s.ping().await.is_ok() => "ok",
            Some(_) => "unavailable",
        };
        let version = self.control.version();
        let mut replicas = vec![pb::Replica {
            id: keypool_shared::process_id().to_owned(),
            address: self.control.config().address.clone(),
            last_seen_ms: now_ms(),
            config_version: version,
        }];
        // frontends watching now, or heard from in the last 15 s
        for (id, f) in self.control.frontends.recent(15_000) {
            replicas.push(pb::Replica {
                id,
                address: f.address,
                last_seen_ms: f.last_seen_ms,
                config_version: f.config_version,
            });
        }
        let redis_health = match &self.control.redis {
            None => "none",
            Some(r) => match r.replicas().await {
                Ok(seen) => {
                    // replicas that beat in the last 15 s
                    for (id, info) in seen {
                        let v: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
                        let last = v["last_seen_ms"].as_i64().unwrap_or(0);
                        if replicas.iter().any(|r| r.id == id) || now_ms() - last > 15_000 {
                            continue;
                        }
                        replicas.push(pb::Replica {
                            id,
                            address: v["address"].as_str().unwrap_or_default().to_owned(),
                            last_seen_ms: last,
                            config_version: v["config_version"].as_u64().unwrap_or(0),
                        });
                    }
                    "ok"
                }
                Err(_) => "unavailable",
            },
        };
        Ok(Response::new(pb::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.control.started.elapsed().as_secs(),
            replicas,
            store: store.to_owned(),
            redis: redis_health.to_owned(),
            config_version: version,
            keys: self.control.pool.keys().len() as u64,
            gateways: self.control.listed_gateways().len() as u64,
        }))
    }
}
