//! Inbound opaque TCP: from another sidecar (`tern.tcp/1`), or redirected
//! plaintext for an opaque port of the app.

use std::net::SocketAddr;

use tern_identity::ConnTls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::header::{self, Status};
use super::{reset, Record, Tcp};
use crate::authz::SharedPolicy;
use crate::inbound::AppPorts;
use crate::metrics::Direction;

/// What an inbound opaque connection is checked against.
pub struct InboundApp<'a> {
    /// The local service (metric labels, logs).
    pub service: &'a str,
    /// The address the connection came in on: the app is reached at its IP.
    pub local: SocketAddr,
    pub ports: &'a AppPorts,
    pub authz: &'a SharedPolicy,
}

impl Tcp {
    /// A sidecar's `tern.tcp/1` connection (already through mTLS, `tls`):
    /// reads the header, checks the port (one the app serves) and the
    /// caller, connects to the app, answers, then carries the bytes.
    pub async fn from_mesh<S>(
        &self,
        mut conn: S,
        peer: SocketAddr,
        tls: ConnTls,
        app: InboundApp<'_>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let _live = self.enter();
        let mut r = Record::new(Direction::Inbound, app.service, peer);
        r.tls = tls;
        let port = match header::read(&mut conn).await {
            Ok(Some(port)) => port,
            Ok(None) => {
                let _ = header::answer(&mut conn, Status::BadHeader).await;
                r.failed("bad_header", "not a tern.tcp/1 header");
                return self.finish(&r);
            }
            Err(e) => {
                r.failed("bad_header", format!("reading the header: {e}"));
                return self.finish(&r);
            }
        };
        let local = app.ports.address(SocketAddr::new(app.local.ip(), port));
        r.original_dst = Some(local);
        let peer_identity = r.tls.peer_identity.clone();
        let refused = if !app.ports.serves(port) {
            app.ports.refuse(peer, port, "tern.tcp/1 header");
            Some(Status::PortNotAllowed)
        } else if !app.authz.load().allows(peer_identity.as_deref(), None) {
            self.authz_denied
                .with_label_values(&[app.service, peer_identity.as_deref().unwrap_or("")])
                .inc();
            Some(Status::Denied)
        } else {
            None
        };
        if let Some(status) = refused {
            let caller = peer_identity.as_deref().unwrap_or("");
            // A refused port was logged by `refuse`, rate-limited.
            if status != Status::PortNotAllowed {
                tracing::warn!(%peer, port, caller, ?status, "refused an opaque TCP connection");
            }
            let _ = header::answer(&mut conn, status).await;
            r.failed(status.outcome(), format!("{status:?}"));
            return self.finish(&r);
        }
        let mut upstream = match self.connect_app(local).await {
            Ok(s) => s,
            Err(e) => {
                let _ = header::answer(&mut conn, Status::AppRefused).await;
                r.failed("app_refused", e);
                return self.finish(&r);
            }
        };
        r.upstream = Some(local);
        if let Err(e) = header::answer(&mut conn, Status::Connected).await {
            r.failed("error", e);
            return self.finish(&r);
        }
        r.splice(&mut conn, &mut upstream).await;
        self.finish(&r);
    }

    /// A redirected plaintext connection for a port the app serves (opaque,
    /// or not HTTP): straight to the app at the address it was sent to
    /// (`app.local`), if the policy lets callers without an identity in.
    pub async fn to_app(&self, mut client: TcpStream, peer: SocketAddr, app: InboundApp<'_>) {
        let _live = self.enter();
        let mut r = Record::new(Direction::Inbound, app.service, peer);
        let port = app.local.port();
        let local = app.ports.address(app.local);
        r.original_dst = Some(app.local);
        if !app.authz.load().allows(None, None) {
            self.authz_denied
                .with_label_values(&[app.service, ""])
                .inc();
            tracing::warn!(%peer, port, "refused plaintext TCP: the policy wants an identity");
            r.failed("denied", "the inbound policy needs a caller identity");
            reset(client);
            return self.finish(&r);
        }
        match self.connect_app(local).await {
            Ok(mut upstream) => {
                r.upstream = Some(local);
                r.splice(&mut client, &mut upstream).await;
            }
            Err(e) => {
                r.failed("app_refused", e);
                reset(client);
            }
        }
        self.finish(&r);
    }

    async fn connect_app(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}
