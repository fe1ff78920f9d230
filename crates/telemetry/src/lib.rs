//! keypool's telemetry: Prometheus metrics ([`metrics`]), alerts ([`notify`]) and, when an OTLP
//! endpoint is configured, OpenTelemetry traces ([`trace`]).

pub mod metrics;
pub mod notify;
pub mod trace;

pub use metrics::{RequestRecord, metrics};
pub use notify::{Cause, alert};
