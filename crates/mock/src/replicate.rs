//! A stand-in for Replicate's predictions API, for tests of the `replicate` adapter.
//!
//! `POST /v1/models/{owner}/{name}/predictions` creates a prediction (finished at once with
//! `Prefer: wait` unless [`ReplicateBehavior::polls`] says otherwise), `GET
//! /v1/predictions/{id}` polls it, `GET /v1/predictions/{id}/stream` streams it as Replicate does
//! (`event: output` with multi-line `data:`, `event: error`, `event: done`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use serde_json::{Value, json};

/// How a prediction ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ending {
    #[default]
    Succeeded,
    Failed,
    Canceled,
}

/// How the stand-in answers.
#[derive(Debug, Clone, Default)]
pub struct ReplicateBehavior {
    pub ending: Ending,
    /// Answer every create with this status (e.g. 429) and `Retry-After`.
    pub status: Option<u16>,
    pub retry_after: Option<String>,
    /// Answer 401 unless `Authorization: Bearer <this>`.
    pub require_key: Option<String>,
    /// Polls answered `processing` before the prediction ends.
    pub polls: u32,
    /// Output pieces; default `["Hello", " from", " replicate", "\nsecond line"]`.
    pub output: Vec<String>,
    /// Delay between streamed pieces.
    pub chunk_interval_ms: u64,
}

struct Prediction {
    model: String,
    prompt_words: u64,
    polls_left: u32,
    stream: bool,
}

#[derive(Default)]
struct State {
    behavior: Mutex<ReplicateBehavior>,
    predictions: Mutex<HashMap<String, Prediction>>,
    creates: AtomicU64,
    next_id: AtomicU64,
    last_input: Mutex<Option<Value>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn behavior(&self) -> ReplicateBehavior {
        lock(&self.behavior).clone()
    }
}

/// A running Replicate stand-in.
pub struct ReplicateServer {
    addr: SocketAddr,
    state: Arc<State>,
    handle: ServerHandle,
}

impl ReplicateServer {
    /// Starts on `127.0.0.1:0`; must be called inside a tokio runtime.
    pub fn start(behavior: ReplicateBehavior) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            behavior: Mutex::new(behavior),
            ..State::default()
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route(
                    "/v1/models/{owner}/{name}/predictions",
                    web::post().to(create),
                )
                .route("/v1/predictions/{id}", web::get().to(get))
                .route("/v1/predictions/{id}/stream", web::get().to(stream))
        })
        .workers(1)
        .disable_signals()
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

    /// The base URL to use as a `replicate` upstream's `endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set(&self, behavior: ReplicateBehavior) {
        *lock(&self.state.behavior) = behavior;
    }

    /// Predictions created.
    pub fn creates(&self) -> u64 {
        self.state.creates.load(Ordering::SeqCst)
    }

    /// The `input` of the last prediction created.
    pub fn last_input(&self) -> Option<Value> {
        lock(&self.state.last_input).clone()
    }

    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

fn output(b: &ReplicateBehavior) -> Vec<String> {
    if b.output.is_empty() {
        ["Hello", " from", " replicate", "\nsecond line"]
            .map(String::from)
            .to_vec()
    } else {
        b.output.clone()
    }
}

fn error(status: u16, detail: &str) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .json(json!({"title": "error", "detail": detail, "status": status}))
}

/// The prediction's JSON: terminal when `polls_left` is 0.
fn view(base: &str, id: &str, p: &Prediction, b: &ReplicateBehavior) -> Value {
    let mut v = json!({
        "id": id, "model": p.model, "status": "processing", "output": null, "error": null,
        "urls": {"get": format!("{base}/predictions/{id}"), "cancel": format!("{base}/predictions/{id}/cancel")},
    });
    if p.stream {
        v["urls"]["stream"] = json!(format!("{base}/predictions/{id}/stream"));
    }
    if p.polls_left == 0 {
        let out = output(b);
        v["status"] = json!(match b.ending {
            Ending::Succeeded => "succeeded",
            Ending::Failed => "failed",
            Ending::Canceled => "canceled",
        });
        match b.ending {
            Ending::Succeeded => {
                v["output"] = json!(out);
                v["metrics"] = json!({"input_token_count": p.prompt_words, "output_token_count": out.len(), "predict_time": 0.1});
            }
            Ending::Failed => v["error"] = json!("CUDA out of memory"),
            Ending::Canceled => {}
        }
    }
    v
}

fn base_of(req: &HttpRequest) -> String {
    format!("http://{}/v1", req.connection_info().host())
}

fn authorized(req: &HttpRequest, b: &ReplicateBehavior) -> bool {
    b.require_key.as_ref().is_none_or(|k| {
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {k}"))
    })
}

async fn create(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Json<Value>,
    state: web::Data<State>,
) -> HttpResponse {
    let b = state.behavior();
    if !authorized(&req, &b) {
        return error(401, "Invalid token.");
    }
    state.creates.fetch_add(1, Ordering::SeqCst);
    if let Some(status) = b.status {
        let mut resp = error(status, "Request was throttled.");
        if let Some(ra) = b
            .retry_after
            .as_deref()
            .and_then(|v| actix_web::http::header::HeaderValue::from_str(v).ok())
        {
            resp.headers_mut()
                .insert(actix_web::http::header::RETRY_AFTER, ra);
        }
        return resp;
    }
    let input = body.get("input").cloned().unwrap_or(Value::Null);
    let prompt_words = input
        .get("prompt")
        .and_then(Value::as_str)
        .map_or(0, |p| p.split_whitespace().count() as u64);
    *lock(&state.last_input) = Some(input);
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let waits = req.headers().contains_key("prefer");
    let id = format!("p{}", state.next_id.fetch_add(1, Ordering::SeqCst));
    let p = Prediction {
        model: format!("{}/{}", path.0, path.1),
        prompt_words,
        // a stream ends when it has been read; `Prefer: wait` finishes at once unless polls say
        polls_left: if stream {
            u32::MAX
        } else if waits {
            b.polls
        } else {
            b.polls.max(1)
        },
        stream,
    };
    let v = view(&base_of(&req), &id, &p, &b);
    lock(&state.predictions).insert(id, p);
    HttpResponse::Created().json(v)
}

async fn get(req: HttpRequest, id: web::Path<String>, state: web::Data<State>) -> HttpResponse {
    let b = state.behavior();
    if !authorized(&req, &b) {
        return error(401, "Invalid token.");
    }
    let mut preds = lock(&state.predictions);
    let Some(p) = preds.get_mut(id.as_str()) else {
        return error(404, "Not found.");
    };
    if p.polls_left != u32::MAX {
        p.polls_left = p.polls_left.saturating_sub(1);
    }
    HttpResponse::Ok().json(view(&base_of(&req), &id, p, &b))
}

async fn stream(req: HttpRequest, id: web::Path<String>, state: web::Data<State>) -> HttpResponse {
    let b = state.behavior();
    if !authorized(&req, &b) {
        return error(401, "Invalid token.");
    }
    if !lock(&state.predictions).contains_key(id.as_str()) {
        return error(404, "Not found.");
    }
    let mut events: Vec<Bytes> = output(&b)
        .iter()
        .map(|piece| {
            let data: String = piece.split('\n').fold(String::new(), |mut acc, line| {
                acc.push_str("data: ");
                acc.push_str(line);
                acc.push('\n');
                acc
            });
            Bytes::from(format!("event: output\nid: 1\n{data}\n"))
        })
        .collect();
    match b.ending {
        Ending::Succeeded => events.push(Bytes::from_static(b"event: done\ndata: {}\n\n")),
        Ending::Failed => {
            events.truncate(1);
            events.push(Bytes::from_static(
                b"event: error\ndata: {\"detail\": \"CUDA out of memory\"}\n\n",
            ));
            events.push(Bytes::from_static(
                b"event: done\ndata: {\"reason\": \"error\"}\n\n",
            ));
        }
        Ending::Canceled => events.push(Bytes::from_static(
            b"event: done\ndata: {\"reason\": \"canceled\"}\n\n",
        )),
    }
    let interval = b.chunk_interval_ms;
    let (state, id) = (state.into_inner(), id.into_inner());
    let body = futures::stream::unfold(
        (events.into_iter(), state, id),
        move |(mut it, state, id)| async move {
            let ev = it.next()?;
            if interval > 0 {
                tokio::time::sleep(Duration::from_millis(interval)).await;
            }
            if it.len() == 0 {
                // the last event goes out: the prediction is finished from now on
                if let Some(p) = lock(&state.predictions).get_mut(&id) {
                    p.polls_left = 0;
                }
            }
            Some((Ok::<_, std::io::Error>(ev), (it, state, id)))
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(Box::pin(body))
}
