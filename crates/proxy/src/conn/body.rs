//! A response body read from its upstream connection as it is polled ([`Body`]), and what
//! it lets go of while it waits.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::Stream;

use super::{Io, KEEP_SMALL, Pool};
use crate::adapter::TransportError;
use crate::h1::Chunked;

/// What is left of a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// A response body, read from its connection as it is polled. Read to the end, the connection
/// goes back to the pool (when the upstream keeps it alive); dropped early, or broken, the
/// connection is closed.
pub(super) struct Body {
    pub(super) io: Option<Io>,
    /// Read and not yet handed out.
    pub(super) buf: BytesMut,
    pub(super) state: State,
    /// Where the connection goes back once the body was read to its end.
    pub(super) back: Option<(Arc<Pool>, usize)>,
}

impl Body {
    /// Hands out `n` bytes of `buf`.
    fn take(&mut self, n: usize) -> Bytes {
        let data = self.buf.split_to(n).freeze();
        self.let_go();
        data
    }

    /// After data was handed out: an emptied buffer is let go, and a few bytes left are moved
    /// to a small one of their own, so that a stream waiting for its next event does not keep
    /// the read's whole allocation (the bytes handed out then own it alone, and free it).
    fn let_go(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        } else if self.buf.len() <= KEEP_SMALL {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }

    /// The body ended: its connection goes back when nothing was sent past the body.
    fn end(&mut self) -> Poll<Option<Result<Bytes, TransportError>>> {
        self.state = State::Done;
        let io = self.io.take();
        if let (Some(io), Some((pool, slot)), true) = (io, self.back.take(), self.buf.is_empty()) {
            pool.checkin(slot, io);
        }
        Poll::Ready(None)
    }

    fn fail(&mut self, e: TransportError) -> Poll<Option<Result<Bytes, TransportError>>> {
        self.state = State::Done;
        self.io = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Stream for Body {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => return this.end(),
                State::Length(left) if !this.buf.is_empty() => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(this.buf.len());
                    this.state = State::Length(left - n as u64);
                    return Poll::Ready(Some(Ok(this.take(n))));
                }
                State::Chunked(mut chunked) => {
                    let decoded = chunked.decode(&mut this.buf);
                    this.state = State::Chunked(chunked);
                    match decoded {
                        Err(e) => return this.fail(e),
                        Ok(Some(data)) => {
                            this.let_go();
                            return Poll::Ready(Some(Ok(data)));
                        }
                        Ok(None) if chunked == Chunked::Done => return this.end(),
                        Ok(None) => {}
                    }
                }
                State::Close if !this.buf.is_empty() => {
                    let n = this.buf.len();
                    return Poll::Ready(Some(Ok(this.take(n))));
                }
                State::Length(_) | State::Close => {}
            }
            let Some(io) = this.io.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(io.poll_fill(cx, &mut this.buf)) {
                Ok(0) if this.state == State::Close => {
                    this.back = None;
                    return this.end();
                }
                Ok(0) => {
                    return this.fail(TransportError::Broken(
                        "the upstream closed the connection before the body's end".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => return this.fail(TransportError::Broken(e.to_string())),
            }
        }
    }
}
