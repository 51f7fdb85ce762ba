//! The accept side of the demo's gRPC servers.

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// Connections accepted from `listener`, ready for tonic's `serve_with_incoming*`, with
/// TCP_NODELAY set, as tonic's own `serve` and every common gRPC server do (tonic ignores its
/// `tcp_nodelay` setting for a listener it did not bind). With Nagle on, a response written
/// while the previous one is still unacknowledged waits for the peer's ACK, and an HTTP/2
/// peer that sends nothing back at once (hyper and h2 acknowledge DATA only with the next
/// WINDOW_UPDATE, after half a window) leaves it to the kernel's delayed ACK or to its next
/// request: up to milliseconds added to one call in a pair.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn accepted_connections_send_without_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = accepted.next().await.unwrap().unwrap();
        assert!(server_side.nodelay().unwrap());
    }
}
