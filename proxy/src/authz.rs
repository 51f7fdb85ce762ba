//! Authorization at inbound: which client identities may call the local app,
//! and which of its gRPC methods.
//!
//! The policy in force is the `inbound` policy of the last snapshot the
//! control plane pushed ([`crate::control`] converts and stores it); before
//! any snapshot, or without a control plane, everything is allowed. A request
//! is allowed when any rule matches it: the caller's identity (the verified
//! SPIFFE id of its mTLS connection, see [`tern_identity::ConnTls`]) matches
//! one of the rule's `from`, and its gRPC method one of the rule's methods
//! (or the rule names none). Otherwise the policy's default action decides.
//! A plaintext caller, or one without a mesh certificate, has no identity
//! and matches no `from`.
//!
//! [`AuthorizeLayer`] sits below [`crate::observe`] and
//! [`crate::errors::ErrorResponseLayer`] in [`crate::stack::http`]: a denied
//! request never reaches the app, becomes [`ProxyError::PermissionDenied`]
//! (gRPC PERMISSION_DENIED, HTTP 403, a warning in the diagnostic log) and is
//! logged and counted like every other request, plus
//! `tern_authz_denied_total{service, peer_identity}`.

use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::Either;
use http::{Request, Response};
use tern_identity::SpiffeId;

use crate::body::Body;
use crate::errors::{is_grpc, ProxyError};
use crate::metrics::{Direction, Metrics};
use crate::router::Routed;
use crate::serve::ConnInfo;

/// The policy storage: written by the control client, read by the inbound
/// stack on every request.
pub type SharedPolicy = Arc<ArcSwap<Policy>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// An inbound authorization policy, validated.
#[derive(Debug)]
pub struct Policy {
    name: Option<Arc<str>>,
    default_action: Action,
    rules: Vec<Rule>,
}

/// Matches when the caller matches any of `from` and the request's gRPC
/// method any of `methods` (or `methods` is empty).
#[derive(Clone, Debug)]
pub struct Rule {
    pub from: Vec<PeerMatch>,
    pub methods: Vec<MethodMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatch {
    /// This one identity (the trust domain compared case-insensitively).
    Exact(SpiffeId),
    /// Any identity of this namespace, in any trust domain.
    Namespace(String),
}

/// A gRPC service and optionally one of its methods; `service: None` matches
/// every gRPC request. A request that is not gRPC matches no method.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MethodMatch {
    pub service: Option<String>,
    pub method: Option<String>,
}

impl Policy {
    /// Lets every request through: the bootstrap default, and what a
    /// snapshot without an inbound policy means.
    pub fn allow_all() -> Self {
        Self {
            name: None,
            default_action: Action::Allow,
            rules: Vec::new(),
        }
    }

    pub fn new(name: Option<&str>, default_action: Action, rules: Vec<Rule>) -> Self {
        Self {
            name: name.filter(|n| !n.is_empty()).map(Arc::from),
            default_action,
            rules,
        }
    }

    /// The storage shared by the control client and the inbound stack,
    /// allowing everything until the first snapshot.
    pub fn shared() -> SharedPolicy {
        Arc::new(ArcSwap::from_pointee(Self::allow_all()))
    }

    /// The AuthorizationPolicy's name, if one applies.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn default_action(&self) -> Action {
        self.default_action
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether nothing is ever denied: rules only allow, so with ALLOW as
    /// the default they cannot change the outcome.
    pub fn allows_all(&self) -> bool {
        self.default_action == Action::Allow
    }

    /// Whether a caller (its verified SPIFFE id, if any) may make a request
    /// (its gRPC `(service, method)`, if it is gRPC).
    pub fn allows(&self, peer: Option<&str>, grpc: Option<(&str, &str)>) -> bool {
        self.decide(peer, grpc).allowed
    }

    /// The decision for a request and what made it: the first rule that
    /// matches, else the default action. `/explain` shows it; the request
    /// path asks [`Policy::allows`], which is this.
    pub fn decide(&self, peer: Option<&str>, grpc: Option<(&str, &str)>) -> Decision {
        let by_default = Decision {
            allowed: self.default_action == Action::Allow,
            rule: None,
        };
        if self.allows_all() {
            return by_default;
        }
        let peer = peer.and_then(IdParts::parse);
        let rule = peer.and_then(|p| self.rules.iter().position(|r| r.matches(&p, grpc)));
        match rule {
            Some(i) => Decision {
                allowed: true,
                rule: Some(i),
            },
            None => by_default,
        }
    }
}

/// What [`Policy::decide`] decided, and by which rule (its index), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `None`: no rule matched (or none is looked at): the default action decided.
    pub rule: Option<usize>,
}

impl Rule {
    fn matches(&self, peer: &IdParts<'_>, grpc: Option<(&str, &str)>) -> bool {
        self.from.iter().any(|f| f.matches(peer))
            && (self.methods.is_empty()
                || grpc.is_some_and(|(s, m)| self.methods.iter().any(|mm| mm.matches(s, m))))
    }
}

impl PeerMatch {
    fn matches(&self, peer: &IdParts<'_>) -> bool {
        match self {
            Self::Exact(id) => {
                peer.trust_domain.eq_ignore_ascii_case(id.trust_domain())
                    && peer.namespace == id.namespace()
                    && peer.service_account == id.service_account()
            }
            Self::Namespace(ns) => peer.namespace == ns,
        }
    }
}

impl MethodMatch {
    fn matches(&self, service: &str, method: &str) -> bool {
        match (&self.service, &self.method) {
            (None, _) => true,
            (Some(s), None) => s == service,
            (Some(s), Some(m)) => s == service && m == method,
        }
    }
}

/// The parts of a `spiffe://<trust-domain>/ns/<namespace>/sa/<account>` id,
/// borrowed from the string (no allocation on the request path).
struct IdParts<'a> {
    trust_domain: &'a str,
    namespace: &'a str,
    service_account: &'a str,
}

impl<'a> IdParts<'a> {
    fn parse(id: &'a str) -> Option<Self> {
        let mut parts = id.strip_prefix("spiffe://")?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some(Self {
                trust_domain: td,
                namespace: ns,
                service_account: sa,
            }),
            _ => None,
        }
    }
}

/// The `(service, method)` of a gRPC request: its path is `/<service>/<method>`.
pub fn grpc_method<B>(req: &Request<B>) -> Option<(&str, &str)> {
    if !is_grpc(req.headers()) {
        return None;
    }
    req.uri().path().strip_prefix('/')?.split_once('/')
}

/// The caller's verified identity: only a TLS connection has one. No
/// [`tern_identity::ConnTls`] at all (a unit test, a listener without TLS) is plaintext.
pub fn peer_identity<B>(req: &Request<B>) -> Option<&str> {
    ConnInfo::of(req)
        .and_then(|c| c.tls.as_ref())
        .filter(|t| t.is_tls())
        .and_then(|t| t.peer_identity.as_deref())
}

/// Checks each inbound request against the policy in force.
#[derive(Clone)]
pub struct AuthorizeLayer {
    policy: Option<SharedPolicy>,
    metrics: Arc<Metrics>,
}

impl AuthorizeLayer {
    /// Only inbound requests are checked; for outbound, or without a policy,
    /// the layer lets everything through.
    pub fn new(direction: Direction, policy: Option<SharedPolicy>, metrics: Arc<Metrics>) -> Self {
        Self {
            policy: policy.filter(|_| direction == Direction::Inbound),
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    layer: AuthorizeLayer,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for Authorize<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Either<S::Future, Ready<Result<Response<Body>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if let Some(shared) = &self.layer.policy {
            let policy = shared.load();
            if !policy.allows_all() {
                let peer = peer_identity(&req);
                let grpc = grpc_method(&req);
                if !policy.allows(peer, grpc) {
                    let e = self.deny(&req, &policy, peer, grpc);
                    return Either::Right(std::future::ready(Err(e)));
                }
            }
        }
        Either::Left(self.inner.call(req))
    }
}

impl<S> Authorize<S> {
    /// Counts a denial and makes its error; the error layer above logs it
    /// and answers the caller.
    fn deny<B>(
        &self,
        req: &Request<B>,
        policy: &Policy,
        peer: Option<&str>,
        grpc: Option<(&str, &str)>,
    ) -> ProxyError {
        let service = Routed::of(req)
            .map(|r| Arc::clone(&r.target.service))
            .unwrap_or_else(|| Arc::from("unknown"));
        self.layer
            .metrics
            .authz_denied
            .with_label_values(&[&service, peer.unwrap_or("")])
            .inc();
        let caller = peer.unwrap_or("a caller with no client identity");
        let call = match grpc {
            Some((s, m)) => format!("{s}/{m}"),
            None => "this service".to_string(),
        };
        let by = policy
            .name()
            .map(|n| format!(" (policy {n})"))
            .unwrap_or_default();
        ProxyError::PermissionDenied {
            service,
            detail: format!("{caller} may not call {call}{by}"),
        }
    }
}

#[cfg(test)]
mod tests;
