//! The two TLS ends of a mesh hop.
//!
//! Outbound, an endpoint whose discovery names an identity is dialed with
//! TLS 1.3 and must present exactly that SPIFFE id under the mesh trust
//! anchors. Inbound, a strict port takes only mTLS and a permissive one also
//! plaintext, told apart by the first byte (a TLS record starts with 0x16;
//! HTTP/1 methods and the HTTP/2 preface are ASCII letters).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tern_identity::ConnTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{Alpn, Identity};
use crate::config::identity::InboundTls;

/// How long an endpoint may take to finish the handshake this sidecar starts;
/// the inbound side's is a setting (`limits.handshake_timeout`).
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to an endpoint, with or without TLS.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why a handshake with an endpoint failed: a bounded reason and the detail.
#[derive(Debug)]
pub struct HandshakeError {
    pub reason: &'static str,
    pub detail: String,
}

/// Dials `tcp` with TLS, requiring the peer to be `expected`. Returns the
/// stream and when the connection must stop taking new requests: when either
/// side's certificate expires, so a connection never outlives the
/// certificates it was authenticated with.
pub async fn connect(
    identity: &Identity,
    expected: &Arc<str>,
    alpn: Alpn,
    addr: SocketAddr,
    tcp: TcpStream,
) -> Result<(ClientIo, Option<SystemTime>), HandshakeError> {
    let fail = |reason, detail| identity.metrics.failed("outbound", reason, detail);
    let Some(own) = identity.store.get() else {
        return Err(fail(
            "no_certificate",
            "this sidecar has no certificate yet".into(),
        ));
    };
    let config = identity
        .client_config(expected, alpn)
        .map_err(|e| fail("config", e.to_string()))?;
    let name = tern_identity::tls::server_name(addr.ip());
    let handshake = TlsConnector::from(config).connect(name, tcp);
    let stream = within_timeout(
        &identity.metrics,
        "outbound",
        CLIENT_HANDSHAKE_TIMEOUT,
        handshake,
    )
    .await?;
    identity
        .metrics
        .handshakes
        .with_label_values(&["outbound"])
        .inc();
    let peer_expiry = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| tern_identity::spiffe::validity(leaf).ok())
        .map(|(_, not_after)| not_after);
    let not_after = match peer_expiry {
        Some(p) => p.min(own.not_after),
        None => own.not_after,
    };
    let retire_at = Some(tern_identity::spiffe::refused_from(not_after));
    Ok((ClientIo::Tls(Box::new(stream)), retire_at))
}

impl super::TlsMetrics {
    /// Counts a refused or failed handshake and says why.
    fn failed(&self, direction: &str, reason: &'static str, detail: String) -> HandshakeError {
        self.handshake_failures
            .with_label_values(&[direction, reason])
            .inc();
        HandshakeError { reason, detail }
    }
}

/// Runs a handshake, bounded by `limit`; a failure is counted under the
/// reason rustls gives.
async fn within_timeout<S>(
    metrics: &super::TlsMetrics,
    direction: &str,
    limit: Duration,
    handshake: impl std::future::Future<Output = io::Result<S>>,
) -> Result<S, HandshakeError> {
    match tokio::time::timeout(limit, handshake).await {
        Err(_) => Err(metrics.failed(direction, "timeout", "TLS handshake timed out".into())),
        Ok(Err(e)) => {
            let reason = tern_identity::tls::failure_reason(&e);
            Err(metrics.failed(direction, reason, e.to_string()))
        }
        Ok(Ok(s)) => Ok(s),
    }
}

/// Accepts mesh connections on the inbound port.
pub struct Inbound {
    pub mode: InboundTls,
    acceptor: TlsAcceptor,
    identity: Arc<Identity>,
    handshake_timeout: Duration,
}

/// An accepted inbound connection and what its handshake established.
pub enum Accepted {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, ConnTls),
}

impl Inbound {
    pub fn new(identity: Arc<Identity>, mode: InboundTls, handshake_timeout: Duration) -> Self {
        Self {
            mode,
            acceptor: TlsAcceptor::from(Arc::clone(&identity.server)),
            identity,
            handshake_timeout,
        }
    }

    /// The connection ready for HTTP, or why it was refused (already counted).
    pub async fn accept(&self, tcp: TcpStream) -> Result<Accepted, HandshakeError> {
        let metrics = &self.identity.metrics;
        let fail = |reason, detail| metrics.failed("inbound", reason, detail);
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(self.handshake_timeout, tcp.peek(&mut first)).await;
        let n = match peeked {
            Err(_) => {
                return Err(fail(
                    "timeout",
                    "no bytes before the handshake timeout".into(),
                ))
            }
            Ok(Err(e)) => return Err(fail("io", e.to_string())),
            Ok(Ok(0)) => return Err(fail("closed", "closed before sending anything".into())),
            Ok(Ok(n)) => n,
        };
        // A TLS record starts with 0x16; HTTP/1 methods and the HTTP/2
        // preface start with ASCII letters.
        if first[..n] != [0x16] {
            return match self.mode {
                InboundTls::Strict => Err(fail(
                    "plaintext",
                    "plaintext connection to a strict mTLS port".into(),
                )),
                _ => Ok(Accepted::Plain(tcp)),
            };
        }
        let stream = within_timeout(
            metrics,
            "inbound",
            self.handshake_timeout,
            self.acceptor.accept(tcp),
        )
        .await?;
        self.identity
            .metrics
            .handshakes
            .with_label_values(&["inbound"])
            .inc();
        let conn = stream.get_ref().1;
        let tls = ConnTls {
            version: Some(tern_identity::tls::version_name(conn)),
            peer_identity: tern_identity::tls::peer_identity(conn),
        };
        Ok(Accepted::Tls(Box::new(stream), tls))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
