//! Outbound opaque TCP: pass-through, and to a mesh service's endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::header::{self, Status};
use super::{reset, Record, Tcp};
use crate::errors::ProxyError;
use crate::metrics::Direction;
use crate::router::Target;

/// Endpoints tried for one connection when connecting fails (no byte of the
/// app has moved yet, so another endpoint can still take it).
const MAX_ATTEMPTS: usize = 3;

impl Tcp {
    /// A redirected connection to a destination outside the mesh: the same
    /// destination, the same bytes, nothing looked at.
    pub async fn passthrough(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let _live = self.enter();
        let mut r = Record::new(Direction::Outbound, "", peer);
        r.original_dst = Some(dst);
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                r.upstream = Some(dst);
                r.splice(&mut client, &mut upstream).await;
            }
            Ok(Err(e)) => {
                r.failed("connect_failed", e);
                reset(client);
            }
            Err(_) => {
                r.failed("connect_timeout", "connect timed out");
                reset(client);
            }
        }
        self.finish(&r);
    }

    /// A redirected connection for `target` (the app dialed `dst`): to one
    /// of its endpoints (`pinned`: that one only), trying up to
    /// `MAX_ATTEMPTS` while connecting fails.
    pub async fn to_mesh(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        target: Arc<Target>,
        pinned: Option<SocketAddr>,
    ) {
        let _live = self.enter();
        let mut r = Record::new(Direction::Outbound, &target.service, peer);
        r.original_dst = Some(dst);
        let port = dst.port();
        let attempts = if pinned.is_some() { 1 } else { MAX_ATTEMPTS };
        let mut avoid = None;
        for _ in 0..attempts {
            let picked = match pinned {
                Some(addr) => target.balancer.get(addr),
                None => target.balancer.pick(None, avoid),
            };
            let ep = match picked {
                Ok(ep) => ep,
                Err(e) => {
                    r.failed("no_endpoints", e);
                    break;
                }
            };
            avoid = Some(ep.addr());
            // Dialed at a Service port: the endpoint's app serves it on its
            // target port. Dialed at the endpoint's own IP: that port as is.
            let port = match pinned {
                Some(_) => port,
                None => ep.target_port(port),
            };
            r.upstream = Some(ep.addr());
            r.tls = ep.conn_tls();
            let mut io = match ep.connect_tcp(port).await {
                Ok(io) => io,
                Err(e) => {
                    r.failed(connect_outcome(&e), e);
                    continue;
                }
            };
            if ep.uses_tls() {
                match header::open(&mut io, port).await {
                    Ok(Some(Status::Connected)) => {}
                    Ok(Some(status)) => {
                        r.failed(status.outcome(), format!("the peer answered {status:?}"));
                        if status == Status::AppRefused {
                            continue;
                        }
                        break;
                    }
                    Ok(None) => {
                        r.failed("bad_header", "the peer answered an unknown status");
                        break;
                    }
                    Err(e) => {
                        r.failed("handshake_failed", format!("opening the connection: {e}"));
                        continue;
                    }
                }
            }
            r.outcome = "ok";
            r.error = None;
            r.splice(&mut client, &mut io).await;
            self.finish(&r);
            return;
        }
        tracing::warn!(
            service = %target.service,
            %dst,
            outcome = r.outcome,
            error = r.error.as_deref().unwrap_or(""),
            "opaque TCP connection failed"
        );
        reset(client);
        self.finish(&r);
    }
}

fn connect_outcome(e: &ProxyError) -> &'static str {
    match e {
        ProxyError::ConnectTimeout { .. } => "connect_timeout",
        ProxyError::Handshake { .. } => "handshake_failed",
        _ => "connect_failed",
    }
}
