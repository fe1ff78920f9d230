//! A connection's socket and what has arrived on it, shared by the connection and the request
//! body it hands the app: the body reads the socket itself when the app asks for more, so
//! nothing is read ahead of the app and nothing is buffered while it does not ask.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use actix_http::error::PayloadError;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::net::TcpStream;

use crate::h1::Chunked;

/// The most a body read asks of the socket at once.
const READ_AT_MOST: usize = 64 * 1024;
/// What a read makes room for when the body's size does not say less.
const READ_ROOM: usize = 16 * 1024;

/// A client connection.
pub(super) struct Conn {
    pub tcp: TcpStream,
    pub inbound: RefCell<Inbound>,
}

/// What has arrived and not been taken, and where the current request's body stands.
pub(super) struct Inbound {
    /// Bytes read and not taken: the rest of a head, a body, the next pipelined request. Let go
    /// of (capacity 0) whenever it is empty at a wait.
    pub buf: BytesMut,
    pub body: BodyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyState {
    /// Read to its end (or there was none): the next request may follow.
    Done,
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Broken (ended early, bad chunking, a read error): the connection closes.
    Failed,
}

impl Inbound {
    /// The next piece of the body from what is buffered: `Ok(None)` when more must be read
    /// (or the body is done: see [`Inbound::body`]).
    fn take(&mut self) -> Result<Option<Bytes>, PayloadError> {
        match &mut self.body {
            BodyState::Done | BodyState::Failed => Ok(None),
            BodyState::Length(left) => {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                *left -= n as u64;
                let data = self.buf.split_to(n).freeze();
                if *left == 0 {
                    self.done();
                }
                Ok(Some(data))
            }
            BodyState::Chunked(state) => {
                let Ok(data) = state.decode(&mut self.buf) else {
                    self.body = BodyState::Failed;
                    return Err(PayloadError::EncodingCorrupted);
                };
                if *state == Chunked::Done {
                    self.done();
                }
                Ok(data)
            }
        }
    }

    /// The body has been read: an empty read buffer is let go of now (a stream's answer may
    /// take minutes; the next head gets a new one).
    fn done(&mut self) {
        self.body = BodyState::Done;
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Room to read into: what the body still needs, at most [`READ_AT_MOST`].
    fn room(&self) -> usize {
        match self.body {
            BodyState::Length(left) => usize::try_from(left)
                .unwrap_or(usize::MAX)
                .clamp(1, READ_AT_MOST),
            _ => READ_ROOM,
        }
    }
}

/// The request body the app reads (as actix's `Payload`).
pub(super) struct Body(pub Rc<Conn>);

impl Stream for Body {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let conn = &*self.0;
        loop {
            {
                let mut inbound = conn.inbound.borrow_mut();
                match inbound.take() {
                    Ok(Some(data)) if data.is_empty() => continue,
                    Ok(Some(data)) => return Poll::Ready(Some(Ok(data))),
                    Err(e) => return Poll::Ready(Some(Err(e))),
                    Ok(None) if matches!(inbound.body, BodyState::Done | BodyState::Failed) => {
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                }
            }
            if let Err(e) = ready!(conn.tcp.poll_read_ready(cx)) {
                conn.inbound.borrow_mut().body = BodyState::Failed;
                return Poll::Ready(Some(Err(PayloadError::Io(e))));
            }
            let mut inbound = conn.inbound.borrow_mut();
            let room = inbound.room();
            inbound.buf.reserve(room);
            match conn.tcp.try_read_buf(&mut inbound.buf) {
                Ok(0) => {
                    inbound.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(PayloadError::Incomplete(None))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    inbound.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(PayloadError::Io(e))));
                }
            }
        }
    }
}
