//! The Route layer: which target and route rule a request is for.
//!
//! It names the target (fixed per listener, looked up by `:authority` or
//! `Host`, an intercepted connection's original destination, or the app port
//! a request names) and the rule the request falls under, and records both,
//! once, in one [`Routed`] extension that the layers below share and add
//! to. With on-demand discovery an authority no known service has waits here
//! for the control plane's answer (at most `--lookup-timeout`) and is looked
//! up again once: a request for a known name pays one route-table lookup.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::Either;
use http::{HeaderValue, Request};

use super::{authority, RouteTable, Selector, Target, DST_PORT};
use crate::endpoint::EndpointClient;
use crate::inbound::AppPorts;
use crate::on_demand::{OnDemand, Outcome, Unanswered};
use crate::retry::Attempts;
use crate::routes::SelectedRule;
use crate::serve::ConnInfo;

/// What routing decided for a request, and what the layers below add on
/// the way down: one extension for all of it.
#[derive(Clone)]
pub struct Routed {
    pub target: Arc<Target>,
    /// The rule the request falls under, with the backend drawn for it;
    /// `None` when no rule matches (the balance layer refuses the request).
    pub rule: Option<SelectedRule>,
    /// Every attempt goes to this endpoint: the app dialed its IP (see
    /// [`super::Destination`]).
    pub pinned: Option<SocketAddr>,
    /// Attempts made so far and the latest one's endpoint; Observe keeps a
    /// clone to log and count them.
    pub attempts: Attempts,
    /// Set by the retry layer: the attempt's response head may be held
    /// (see [`crate::balance::layer::held`]).
    pub may_hold: bool,
    /// The attempt's endpoint, chosen by the balance layer, taken by Forward.
    pub endpoint: Option<Arc<EndpointClient>>,
}

impl Routed {
    pub fn new(
        target: Arc<Target>,
        rule: Option<SelectedRule>,
        pinned: Option<SocketAddr>,
    ) -> Self {
        Self {
            target,
            rule,
            pinned,
            attempts: Attempts::default(),
            may_hold: false,
            endpoint: None,
        }
    }

    /// What routing decided for `req`, if it found a target.
    pub fn of<B>(req: &Request<B>) -> Option<&Routed> {
        req.extensions().get::<Routed>()
    }
}

/// The request named a port ([`DST_PORT`]) the app does not serve:
/// the balance layer answers it with [`crate::errors::ProxyError::PortNotServed`].
#[derive(Clone, Copy, Debug)]
pub struct UnservedPort(pub u16);

#[derive(Clone)]
pub struct RouteLayer {
    selector: Selector,
    on_demand: Option<Arc<OnDemand>>,
}

impl RouteLayer {
    /// `on_demand`: where authorities no known service has are looked up;
    /// used only when the listener routes by name.
    pub fn new(selector: Selector, on_demand: Option<Arc<OnDemand>>) -> Self {
        let on_demand = on_demand.filter(|_| selector.table().is_some());
        Self {
            selector,
            on_demand,
        }
    }
}

impl<S> tower::Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            selector: self.selector.clone(),
            on_demand: self.on_demand.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Route<S> {
    selector: Selector,
    on_demand: Option<Arc<OnDemand>>,
    inner: S,
}

type Lookup<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for Route<S>
where
    S: tower::Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Lookup<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Only this sidecar says which port a request was sent to.
        let dst_port = req.headers_mut().remove(DST_PORT);
        if let Some((target, pinned)) = self.select(&mut req, dst_port) {
            route_to(&mut req, target, pinned);
            return Either::Left(self.inner.call(req));
        }
        let Some((on_demand, table, name)) = self.unknown_name(&req) else {
            if let Some(u) = ConnInfo::of(&req).and_then(|c| c.unanswered.clone()) {
                req.extensions_mut().insert(u);
            }
            return Either::Left(self.inner.call(req));
        };
        // The service made ready by poll_ready goes with the request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let outcome = on_demand.name(&name).await;
            match table.load().lookup(&name).cloned() {
                Some(target) => route_to(&mut req, target, None),
                None if outcome == Outcome::NoAnswer => {
                    req.extensions_mut().insert(Unanswered {
                        destination: name,
                        waited: on_demand.lookup_timeout(),
                    });
                }
                None => {}
            }
            inner.call(req).await
        }))
    }
}

impl<S> Route<S> {
    /// The request's target by the listener's selector, with the endpoint
    /// every attempt must go to, if any.
    fn select<B>(
        &self,
        req: &mut Request<B>,
        dst_port: Option<HeaderValue>,
    ) -> Option<(Arc<Target>, Option<SocketAddr>)> {
        match &self.selector {
            Selector::Fixed(t) => Some((Arc::clone(t), None)),
            Selector::Authority(table) => {
                let t = table.load().lookup(authority(req)).cloned()?;
                Some((t, None))
            }
            Selector::Intercepted(table) => match table.load().lookup(authority(req)) {
                Some(t) => Some((Arc::clone(t), None)),
                None => original_destination(req),
            },
            Selector::Local { app, ports } => {
                let named = dst_port.and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
                let dest = ConnInfo::of(req).and_then(|c| c.dest.as_ref());
                let t = match (dest.map(|d| Arc::clone(&d.target)), named, ports) {
                    (Some(t), _, _) => Some(t),
                    (None, Some(port), Some(ports)) => named_port(req, ports, port),
                    _ => app.clone(),
                };
                Some((t?, None))
            }
        }
    }

    /// What to look up for a request whose authority named no known
    /// service: a host name (not an IP literal, not `localhost`), on a
    /// listener with on-demand discovery, from a connection that was not
    /// intercepted.
    #[allow(clippy::type_complexity)]
    fn unknown_name<B>(
        &self,
        req: &Request<B>,
    ) -> Option<(Arc<OnDemand>, Arc<ArcSwap<RouteTable>>, String)> {
        let on_demand = self.on_demand.as_ref()?;
        let table = self.selector.table()?;
        if ConnInfo::of(req).is_some_and(|c| c.dest.is_some() || c.unanswered.is_some()) {
            return None;
        }
        let auth = authority(req);
        let host = auth.rsplit_once(':').map_or(auth, |(h, _)| h);
        let literal = host.starts_with('[') || host.parse::<IpAddr>().is_ok();
        let wanted = !host.is_empty() && !literal && host != "localhost";
        wanted.then(|| (Arc::clone(on_demand), table, auth.to_owned()))
    }
}

/// Records the target and its rule for every layer below.
fn route_to<B>(req: &mut Request<B>, target: Arc<Target>, pinned: Option<SocketAddr>) {
    target.touch();
    let rule = SelectedRule::select(target.routes.load_full(), req);
    req.extensions_mut()
        .insert(Routed::new(target, rule, pinned));
}

/// The app's `port` at the address the request's connection came in on,
/// or, for a port the app does not serve, none (and the request is marked
/// [`UnservedPort`]).
fn named_port<B>(req: &mut Request<B>, ports: &AppPorts, port: u16) -> Option<Arc<Target>> {
    let conn = ConnInfo::of(req);
    let local = conn.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.local.ip());
    let peer = conn.map_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), |c| c.peer);
    let target = ports.get(SocketAddr::new(local, port));
    if target.is_none() {
        ports.refuse(peer, port, "tern-dst-port");
        req.extensions_mut().insert(UnservedPort(port));
    }
    target
}

/// The target of an intercepted connection's request, and the endpoint the
/// app dialed, which every attempt must go to; tells the next sidecar which
/// port that was.
fn original_destination<B>(req: &mut Request<B>) -> Option<(Arc<Target>, Option<SocketAddr>)> {
    let d = ConnInfo::of(req)?.dest.as_ref()?;
    let (target, pinned, port) = (Arc::clone(&d.target), d.endpoint, d.port);
    if let Some(port) = port {
        req.headers_mut().insert(DST_PORT, HeaderValue::from(port));
    }
    Some((target, pinned))
}
