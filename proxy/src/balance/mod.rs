//! Per-request load balancing over a service's endpoints.
//!
//! The endpoint list lives behind an `ArcSwap`: a request reads it without a
//! lock, and a discovery update swaps in a new list that reuses the clients
//! (and so the pooled connections) of endpoints that stayed. A request already
//! holding a removed endpoint's client finishes on it; new requests never see
//! it. Routes may send a request to a subset of endpoints selected by labels
//! (a canary's `version: v2`); each subset is kept as its own member list.

pub mod layer;
mod p2c;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use serde::Serialize;
use tokio::sync::watch;

use crate::accrual::now_ms;
use crate::config::limits::ClientLimits;
use crate::config::policy::AccrualPolicy;
use crate::discovery::{EndpointSet, Labels, TargetPorts};
use crate::endpoint::EndpointClient;
use crate::errors::ProxyError;

pub use layer::{Balance, BalanceLayer};
pub use p2c::{start as start_request, InFlight, Load};

/// Which endpoint served a response; read by the access log and metrics.
#[derive(Clone, Copy, Debug)]
pub struct Upstream(pub SocketAddr);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    /// Power of two choices, cost = peak-EWMA latency × (in flight + 1).
    P2cEwma,
    /// Power of two choices, cost = requests in flight.
    LeastRequest,
}

impl Algorithm {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::P2cEwma,
            2 => Self::LeastRequest,
            _ => Self::RoundRobin,
        }
    }
    fn to_u8(self) -> u8 {
        match self {
            Self::RoundRobin => 0,
            Self::P2cEwma => 1,
            Self::LeastRequest => 2,
        }
    }
}

/// What the balancer needs to make clients for new endpoints.
#[derive(Clone)]
pub struct ClientParams {
    pub client: ClientLimits,
    pub open_connections: IntGauge,
    /// Responses whose header or trailer block was over the limit.
    pub oversized: IntCounter,
    /// `tern_endpoints{service}`; none for the inbound app.
    pub endpoints_gauge: Option<IntGauge>,
    pub accrual: AccrualPolicy,
    pub ejections: IntCounter,
    pub ejected: IntGauge,
    /// This sidecar's identity: endpoints that have one are dialed with mTLS.
    pub identity: Option<Arc<crate::identity::Identity>>,
}

impl ClientParams {
    /// The metric handles of `service`; `count_endpoints` is false for the
    /// inbound app, which is not a mesh service's endpoint set.
    pub fn for_service(
        metrics: &crate::metrics::Metrics,
        service: &str,
        client: ClientLimits,
        accrual: AccrualPolicy,
        count_endpoints: bool,
    ) -> Self {
        Self {
            client,
            open_connections: metrics
                .upstream_open_connections
                .with_label_values(&[service]),
            oversized: metrics
                .protocol_rejections
                .with_label_values(&["client", "response_header_list_size"]),
            endpoints_gauge: count_endpoints
                .then(|| metrics.endpoints.with_label_values(&[service])),
            accrual,
            ejections: metrics.ejections.with_label_values(&[service]),
            ejected: metrics.ejected.with_label_values(&[service]),
            identity: None,
        }
    }
}

/// Endpoints a request may go to, with the round-robin cursor over them.
#[derive(Default)]
struct Members {
    eps: Vec<Arc<EndpointClient>>,
    next: AtomicUsize,
}

#[derive(Default)]
struct State {
    all: Members,
    subsets: Vec<(Labels, Members)>,
}

pub struct Balancer {
    service: Arc<str>,
    state: ArcSwap<State>,
    /// Serialises writers (discovery updates, new subsets); readers never take it.
    writer: Mutex<Writer>,
    algorithm: AtomicU8,
    accrual: ArcSwap<AccrualPolicy>,
    params: ClientParams,
}

#[derive(Default)]
struct Writer {
    set: EndpointSet,
    subsets: Vec<Labels>,
}

impl Balancer {
    pub fn new(service: Arc<str>, params: ClientParams) -> Arc<Self> {
        Arc::new(Self {
            service,
            state: ArcSwap::from_pointee(State::default()),
            writer: Mutex::new(Writer::default()),
            algorithm: AtomicU8::new(0),
            accrual: ArcSwap::from_pointee(params.accrual.clone()),
            params,
        })
    }

    /// Starts following `updates`; the balancer keeps the last set if the
    /// source goes away.
    pub fn spawn(
        service: Arc<str>,
        updates: watch::Receiver<EndpointSet>,
        params: ClientParams,
    ) -> Arc<Self> {
        let this = Self::new(service, params);
        this.follow(updates);
        this
    }

    pub fn follow(self: &Arc<Self>, mut updates: watch::Receiver<EndpointSet>) {
        self.set_endpoints(updates.borrow_and_update().clone());
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let Some(this) = weak.upgrade() else { break };
                let set = updates.borrow_and_update().clone();
                this.set_endpoints(set);
            }
        });
    }

    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    pub fn algorithm(&self) -> Algorithm {
        Algorithm::from_u8(self.algorithm.load(Ordering::Relaxed))
    }

    pub fn set_algorithm(&self, a: Algorithm) {
        self.algorithm.store(a.to_u8(), Ordering::Relaxed);
    }

    pub fn set_accrual(&self, p: AccrualPolicy) {
        self.accrual.store(Arc::new(p));
    }

    /// The label subsets routes select; kept as ready member lists.
    pub fn set_subsets(&self, mut subsets: Vec<Labels>) {
        subsets.sort();
        subsets.dedup();
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.subsets == subsets {
            return;
        }
        w.subsets = subsets;
        self.rebuild(&w);
    }

    /// Replaces the endpoints now (the watch it follows catches up later).
    pub fn set_endpoints(&self, set: EndpointSet) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.set = set;
        self.rebuild(&w);
        tracing::info!(service = %self.service, endpoints = w.set.len(), "endpoints updated");
    }

    fn rebuild(&self, w: &Writer) {
        let old = self.state.load();
        // An endpoint whose identity changed needs a client that checks the
        // new one; one whose target ports changed, a client that names them.
        type Key<'a> = (SocketAddr, &'a Labels, Option<&'a str>, &'a TargetPorts);
        let mut by_key: HashMap<Key<'_>, &Arc<EndpointClient>> = old
            .all
            .eps
            .iter()
            .map(|c| ((c.addr(), c.labels(), c.identity(), c.target_ports()), c))
            .collect();
        let all: Vec<Arc<EndpointClient>> = w
            .set
            .iter()
            .map(|ep| {
                match by_key.remove(&(
                    ep.addr,
                    &ep.labels,
                    ep.identity.as_deref(),
                    &ep.target_ports,
                )) {
                    Some(c) => Arc::clone(c),
                    None => Arc::new(EndpointClient::new(
                        self.service.clone(),
                        ep.clone(),
                        self.params.client,
                        self.params.open_connections.clone(),
                        self.params.oversized.clone(),
                        self.params.identity.as_ref(),
                    )),
                }
            })
            .collect();
        let now = now_ms();
        for gone in by_key.values() {
            if gone.accrual.is_ejected(now) {
                self.params.ejected.dec();
            }
        }
        let subsets = w
            .subsets
            .iter()
            .map(|labels| {
                let eps = all
                    .iter()
                    .filter(|c| labels.iter().all(|(k, v)| c.labels().get(k) == Some(v)))
                    .cloned()
                    .collect();
                (
                    labels.clone(),
                    Members {
                        eps,
                        next: AtomicUsize::new(0),
                    },
                )
            })
            .collect();
        if let Some(g) = &self.params.endpoints_gauge {
            g.set(all.len() as i64);
        }
        self.state.store(Arc::new(State {
            all: Members {
                eps: all,
                next: AtomicUsize::new(old.all.next.load(Ordering::Relaxed)),
            },
            subsets,
        }));
    }

    /// Picks an endpoint of `subset` (all endpoints when `None`) by the
    /// configured algorithm. An endpoint that cannot be connected to, one
    /// ejected by failure accrual, and the one a retry wants to avoid are
    /// passed over, in that order of badness; when nothing better is left
    /// the least bad one is used (fail open).
    pub fn pick(
        &self,
        subset: Option<&Labels>,
        avoid: Option<SocketAddr>,
    ) -> Result<Arc<EndpointClient>, ProxyError> {
        let state = self.state.load();
        let members = match subset {
            None => &state.all,
            Some(labels) => match state.subsets.iter().find(|(l, _)| l == labels) {
                Some((_, m)) => m,
                None => &state.all,
            },
        };
        let eps = &members.eps;
        if eps.is_empty() {
            return Err(ProxyError::NoEndpoints {
                service: self.service.clone(),
            });
        }
        let now = now_ms();
        match self.algorithm() {
            Algorithm::RoundRobin => Ok(round_robin(members, now, avoid)),
            algo => Ok(p2c::pick(eps, algo, now, avoid)
                .unwrap_or_else(|| round_robin(members, now, avoid))),
        }
    }

    /// The endpoint at `addr`, whatever its state: the app dialed that one.
    pub fn get(&self, addr: SocketAddr) -> Result<Arc<EndpointClient>, ProxyError> {
        let state = self.state.load();
        state
            .all
            .eps
            .iter()
            .find(|e| e.addr() == addr)
            .cloned()
            .ok_or_else(|| ProxyError::NoEndpoints {
                service: self.service.clone(),
            })
    }

    /// Feeds an attempt's outcome to failure accrual.
    pub fn report(&self, addr: SocketAddr, success: bool) {
        let state = self.state.load();
        let eps = &state.all.eps;
        let Some(ep) = eps.iter().find(|e| e.addr() == addr) else {
            return;
        };
        if success {
            if ep.accrual.success() {
                self.params.ejected.dec();
                tracing::info!(service = %self.service, endpoint = %addr, "endpoint back in rotation");
            }
            return;
        }
        let policy = self.accrual.load();
        let now = now_ms();
        let available = eps.iter().filter(|e| !e.accrual.is_ejected(now)).count();
        let may_eject = available > policy.min_available;
        if ep.accrual.failure(&policy, now, may_eject) {
            self.params.ejections.inc();
            self.params.ejected.inc();
            tracing::warn!(service = %self.service, endpoint = %addr, "endpoint ejected after consecutive failures");
        }
    }

    pub fn endpoint_addrs(&self) -> Vec<SocketAddr> {
        self.state.load().all.eps.iter().map(|c| c.addr()).collect()
    }

    /// Endpoints with their labels and state, for `/config`.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        let now = now_ms();
        self.state
            .load()
            .all
            .eps
            .iter()
            .map(|c| {
                serde_json::json!({
                    "address": c.addr(),
                    "labels": c.labels(),
                    "identity": c.identity(),
                    "ejected": c.accrual.is_ejected(now),
                    "connect_failing": c.connect_failing(now),
                    "in_flight": c.load.in_flight(),
                })
            })
            .collect()
    }
}

/// How bad a choice `ep` is right now (0 = fine); see [`Balancer::pick`].
fn badness(ep: &EndpointClient, now: u64, avoid: Option<SocketAddr>) -> u8 {
    let mut b = if ep.connect_failing(now) {
        4
    } else if ep.accrual.is_ejected(now) {
        2
    } else {
        0
    };
    if Some(ep.addr()) == avoid {
        b += 1;
    }
    b
}

fn round_robin(members: &Members, now: u64, avoid: Option<SocketAddr>) -> Arc<EndpointClient> {
    let eps = &members.eps;
    let n = eps.len();
    let start = members.next.fetch_add(1, Ordering::Relaxed);
    let mut best: Option<(u8, &Arc<EndpointClient>)> = None;
    for k in 0..n {
        let ep = &eps[(start + k) % n];
        let b = badness(ep, now, avoid);
        // try_acquire lets exactly one request probe an endpoint whose ejection ran out.
        if b == 0 && ep.accrual.try_acquire(now) {
            return Arc::clone(ep);
        }
        if best.is_none_or(|(bb, _)| b < bb) {
            best = Some((b, ep));
        }
    }
    Arc::clone(best.map(|(_, ep)| ep).unwrap_or(&eps[start % n]))
}

#[cfg(test)]
mod tests;
