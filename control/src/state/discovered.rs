//! Services from a discovery source entering the state: each batch is laid
//! over the directory's config ([`crate::discovery::Overlay`]), only the
//! touched services' views are recomputed, and only their watchers woken —
//! as a registration does, and without a new config version (that counts
//! directory generations).

use std::collections::BTreeSet;
use std::time::Instant;

use super::{lock, Mesh};
use crate::config::ServiceKey;
use crate::discovery::Discovered;
use crate::snapshot;

impl Mesh {
    /// Sets discovered services (`None`: gone from the source). Returns how
    /// many services' views changed.
    pub fn set_discovered(
        &self,
        changes: Vec<(ServiceKey, Option<Discovered>)>,
        since: Instant,
    ) -> usize {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let mut touched = Vec::new();
        for (key, d) in changes {
            if inner.discovered.set(&key, d, &mut inner.config) {
                touched.push(key);
            }
        }
        if touched.is_empty() {
            return 0;
        }
        let changed = snapshot::refresh(&mut inner.views, &touched, &inner.config, &inner.registry);
        inner.index.update(&inner.views, &changed);
        let affected = inner.interest.affected(&changed, &BTreeSet::new());
        for id in &affected {
            if let Some(e) = inner.subscribers.get(id) {
                e.sub.wake(since);
            }
        }
        let m = &self.metrics.discovery;
        m.services.set(inner.discovered.len() as i64);
        m.endpoints.set(inner.discovered.endpoint_count() as i64);
        tracing::info!(
            services_touched = touched.len(),
            views_changed = changed.len(),
            subscribers_affected = affected.len(),
            discovered_services = inner.discovered.len(),
            "discovered services applied"
        );
        changed.len()
    }

    /// The keys of every discovered service in force.
    pub fn discovered_keys(&self) -> BTreeSet<ServiceKey> {
        lock(&self.inner).discovered.keys().cloned().collect()
    }
}

impl crate::discovery::Sink for Mesh {
    fn set_discovered(
        &self,
        changes: Vec<(ServiceKey, Option<Discovered>)>,
        since: Instant,
    ) -> usize {
        Mesh::set_discovered(self, changes, since)
    }

    fn discovered_keys(&self) -> BTreeSet<ServiceKey> {
        Mesh::discovered_keys(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{parse_files_with, LoadOptions};
    use crate::discovery::{DiscoveredEndpoint, DiscoveredPort};
    use crate::metrics::Metrics;
    use crate::state::{Subscription, Workload};

    /// A TrafficPolicy for `pay`, which only the cluster declares.
    const POLICY: &str = "\
apiVersion: tern.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: pay}
spec: {service: pay, loadBalancer: ROUND_ROBIN}
";

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    fn pay(ips: &[&str]) -> Discovered {
        Discovered {
            virtual_ips: vec!["10.96.0.20".parse().unwrap()],
            ports: vec![DiscoveredPort {
                name: None,
                port: 50051,
                target_port: Some(50051),
            }],
            endpoints: ips
                .iter()
                .map(|ip| DiscoveredEndpoint {
                    address: format!("{ip}:4143").parse().unwrap(),
                    labels: Default::default(),
                    identity: Some("spiffe://cluster.local/ns/default/sa/pay".into()),
                    source: "EndpointSlice default/pay".into(),
                    target_ports: Default::default(),
                })
                .collect(),
            http: false,
        }
    }

    fn subscribe(m: &Arc<Mesh>, calls: &str) -> Subscription {
        let w = Workload {
            key: key("client"),
            identity: None,
            address: None,
            labels: Default::default(),
            peer: None,
            all_services: false,
            admin: None,
        };
        m.subscribe(w, [key(calls)].into()).unwrap()
    }

    fn woken(s: &mut Subscription) -> bool {
        let w = s.woken.has_changed().unwrap();
        s.woken.borrow_and_update();
        w
    }

    #[tokio::test]
    async fn discovered_services_wake_only_their_watchers_and_take_the_directorys_policy() {
        let options = LoadOptions {
            services_elsewhere: true,
        };
        let config =
            parse_files_with(&[(PathBuf::from("p.yaml"), POLICY.to_owned())], options).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let m = Mesh::new(config.clone(), Duration::from_secs(1), Arc::clone(&metrics));
        let mut on_pay = subscribe(&m, "pay");
        let mut on_other = subscribe(&m, "inventory");
        woken(&mut on_pay);
        woken(&mut on_other);
        assert!(m.build(on_pay.subscriber.id).unwrap().services.is_empty());

        let now = Instant::now();
        assert_eq!(
            m.set_discovered(vec![(key("pay"), Some(pay(&["10.1.0.1"])))], now),
            1
        );
        assert!(woken(&mut on_pay));
        assert!(
            !woken(&mut on_other),
            "a change to pay is nothing to inventory's caller"
        );
        let built = m.build(on_pay.subscriber.id).unwrap();
        let view = &built.services[0].message;
        assert_eq!(view.virtual_ip, "10.96.0.20");
        assert!(view.declared);
        assert_eq!(view.endpoints[0].address, "10.1.0.1:4143");
        let traffic = view.traffic.as_ref().unwrap();
        assert_eq!(traffic.name, "pay", "the directory's TrafficPolicy applies");
        assert_eq!(metrics.discovery.services.get(), 1);
        assert_eq!(metrics.discovery.endpoints.get(), 1);

        // The same again: nothing to push.
        assert_eq!(
            m.set_discovered(vec![(key("pay"), Some(pay(&["10.1.0.1"])))], now),
            0
        );
        assert!(!woken(&mut on_pay));
        // A directory reload keeps the discovered service (and bumps the version).
        let before = m.config_version();
        let mut reloaded = config;
        reloaded.traffic.clear();
        assert_eq!(m.apply_config(reloaded, now), Some(before + 1));
        assert!(woken(&mut on_pay));
        let built = m.build(on_pay.subscriber.id).unwrap();
        assert_eq!(built.services[0].message.endpoints.len(), 1);
        // Gone from the cluster: gone from the snapshot.
        m.set_discovered(vec![(key("pay"), None)], now);
        assert!(woken(&mut on_pay));
        assert!(m.build(on_pay.subscriber.id).unwrap().services.is_empty());
        assert!(m.discovered_keys().is_empty());
    }
}
