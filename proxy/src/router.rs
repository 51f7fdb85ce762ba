//! Which service a request is for, and forwarding it there.
//!
//! [`RouteLayer`] names the target (fixed per listener, or looked up by
//! `:authority`/`Host`) and the route rule the request falls under
//! ([`crate::routes::SelectedRule`]), and records both in the request's extensions
//! ([`Routed`]), so every layer below (metrics, logs, errors, retries,
//! balancing) knows them; [`Forward`] at the bottom of the stack sends each
//! attempt on the connection of the endpoint the balance layer chose. With
//! transparent interception the connection's original destination names the
//! target too: the accept loop resolves it once per connection
//! ([`crate::intercept`]) into the connection's [`crate::serve::ConnInfo`].

mod route;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderName, HeaderValue, Request, Response};

use arc_swap::ArcSwap;

use crate::balance::Balancer;
use crate::body::Body;
use crate::endpoint::EndpointClient;
use crate::errors::ProxyError;
use crate::inbound::AppPorts;
use crate::routes::Routes;

pub use route::{Route, RouteLayer, Routed, UnservedPort};

/// The port an intercepted request was sent to, told by the calling sidecar
/// to the receiving one, whose transparent inbound forwards it to that port
/// of the app if the app serves it ([`crate::inbound::AppPorts`]). Never reaches the app.
pub const DST_PORT: HeaderName = HeaderName::from_static("tern-dst-port");

/// Where an intercepted connection was going (in its [`crate::serve::ConnInfo`]).
#[derive(Clone)]
pub struct Destination {
    pub target: Arc<Target>,
    /// The app dialed this endpoint's IP: every attempt goes to it.
    pub endpoint: Option<SocketAddr>,
    /// The port the app dialed (outbound), sent on as [`DST_PORT`].
    pub port: Option<u16>,
}

/// A service requests can be sent to. Long-lived: a config push swaps its
/// routes and its balancer's endpoints, never the target itself.
pub struct Target {
    pub service: Arc<str>,
    pub balancer: Arc<Balancer>,
    pub routes: ArcSwap<Routes>,
    /// When a request or connection last went to it ([`crate::accrual::now_ms`]).
    used: AtomicU64,
}

impl Target {
    pub fn new(service: Arc<str>, balancer: Arc<Balancer>, routes: Routes) -> Self {
        balancer.set_subsets(routes.subsets());
        Self {
            service,
            balancer,
            routes: ArcSwap::from_pointee(routes),
            used: AtomicU64::new(crate::accrual::now_ms()),
        }
    }

    /// Marks it used now. Stored at most once a second: a busy target's
    /// requests do not all write the same cache line.
    pub fn touch(&self) {
        let now = crate::accrual::now_ms();
        if now.saturating_sub(self.used.load(Ordering::Relaxed)) >= 1000 {
            self.used.store(now, Ordering::Relaxed);
        }
    }

    /// When it was last used, in [`crate::accrual::now_ms`] (to the second).
    pub fn last_used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Replaces the routes; the balancer keeps the subsets they select ready first.
    pub fn set_routes(&self, mut routes: Routes) {
        routes.keep_budgets_from(&self.routes.load());
        self.balancer.set_subsets(routes.subsets());
        self.routes.store(Arc::new(routes));
    }
}

/// How a listener picks the target of each request.
#[derive(Clone)]
pub enum Selector {
    /// Every request on this listener goes to one target (explicit upstream
    /// ports, and the inbound listener's local app).
    Fixed(Arc<Target>),
    /// The request's authority names the service; the table is replaced
    /// when the control plane adds services.
    Authority(Arc<ArcSwap<RouteTable>>),
    /// The outbound port with interception: the authority when it names a
    /// known service, else the connection's original destination (a
    /// connection that was not redirected has none: as `Authority`).
    Intercepted(Arc<ArcSwap<RouteTable>>),
    /// The inbound port: a redirected connection's destination port, else
    /// the port the caller's sidecar names in [`DST_PORT`] (with `ports`,
    /// transparent inbound), else `app`.
    Local {
        app: Option<Arc<Target>>,
        ports: Option<Arc<AppPorts>>,
    },
}

impl Selector {
    /// The names it routes by, if it routes by name.
    pub fn table(&self) -> Option<Arc<ArcSwap<RouteTable>>> {
        match self {
            Self::Authority(t) | Self::Intercepted(t) => Some(Arc::clone(t)),
            Self::Fixed(_) | Self::Local { .. } => None,
        }
    }
}

/// Names under which each service is known: `pay`, `pay.ns`, `pay.ns.svc`,
/// `pay.ns.svc.cluster.local`, each with or without a port.
#[derive(Clone, Default)]
pub struct RouteTable {
    by_name: HashMap<String, Arc<Target>>,
}

impl RouteTable {
    pub fn insert(&mut self, namespace: &str, target: Arc<Target>) {
        let name = target.service.to_string();
        for n in [
            name.clone(),
            format!("{name}.{namespace}"),
            format!("{name}.{namespace}.svc"),
            format!("{name}.{namespace}.svc.cluster.local"),
        ] {
            self.by_name.insert(n, Arc::clone(&target));
        }
    }

    /// One more name for a target, e.g. the DNS name a Service declares.
    pub fn alias(&mut self, name: &str, target: Arc<Target>) {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.by_name.insert(name, target);
    }

    pub fn lookup(&self, authority: &str) -> Option<&Arc<Target>> {
        let host = strip_port(authority);
        let host = host.strip_suffix('.').unwrap_or(host);
        self.by_name.get(host).or_else(|| {
            // Names are case-insensitive; only allocate for the rare mixed-case one.
            host.bytes()
                .any(|b| b.is_ascii_uppercase())
                .then(|| self.by_name.get(&host.to_ascii_lowercase()))
                .flatten()
        })
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split(']')
            .next()
            .map(|h| &h[1..])
            .unwrap_or(authority);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// The authority a request names: `:authority` for HTTP/2, `Host` for HTTP/1.
pub fn authority<B>(req: &Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// A request sent to a Service port (on the virtual IP) names, in
/// [`DST_PORT`], the port this attempt's endpoint serves it on (its target
/// port). One sent to an endpoint's own IP (`pinned`, see [`Routed::pinned`])
/// named the port its app serves already.
fn name_target_port<B>(req: &mut Request<B>, ep: &EndpointClient, pinned: bool) {
    if ep.target_ports().is_empty() || pinned {
        return;
    }
    let named = req.headers().get(DST_PORT);
    let Some(port) = named.and_then(|v| v.to_str().ok()?.parse::<u16>().ok()) else {
        return;
    };
    let target = ep.target_port(port);
    if target != port {
        req.headers_mut()
            .insert(DST_PORT, HeaderValue::from(target));
    }
}

/// The bottom of the stack: send on the connection of the endpoint the
/// balance layer chose for this attempt ([`crate::balance::Balance`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Forward;

impl tower::Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let routed = req.extensions_mut().get_mut::<Routed>();
        let pinned = routed.as_ref().is_some_and(|r| r.pinned.is_some());
        let Some(ep) = routed.and_then(|r| r.endpoint.take()) else {
            let authority = authority(&req).to_string();
            return Box::pin(async move { Err(ProxyError::NoRoute { authority }) });
        };
        Box::pin(async move {
            name_target_port(&mut req, &ep, pinned);
            // Which endpoint answered, and over what, Observe learns from the
            // request's attempts record (see crate::retry::Attempts).
            ep.send(req).await
        })
    }
}

#[cfg(test)]
mod tests;
