//! A TLS connection's reads against a real TLS server on 127.0.0.1.

use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;

/// A self-signed certificate for 127.0.0.1 (the `openssl` command-line tool, as the e2e
/// harness's CA): its DER and its key.
fn self_signed() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let dir = std::env::temp_dir().join(format!("kp-conn-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.cnf"), "[req]\ndistinguished_name=dn\n[dn]\n").unwrap();
    let status = Command::new("openssl")
        .current_dir(&dir)
        .args(["req", "-x509", "-config", "c.cnf", "-newkey", "ec"])
        .args([
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let cert = CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (cert, key)
}

/// Between two events a TLS stream waits on its socket with no read buffer: room is made
/// only once something arrived (before, 8 KB was reserved and held while it waited).
#[tokio::test(flavor = "current_thread")]
async fn a_tls_connection_waits_for_its_next_bytes_without_a_read_buffer() {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = self_signed();
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (next_tx, next_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let mut tls = acceptor.accept(tcp).await.unwrap();
        tls.write_all(b"data: one\n\n").await.unwrap();
        tls.flush().await.unwrap();
        next_rx.await.unwrap();
        tls.write_all(b"data: two\n\n").await.unwrap();
        tls.flush().await.unwrap();
        // held open until the client is done
        std::future::pending::<()>().await;
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut io = Io::Tls(Box::new(tls));

    let mut buf = BytesMut::new();
    std::future::poll_fn(|cx| io.poll_fill(cx, &mut buf))
        .await
        .unwrap();
    assert_eq!(&buf[..], b"data: one\n\n");
    // handed out, as `Body` does: the stream now waits for its next event
    buf = BytesMut::new();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(io.poll_fill(&mut cx, &mut buf).is_pending());
    assert_eq!(
        buf.capacity(),
        0,
        "a read buffer was held while nothing arrived"
    );

    next_tx.send(()).unwrap();
    std::future::poll_fn(|cx| io.poll_fill(cx, &mut buf))
        .await
        .unwrap();
    assert_eq!(&buf[..], b"data: two\n\n");
}
