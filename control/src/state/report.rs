//! The `/state` document, built from the state under its lock: what the admin
//! listener serves, kept beside the state it describes so the state needs
//! nothing from the admin side.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::Subscriber;
use crate::config::{ConfigErrors, MeshConfig, ServiceKey};
use crate::registry::Registry;

/// The `/state` document: config version, services with their endpoints
/// (and where each came from), and subscribers with what they were sent and
/// acknowledged.
pub(super) fn state_json<'a>(
    config: &MeshConfig,
    config_version: u64,
    last_error: Option<&ConfigErrors>,
    registry: &Registry,
    subscribers: impl Iterator<Item = (&'a Subscriber, &'a BTreeSet<ServiceKey>)>,
) -> Value {
    let keys: BTreeSet<&ServiceKey> = config
        .services
        .keys()
        .chain(config.endpoints.keys())
        .chain(registry.services())
        .collect();
    let services: Vec<Value> = keys
        .into_iter()
        .map(|key| {
            let svc = config.services.get(key);
            let mut endpoints: BTreeMap<String, Value> = BTreeMap::new();
            for e in config.endpoints.get(key).into_iter().flatten() {
                endpoints.insert(
                    e.address.to_string(),
                    json!({
                        "address": e.address.to_string(),
                        "labels": e.labels,
                        "identity": e.identity,
                        "source": "static",
                        "document": e.source,
                    }),
                );
            }
            for (addr, e) in registry.endpoints(key).into_iter().flatten() {
                endpoints.insert(
                    addr.to_string(),
                    json!({
                        "address": addr.to_string(),
                        "labels": e.labels,
                        "identity": e.identity,
                        "source": "registered",
                        "streams": e.streams,
                        // Its last stream ended; it goes when the grace is over.
                        "draining": e.orphaned_at.is_some(),
                    }),
                );
            }
            json!({
                "name": key.name,
                "namespace": key.namespace,
                "declared": svc.is_some(),
                "protocol": svc.map(|s| s.protocol),
                "ports": svc.map(|s| &s.ports),
                "virtual_ip": svc.and_then(|s| s.virtual_ip),
                "identity": svc.and_then(|s| s.identity.as_ref()),
                "dns_name": svc.and_then(|s| s.dns_name.as_ref()),
                "traffic_policy": config.traffic.get(key).map(|p| &p.name),
                "authorization_policy": config.authorization.get(key).map(|p| &p.name),
                "endpoints": endpoints.into_values().collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut subs: Vec<(&Subscriber, &BTreeSet<ServiceKey>)> = subscribers.collect();
    subs.sort_by_key(|(s, _)| s.id);
    let subscribers: Vec<Value> = subs
        .into_iter()
        .map(|(s, watching)| {
            let w = &s.workload;
            let d = s.delivery();
            json!({
                "id": s.id,
                "service": w.key.name,
                "namespace": w.key.namespace,
                "identity": w.identity,
                "address": w.address,
                "labels": w.labels,
                "peer": w.peer,
                "admin": w.admin,
                "watching": watching.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "sent_version": d.sent_version,
                "acked_version": d.acked_version,
                "nacks": d.nacks,
                "last_nack": d.last_nack,
            })
        })
        .collect();
    json!({
        "config_version": config_version,
        "last_config_error": last_error.map(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "services": services,
        "subscribers": subscribers,
    })
}
