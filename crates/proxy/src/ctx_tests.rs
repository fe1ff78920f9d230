use std::sync::Mutex;

use keypool_policy::budget::Budgets;
use reqwest::header::HeaderName;

use super::*;

/// Keeps the events it is given.
#[derive(Default)]
struct Kept(Mutex<Vec<UsageEvent>>);

impl UsageSink for Kept {
    fn record(&self, e: UsageEvent) {
        self.0.lock().unwrap().push(e);
    }
}

fn ctx(sink: Arc<Kept>) -> RequestCtx {
    let raw: keypool_config::RawGateway = serde_norway::from_str("name: g").unwrap();
    let gateway = Arc::new(GatewayRuntime::new(Arc::new(
        keypool_config::validate_gateway(&raw, "g").unwrap(),
    )));
    let mut forwarded = HeaderMap::new();
    forwarded.insert(
        HeaderName::from_static("x-team"),
        HeaderValue::from_static("a"),
    );
    let body = bytes::Bytes::from_static(br#"{"model":"gpt-4o-mini","stream":true}"#);
    RequestCtx::new(NewRequest {
        started: Instant::now(),
        method: reqwest::Method::POST,
        path: Arc::from("/v1/chat/completions"),
        upstream_path: "/chat/completions".to_owned(),
        query: Some("api-version=1".to_owned()),
        caller: Caller::ANONYMOUS,
        gateway,
        client_ip: None,
        inspected: Inspected {
            model: "gpt-4o-mini".to_owned(),
            stream: true,
            est_tokens: 10,
            est_prompt: 10,
            max_output: None,
            body,
            strip_usage_chunk: true,
            previous_response: None,
        },
        headers: (forwarded.clone(), forwarded),
        client_authorization: Some(HeaderValue::from_static("Bearer sk-client")),
        user_agent: None,
        log: None,
        log_response_cap: None,
        max_attempts: 1,
        sink,
        spend: crate::spend::Spending::new(
            Arc::default(),
            Arc::new(Budgets::new(
                None,
                None,
                keypool_telemetry::Telemetry::default(),
            )),
        ),
        session: None,
    })
}

/// A relayed stream lets go of what only an attempt reads; its usage event is whole.
#[test]
fn a_forwarded_request_keeps_what_its_usage_event_needs_only() {
    let sink = Arc::new(Kept::default());
    let mut ctx = ctx(sink.clone());
    ctx.forwarded();
    assert!(ctx.headers.0.is_empty() && ctx.headers.1.is_empty());
    assert!(ctx.inspected.body.is_empty());
    assert!(ctx.client_authorization.is_none());
    assert_eq!(
        (ctx.upstream_path.as_str(), ctx.query.as_deref()),
        ("", None)
    );
    ctx.account(200, None, None);
    let events = sink.0.lock().unwrap();
    let e = &events[0];
    assert_eq!((&*e.gateway, e.model.as_str()), ("g", "gpt-4o-mini"));
    assert!(e.stream && e.status == 200);
}
