//! OpenTelemetry traces through the real binary, into an in-test OTLP/gRPC receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, config, hello, mock};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::json;

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    service_names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            if let Some(r) = &rs.resource {
                for kv in &r.attributes {
                    if kv.key == "service.name"
                        && let Some(Any::StringValue(s)) =
                            kv.value.as_ref().and_then(|v| v.value.clone())
                    {
                        self.service_names
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(s);
                    }
                }
            }
            for ss in rs.scope_spans {
                self.spans
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            Any::IntValue(i) => Some(i.to_string()),
            Any::BoolValue(b) => Some(b.to_string()),
            Any::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    })
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_plain_and_a_streamed_request_reach_an_otlp_receiver() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let up = mock("up", Behavior::default());
    let mut gw = Gateway::start(
        &config()
            .token("t")
            .key(&up, "up", "")
            .block(&format!(
                "telemetry: {{otlp_endpoint: \"{otlp}\", service_name: keypool-under-test, json_logs: true}}"
            ))
            .yaml(),
    )
    .await?;
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let resp = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("t")
        .header("traceparent", &traceparent)
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let _ = resp.text().await?;
    // the upstream continues keypool's trace, under keypool's upstream span
    let seen = up.last_request().unwrap();
    let upstream_tp = seen.header("traceparent").unwrap().to_owned();
    assert!(
        upstream_tp.starts_with(&format!("00-{CLIENT_TRACE}-")),
        "{upstream_tp}"
    );
    assert!(
        !upstream_tp.contains(CLIENT_SPAN),
        "a new parent span id: {upstream_tp}"
    );

    // a streamed request without traceparent starts its own trace
    let mut req = hello("gpt-4o-mini");
    req["stream"] = json!(true);
    let resp = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("t")
        .json(&req)
        .send()
        .await?;
    assert!(resp.text().await?.contains("[DONE]"));

    // spans are flushed on shutdown
    gw.terminate()?;
    gw.wait(Duration::from_secs(15)).await?;
    let logs = gw.logs();
    server.abort();

    let spans = receiver.spans.lock().unwrap().clone();
    assert!(
        receiver
            .service_names
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "keypool-under-test")
    );
    let by_id: HashMap<String, &Span> = spans.iter().map(|s| (hex(&s.span_id), s)).collect();
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 2, "{spans:#?}");
    let plain = servers
        .iter()
        .find(|s| hex(&s.trace_id) == CLIENT_TRACE)
        .expect("the client's trace was continued");
    assert_eq!(hex(&plain.parent_span_id), CLIENT_SPAN);
    assert_eq!(plain.name, "POST /v1/chat/completions");
    assert_eq!(
        attr(plain, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(plain, "gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert_eq!(
        attr(plain, "gen_ai.request.model").as_deref(),
        Some("gpt-4o-mini")
    );
    assert_eq!(
        attr(plain, "gen_ai.response.model").as_deref(),
        Some("gpt-4o-mini")
    );
    assert_eq!(
        attr(plain, "gen_ai.usage.input_tokens").as_deref(),
        Some("5")
    );
    assert_eq!(
        attr(plain, "gen_ai.usage.output_tokens").as_deref(),
        Some("5")
    );
    assert_eq!(attr(plain, "keypool.key").as_deref(), Some("up"));

    let children = |parent: &Span| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .collect()
    };
    let names = |parent: &Span| {
        let mut n: Vec<String> = children(parent).iter().map(|s| s.name.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(names(plain), ["POST upstream", "policy", "select_key"]);
    let attempt = children(plain)
        .into_iter()
        .find(|s| s.name == "POST upstream")
        .unwrap();
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(attr(attempt, "keypool.attempt").as_deref(), Some("1"));
    assert_eq!(attr(attempt, "keypool.key").as_deref(), Some("up"));
    assert_eq!(attr(attempt, "gen_ai.system").as_deref(), Some("openai"));
    assert_eq!(
        attr(attempt, "http.response.status_code").as_deref(),
        Some("200")
    );
    // the traceparent the upstream got names the attempt span
    assert_eq!(
        upstream_tp,
        format!("00-{CLIENT_TRACE}-{}-01", hex(&attempt.span_id))
    );
    let select = children(plain)
        .into_iter()
        .find(|s| s.name == "select_key")
        .unwrap();
    assert_eq!(attr(select, "keypool.key").as_deref(), Some("up"));
    assert_eq!(
        attr(select, "keypool.lb_policy").as_deref(),
        Some("least-used")
    );

    let streamed = servers
        .iter()
        .find(|s| hex(&s.trace_id) != CLIENT_TRACE)
        .unwrap();
    assert!(streamed.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        names(streamed),
        ["POST upstream", "policy", "select_key", "stream"]
    );
    let stream = children(streamed)
        .into_iter()
        .find(|s| s.name == "stream")
        .unwrap();
    assert!(attr(stream, "keypool.stream.ttfb_ms").is_some());
    let chunks: u64 = attr(stream, "keypool.stream.chunks").unwrap().parse()?;
    assert!(chunks >= 6, "5 words and [DONE] at least: {chunks}");
    // the stream's usage is exact on the server span, which ends with the stream
    assert_eq!(
        attr(streamed, "gen_ai.usage.output_tokens").as_deref(),
        Some("5")
    );
    assert!(
        streamed.end_time_unix_nano >= stream.end_time_unix_nano,
        "server {}..{} stream {}..{}",
        streamed.start_time_unix_nano,
        streamed.end_time_unix_nano,
        stream.start_time_unix_nano,
        stream.end_time_unix_nano
    );
    assert!(by_id.len() >= 9);

    // JSON logs carry the trace id of the request they were written in
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains(&format!("\"trace_id\":\"{CLIENT_TRACE}\""))),
        "{logs}"
    );
    Ok(())
}
