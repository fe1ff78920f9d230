//! keypool's telemetry: Prometheus metrics ([`metrics`]), alerts ([`notify`]) and, when an OTLP
//! endpoint is configured, OpenTelemetry traces ([`trace`]), reached through one handle,
//! [`Telemetry`], that each part is given at start (no process-wide registry: two keypools in
//! one test process record apart).

pub mod metrics;
pub mod notify;
pub mod trace;

use std::sync::Arc;

pub use metrics::{Metrics, RequestRecord};
pub use notify::{Alert, Cause};

/// What a part of keypool records into: the metrics registry its `/metrics` serves, the alert
/// queue, and whether traces are exported. Cloning it is one reference count.
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

struct Inner {
    metrics: Arc<Metrics>,
    alerts: Option<tokio::sync::mpsc::Sender<Alert>>,
    cooling_after: u32,
    traced: bool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("alerts", &self.0.alerts.is_some())
            .field("traced", &self.0.traced)
            .finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    /// A registry of its own, no alerts, no traces (tools and tests).
    fn default() -> Self {
        Self::with(Arc::new(Metrics::new()), None, 3, false)
    }
}

impl Telemetry {
    fn with(
        metrics: Arc<Metrics>,
        alerts: Option<tokio::sync::mpsc::Sender<Alert>>,
        cooling_after: u32,
        traced: bool,
    ) -> Self {
        Self(Arc::new(Inner {
            metrics,
            alerts,
            cooling_after,
            traced,
        }))
    }

    /// The handle a process records into: `metrics` (the registry its log layer counts into
    /// too), alerts as `notify` says (their task started on the current runtime when a channel
    /// is configured), `traced` when spans are exported.
    pub fn start(
        metrics: Arc<Metrics>,
        notify: &keypool_config::Notify,
        instance: &str,
        traced: bool,
    ) -> (Self, Option<tokio::task::JoinHandle<()>>) {
        let (alerts, task) = match notify::start(notify, instance, metrics.clone()) {
            Some((tx, task)) => (Some(tx), Some(task)),
            None => (None, None),
        };
        let t = Self::with(metrics, alerts, notify.cooling_alert_after, traced);
        (t, task)
    }

    /// The metrics registry.
    #[inline]
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Whether traces are exported (spans exist at all).
    #[inline]
    pub fn traced(&self) -> bool {
        self.0.traced
    }

    /// Consecutive cooldowns of one key before it is alerted (`notify.cooling_alert_after`).
    pub fn cooling_alert_after(&self) -> u32 {
        self.0.cooling_after
    }

    /// Queues an alert: never blocks, never fails (a no-op when no channel is configured; a
    /// full queue drops it and counts it).
    pub fn alert(&self, cause: Cause, subject: impl Into<String>, text: impl Into<String>) {
        let Some(tx) = &self.0.alerts else {
            return;
        };
        let a = Alert {
            cause,
            subject: subject.into(),
            text: text.into(),
        };
        if tx.try_send(a).is_err() {
            self.metrics()
                .alerts
                .with_label_values(&["queue", "dropped"])
                .inc();
        }
    }
}
