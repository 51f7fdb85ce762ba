//! Per-request load balancing over a service's endpoints.
//!
//! The endpoint list lives behind an `ArcSwap`: a request reads it without a
//! lock, and a discovery update swaps in a new list that reuses the clients
//! (and so the pooled connections) of endpoints that stayed. A request already
//! holding a removed endpoint's client finishes on it; new requests never see it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::watch;

use crate::accrual::now_ms;
use crate::config::policy::AccrualPolicy;
use crate::discovery::EndpointSet;
use crate::endpoint::EndpointClient;
use crate::errors::ProxyError;

/// Which endpoint served a response; read by the access log and metrics.
#[derive(Clone, Copy, Debug)]
pub struct Upstream(pub SocketAddr);

pub struct Balancer {
    service: Arc<str>,
    endpoints: ArcSwap<Vec<Arc<EndpointClient>>>,
    next: AtomicUsize,
    accrual: AccrualPolicy,
    ejections: IntCounter,
    ejected: IntGauge,
}

/// What the balancer needs to make clients for new endpoints.
#[derive(Clone)]
pub struct ClientParams {
    pub connect_timeout: Duration,
    pub open_connections: IntGauge,
    /// `tern_endpoints{service}`; none for the inbound app.
    pub endpoints_gauge: Option<IntGauge>,
    pub accrual: AccrualPolicy,
    pub ejections: IntCounter,
    pub ejected: IntGauge,
}

impl Balancer {
    /// Starts following `updates`; the balancer keeps the last set if the
    /// source goes away.
    pub fn spawn(
        service: Arc<str>,
        mut updates: watch::Receiver<EndpointSet>,
        params: ClientParams,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            service,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            accrual: params.accrual.clone(),
            ejections: params.ejections.clone(),
            ejected: params.ejected.clone(),
        });
        this.update(&updates.borrow_and_update(), &params);
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let Some(this) = weak.upgrade() else { break };
                let set = updates.borrow_and_update().clone();
                this.update(&set, &params);
            }
        });
        this
    }

    fn update(&self, set: &EndpointSet, params: &ClientParams) {
        let old = self.endpoints.load();
        let mut by_addr: HashMap<SocketAddr, &Arc<EndpointClient>> =
            old.iter().map(|c| (c.addr(), c)).collect();
        let next: Vec<Arc<EndpointClient>> = set
            .iter()
            .map(|ep| match by_addr.remove(&ep.addr) {
                Some(c) => Arc::clone(c),
                None => Arc::new(EndpointClient::new(
                    self.service.clone(),
                    ep.addr,
                    params.connect_timeout,
                    params.open_connections.clone(),
                )),
            })
            .collect();
        let now = now_ms();
        for gone in by_addr.values() {
            if gone.accrual.is_ejected(now) {
                self.ejected.dec();
            }
        }
        tracing::info!(service = %self.service, endpoints = next.len(), "endpoints updated");
        if let Some(g) = &params.endpoints_gauge {
            g.set(next.len() as i64);
        }
        self.endpoints.store(Arc::new(next));
    }

    /// Round robin: each request takes the next endpoint in turn. An endpoint
    /// that cannot be connected to, one ejected by failure accrual, and the one
    /// a retry wants to avoid are passed over, in that order of badness; when
    /// nothing better is left the least bad one is used (fail open).
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Result<Arc<EndpointClient>, ProxyError> {
        let eps = self.endpoints.load();
        let n = eps.len();
        if n == 0 {
            return Err(ProxyError::NoEndpoints {
                service: self.service.clone(),
            });
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let mut best: Option<(u8, &Arc<EndpointClient>)> = None;
        for k in 0..n {
            let ep = &eps[(start + k) % n];
            let mut badness = if ep.connect_failing(now) {
                4
            } else if ep.accrual.is_ejected(now) {
                2
            } else {
                0
            };
            if Some(ep.addr()) == avoid {
                badness += 1;
            }
            // try_acquire lets exactly one request probe an endpoint whose ejection ran out.
            if badness == 0 && ep.accrual.try_acquire(now) {
                return Ok(Arc::clone(ep));
            }
            if best.is_none_or(|(b, _)| badness < b) {
                best = Some((badness, ep));
            }
        }
        let ep = best.map(|(_, ep)| ep).unwrap_or(&eps[start % n]);
        Ok(Arc::clone(ep))
    }

    /// Feeds an attempt's outcome to failure accrual.
    pub fn report(&self, addr: SocketAddr, success: bool) {
        let eps = self.endpoints.load();
        let Some(ep) = eps.iter().find(|e| e.addr() == addr) else {
            return;
        };
        if success {
            if ep.accrual.success() {
                self.ejected.dec();
                tracing::info!(service = %self.service, endpoint = %addr, "endpoint back in rotation");
            }
            return;
        }
        let now = now_ms();
        let available = eps.iter().filter(|e| !e.accrual.is_ejected(now)).count();
        let may_eject = available > self.accrual.min_available;
        if ep.accrual.failure(&self.accrual, now, may_eject) {
            self.ejections.inc();
            self.ejected.inc();
            tracing::warn!(service = %self.service, endpoint = %addr, "endpoint ejected after consecutive failures");
        }
    }

    pub fn endpoint_addrs(&self) -> Vec<SocketAddr> {
        self.endpoints.load().iter().map(|c| c.addr()).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::discovery::Endpoint;

    fn params() -> ClientParams {
        ClientParams {
            connect_timeout: Duration::from_secs(1),
            open_connections: IntGauge::new("c", "c").unwrap(),
            endpoints_gauge: None,
            accrual: AccrualPolicy {
                consecutive_failures: 0,
                backoff_min: Duration::from_secs(1),
                backoff_max: Duration::from_secs(1),
                min_available: 1,
            },
            ejections: IntCounter::new("x", "x").unwrap(),
            ejected: IntGauge::new("y", "y").unwrap(),
        }
    }

    fn set(ports: &[u16]) -> EndpointSet {
        Arc::new(
            ports
                .iter()
                .map(|p| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], *p))))
                .collect(),
        )
    }

    #[tokio::test]
    async fn round_robin_is_even_and_follows_updates() {
        let (tx, rx) = watch::channel(set(&[1, 2, 3]));
        let b = Balancer::spawn("pay".into(), rx, params());
        let mut counts = HashMap::new();
        for _ in 0..999 {
            *counts
                .entry(b.pick(None).unwrap().addr().port())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![333; 3]);

        let kept = b.pick(None).unwrap();
        tx.send(set(&[2, 3])).unwrap();
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if b.endpoint_addrs().len() == 2 {
                break;
            }
        }
        assert_eq!(b.endpoint_addrs().len(), 2);
        for _ in 0..10 {
            assert_ne!(b.pick(None).unwrap().addr().port(), 1);
        }
        // The client of an endpoint that stayed is the same object (pooled connections survive).
        if kept.addr().port() != 1 {
            assert!(b.endpoint_addrs().contains(&kept.addr()));
        }
        tx.send(set(&[])).unwrap();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(b.pick(None), Err(ProxyError::NoEndpoints { .. })));
    }
}
