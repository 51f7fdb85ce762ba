//! Which service a request is for, and forwarding it there.
//!
//! [`RouteLayer`] names the target (fixed per listener, or looked up by
//! `:authority`/`Host`) and the route rule the request falls under
//! ([`SelectedRule`]), and records both in the request's extensions, so every
//! layer below (metrics, logs, errors, retries, balancing) knows them;
//! [`Forward`] at the bottom of the stack sends each attempt on the
//! connection of the endpoint the balance layer chose. With transparent
//! interception the connection's original destination names the target too:
//! the accept loop resolves it once per connection ([`crate::intercept`]) and
//! puts the [`Destination`] in each request.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderName, HeaderValue, Request, Response};

use arc_swap::ArcSwap;

use crate::balance::{Balancer, Upstream};
use crate::body::Body;
use crate::endpoint::EndpointClient;
use crate::errors::ProxyError;
use crate::inbound::AppPorts;
use crate::routes::{Routes, SelectedRule};

/// The port an intercepted request was sent to, told by the calling sidecar
/// to the receiving one, whose transparent inbound forwards it to that port
/// of the app if the app serves it ([`AppPorts`]). Never reaches the app.
pub const DST_PORT: HeaderName = HeaderName::from_static("tern-dst-port");

/// Where an intercepted connection was going, in each of its requests.
#[derive(Clone)]
pub struct Destination {
    pub target: Arc<Target>,
    /// The app dialed this endpoint's IP: every attempt goes to it.
    pub endpoint: Option<SocketAddr>,
    /// The port the app dialed (outbound), sent on as [`DST_PORT`].
    pub port: Option<u16>,
}

/// The two ends of the connection a request came on, in its extensions.
#[derive(Clone, Copy, Debug)]
pub struct ConnAddrs {
    /// The address the client dialed (on the inbound port: the pod IP).
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// The request named a port ([`DST_PORT`]) the app does not serve:
/// [`Forward`] answers it with [`ProxyError::PortNotServed`].
#[derive(Clone, Copy, Debug)]
pub struct UnservedPort(pub u16);

/// Every attempt of the request goes to this endpoint (see [`Destination`]).
#[derive(Clone, Copy, Debug)]
pub struct PinnedEndpoint(pub SocketAddr);

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

#[derive(Clone)]
pub struct RouteLayer {
    selector: Selector,
}

impl RouteLayer {
    pub fn new(selector: Selector) -> Self {
        Self { selector }
    }
}

impl<S> tower::Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            selector: self.selector.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Route<S> {
    selector: Selector,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for Route<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Only this sidecar says which port a request was sent to.
        let dst_port = req.headers_mut().remove(DST_PORT);
        let target = match &self.selector {
            Selector::Fixed(t) => Some(Arc::clone(t)),
            Selector::Authority(table) => table.load().lookup(authority(&req)).cloned(),
            Selector::Intercepted(table) => {
                let named = table.load().lookup(authority(&req)).cloned();
                named.or_else(|| original_destination(&mut req))
            }
            Selector::Local { app, ports } => {
                let named = dst_port.and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
                let dest = req.extensions().get::<Destination>();
                match (dest.map(|d| Arc::clone(&d.target)), named, ports) {
                    (Some(t), _, _) => Some(t),
                    (None, Some(port), Some(ports)) => named_port(&mut req, ports, port),
                    _ => app.clone(),
                }
            }
        };
        if let Some(t) = target {
            t.touch();
            if let Some(rule) = SelectedRule::select(t.routes.load_full(), &req) {
                req.extensions_mut().insert(rule);
            }
            req.extensions_mut().insert(t);
        }
        self.inner.call(req)
    }
}

/// The app's `port` at the address the request's connection came in on,
/// or, for a port the app does not serve, none (and the request is marked
/// [`UnservedPort`]).
fn named_port<B>(req: &mut Request<B>, ports: &AppPorts, port: u16) -> Option<Arc<Target>> {
    let conn = req.extensions().get::<ConnAddrs>().copied();
    let local = conn.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.local.ip());
    let target = ports.get(SocketAddr::new(local, port));
    if target.is_none() {
        let peer = conn.map_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), |c| c.peer);
        ports.refuse(peer, port, "tern-dst-port");
        req.extensions_mut().insert(UnservedPort(port));
    }
    target
}

/// The target of an intercepted connection's request; pins the endpoint the
/// app dialed and tells the next sidecar which port that was.
fn original_destination<B>(req: &mut Request<B>) -> Option<Arc<Target>> {
    let d = req.extensions().get::<Destination>()?.clone();
    if let Some(ep) = d.endpoint {
        req.extensions_mut().insert(PinnedEndpoint(ep));
    }
    if let Some(port) = d.port {
        req.headers_mut().insert(DST_PORT, HeaderValue::from(port));
    }
    Some(d.target)
}

/// A request sent to a Service port (on the virtual IP) names, in
/// [`DST_PORT`], the port this attempt's endpoint serves it on (its target
/// port). One sent to an endpoint's own IP ([`PinnedEndpoint`]) named the
/// port its app serves already.
fn name_target_port<B>(req: &mut Request<B>, ep: &EndpointClient) {
    if ep.target_ports().is_empty() || req.extensions().get::<PinnedEndpoint>().is_some() {
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
        let Some(ep) = req.extensions_mut().remove::<Arc<EndpointClient>>() else {
            let authority = authority(&req).to_string();
            return Box::pin(async move { Err(ProxyError::NoRoute { authority }) });
        };
        Box::pin(async move {
            name_target_port(&mut req, &ep);
            let mut rsp = ep.send(req).await?;
            rsp.extensions_mut().insert(Upstream(ep.addr()));
            if ep.uses_tls() {
                rsp.extensions_mut().insert(ep.conn_tls());
            }
            Ok(rsp)
        })
    }
}

#[cfg(test)]
mod tests;
