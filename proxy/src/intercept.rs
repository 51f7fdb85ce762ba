//! Transparent interception: connections that iptables (set up by
//! `tern-init`) redirected to the outbound or inbound listener, and what each
//! becomes. Decided once per connection, before any HTTP is served.
//!
//! Outbound, the original destination (`SO_ORIGINAL_DST`) picks the route:
//! - a service's virtual IP, or the IP of one of its endpoints (then that
//!   endpoint only), is mesh traffic: HTTP through the request stack
//!   (an `:authority` naming a known service still wins, see
//!   [`crate::router::Selector::Intercepted`]), or opaque TCP to the
//!   service when the port is marked opaque or the client does not speak
//!   HTTP first ([`DETECT_TIMEOUT`]);
//! - an address no known service has is looked up ([`crate::on_demand`],
//!   with a control plane): a service found is mesh traffic as above; one
//!   outside the mesh, and anything without a control plane, passes through
//!   untouched, with no detection, so protocols whose server speaks first
//!   work; no answer in time fails the connection
//!   ([`OutboundConn::Unanswered`]).
//!
//! A connection that was not redirected (its original destination is the
//! listener itself) is served as it always was.
//!
//! Inbound (with `--inbound-transparent`), a redirected connection is for the
//! app at its original destination (the pod IP and the port dialed), if the
//! app serves that port ([`AppPorts`]); any other port is refused with a
//! reset, as a closed port would be. In strict mode it must be mTLS like any
//! other; otherwise a plaintext connection to an opaque port, or one that
//! does not start like HTTP, is carried as bytes to the app.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

use crate::config::identity::InboundTls;
use crate::config::ports::PortSet;
use crate::inbound::AppPorts;
use crate::on_demand::{OnDemand, Outcome};
use crate::router::{Destination, Target};
use crate::targets::Targets;
use crate::tcp::Tcp;

/// How long a redirected connection to a mesh destination may stay silent
/// before it is carried as opaque TCP: HTTP clients speak first, so silence
/// means the server is expected to (mark such ports opaque to skip the wait).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a redirected connection was going; `None` when it was not
/// redirected (or the kernel has no NAT record of it).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    // An IPv4 connection on a dual-stack IPv6 socket (`--inbound-listen
    // [::]:4143`) shows IPv4-mapped addresses, but its NAT record is IPv4.
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let orig = match local {
        SocketAddr::V4(_) => {
            let sin = getsockopt(stream, sockopt::OriginalDst).ok()?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let sin6 = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            ))
        }
    };
    (orig != local).then_some(orig)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Opaque,
}

/// HTTP/1 requests start with a method and HTTP/2 with `PRI`: an uppercase
/// ASCII letter. Anything else (TLS, binary protocols), or nothing within
/// [`DETECT_TIMEOUT`], is opaque.
pub async fn detect(stream: &TcpStream) -> Protocol {
    let mut first = [0u8; 1];
    match tokio::time::timeout(DETECT_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => Protocol::Http,
        _ => Protocol::Opaque,
    }
}

/// What a redirected outbound connection becomes.
pub enum OutboundConn {
    /// Served by the HTTP stack, the destination in every request.
    Http(Destination),
    /// Opaque TCP to the service (`pinned`: to that endpoint only).
    Mesh {
        target: Arc<Target>,
        pinned: Option<SocketAddr>,
    },
    Passthrough,
    /// The control plane did not say in time what the destination is: an
    /// HTTP client gets UNAVAILABLE naming it, anything else a reset.
    Unanswered,
}

/// The outbound listener's interception.
pub struct Outbound {
    pub targets: Arc<Targets>,
    pub opaque_ports: PortSet,
    pub tcp: Arc<Tcp>,
    /// Asks the control plane about unknown destinations; `None` without one.
    pub on_demand: Option<Arc<OnDemand>>,
}

impl Outbound {
    pub async fn classify(&self, stream: &TcpStream, dst: SocketAddr) -> OutboundConn {
        let r = match (self.targets.resolve(dst), &self.on_demand) {
            (Some(r), _) => r,
            (None, None) => return OutboundConn::Passthrough,
            (None, Some(on_demand)) => match on_demand.address(dst).await {
                Outcome::OutsideMesh | Outcome::Unknown => return OutboundConn::Passthrough,
                Outcome::NoAnswer => return OutboundConn::Unanswered,
                Outcome::Found => match self.targets.resolve(dst) {
                    Some(r) => r,
                    None => return OutboundConn::Unanswered,
                },
            },
        };
        let opaque = r.opaque || self.opaque_ports.contains(dst.port());
        if opaque || detect(stream).await == Protocol::Opaque {
            return OutboundConn::Mesh {
                target: r.target,
                pinned: r.endpoint,
            };
        }
        OutboundConn::Http(Destination {
            target: r.target,
            endpoint: r.endpoint,
            port: Some(dst.port()),
        })
    }
}

/// What a redirected inbound connection becomes.
pub enum InboundConn {
    /// Through the usual accept (mTLS per the mode) and the HTTP stack.
    Http(Destination),
    /// Bytes straight to the app's port.
    Opaque,
    /// A port the app does not serve (or one of the sidecar's own).
    Refused,
}

/// The inbound listener's interception and opaque TCP.
pub struct Inbound {
    /// Redirected connections go to the port they were sent to.
    pub transparent: bool,
    pub mode: InboundTls,
    pub opaque_ports: PortSet,
    pub ports: Arc<AppPorts>,
    pub service: String,
    pub authz: crate::authz::SharedPolicy,
    pub tcp: Arc<Tcp>,
}

impl Inbound {
    pub fn redirected(&self, stream: &TcpStream) -> Option<SocketAddr> {
        self.transparent.then(|| original_dst(stream)).flatten()
    }

    pub async fn classify(&self, stream: &TcpStream, dst: SocketAddr) -> InboundConn {
        let port = dst.port();
        if !self.ports.serves(port) {
            return InboundConn::Refused;
        }
        // Strict takes mTLS only: the accept that follows refuses the rest.
        if self.mode != InboundTls::Strict
            && (self.opaque_ports.contains(port) || detect(stream).await == Protocol::Opaque)
        {
            return InboundConn::Opaque;
        }
        match self.ports.get(dst) {
            Some(target) => InboundConn::Http(Destination {
                target,
                endpoint: None,
                port: None,
            }),
            None => InboundConn::Refused,
        }
    }

    /// What an opaque connection that came in on `local` is checked against.
    pub fn app(&self, local: SocketAddr) -> crate::tcp::InboundApp<'_> {
        crate::tcp::InboundApp {
            service: &self.service,
            local,
            ports: &self.ports,
            authz: &self.authz,
        }
    }
}
