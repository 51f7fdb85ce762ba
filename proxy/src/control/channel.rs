//! The gRPC channel to one tern-control replica: plaintext for a sidecar
//! without an identity, otherwise TLS 1.3 that accepts only the control
//! plane's own SPIFFE id and presents this workload's certificate once it has
//! one. Which replica is dialed, and in what order, is `failover`'s business.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tern_identity::tls::ALPN_H2;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::Identity;

/// Connects to the replica at `addr`; `tls` is the configured scheme.
pub async fn connect(
    addr: SocketAddr,
    tls: bool,
    identity: Option<&Arc<Identity>>,
) -> Result<Channel, String> {
    // tonic only frames HTTP/2 over the stream the connector returns; TLS, if
    // any, is done here, so the URI it sees is plain http.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad control plane address {addr}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let Some(identity) = identity else {
        if tls {
            return Err("https:// needs a workload identity (trust anchors)".to_string());
        }
        let connector = tower::service_fn(move |_: Uri| async move {
            let tcp = dial(addr).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tcp))
        });
        return endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("connect: {e}: {}", source_chain(&e)));
    };
    let config = tern_identity::tls::client_config(
        Some(Arc::clone(&identity.store)),
        Arc::clone(&identity.anchors),
        Arc::clone(&identity.control_plane_identity),
        &[ALPN_H2],
    )
    .map_err(|e| format!("TLS config: {e}"))?;
    let metrics = identity.metrics.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let config = Arc::clone(&config);
        let metrics = metrics.clone();
        async move {
            let tcp = dial(addr).await?;
            let tls = TlsConnector::from(config)
                .connect(tern_identity::tls::server_name(addr.ip()), tcp)
                .await
                .inspect_err(|e| {
                    metrics
                        .handshake_failures
                        .with_label_values(&["control", tern_identity::tls::failure_reason(e)])
                        .inc();
                })?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {e}: {}", source_chain(&e)))
}

/// A replica that is gone may not refuse, only stay silent: give up on it
/// soon enough to try the next one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

async fn dial(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// tonic's transport error hides the cause (such as a refused certificate) in its sources.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}
