//! The request path's part of on-demand discovery: a request whose
//! authority names no service this sidecar knows waits for a lookup of that
//! name before the router picks its target.
//!
//! An intercepted connection's destination was looked up when it was
//! accepted ([`crate::intercept`]); its requests pass straight through, as
//! do requests for known names and all requests when there is no control
//! plane. A lookup left unanswered marks the request [`Unanswered`], which
//! the bottom of the stack turns into UNAVAILABLE naming the destination.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::Either;
use http::Request;

use super::{OnDemand, Outcome};
use crate::router::{authority, Destination, RouteTable};

/// The destination a request was for, when the control plane did not say
/// what it is in time.
#[derive(Clone, Debug)]
pub struct Unanswered {
    pub destination: String,
    pub waited: std::time::Duration,
}

#[derive(Clone)]
pub struct DiscoverLayer {
    lookup: Option<(Arc<OnDemand>, Arc<ArcSwap<RouteTable>>)>,
}

impl DiscoverLayer {
    /// Looks names up when there is `on_demand` and the listener routes by
    /// name (`table`); otherwise passes every request on as it is.
    pub fn new(on_demand: Option<Arc<OnDemand>>, table: Option<Arc<ArcSwap<RouteTable>>>) -> Self {
        Self {
            lookup: on_demand.zip(table),
        }
    }
}

impl<S> tower::Layer<S> for DiscoverLayer {
    type Service = Discover<S>;
    fn layer(&self, inner: S) -> Discover<S> {
        Discover {
            lookup: self.lookup.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Discover<S> {
    lookup: Option<(Arc<OnDemand>, Arc<ArcSwap<RouteTable>>)>,
    inner: S,
}

type Lookup<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for Discover<S>
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
        let Some(name) = self.unknown_name(&req) else {
            return Either::Left(self.inner.call(req));
        };
        let Some((on_demand, _)) = self.lookup.clone() else {
            return Either::Left(self.inner.call(req));
        };
        // The service made ready by poll_ready goes with the request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            if on_demand.name(&name).await == Outcome::NoAnswer {
                req.extensions_mut().insert(Unanswered {
                    destination: name,
                    waited: on_demand.lookup_timeout(),
                });
            }
            inner.call(req).await
        }))
    }
}

impl<S> Discover<S> {
    /// The authority to look up: a host name no known service has, on a
    /// request that did not come on an intercepted connection.
    fn unknown_name<B>(&self, req: &Request<B>) -> Option<String> {
        let (_, table) = self.lookup.as_ref()?;
        if req.extensions().get::<Destination>().is_some()
            || req.extensions().get::<Unanswered>().is_some()
        {
            return None;
        }
        let auth = authority(req);
        // Known names, the common case, stop at the first check.
        if table.load().lookup(auth).is_some() {
            return None;
        }
        let host = auth.rsplit_once(':').map_or(auth, |(h, _)| h);
        let literal = host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok();
        (!host.is_empty() && !literal && host != "localhost").then(|| auth.to_owned())
    }
}
