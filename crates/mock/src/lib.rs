//! An OpenAI-compatible mock upstream: the stand-in for OpenAI in tests, `keypool demo` and the
//! benchmark. It is never a stand-in for keypool's own parts.
//!
//! It serves `/v1/chat/completions` (plain and SSE, honouring `stream_options.include_usage`),
//! `/v1/embeddings` (float and base64), `/v1/moderations` (`flag-me` is flagged), `/v1/models`
//! and `/v1/audio/transcriptions`, and
//! Anthropic's `/v1/messages` (plain and SSE, cache usage) and `/v1/messages/count_tokens`, and
//! Azure OpenAI's `/openai/deployments/{deployment}/...` (with `api-version` and `api-key`),
//! and the Responses API (create, stream, retrieve, delete, input items). A
//! [`Behavior`] sets latency, time to first byte, chunk pacing, a forced status with
//! `Retry-After`, a mid-stream cut, the key it expects and the models it knows; it can be changed
//! while running ([`MockServer::set`]). [`MockServer`] counts requests, cancelled streams and keeps
//! the last request for assertions.

mod anthropic;
mod openai;
pub mod replicate;
mod responses;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer, web};

/// How the mock answers. `Default` is a fast, healthy upstream that knows every model.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Name used in replies ("Hello from <name>") so tests can tell mocks apart.
    pub name: String,
    /// Delay before the response head (whole response for non-stream).
    pub latency_ms: u64,
    /// Stream only: delay between the head and the first chunk.
    pub ttfb_ms: u64,
    /// Stream only: delay between chunks.
    pub chunk_interval_ms: u64,
    /// Words in a chat reply (one stream chunk each). 0 means 5.
    pub reply_words: usize,
    /// The reply's text as its stream chunks, exactly (the whole answer is them joined);
    /// replaces the words.
    pub reply: Option<Vec<String>>,
    /// Answer every request with this status and an OpenAI error body.
    pub status: Option<u16>,
    /// The `code` of a forced status's OpenAI error (default `mock_forced`), e.g.
    /// `context_length_exceeded`.
    pub error_code: Option<String>,
    /// `Retry-After` value sent with a forced status.
    pub retry_after: Option<String>,
    /// Stream only: break the connection after this many content chunks.
    pub cut_after: Option<usize>,
    /// Answer 401 unless `Authorization: Bearer <this>`.
    pub require_key: Option<String>,
    /// Models it knows; others get 404 `model_not_found`. `None`: all.
    pub models: Option<Vec<String>>,
}

/// A request as the mock received it.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Shared between the mock's workers and its handle.
#[derive(Default)]
pub(crate) struct State {
    behavior: Mutex<Behavior>,
    requests: AtomicU64,
    streams_cancelled: AtomicU64,
    streams_completed: AtomicU64,
    last: Mutex<Option<Recorded>>,
    record: bool,
    /// Responses API responses this mock created, by id.
    responses: Mutex<std::collections::HashMap<String, responses::Stored>>,
    responses_created: AtomicU64,
}

impl State {
    pub(crate) fn responses(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, responses::Stored>> {
        self.responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn next_response(&self) -> u64 {
        self.responses_created.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub(crate) fn behavior(&self) -> Behavior {
        self.behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A running mock upstream.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
    handle: ServerHandle,
}

impl MockServer {
    /// Starts on `127.0.0.1:0` with one worker; must be called inside a tokio runtime.
    pub fn start(behavior: Behavior) -> std::io::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0")?, behavior, 1, true)
    }

    /// Starts on an already-bound listener. `record` keeps the last request (tests); the
    /// benchmark turns it off to stay fast.
    pub fn start_on(
        listener: TcpListener,
        behavior: Behavior,
        workers: usize,
        record: bool,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            behavior: Mutex::new(behavior),
            record,
            ..State::default()
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .default_service(web::to(openai::dispatch))
        })
        .workers(workers.max(1))
        .disable_signals()
        .on_connect(|conn, _| {
            if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .listen(listener)?
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Ok(Self {
            addr,
            state,
            handle,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL including `/v1`, as an upstream `endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `host:port` it listens on (for what sits in front of it: proxies, TLS).
    pub fn hostport(&self) -> String {
        self.addr.to_string()
    }

    pub fn set(&self, behavior: Behavior) {
        *self
            .state
            .behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = behavior;
    }

    pub fn behavior(&self) -> Behavior {
        self.state.behavior()
    }

    /// Requests received (every endpoint).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Streams whose client went away before the last chunk.
    pub fn streams_cancelled(&self) -> u64 {
        self.state.streams_cancelled.load(Ordering::SeqCst)
    }

    pub fn streams_completed(&self) -> u64 {
        self.state.streams_completed.load(Ordering::SeqCst)
    }

    pub fn last_request(&self) -> Option<Recorded> {
        self.state
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops accepting and closes connections.
    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}
