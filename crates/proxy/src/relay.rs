//! [`Relay`]: a stream being passed from one upstream to one client, event by event.
//!
//! Created once the first body chunk arrived within the key's `stream_timeout` (until then the
//! engine may still fail over). From then on there is no retry: a gap longer than `idle_timeout`,
//! a broken upstream connection, or a completion stream that ends without `data: [DONE]` ends the
//! client's stream with an explicit error event. The relay settles its lease and records the
//! request's usage when the stream ends; if the client goes away first, dropping the relay drops
//! the upstream response (cancelling the upstream request) and records the cancellation.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use keypool_config::routing::MAX_CACHE_ENTRY_BYTES;
use keypool_pool::{Lease, Outcome};
use keypool_types::{ApiError, ErrorKind, Surface};
use tokio::time::{Instant, timeout_at};

use crate::adapter::BodyStream;
use crate::ctx::RequestCtx;
use crate::sse::{SseTap, error_event};

/// How a stream is relayed.
pub struct StreamSetup {
    /// Longest gap between chunks.
    pub idle: Duration,
    /// keypool asked for the usage chunk; the client did not.
    pub strip_usage_chunk: bool,
    /// Completion streams must end with `data: [DONE]`, Messages streams with `message_stop`.
    pub require_done: bool,
    /// Whose events these are (and the shape of keypool's error event).
    pub surface: Surface,
    /// Status of the response head.
    pub status: u16,
    /// Collect the streamed text (for request logs), up to this many bytes.
    pub collect_text: Option<usize>,
    /// Largest single event (`max_stream_event_bytes`).
    pub max_event: usize,
    /// When the whole stream must have ended (`stream_deadline`).
    pub deadline: Option<Instant>,
    /// The answer guardrails (`data_masking` restore, `content_safety`), when the gateway has them.
    pub guard: Option<crate::guard::stream::StreamGuard>,
}

/// Where a complete stream's bytes go (the response cache).
pub type Keep = Box<dyn FnOnce(Bytes) + Send>;

/// A started stream.
pub struct Relay {
    /// The stream's span (none unless traced). First, so it is dropped (ends) before the
    /// request context's server span, its parent.
    span: tracing::Span,
    upstream: BodyStream,
    /// The idle gap's (and `deadline`'s) timer: one per stream, the gap restarted at each chunk,
    /// the timer moved only when it fires before the gap's end ([`crate::timer`]).
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    tap: SseTap,
    lease: Option<Lease>,
    ctx: Option<Box<RequestCtx>>,
    idle: Duration,
    /// Output of the first chunk, sent before anything else.
    first: Option<Bytes>,
    /// Completion streams must end with `data: [DONE]`, Messages streams with `message_stop`,
    /// Responses API streams with `response.completed` (or `.failed` / `.incomplete`); others
    /// need not.
    require_done: bool,
    surface: Surface,
    status: u16,
    started: Instant,
    deadline: Option<Instant>,
    finished: bool,
    /// Called once with the Responses API response id when the stream names it.
    on_response_id: Option<Box<dyn FnOnce(String) + Send>>,
    /// What the client received so far, for the response cache, and where it goes once the
    /// stream ended complete (dropped past [`MAX_CACHE_ENTRY_BYTES`] or when it broke).
    recording: Option<(BytesMut, Keep)>,
    /// The stream ended complete.
    succeeded: bool,
    guard: Option<crate::guard::stream::StreamGuard>,
    /// Where a cut stream is counted (the key's, from its lease).
    telemetry: keypool_telemetry::Telemetry,
}

impl Relay {
    /// Waits for the first chunk until `first_byte_deadline`. On failure, hands the lease back
    /// with the outcome, so the engine can settle it and fail over.
    pub async fn start(
        mut upstream: BodyStream,
        lease: Lease,
        first_byte_deadline: Instant,
        setup: StreamSetup,
    ) -> Result<Self, (Lease, Outcome)> {
        let StreamSetup {
            idle,
            strip_usage_chunk,
            require_done,
            surface,
            status,
            collect_text,
            max_event,
            deadline,
            guard,
        } = setup;
        let started = Instant::now();
        let first = match timeout_at(first_byte_deadline, upstream.next()).await {
            Err(_) => return Err((lease, Outcome::Timeout)),
            Ok(None) => return Err((lease, Outcome::StreamBroken)),
            Ok(Some(Err(_))) => return Err((lease, Outcome::Connect)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        let mut tap = SseTap::new(strip_usage_chunk)
            .speaking(surface)
            .collecting_text(collect_text)
            .max_event(max_event);
        let first = tap.feed(&first);
        Ok(Self {
            telemetry: lease.telemetry().clone(),
            upstream,
            // never later than the first gap's end or the deadline; moved later only
            timer: Box::pin(tokio::time::sleep_until({
                let gap = Instant::now() + idle;
                deadline.map_or(gap, |d| gap.min(d))
            })),
            tap,
            lease: Some(lease),
            ctx: None,
            idle,
            first: Some(first),
            require_done,
            surface,
            status,
            started,
            deadline,
            finished: false,
            span: tracing::Span::none(),
            on_response_id: None,
            recording: None,
            succeeded: false,
            guard,
        })
    }

    /// Calls `f` once with the Responses API response id when the stream names it
    /// (`response.created`), at once if it already has.
    pub fn on_response_id(&mut self, f: Box<dyn FnOnce(String) + Send>) {
        self.on_response_id = Some(f);
        self.response_id_seen();
    }

    fn response_id_seen(&mut self) {
        if self.on_response_id.is_some()
            && let Some(id) = self.tap.response_id.take()
            && let Some(f) = self.on_response_id.take()
        {
            f(id);
        }
    }

    /// Attaches the request context that records the usage event when the stream ends.
    pub fn attach(&mut self, mut ctx: Box<RequestCtx>) {
        if !ctx.span.is_none() {
            let ttfb = ctx.ttfb.map_or(0, |d| d.as_millis() as u64);
            self.span = crate::observe::stream_span(&ctx, ttfb);
            ctx.response_model = self.first.as_deref().and_then(crate::inspect::stream_model);
        }
        ctx.forwarded();
        self.ctx = Some(ctx);
    }

    /// The body to hand to the HTTP server.
    pub fn into_stream(self: Box<Self>) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static {
        futures::stream::unfold(self, |mut relay| async move {
            let next = relay.next_bytes().await;
            if relay.recording.is_some() {
                relay.record(next.as_ref());
            }
            next.map(|b| (Ok(b), relay))
        })
    }

    /// Keeps what the client receives, and hands it to `keep` once the stream ended complete.
    pub fn record_into(&mut self, keep: Keep) {
        self.recording = Some((BytesMut::new(), keep));
    }

    fn record(&mut self, sent: Option<&Bytes>) {
        if let (Some(b), Some((buf, _))) = (sent, self.recording.as_mut()) {
            if (buf.len() + b.len()) as u64 > MAX_CACHE_ENTRY_BYTES {
                self.recording = None;
                return;
            }
            buf.extend_from_slice(b);
        }
        if self.finished
            && let Some((buf, keep)) = self.recording.take()
            && self.succeeded
        {
            keep(buf.freeze());
        }
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take()
            && !first.is_empty()
        {
            let first = self.guarded(first);
            if !first.is_empty() || self.finished {
                return Some(first);
            }
        }
        if self.finished {
            return None;
        }
        // the gap starts when the client has taken the last chunk, and again at each chunk
        let mut waiting_since = Instant::now();
        loop {
            let next = tokio::select! {
                biased;
                next = self.upstream.next() => Ok(next),
                () = self.timer.as_mut() => Err(()),
            };
            if next.is_err() {
                let gap = waiting_since + self.idle;
                let due = self.deadline.map_or(gap, |d| gap.min(d));
                if !crate::timer::over(self.timer.as_mut(), due) {
                    continue;
                }
            }
            match next {
                Ok(Some(Ok(chunk))) => {
                    let out = self.tap.feed(&chunk);
                    self.response_id_seen();
                    if self.tap.oversized {
                        return Some(self.cut(&out, "stream_event_too_large"));
                    }
                    let out = self.guarded(out);
                    if !out.is_empty() || self.finished {
                        return Some(out);
                    }
                    waiting_since = Instant::now();
                }
                Ok(None) => {
                    let rest = self.tap.finish();
                    if self.tap.done || !self.require_done {
                        self.complete();
                        return (!rest.is_empty()).then_some(rest);
                    }
                    let why = match self.surface {
                        Surface::OpenAi => "The upstream ended the stream without [DONE].",
                        Surface::Anthropic => "The upstream ended the stream without message_stop.",
                        Surface::Responses => {
                            "The upstream ended the stream without response.completed."
                        }
                    };
                    return Some(self.broken(&rest, why));
                }
                Ok(Some(Err(e))) => {
                    let rest = self.tap.finish();
                    return Some(self.broken(&rest, &format!("The upstream stream broke: {e}")));
                }
                Err(()) if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                    let rest = self.tap.finish();
                    return Some(self.cut(&rest, "stream_deadline"));
                }
                Err(()) => {
                    let rest = self.tap.finish();
                    let why = format!(
                        "The upstream sent no data for {:.1} s.",
                        self.idle.as_secs_f64()
                    );
                    return Some(self.broken(&rest, &why));
                }
            }
        }
    }

    /// Released events through the answer guardrails; a blocked stream ends here.
    fn guarded(&mut self, out: Bytes) -> Bytes {
        let Some(guard) = self.guard.as_mut() else {
            return out;
        };
        if out.is_empty() {
            return out;
        }
        match guard.events(&out) {
            crate::guard::stream::Guarded::Pass(b) => b,
            crate::guard::stream::Guarded::Blocked(before, error) => self.block(&before, &error),
        }
    }

    /// Ends a stream a `content_safety` rule blocked: what was clean, then the error event,
    /// nothing after it. The upstream is dropped (cancelled); its usage so far is recorded.
    fn block(&mut self, before: &[u8], error: &ApiError) -> Bytes {
        self.span.record("error.type", "content_blocked");
        self.end_answered(Some("content_blocked"));
        let event = error_event(error, self.surface);
        let mut out = BytesMut::with_capacity(before.len() + event.len());
        out.extend_from_slice(before);
        out.extend_from_slice(&event);
        out.freeze()
    }

    fn complete(&mut self) {
        self.succeeded = true;
        self.span.record("keypool.stream.chunks", self.tap.events);
        self.end_answered(None);
    }

    /// Ends a stream its upstream answered (complete, or blocked by a guardrail): the key
    /// served it; the usage so far is the request's.
    fn end_answered(&mut self, error: Option<&'static str>) {
        self.finished = true;
        // the stream span ends here, before its parent records the outcome (and ends)
        self.span = tracing::Span::none();
        let usage = self.tap.usage;
        if let Some(lease) = self.lease.take() {
            lease.settle(Outcome::Success {
                tokens: usage.map(|u| u.total()),
                latency: self.started.elapsed(),
            });
        }
        if let Some(ctx) = self.ctx.as_mut() {
            ctx.capture_stream_text(&self.tap.text);
            if let Some(g) = &self.guard {
                ctx.guardrails.extend(g.matched.iter().cloned());
            }
            ctx.account(self.status, usage, error);
        }
    }

    /// Ends a stream keypool cut off (`reason`: an event past `max_stream_event_bytes`, or
    /// past `stream_deadline`), with an error event after what was already complete.
    fn cut(&mut self, rest: &[u8], reason: &'static str) -> Bytes {
        crate::observe::answer_cut(&self.telemetry, reason);
        let why = if reason == "stream_deadline" {
            "The stream ran past the gateway's stream_deadline."
        } else {
            "An event of the upstream stream was larger than max_stream_event_bytes."
        };
        self.broken(rest, why)
    }

    /// Ends the stream with an error event after whatever partial data was left.
    fn broken(&mut self, rest: &[u8], why: &str) -> Bytes {
        self.finished = true;
        self.span.record("keypool.stream.chunks", self.tap.events);
        self.span.record("error.type", "upstream_stream_broken");
        self.span = tracing::Span::none();
        tracing::warn!(events = self.tap.events, "{why}");
        if let Some(lease) = self.lease.take() {
            lease.settle(Outcome::StreamBroken);
        }
        if let Some(ctx) = self.ctx.as_mut() {
            ctx.capture_stream_text(&self.tap.text);
            if let Some(g) = &self.guard {
                ctx.guardrails.extend(g.matched.iter().cloned());
            }
            ctx.account(self.status, self.tap.usage, Some("upstream_stream_broken"));
        }
        let event = error_event(
            &ApiError::new(ErrorKind::UpstreamStreamBroken, why),
            self.surface,
        );
        let mut out = BytesMut::with_capacity(rest.len() + 2 + event.len());
        out.extend_from_slice(rest);
        if !rest.is_empty() && !rest.ends_with(b"\n\n") {
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(&event);
        out.freeze()
    }
}
