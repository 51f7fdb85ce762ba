//! What the accept loop learned about a connection, handed to each of its
//! requests.
//!
//! The facts (both addresses, the TLS handshake's result, an intercepted
//! connection's destination) are gathered once, when the connection is
//! accepted, into one [`ConnInfo`] behind an `Arc`; every request carries a
//! clone of that `Arc` in its extensions. One extension per request instead
//! of one per fact: each `http::Extensions` insert is an allocation, and the
//! first one of a request allocates its map as well.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tern_identity::ConnTls;

use super::conn_state::{ConnState, Tracked};
use crate::on_demand::Unanswered;
use crate::router::Destination;

/// The connection a request came on, in its extensions as `Arc<ConnInfo>`.
#[derive(Clone)]
pub struct ConnInfo {
    /// The downstream peer.
    pub peer: SocketAddr,
    /// The address the client dialed (on the inbound port: the pod IP).
    pub local: SocketAddr,
    /// The handshake's result, on a listener that takes TLS.
    pub tls: Option<ConnTls>,
    /// Where an intercepted connection was going.
    pub dest: Option<Destination>,
    /// An intercepted connection whose destination went unanswered.
    pub unanswered: Option<Unanswered>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Self {
        Self {
            peer,
            local,
            tls: None,
            dest: None,
            unanswered: None,
        }
    }

    /// The connection `req` came on; `None` for a request that did not come
    /// through the accept loop (unit tests).
    pub fn of<B>(req: &Request<B>) -> Option<&ConnInfo> {
        req.extensions().get::<Arc<ConnInfo>>().map(|c| &**c)
    }
}

/// Puts the connection's [`ConnInfo`] into each request and tracks it in
/// the connection's [`ConnState`].
#[derive(Clone)]
pub(super) struct WithConn<S> {
    pub inner: S,
    pub info: Arc<ConnInfo>,
    pub state: Arc<ConnState>,
}

impl<S, B, R> tower::Service<Request<R>> for WithConn<S>
where
    S: tower::Service<Request<R>, Response = http::Response<B>>,
    B: http_body::Body,
{
    type Response = http::Response<Tracked<B>>;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<R>) -> Self::Future {
        req.extensions_mut().insert(Arc::clone(&self.info));
        Tracked::new(self.inner.call(req), &self.state)
    }
}
