//! The workload registry: endpoints that sidecars announce in their Hello.
//!
//! An endpoint lives while at least one stream that registered it is open.
//! When the last one ends, the endpoint is kept for a grace period: a sidecar
//! that merely reconnects (a control-plane hiccup, a network blip) should not
//! make every caller drop and re-add it. A killed replica's stream ends at
//! once (its TCP connection closes), so it leaves callers' endpoint sets about
//! one grace period later.
//!
//! Pure data with time passed in, so the grace logic is tested without
//! sleeping; the caller schedules [`Registry::expire`] at the returned deadline.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::ServiceKey;

/// What a sidecar registers for its workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub address: SocketAddr,
    pub labels: BTreeMap<String, String>,
    /// The workload's verified identity (its client certificate's SPIFFE id).
    pub identity: Option<String>,
}

/// One registered endpoint as callers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub labels: BTreeMap<String, String>,
    pub identity: Option<String>,
    /// Open streams that registered this address.
    pub streams: u32,
    /// Set while no stream holds the endpoint: when its grace began.
    #[serde(skip)]
    pub orphaned_at: Option<Instant>,
}

pub struct Registry {
    grace: Duration,
    services: HashMap<ServiceKey, BTreeMap<SocketAddr, Entry>>,
}

impl Registry {
    pub fn new(grace: Duration) -> Self {
        Registry {
            grace,
            services: HashMap::new(),
        }
    }

    /// Adds (or revives) an endpoint. Returns whether callers' view of the
    /// service changed: a revived endpoint within its grace did not change.
    pub fn register(&mut self, key: &ServiceKey, r: Registration) -> bool {
        let eps = self.services.entry(key.clone()).or_default();
        match eps.get_mut(&r.address) {
            Some(e) => {
                e.streams += 1;
                e.orphaned_at = None;
                // Two streams for one address (a restart racing its own grace):
                // the newest registration describes the workload.
                let changed = e.labels != r.labels || e.identity != r.identity;
                e.labels = r.labels;
                e.identity = r.identity;
                changed
            }
            None => {
                eps.insert(
                    r.address,
                    Entry {
                        labels: r.labels,
                        identity: r.identity,
                        streams: 1,
                        orphaned_at: None,
                    },
                );
                true
            }
        }
    }

    /// A stream that registered `address` ended. Returns when the endpoint
    /// should be expired if this was its last stream.
    pub fn release(
        &mut self,
        key: &ServiceKey,
        address: SocketAddr,
        now: Instant,
    ) -> Option<Instant> {
        let e = self.services.get_mut(key)?.get_mut(&address)?;
        e.streams = e.streams.saturating_sub(1);
        if e.streams > 0 {
            return None;
        }
        e.orphaned_at = Some(now);
        Some(now + self.grace)
    }

    /// Removes endpoints whose grace is over; returns the services that changed.
    pub fn expire(&mut self, now: Instant) -> Vec<ServiceKey> {
        let grace = self.grace;
        let mut changed = Vec::new();
        self.services.retain(|key, eps| {
            let before = eps.len();
            eps.retain(|_, e| match e.orphaned_at {
                Some(t) => now.saturating_duration_since(t) < grace,
                None => true,
            });
            if eps.len() != before {
                changed.push(key.clone());
            }
            !eps.is_empty()
        });
        changed.sort();
        changed
    }

    pub fn endpoints(&self, key: &ServiceKey) -> Option<&BTreeMap<SocketAddr, Entry>> {
        self.services.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// Endpoints registered across all services, for the metrics gauge.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pay() -> ServiceKey {
        ServiceKey::new("default", "pay")
    }

    fn reg(addr: &str, version: &str) -> Registration {
        Registration {
            address: addr.parse().unwrap(),
            labels: BTreeMap::from([("version".to_owned(), version.to_owned())]),
            identity: None,
        }
    }

    fn addrs(r: &Registry) -> Vec<String> {
        r.endpoints(&pay())
            .map(|m| m.keys().map(|a| a.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn endpoint_stays_for_the_grace_then_goes() {
        let grace = Duration::from_secs(1);
        let mut r = Registry::new(grace);
        let t0 = Instant::now();
        assert!(r.register(&pay(), reg("10.0.0.1:4143", "v1")));
        assert!(r.register(&pay(), reg("10.0.0.2:4143", "v1")));
        let deadline = r
            .release(&pay(), "10.0.0.1:4143".parse().unwrap(), t0)
            .unwrap();
        assert_eq!(deadline, t0 + grace);
        assert!(r.expire(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(addrs(&r).len(), 2, "still there within the grace");
        assert_eq!(r.expire(deadline), vec![pay()]);
        assert_eq!(addrs(&r), vec!["10.0.0.2:4143"]);
    }

    #[test]
    fn reconnect_within_the_grace_keeps_the_endpoint() {
        let grace = Duration::from_secs(1);
        let mut r = Registry::new(grace);
        let t0 = Instant::now();
        r.register(&pay(), reg("10.0.0.1:4143", "v1"));
        r.release(&pay(), "10.0.0.1:4143".parse().unwrap(), t0);
        // Same labels: callers see no change, so nobody gets a push.
        assert!(!r.register(&pay(), reg("10.0.0.1:4143", "v1")));
        assert!(r.expire(t0 + grace * 5).is_empty());
        assert_eq!(addrs(&r), vec!["10.0.0.1:4143"]);
    }

    #[test]
    fn endpoint_lives_while_any_stream_holds_it() {
        let mut r = Registry::new(Duration::ZERO);
        let t0 = Instant::now();
        let a = "10.0.0.1:4143".parse().unwrap();
        r.register(&pay(), reg("10.0.0.1:4143", "v1"));
        // A restarted sidecar re-registers before its old stream is noticed gone.
        assert!(
            r.register(&pay(), reg("10.0.0.1:4143", "v2")),
            "labels changed"
        );
        assert_eq!(r.release(&pay(), a, t0), None);
        assert!(r.expire(t0).is_empty());
        assert!(r.release(&pay(), a, t0).is_some());
        assert_eq!(r.expire(t0), vec![pay()]);
        assert!(
            r.endpoints(&pay()).is_none(),
            "an empty service is forgotten"
        );
        assert_eq!(r.endpoint_count(), 0);
    }

    #[test]
    fn releasing_unknown_endpoints_is_harmless() {
        let mut r = Registry::new(Duration::from_secs(1));
        assert_eq!(
            r.release(&pay(), "10.0.0.9:1".parse().unwrap(), Instant::now()),
            None
        );
    }
}
