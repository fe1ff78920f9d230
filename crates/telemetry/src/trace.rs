//! Logging and OpenTelemetry traces.
//!
//! [`init`] installs the `tracing` subscriber: text or JSON logs on stderr, plus, when an OTLP
//! endpoint is configured, a `tracing-opentelemetry` layer exporting through OTLP/gRPC with a
//! batch processor. Without an endpoint no span is ever created: the request's server span is
//! [`Span::none`] unless [`crate::Telemetry::traced`], and every child of a none span is none,
//! so the hot path pays nothing.
//!
//! Span tree of one request (names and attributes follow the HTTP and GenAI semantic
//! conventions):
//! - `POST /v1/chat/completions` (server): `http.request.method`, `url.path`,
//!   `http.response.status_code`, `gen_ai.operation.name`, `gen_ai.request.model`,
//!   `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//!   `keypool.gateway`, `keypool.key`, `keypool.attempts`, `error.type`; continues the client's
//!   W3C `traceparent`.
//!   - `policy`: authentication and the gateway's checks.
//!   - `select_key`: `keypool.key`, `keypool.lb_policy`, `keypool.attempt`.
//!   - `upstream` (client), one per attempt: `keypool.key`, `gen_ai.system` (the key's
//!     provider: `openai`, `replicate`), `keypool.attempt`,
//!     `http.response.status_code`, `error.type`; its context goes upstream as `traceparent`.
//!   - `stream`: `keypool.stream.ttfb_ms`, `keypool.stream.chunks`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and stops the exporter on drop... explicitly, through [`TraceGuard::shutdown`].
pub struct TraceGuard {
    provider: Option<SdkTracerProvider>,
}

impl TraceGuard {
    /// Whether spans are exported (an OTLP endpoint is configured and its exporter built).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered. Blocking: call it from `spawn_blocking` (the exporter
    /// needs the multi-thread runtime to make progress meanwhile).
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.force_flush() {
                eprintln!("keypool: flushing traces failed: {e}");
            }
            let _ = p.shutdown();
        }
    }
}

/// Installs logging (and tracing when `telemetry` names an endpoint); actix's malformed-request
/// reports are counted into `metrics`. Call inside the tokio runtime, once.
pub fn init(
    telemetry: Option<&keypool_config::Telemetry>,
    metrics: &Arc<crate::Metrics>,
) -> TraceGuard {
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,actix_server=warn,sea_orm_migration=warn"))
    };
    // actix's per-connection parse errors are counted and summarised, never logged one by one
    // (a hint of TRACE restricts nothing: the `and` takes the EnvFilter's level as the hint;
    // a filter without one would make the whole process's level TRACE)
    let not_actix_dispatch = || {
        tracing_subscriber::filter::filter_fn(|m| !is_malformed(m.target()))
            .with_max_level_hint(tracing::level_filters::LevelFilter::TRACE)
    };
    let json = telemetry.is_some_and(|t| t.json_logs);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter().and(not_actix_dispatch()))
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter().and(not_actix_dispatch()))
            .boxed()
    };
    let provider = telemetry
        .and_then(|t| t.otlp_endpoint.as_deref().map(|e| (t, e)))
        .and_then(|(t, endpoint)| match build_provider(t, endpoint) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("keypool: traces disabled: cannot build the OTLP exporter: {e}");
                None
            }
        });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("keypool"))
            .with_filter(
                tracing_subscriber::filter::filter_fn(|m| m.is_span() && m.target() == TARGET)
                    // its spans are INFO: nothing more verbose is enabled for its sake
                    .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
            )
    });
    let malformed = MalformedRequests {
        metrics: metrics.clone(),
        last: Arc::default(),
    };
    let summary = (metrics.clone(), malformed.last.clone());
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        // filtered to its one target at WARN and above: no other event is enabled for its
        // sake, and the level hint keeps every `trace!` and `debug!` in every crate off (with
        // no hint the most verbose level was on, and actix's dispatcher traced its timers and
        // flags several times per poll: 16% of the instructions of a request)
        .with(
            malformed.with_filter(
                tracing_subscriber::filter::filter_fn(|m| {
                    is_malformed(m.target()) && *m.level() <= tracing::Level::WARN
                })
                .with_max_level_hint(tracing::level_filters::LevelFilter::WARN),
            ),
        )
        .try_init();
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(summarise_malformed(summary.0, summary.1));
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    TraceGuard { provider }
}

fn build_provider(
    t: &keypool_config::Telemetry,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the builder; the file wins
    resource = resource.with_service_name(
        t.service_name
            .clone()
            .unwrap_or_else(|| "keypool".to_owned()),
    );
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if let Some(ratio) = t.sample_ratio {
        builder = builder.with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(ratio),
        )));
    }
    Ok(builder.build())
}

/// Where actix reports a request it could not parse, or one that broke off, at ERROR: one line
/// per connection, so a fuzzer or a scanner could fill the log (30,000 lines seen).
const ACTIX_DISPATCH: &str = "actix_http::h1::dispatcher";

/// The target of the API port's reports of requests it could not read (`keypool_proxy::edge`):
/// counted and summarised as actix's are (actix still serves the admin API and the console).
pub const MALFORMED: &str = "keypool::malformed";

fn is_malformed(target: &str) -> bool {
    target == MALFORMED || target == ACTIX_DISPATCH
}

/// The `message` field of an event, cut at 200 bytes.
struct Message<'a>(&'a mut String);
impl tracing::field::Visit for Message<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write as _;
            self.0.clear();
            let _ = write!(self.0, "{value:?}");
            self.0.truncate(200);
        }
    }
}

/// Counts actix's malformed-request events (`keypool_malformed_requests_total`) and keeps the
/// last one's text (for the summary line); the fmt layer does not print them.
struct MalformedRequests {
    metrics: Arc<crate::Metrics>,
    last: Arc<Mutex<String>>,
}

impl<S: tracing::Subscriber> Layer<S> for MalformedRequests {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !is_malformed(event.metadata().target()) {
            return;
        }
        self.metrics.malformed_requests.inc();
        if let Ok(mut last) = self.last.try_lock() {
            event.record(&mut Message(&mut last));
        }
    }
}

/// One WARN line every 10 s while malformed requests arrive: how many, and the last one.
async fn summarise_malformed(metrics: Arc<crate::Metrics>, last: Arc<Mutex<String>>) {
    let mut seen = metrics.malformed_requests.get();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        let now = metrics.malformed_requests.get();
        if now > seen {
            let last = last.lock().unwrap_or_else(PoisonError::into_inner).clone();
            tracing::warn!(
                count = now - seen,
                last = %last,
                "malformed or broken-off client requests in the last 10 s (keypool_malformed_requests_total)"
            );
            seen = now;
        }
    }
}

/// The target of keypool's request spans (the only spans exported).
pub const TARGET: &str = "keypool::request";

struct Headers<'a>(&'a HashMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// `gen_ai.operation.name` for an OpenAI path.
pub fn operation(path: &str) -> &'static str {
    if path.ends_with("/chat/completions") {
        "chat"
    } else if path.ends_with("/completions") {
        "text_completion"
    } else if path.ends_with("/embeddings") {
        "embeddings"
    } else {
        "other"
    }
}

/// The server span of one request, continuing the client's `traceparent` when it sent one
/// (called only while traces are exported: [`crate::Telemetry::traced`]).
pub fn server_span(
    method: &str,
    path: &str,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = format!("{method} {path}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        url.path = path,
        http.response.status_code = tracing::field::Empty,
        gen_ai.operation.name = operation(path),
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        keypool.gateway = tracing::field::Empty,
        keypool.key = tracing::field::Empty,
        keypool.attempts = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(tp) = traceparent {
        let mut carrier = HashMap::with_capacity(2);
        carrier.insert("traceparent".to_owned(), tp.to_owned());
        if let Some(ts) = tracestate {
            carrier.insert("tracestate".to_owned(), ts.to_owned());
        }
        let parent = TraceContextPropagator::new().extract(&Headers(&carrier));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    let id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(id));
    span
}

/// A child span of `parent` (internal kind) with no extra fields.
pub fn child(parent: &Span, name: &'static str) -> Span {
    if parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(target: TARGET, parent: parent, "step", otel.name = name)
}

/// The `select_key` span.
pub fn select_span(parent: &Span, attempt: u32, lb_policy: &'static str) -> Span {
    if parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        parent: parent,
        "select_key",
        keypool.attempt = attempt,
        keypool.lb_policy = lb_policy,
        keypool.key = tracing::field::Empty,
        keypool.reason = tracing::field::Empty,
    )
}

/// An upstream attempt's client span (`gen_ai.system` is the key's provider).
pub fn attempt_span(parent: &Span, attempt: u32, key: &str, provider: &str, method: &str) -> Span {
    if parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        parent: parent,
        "upstream",
        otel.name = format!("{method} upstream"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        keypool.attempt = attempt,
        keypool.key = key,
        gen_ai.system = provider,
        http.response.status_code = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    )
}

/// The span of a relayed stream.
pub fn stream_span(parent: &Span, ttfb_ms: u64) -> Span {
    if parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        parent: parent,
        "stream",
        keypool.stream.ttfb_ms = ttfb_ms,
        keypool.stream.chunks = tracing::field::Empty,
    )
}

/// The W3C `traceparent` (and `tracestate`) of `span`, for the upstream request.
pub fn propagation_headers(span: &Span) -> Vec<(String, String)> {
    struct Out(Vec<(String, String)>);
    impl Injector for Out {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }
    if span.is_none() {
        return Vec::new();
    }
    let mut out = Out(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&span.context(), &mut out);
    out.0
}
