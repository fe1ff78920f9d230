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

mod balance;
mod body;
mod conn;
mod head;
mod listen;

pub use listen::bind;

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::task::Waker;
use std::time::Duration;

use actix_service::IntoServiceFactory as _;
use actix_web::body::MessageBody;
use actix_web::dev::{AppConfig, ServiceFactory, ServiceRequest, ServiceResponse};
use balance::{Balance, Handed};
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
    let listeners = listen::per_worker(&listener, settings.workers)?;
    let mut workers = Vec::with_capacity(settings.workers);
    let balances = Balance::for_workers(settings.workers);
    for (i, (listener, handed)) in listeners.into_iter().zip(balances).enumerate() {
        let (settings, stop, make) = (settings, stop.clone(), make.clone());
        let (done, outcome) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("keypool-worker-{i}"))
            .spawn(move || {
                let _ = done.send(run_worker(listener, handed, settings, stop, make));
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
