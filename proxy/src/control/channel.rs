//! The gRPC channel to tern-control: plaintext for a sidecar without an
//! identity, otherwise TLS 1.3 that accepts only the control plane's own
//! SPIFFE id and presents this workload's certificate once it has one.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tern_identity::tls::ALPN_H2;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::Identity;

pub async fn connect(url: &str, identity: Option<&Arc<Identity>>) -> Result<Channel, String> {
    let Some(identity) = identity else {
        return endpoint(url)?
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"));
    };
    // tonic only frames HTTP/2 over the stream the connector returns; TLS
    // is done here, so the URI it sees is plain http.
    let plain = url.replacen("https://", "http://", 1);
    let config = tern_identity::tls::client_config(
        Some(Arc::clone(&identity.store)),
        Arc::clone(&identity.anchors),
        Arc::clone(&identity.control_plane_identity),
        &[ALPN_H2],
    )
    .map_err(|e| format!("TLS config: {e}"))?;
    let metrics = identity.metrics.clone();
    let connector = tower::service_fn(move |uri: Uri| {
        let config = Arc::clone(&config);
        let metrics = metrics.clone();
        async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            let ip = tcp.peer_addr()?.ip();
            let tls = TlsConnector::from(config)
                .connect(tern_identity::tls::server_name(ip), tcp)
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
    endpoint(&plain)?
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {e}: {}", source_chain(&e)))
}

fn endpoint(url: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("bad control plane URL: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
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
