//! Reading a whole upstream body, bounded in time and size.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::time::{Instant, timeout_at};

use crate::adapter::BodyStream;

/// Why a whole body could not be read.
pub(super) enum BodyError {
    Timeout,
    Broken(String),
    /// Past the limit: reading stopped (the connection is dropped, not drained).
    TooLarge,
}

/// Reads a whole body before `deadline`. A body that came in one chunk is returned uncopied.
pub(super) async fn read_body(
    mut body: BodyStream,
    deadline: Instant,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut read = 0usize;
    loop {
        match timeout_at(deadline, body.next()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(first.unwrap_or_else(|| buf.freeze())),
            Ok(Some(Ok(chunk))) => {
                read = read.saturating_add(chunk.len());
                if read > limit {
                    return Err(BodyError::TooLarge);
                }
                if first.is_none() && buf.is_empty() {
                    first = Some(chunk);
                } else {
                    if let Some(f) = first.take() {
                        buf.extend_from_slice(&f);
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
            Ok(Some(Err(e))) => return Err(BodyError::Broken(e.to_string())),
        }
    }
}
