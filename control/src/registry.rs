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

/// Who holds an address that another identity tried to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub service: ServiceKey,
    /// `None`: a workload without identity (a plaintext subscriber).
    pub identity: Option<String>,
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
    /// An address that another identity holds (for any service, draining or
    /// not) is refused with its holder: overwriting it would hand its
    /// callers to someone else, or downgrade them to plaintext.
    pub fn register(&mut self, key: &ServiceKey, r: Registration) -> Result<bool, Held> {
        if let Some(held) = self.holder(r.address, r.identity.as_deref()) {
            return Err(held);
        }
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
                Ok(changed)
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
                Ok(true)
            }
        }
    }

    /// The registration of `address` by an identity other than `identity`.
    /// A scan over the services: registrations are rare next to snapshots.
    fn holder(&self, address: SocketAddr, identity: Option<&str>) -> Option<Held> {
        self.services.iter().find_map(|(key, eps)| {
            let e = eps.get(&address)?;
            (e.identity.as_deref() != identity).then(|| Held {
                service: key.clone(),
                identity: e.identity.clone(),
            })
        })
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
        assert!(r.register(&pay(), reg("10.0.0.1:4143", "v1")).unwrap());
        assert!(r.register(&pay(), reg("10.0.0.2:4143", "v1")).unwrap());
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
        r.register(&pay(), reg("10.0.0.1:4143", "v1")).unwrap();
        r.release(&pay(), "10.0.0.1:4143".parse().unwrap(), t0);
        // Same labels: callers see no change, so nobody gets a push.
        assert!(!r.register(&pay(), reg("10.0.0.1:4143", "v1")).unwrap());
        assert!(r.expire(t0 + grace * 5).is_empty());
        assert_eq!(addrs(&r), vec!["10.0.0.1:4143"]);
    }

    #[test]
    fn endpoint_lives_while_any_stream_holds_it() {
        let mut r = Registry::new(Duration::ZERO);
        let t0 = Instant::now();
        let a = "10.0.0.1:4143".parse().unwrap();
        r.register(&pay(), reg("10.0.0.1:4143", "v1")).unwrap();
        // A restarted sidecar re-registers before its old stream is noticed gone.
        assert!(
            r.register(&pay(), reg("10.0.0.1:4143", "v2")).unwrap(),
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
    fn another_identity_cannot_take_a_held_address() {
        let mut r = Registry::new(Duration::from_secs(1));
        let pay_id = Some("spiffe://cluster.local/ns/default/sa/pay".to_owned());
        let held = Registration {
            identity: pay_id.clone(),
            ..reg("10.0.0.1:4143", "v1")
        };
        r.register(&pay(), held.clone()).unwrap();
        let want = Held {
            service: pay(),
            identity: pay_id.clone(),
        };
        // Without identity (a downgrade to plaintext), or with another one,
        // for the same service or another.
        assert_eq!(
            r.register(&pay(), reg("10.0.0.1:4143", "v1")),
            Err(want.clone())
        );
        let order = ServiceKey::new("default", "order");
        let other = Registration {
            identity: Some("spiffe://cluster.local/ns/default/sa/order".to_owned()),
            ..reg("10.0.0.1:4143", "v1")
        };
        assert_eq!(r.register(&order, other.clone()), Err(want.clone()));
        // Still held while draining; the holder itself may come back.
        let t0 = Instant::now();
        r.release(&pay(), held.address, t0);
        assert_eq!(r.register(&order, other.clone()), Err(want));
        assert_eq!(r.register(&pay(), held), Ok(false));
        let e = &r.endpoints(&pay()).unwrap()[&"10.0.0.1:4143".parse().unwrap()];
        assert_eq!(e.identity, pay_id);
        // Once it is gone, the address is free.
        r.release(&pay(), "10.0.0.1:4143".parse().unwrap(), t0);
        r.expire(t0 + Duration::from_secs(1));
        assert_eq!(r.register(&order, other), Ok(true));
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
