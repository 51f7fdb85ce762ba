//! The gRPC listener: TLS and plaintext on one port, told apart per
//! connection by its first bytes.
//!
//! A TLS connection gets the control plane's own certificate (for
//! `--identity`, from its own CA) and may present a client certificate: a
//! sidecar that holds one is then known by its verified SPIFFE id. Plaintext
//! h2c is still accepted here; what a connection without a certificate may
//! do is decided per service (Certify and, by default, Subscribe refuse it).
//! Each connection is detected and handshaken in its own task under a
//! deadline, so a slow or silent client never holds up the accept loop; what
//! comes out is handed to tonic as a [`Conn`] whose [`ConnInfo`] (remote
//! address, TLS or not, the peer's verified identity) every request on it
//! carries in its extensions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tern_identity::tls::{failure_reason, looks_like_tls, peer_identity};
use tern_identity::{CertStore, Credentials, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::ca::{self, Ca};
use crate::metrics::Metrics;

/// From accept to a finished TLS handshake (or the first plaintext byte).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The control plane's own certificate never lives longer than this.
pub const OWN_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Renewal at this share of a certificate's lifetime.
const RENEW_AT: f64 = 0.7;
const RENEW_RETRY: Duration = Duration::from_secs(10);

/// What is known about the connection a request came on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub tls: bool,
    /// The SPIFFE id of the client certificate, verified against the trust anchor.
    pub peer_identity: Option<Arc<str>>,
}

impl ConnInfo {
    /// The connection info of a request; a request that came some other way
    /// (tests, plain `TcpIncoming`) counts as plaintext.
    pub fn of<T>(request: &tonic::Request<T>) -> ConnInfo {
        request
            .extensions()
            .get::<ConnInfo>()
            .cloned()
            .unwrap_or_else(|| ConnInfo {
                remote: request.remote_addr(),
                ..ConnInfo::default()
            })
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection, plaintext or TLS, as tonic serves it.
pub struct Conn {
    io: Io,
    info: ConnInfo,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts on `listener` until `stop`, and yields each connection once it
/// is known to be plaintext or has finished its TLS handshake.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                if let Some(conn) = detect(stream, remote, &acceptor, &metrics).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Plaintext or TLS, by the first bytes; TLS is handshaken here.
async fn detect(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: &TlsAcceptor,
    metrics: &Metrics,
) -> Option<Conn> {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut first = [0u8; 2];
    let n = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        Ok(Ok(_)) => return None,
        Ok(Err(e)) => {
            tracing::debug!(peer = %remote, error = %e, "connection failed before its first byte");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %remote, "connection sent nothing within {HANDSHAKE_TIMEOUT:?}; closed");
            return None;
        }
    };
    // An HTTP/2 preface starts with 'P', so one 0x16 byte is TLS already.
    let tls = match &first[..n] {
        [b] => *b == 0x16,
        bytes => looks_like_tls(bytes),
    };
    let mut info = ConnInfo {
        remote: Some(remote),
        tls,
        peer_identity: None,
    };
    if !tls {
        return Some(Conn {
            io: Io::Plain(stream),
            info,
        });
    }
    let failed = |reason: &'static str, error: &dyn std::fmt::Display| {
        metrics
            .tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
        tracing::info!(peer = %remote, reason, error = %error, "TLS handshake failed");
    };
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            info.peer_identity = peer_identity(stream.get_ref().1);
            Some(Conn {
                io: Io::Tls(Box::new(stream)),
                info,
            })
        }
        Ok(Err(e)) => {
            failed(failure_reason(&e), &e);
            None
        }
        Err(_) => {
            failed(
                "timeout",
                &format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            );
            None
        }
    }
}

/// A fresh key and a certificate for `id` from `ca`: the control plane's own.
pub fn issue_own(ca: &Ca, id: &SpiffeId) -> anyhow::Result<Credentials> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued = ca.issue(id, &key, OWN_CERT_LIFETIME)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(Credentials::new(issued.chain, &der)?)
}

/// When a certificate valid over `[not_before, not_after)` is due for renewal.
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life.mul_f64(RENEW_AT)
}

/// Re-issues the control plane's certificate in `store` at about 70% of its
/// lifetime, until `stop`. Handshakes pick the new one up at once; open
/// connections keep theirs.
pub async fn keep_fresh(
    store: Arc<CertStore>,
    ca: Arc<Ca>,
    id: SpiffeId,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut retry = None;
    loop {
        let wait = retry.take().unwrap_or_else(|| match store.get() {
            Some(c) => renewal_time(c.not_before, c.not_after)
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_secs(1)),
            None => Duration::ZERO,
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match issue_own(&ca, &id) {
            Ok(creds) => {
                tracing::info!(identity = %id, not_after = %ca::rfc3339(creds.not_after), "renewed the control plane's certificate");
                metrics
                    .certificate_expiry
                    .with_label_values(&["control_plane"])
                    .set(ca::unix_seconds(creds.not_after));
                store.set(creds);
            }
            Err(e) => {
                tracing::error!(identity = %id, error = %format!("{e:#}"), "cannot renew the control plane's certificate; retrying");
                retry = Some(RENEW_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use tern_identity::csr::WorkloadKey;
    use tokio::io::AsyncWriteExt as _;
    use tokio_stream::StreamExt as _;

    /// A CA in `dir` and the listener's acceptor with the control plane's
    /// own certificate from it, as the identity side builds them.
    fn acceptor(dir: &std::path::Path) -> (Ca, TlsAcceptor) {
        let ca = Ca::load(&ca::Source::StateDir(dir.into()), "cluster.local").unwrap();
        let own = SpiffeId::new("cluster.local", "tern", "tern-control").unwrap();
        let serving = CertStore::new();
        serving.set(issue_own(&ca, &own).unwrap());
        let anchors = tern_identity::TrustAnchors::from_pem(ca.anchor_pem().as_bytes()).unwrap();
        let config = tern_identity::tls::server_config(
            serving,
            anchors,
            tern_identity::tls::ClientAuth::Optional,
        )
        .unwrap();
        (ca, TlsAcceptor::from(config))
    }

    #[tokio::test]
    async fn the_listener_tells_tls_from_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (ca, acceptor) = acceptor(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let mut conns = incoming(listener, acceptor, Arc::clone(&metrics), stop.clone());
        async fn next(conns: &mut ReceiverStream<Result<Conn, io::Error>>) -> Conn {
            tokio::time::timeout(Duration::from_secs(5), conns.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
        }

        // Plaintext h2c.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let conn = next(&mut conns).await;
        assert!(!conn.info.tls);
        assert_eq!(conn.info.peer_identity, None);

        // TLS with a workload certificate from the same CA.
        let order = SpiffeId::new("cluster.local", "default", "order").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let public = ca::check_csr(&key.csr_pem(&order).unwrap(), &order).unwrap();
        let issued = ca.issue(&order, &public, Duration::from_secs(60)).unwrap();
        let store = CertStore::new();
        store.set(Credentials::new(issued.chain, &key.private_key_der()).unwrap());
        let roots = tern_identity::TrustAnchors::from_pem(ca.anchor_pem().as_bytes()).unwrap();
        let connect = |expected: &str| {
            let config = tern_identity::tls::client_config(
                Some(Arc::clone(&store)),
                Arc::clone(&roots),
                Arc::from(expected),
                &[tern_identity::tls::ALPN_H2],
            )
            .unwrap();
            async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = tern_identity::tls::server_name(addr.ip());
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
            }
        };
        let _client = connect("spiffe://cluster.local/ns/tern/sa/tern-control")
            .await
            .unwrap();
        let conn = next(&mut conns).await;
        assert!(conn.info.tls);
        assert_eq!(
            conn.info.peer_identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/order")
        );

        // A client that expects another identity gives up; the failure is counted.
        assert!(connect("spiffe://cluster.local/ns/tern/sa/other")
            .await
            .is_err());
        for _ in 0..100 {
            let failed: u64 = metrics
                .tls_handshake_failures
                .with_label_values(&["rejected_by_peer"])
                .get();
            if failed == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            metrics
                .tls_handshake_failures
                .with_label_values(&["rejected_by_peer"])
                .get(),
            1
        );
        stop.cancel();
    }

    #[test]
    fn renewal_is_at_seventy_percent() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = renewal_time(t0, t0 + Duration::from_secs(100));
        assert_eq!(at, t0 + Duration::from_secs(70));
        assert_eq!(renewal_time(t0, t0), t0);
    }
}
