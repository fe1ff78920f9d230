//! OpenAI wire types shared by every keypool crate, and the one table that maps an error kind to
//! its OpenAI `type` / `code` and HTTP status.
//!
//! No IO lives here. The frontend turns an [`ApiError`] into a response exactly once (see
//! `keypool-proxy`); the admin service will map the same kinds to gRPC codes from this table.

mod error;
mod usage;

pub use error::{ApiError, ErrorKind, GrpcCode, Surface};
pub use usage::{
    AnthropicCounts, RequestLog, Usage, UsageEvent, UsageSink, event_id_hex, hex, new_event_id,
    new_event_id_at,
};

mod secret;
pub use secret::{Secret, constant_time_eq, mask, strip_bearer};
