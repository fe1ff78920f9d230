//! The forwarding engine: everything between an accepted HTTP request and the upstream.
//!
//! Every request goes through one [`pipeline`] of named phases, whatever its gateway:
//! `resolve` → `authenticate` → `admit` → read and [`inspect`] the body once → `transform` →
//! `select_key` + `forward` in the attempt loop ([`forward`]) → relay the answer (whole, or a
//! stream through [`relay`]) → `account` (one usage event per request, [`ctx`]). Providers sit
//! behind one trait in [`adapter`].

pub mod adapter;
mod affinity;
mod attempt;
pub mod cache;
pub mod capture;
pub mod client;
mod conn;
pub mod cooldown;
pub mod ctx;
pub mod edge;
mod fallback;
pub mod forward;
pub mod guard;
mod h1;
pub mod headers;
pub mod http;
pub mod inflight;
pub mod inspect;
pub mod models;
mod observe;
pub mod pipeline;
pub mod relay;
mod resolve;
pub mod spend;
pub mod sse;
mod timer;

pub use client::UpstreamClient;
pub use ctx::{LogSink, RequestCtx};
pub use forward::{Engine, Reply};
pub use http::Frontend;
pub use keypool_types::UsageSink;
