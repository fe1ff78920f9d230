//! The API port's listening sockets: one a worker, with `SO_REUSEPORT`, behind a plain bind
//! that keeps the port from being shared with another process by mistake.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

/// Connections waiting to be accepted on one listener; the kernel caps it at
/// `net.core.somaxconn` (4096 on current kernels).
const BACKLOG: i32 = 4096;

/// Binds the API port for [`serve`]: a listener with `SO_REUSEPORT`, so that each worker can
/// listen on the port with its own. A plain bind of the address comes first and is undone at
/// once: a port another process listens on (a second keypool started by mistake, too) fails
/// it, with the usual error, instead of joining the first one's listeners and taking a share
/// of its connections. A port of 0 gets one the kernel gives no other socket.
pub fn bind(address: impl ToSocketAddrs) -> io::Result<std::net::TcpListener> {
    let mut last = None;
    // each address in turn, as std's bind tries them
    for at in address.to_socket_addrs()? {
        let guarded = if at.port() == 0 {
            Ok(at)
        } else {
            std::net::TcpListener::bind(at).and_then(|guard| guard.local_addr())
        };
        match guarded.and_then(listen) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// A listener on `at` with `SO_REUSEPORT` (and `SO_REUSEADDR`, as std's bind sets it).
pub(super) fn listen(at: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(at),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&at.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// One listener a worker: `listener` for the first, and for the others a sibling on its
/// address when it was bound by [`bind`] (all bound before this returns, so a sibling that
/// cannot bind stops the start before any worker runs); any other listener is shared.
pub(super) fn per_worker(
    listener: &std::net::TcpListener,
    workers: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    listener.set_nonblocking(true)?;
    let own = socket2::SockRef::from(listener).reuse_port()?;
    let at = listener.local_addr()?;
    (0..workers)
        .map(|i| {
            if own && i > 0 {
                let sibling = listen(at)?;
                sibling.set_nonblocking(true)?;
                Ok(sibling)
            } else {
                listener.try_clone()
            }
        })
        .collect()
}
