//! A worker's upstream addresses: one lookup a host while they are fresh (time paused).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// Answers `upstream.test` with 10.0.0.N (N from `answer`, 0 failing) after `delay`, counting
/// the lookups.
struct Script {
    lookups: Arc<AtomicUsize>,
    answer: Arc<AtomicUsize>,
}

fn scripted(delay: Duration) -> (Addresses, Script) {
    let lookups = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(AtomicUsize::new(1));
    let (l, a) = (Arc::clone(&lookups), Arc::clone(&answer));
    let addresses = Addresses::with_lookup(Box::new(move |name, port| {
        assert_eq!(name, "upstream.test");
        l.fetch_add(1, Ordering::SeqCst);
        let n = a.load(Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            match n {
                0 => Err(io::Error::other("no such host")),
                n => Ok(vec![SocketAddr::from(([10, 0, 0, n as u8], port))]),
            }
        })
    }));
    (addresses, Script { lookups, answer })
}

fn at(n: u8) -> Arc<[SocketAddr]> {
    Arc::new([SocketAddr::from(([10, 0, 0, n], 443))])
}

#[tokio::test(start_paused = true)]
async fn the_first_connections_to_a_host_wait_for_one_lookup() {
    let (addresses, script) = scripted(Duration::from_millis(20));
    let all = futures::future::join_all((0..10).map(|_| addresses.of("upstream.test", 443))).await;
    assert!(all.iter().all(|a| a.as_ref().ok() == Some(&at(1))));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 1);
    // fresh: not looked up again
    tokio::time::advance(FRESH / 2).await;
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(1)));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 1);
    // another port is another host
    assert!(addresses.of("upstream.test", 8443).await.is_ok());
    assert_eq!(script.lookups.load(Ordering::SeqCst), 2);
}

/// Past `FRESH` the next connection looks up again; one that comes meanwhile does not wait.
#[tokio::test(start_paused = true)]
async fn stale_addresses_serve_while_one_connection_looks_up_again() {
    let (addresses, script) = scripted(Duration::from_millis(50));
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(1)));
    tokio::time::advance(FRESH).await;
    script.answer.store(2, Ordering::SeqCst);
    let started = Instant::now();
    let (first, second) = tokio::join!(addresses.of("upstream.test", 443), async {
        let a = addresses.of("upstream.test", 443).await;
        (a, started.elapsed())
    });
    assert_eq!(first, Ok(at(2)));
    assert_eq!(second, (Ok(at(1)), Duration::ZERO));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 2);
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(2)));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_lookup_is_answered_again_for_a_while_without_asking() {
    let (addresses, script) = scripted(Duration::from_millis(5));
    script.answer.store(0, Ordering::SeqCst);
    let e = addresses.of("upstream.test", 443).await.unwrap_err();
    assert!(
        e.contains("upstream.test") && e.contains("no such host"),
        "{e}"
    );
    let again = futures::future::join_all((0..5).map(|_| addresses.of("upstream.test", 443))).await;
    assert!(again.iter().all(Result::is_err));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 1);
    tokio::time::advance(FAILED).await;
    script.answer.store(1, Ordering::SeqCst);
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(1)));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 2);

    // a lookup of stale addresses that fails keeps them, and is not retried for a while
    tokio::time::advance(FRESH).await;
    script.answer.store(0, Ordering::SeqCst);
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(1)));
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(1)));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_host_whose_addresses_all_failed_is_looked_up_by_the_next_connection() {
    let (addresses, script) = scripted(Duration::from_millis(5));
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(1)));
    addresses.forget("upstream.test", 443);
    script.answer.store(3, Ordering::SeqCst);
    assert_eq!(addresses.of("upstream.test", 443).await, Ok(at(3)));
    assert_eq!(script.lookups.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn ip_literals_are_not_looked_up_and_names_by_the_system_resolver() {
    let (addresses, script) = scripted(Duration::ZERO);
    assert_eq!(
        addresses.of("127.0.0.1", 80).await.unwrap()[..],
        [SocketAddr::from(([127, 0, 0, 1], 80))]
    );
    assert_eq!(
        addresses.of("::1", 80).await.unwrap()[..],
        ["[::1]:80".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(script.lookups.load(Ordering::SeqCst), 0);
    let system = Addresses::system();
    let local = system.of("localhost", 80).await.unwrap();
    assert!(
        local.iter().all(|a| a.ip().is_loopback() && a.port() == 80),
        "{local:?}"
    );
}

/// The address that connected is tried first, also after the host is looked up again.
#[tokio::test(start_paused = true)]
async fn the_address_that_connected_is_tried_first() {
    let lists = Arc::new(Mutex::new(vec![at(1)[0], at(2)[0]]));
    let answers = Arc::clone(&lists);
    let addresses = Addresses::with_lookup(Box::new(move |_, _| {
        let list = answers.lock().unwrap().clone();
        Box::pin(async move { Ok(list) })
    }));
    assert_eq!(
        addresses.of("upstream.test", 443).await.unwrap()[..],
        [at(1)[0], at(2)[0]]
    );
    addresses.connected("upstream.test", 443, at(2)[0]);
    assert_eq!(
        addresses.of("upstream.test", 443).await.unwrap()[..],
        [at(2)[0], at(1)[0]]
    );
    // looked up again, in the resolver's order: the one that connected stays first
    tokio::time::advance(FRESH).await;
    assert_eq!(
        addresses.of("upstream.test", 443).await.unwrap()[..],
        [at(2)[0], at(1)[0]]
    );
    // unless it is gone
    *lists.lock().unwrap() = vec![at(3)[0], at(1)[0]];
    tokio::time::advance(FRESH).await;
    assert_eq!(
        addresses.of("upstream.test", 443).await.unwrap()[..],
        [at(3)[0], at(1)[0]]
    );
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// waits (as to an address that drops rather than refuses).
pub(crate) fn silent() -> (tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = socket.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => queued.push(c),
            Err(_) => return (l, queued),
        }
    }
    panic!("the accept queue never filled");
}

#[tokio::test]
async fn a_silent_address_costs_the_stagger_and_a_refusing_one_nothing() {
    let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good = good.local_addr().unwrap();
    let (held, _queued) = silent();
    let silent = held.local_addr().unwrap();
    let refusing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let started = std::time::Instant::now();
    let tcp = connect_first(&[silent, good], Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(tcp.peer_addr().unwrap(), good);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(900),
        "{waited:?}"
    );

    let started = std::time::Instant::now();
    let tcp = connect_first(&[refusing, good], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(tcp.peer_addr().unwrap(), good);
    assert!(started.elapsed() < Duration::from_secs(1));

    let e = connect_first(&[refusing, refusing], Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
}
