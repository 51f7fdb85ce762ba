//! Incremental snapshots: what changed between the snapshot a sidecar was
//! last sent and the one due now, for sidecars that announced they apply
//! them (`Hello.incremental`).
//!
//! Views are shared and immutable, so "changed" is decided by pointer: a
//! service whose view kept its `Arc` is unchanged and not sent again.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tern_proto::control::v1 as pb;

use super::{Built, View};

impl Built {
    /// The incremental snapshot from `last` (what the sidecar has) to this
    /// one: the services whose view changed or appeared, those gone, and
    /// the inbound policy if it changed.
    pub fn encode_delta(&self, version: u64, last: &Built) -> Bytes {
        let before: HashMap<(&str, &str), &Arc<View<pb::ServiceConfig>>> =
            last.services.iter().map(|s| (key(s), s)).collect();
        let changed: Vec<&Arc<View<pb::ServiceConfig>>> = self
            .services
            .iter()
            .filter(|s| before.get(&key(s)).is_none_or(|b| !Arc::ptr_eq(b, s)))
            .collect();
        let now: HashMap<(&str, &str), ()> = self.services.iter().map(|s| (key(s), ())).collect();
        let removed: Vec<String> = last
            .services
            .iter()
            .filter(|s| !now.contains_key(&key(s)))
            .map(|s| format!("{}.{}", s.name, s.namespace))
            .collect();
        let inbound = (!Arc::ptr_eq(&self.inbound, &last.inbound)).then_some(&self.inbound.encoded);
        let services = changed.iter().map(|s| &s.encoded);
        self.encode_with(version, services, inbound, Some(&removed))
    }
}

fn key(s: &View<pb::ServiceConfig>) -> (&str, &str) {
    (s.namespace.as_str(), s.name.as_str())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use prost::Message;

    use super::*;

    fn view(name: &str, endpoint: &str) -> Arc<View<pb::ServiceConfig>> {
        Arc::new(View::new(pb::ServiceConfig {
            name: name.into(),
            namespace: "default".into(),
            endpoints: vec![pb::Endpoint {
                address: endpoint.into(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    fn built(
        services: Vec<Arc<View<pb::ServiceConfig>>>,
        inbound: &Arc<View<pb::InboundPolicy>>,
    ) -> Built {
        Built {
            config_version: 3,
            services,
            inbound: Arc::clone(inbound),
            lookups: Vec::new(),
        }
    }

    #[test]
    fn only_changed_services_and_removals_are_sent() {
        let inbound = Arc::new(View::new(pb::InboundPolicy::default()));
        let (a, b, c) = (
            view("a", "10.0.0.1:1"),
            view("b", "10.0.0.2:1"),
            view("c", "10.0.0.3:1"),
        );
        let last = built(
            vec![Arc::clone(&a), Arc::clone(&b), Arc::clone(&c)],
            &inbound,
        );
        let b2 = view("b", "10.0.0.9:1");
        let d = view("d", "10.0.0.4:1");
        let now = built(vec![a, b2, d], &inbound);
        let delta = pb::Snapshot::decode(now.encode_delta(42, &last)).unwrap();
        assert!(delta.incremental);
        assert_eq!(delta.version, 42);
        assert_eq!(delta.config_version, 3);
        let names: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(delta.services[0].endpoints[0].address, "10.0.0.9:1");
        assert_eq!(delta.removed, ["c.default"]);
        assert!(delta.inbound.is_none(), "unchanged inbound policy sent");
        // A complete one of the same content carries everything.
        let full = pb::Snapshot::decode(now.encode(42)).unwrap();
        assert!(!full.incremental && full.removed.is_empty());
        assert_eq!(full.services.len(), 3);
        assert!(full.inbound.is_some());
        // An endpoint change to one of a thousand services costs one service.
        let many: Vec<_> = (0..1000)
            .map(|i| view(&format!("s{i}"), "10.1.0.1:1"))
            .collect();
        let mut changed = many.clone();
        changed[500] = view("s500", "10.1.0.2:1");
        let (last, now) = (built(many, &inbound), built(changed, &inbound));
        let delta = now.encode_delta(43, &last);
        assert!(
            delta.len() * 100 < now.encode(43).len(),
            "{} bytes",
            delta.len()
        );
    }
}
