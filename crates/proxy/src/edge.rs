//! The API port's HTTP/1.1 server: keypool's own connections in front of the actix-web app.
//!
//! actix-web keeps the routing, the extractors and the handlers (the app is built as before and
//! called as a service, one per worker); what this module replaces is actix-http's connection
//! dispatcher, which gave every client connection an 8 KB read and an 8 KB write buffer for
//! its whole life (a constant there): ~8 KB resident of a relayed stream's ~13. Here a
//! connection holds its socket; a read buffer only while a request head or body is arriving,
//! and bytes to write only until the socket takes them. An idle keep-alive client or a stream
//! waiting for its next event holds neither.
//!
//! ```text
//!  worker (one thread, its own runtime)       connection (a task on its worker)
//!  accept ─▶ nodelay ─▶ spawn ─────────────▶  head ─▶ 100 Continue? ─▶ app ─▶ response ─▶ keep-alive?
//!  (at most `max_connections`; past it        (bounds: 128 KiB, 96 headers, 5 s to arrive;
//!   connections wait in the backlog)           idle 5 s; a body the app left unread closes)
//! ```
//!
//! Every worker accepts on a listener itself (no acceptor thread handing sockets over): its own
//! when the port was bound by [`bind`] (`SO_REUSEPORT`: the kernel gives each new connection to
//! one worker's listener by its addresses, and wakes only that worker), else the one listener
//! they share (every worker woken for each connection, one takes it). On stop a worker accepts
//! no more, closes its idle connections, lets the busy ones finish their response, and drops
//! what is left after the grace period.

mod body;
mod conn;
mod head;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;
use std::time::Duration;

use actix_service::IntoServiceFactory as _;
use actix_web::body::MessageBody;
use actix_web::dev::{AppConfig, ServiceFactory, ServiceRequest, ServiceResponse};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How the server runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Worker threads, each accepting and serving its own connections.
    pub workers: usize,
    /// Client connections one worker holds at once; past it new ones wait in the backlog.
    pub max_connections: usize,
    /// How long a stop waits for responses in flight before dropping them.
    pub shutdown_grace: Duration,
    /// A request head must arrive within this from its first byte (or from the connection's
    /// start): past it, 408.
    pub head_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keep_alive: Duration,
}

impl Settings {
    /// actix-web's defaults for what it shares with this server: 5 s for a head, 5 s idle.
    pub fn new(workers: usize, max_connections: usize, shutdown_grace: Duration) -> Self {
        Self {
            workers: workers.max(1),
            max_connections: max_connections.max(1),
            shutdown_grace,
            head_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(5),
        }
    }
}

/// What an actix-web `App<T>` is built over, as this server serves it.
pub trait AppFactory<B>:
    ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<B>,
        Error = actix_web::Error,
        InitError = (),
    > + 'static
{
}

impl<T, B> AppFactory<B> for T where
    T: ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static
{
}

/// A running server: stopped when the token given to [`serve`] is cancelled.
pub struct Server {
    workers: Vec<tokio::sync::oneshot::Receiver<io::Result<()>>>,
}

impl Server {
    /// Waits until every worker has stopped (after a stop and its drain), with the first
    /// worker's error if one failed to start.
    pub async fn wait(self) -> io::Result<()> {
        let mut outcome = Ok(());
        for w in self.workers {
            match w.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => outcome = outcome.and(Err(e)),
                Err(_) => outcome = outcome.and(Err(io::Error::other("a worker panicked"))),
            }
        }
        outcome
    }
}

/// Connections waiting to be accepted on one listener; the kernel caps it at
/// `net.core.somaxconn` (4096 on current kernels).
const BACKLOG: i32 = 4096;

/// Binds the API port for [`serve`]: a listener with `SO_REUSEPORT`, so that each worker can
/// listen on the port with its own. A plain bind of the address comes first and is undone at
/// once: a port another process listens on (a second keypool started by mistake, too) fails
/// it, with the usual error, instead of joining the first one's listeners and taking a share
/// of its connections. A port of 0 gets one the kernel gives no other socket.
pub fn bind(address: impl ToSocketAddrs) -> io::Result<std::net::TcpListener> {
    let mut at = None;
    let mut last = None;
    for a in address.to_socket_addrs()? {
        if a.port() == 0 {
            at = Some(a);
            break;
        }
        match std::net::TcpListener::bind(a) {
            Ok(guard) => {
                at = Some(guard.local_addr()?);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    match (at, last) {
        (Some(a), _) => listen(a),
        (None, Some(e)) => Err(e),
        (None, None) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )),
    }
}

/// A listener on `at` with `SO_REUSEPORT` (and `SO_REUSEADDR`, as std's bind sets it).
fn listen(at: SocketAddr) -> io::Result<std::net::TcpListener> {
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

/// Serves `make()`'s app on `listener` with `settings.workers` workers until `stop` is
/// cancelled. `make` runs once on each worker. A listener from [`bind`] gets a sibling on its
/// address for every worker but the first (all bound before this returns); any other is
/// shared by the workers.
pub fn serve<F, T, B>(
    listener: std::net::TcpListener,
    settings: Settings,
    stop: &CancellationToken,
    make: F,
) -> io::Result<Server>
where
    F: Fn() -> actix_web::App<T> + Send + Clone + 'static,
    T: AppFactory<B>,
    B: MessageBody + 'static,
{
    listener.set_nonblocking(true)?;
    let own = socket2::SockRef::from(&listener).reuse_port()?;
    let at = listener.local_addr()?;
    let mut workers = Vec::with_capacity(settings.workers);
    let assigned: Arc<[AtomicUsize]> = (0..settings.workers).map(|_| AtomicUsize::new(0)).collect();
    let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..settings.workers)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let inboxes: Arc<[Inbox]> = inboxes.into();
    // every listener first: a sibling that cannot bind stops the start before any worker runs
    let listeners = (0..settings.workers)
        .map(|i| {
            if own && i > 0 {
                let sibling = listen(at)?;
                sibling.set_nonblocking(true)?;
                Ok(sibling)
            } else {
                listener.try_clone()
            }
        })
        .collect::<io::Result<Vec<_>>>()?;
    for (i, (listener, inbox)) in listeners.into_iter().zip(receivers).enumerate() {
        let balance = Balance {
            assigned: assigned.clone(),
            inboxes: inboxes.clone(),
            me: i,
        };
        let (settings, stop, make) = (settings, stop.clone(), make.clone());
        let (done, outcome) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("keypool-worker-{i}"))
            .spawn(move || {
                let _ = done.send(run_worker(listener, (balance, inbox), settings, stop, make));
            })?;
        workers.push(outcome);
    }
    // each worker holds its own descriptor: a shared listener closes when the last one stops
    drop(listener);
    Ok(Server { workers })
}

fn run_worker<F, T, B>(
    listener: std::net::TcpListener,
    (balance, mut inbox): (Balance, Handed),
    settings: Settings,
    stop: CancellationToken,
    make: F,
) -> io::Result<()>
where
    F: Fn() -> actix_web::App<T>,
    T: AppFactory<B>,
    B: MessageBody + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let outcome = local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let service = make()
            .into_factory()
            .new_service(AppConfig::default())
            .await
            .map_err(|()| io::Error::other("the app did not start"))?;
        let worker = Rc::new(Worker::new(settings, balance));
        tokio::task::spawn_local(keep_date(Rc::downgrade(&worker)));
        let service = Rc::new(service);
        // one wait for the stop a worker, none a request
        tokio::select! {
            () = accept(&listener, &mut inbox, &worker, &service) => {}
            () = stop.cancelled() => {}
        }
        drop(listener);
        worker.stop();
        worker.drain().await;
        Ok(())
    });
    // what is still open past the grace period is dropped here, its streams recorded as ended
    drop(local);
    outcome
}

/// What a worker's connections share.
pub(crate) struct Worker {
    settings: Settings,
    /// Set once the server stops: idle connections close, busy ones after their answer.
    stopping: Cell<bool>,
    /// Connections open now.
    live: Cell<usize>,
    /// Every worker's connections open now, for the accept.
    balance: Balance,
    /// Told when a connection closes.
    closed: Notify,
    /// Each open connection's slot: the waker of its task while it waits for a head (kept
    /// from its first wait on), woken at the stop. Slots are reused.
    parked: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
    /// The `Date` header's value, renewed twice a second.
    date: RefCell<[u8; 29]>,
}

impl Worker {
    fn new(settings: Settings, balance: Balance) -> Self {
        Self {
            settings,
            balance,
            stopping: Cell::new(false),
            live: Cell::new(0),
            closed: Notify::new(),
            parked: RefCell::default(),
            free: RefCell::default(),
            date: RefCell::new(http_date()),
        }
    }

    /// Marks the worker stopping and wakes every connection waiting for a head, to close.
    fn stop(&self) {
        self.stopping.set(true);
        for w in self.parked.borrow_mut().iter_mut().filter_map(Option::take) {
            w.wake();
        }
    }

    /// Keeps `cx`'s waker in connection `slot`'s place, for the stop.
    pub(crate) fn park(&self, slot: usize, waker: &Waker) {
        let mut parked = self.parked.borrow_mut();
        if let Some(place) = parked.get_mut(slot)
            && !place.as_ref().is_some_and(|w| w.will_wake(waker))
        {
            *place = Some(waker.clone());
        }
    }

    /// Waits until no connection is open, or the grace period has passed.
    async fn drain(&self) {
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_grace;
        while self.live.get() > 0 {
            if tokio::time::timeout_at(deadline, self.closed.notified())
                .await
                .is_err()
            {
                tracing::warn!(
                    connections = self.live.get(),
                    "shutdown grace period over: dropping the connections still open"
                );
                return;
            }
        }
    }
}

/// A connection counted open, with its slot among the parked, while it lives.
pub(crate) struct Open {
    worker: Rc<Worker>,
    slot: usize,
}

impl Open {
    fn new(worker: &Rc<Worker>) -> Self {
        worker.live.set(worker.live.get() + 1);
        let slot = worker.free.borrow_mut().pop().unwrap_or_else(|| {
            let mut parked = worker.parked.borrow_mut();
            parked.push(None);
            parked.len() - 1
        });
        Self {
            worker: worker.clone(),
            slot,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let w = &self.worker;
        if let Some(place) = w.parked.borrow_mut().get_mut(self.slot) {
            *place = None;
        }
        w.free.borrow_mut().push(self.slot);
        w.live.set(w.live.get() - 1);
        w.balance.release();
        w.closed.notify_waiters();
    }
}

async fn accept<S, B>(
    listener: &tokio::net::TcpListener,
    inbox: &mut Handed,
    worker: &Rc<Worker>,
    service: &Rc<S>,
) where
    S: actix_web::dev::Service<
            actix_http::Request,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
        > + 'static,
    B: MessageBody + 'static,
{
    let balance = &worker.balance;
    loop {
        // room first: a worker at its share leaves new connections in the backlog
        while worker.live.get() >= worker.settings.max_connections {
            worker.closed.notified().await;
        }
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // the least loaded worker serves it: handed over when that is another
                    let to = balance.pick();
                    if to == balance.me {
                        (tcp, peer)
                    } else {
                        balance.hand(tcp, peer, to);
                        continue;
                    }
                }
                Err(e) => {
                    // out of descriptors or memory, for now: the backlog keeps the connections
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some((std, peer)) = inbox.recv() => {
                let Ok(tcp) = tokio::net::TcpStream::from_std(std) else {
                    balance.release();
                    continue;
                };
                (tcp, peer)
            }
        };
        let _ = tcp.set_nodelay(true);
        let open = Open::new(worker);
        tokio::task::spawn_local(conn::serve(tcp, peer, service.clone(), open));
    }
}

/// A connection handed to another worker.
type Inbox = tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>;
type Handed = tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>;

/// The connections every worker serves, and their inboxes. Each worker accepts on the shared
/// listener itself; one that holds more than another hands the connection over (a hand-off
/// per connection only while the workers are uneven, never a wait).
struct Balance {
    /// Connections each worker has been given and not yet closed (counted by whoever
    /// accepted, taken off by the worker that closes).
    assigned: Arc<[AtomicUsize]>,
    inboxes: Arc<[Inbox]>,
    me: usize,
}

impl Balance {
    /// The worker that serves the next connection, counted as given to it: the one with the
    /// fewest when this one holds more than that by over an eighth of its own, else this one.
    /// A hand-off wakes the other worker's thread; the kernel's spread over per-worker
    /// listeners (or who woke first on a shared one) stays within the eighth without one.
    fn pick(&self) -> usize {
        let load = |i: usize| {
            self.assigned
                .get(i)
                .map_or(usize::MAX, |n| n.load(Ordering::Relaxed))
        };
        let mine = load(self.me);
        let mut least = (mine, self.me);
        for i in 0..self.assigned.len() {
            if load(i) < least.0 {
                least = (load(i), i);
            }
        }
        let to = if mine > least.0 + mine / 8 {
            least.1
        } else {
            self.me
        };
        if let Some(n) = self.assigned.get(to) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        to
    }

    /// Hands `tcp` to worker `to` (a worker gone, stopping, drops it).
    fn hand(&self, tcp: tokio::net::TcpStream, peer: SocketAddr, to: usize) {
        let handed = tcp.into_std().ok().and_then(|std| {
            self.inboxes
                .get(to)
                .and_then(|inbox| inbox.send((std, peer)).ok())
        });
        if handed.is_none()
            && let Some(n) = self.assigned.get(to)
        {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// One of this worker's connections closed.
    fn release(&self) {
        if let Some(n) = self.assigned.get(self.me) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Renews the worker's `Date` header value every 500 ms while the worker lives.
async fn keep_date(worker: std::rc::Weak<Worker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(w) = worker.upgrade() else { return };
        *w.date.borrow_mut() = http_date();
    }
}

fn http_date() -> [u8; 29] {
    let mut out = [0u8; 29];
    let now = httpdate::fmt_http_date(std::time::SystemTime::now());
    let n = now.len().min(29);
    out[..n].copy_from_slice(&now.as_bytes()[..n]);
    out
}

#[cfg(test)]
mod tests;
