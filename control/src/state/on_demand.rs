//! On-demand discovery: a sidecar asks which service is behind an address
//! or a name it does not know, and drops services it stopped using.
//!
//! A service found is watched from then on, as if named in a Watch (so
//! admission is the same: a lookup may add the one service the caller dials
//! or names). The answer rides in the subscriber's next snapshot, which also
//! lists the service, so the sidecar learns both at once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Instant;

use tern_proto::control::v1 as pb;

use super::{lock, Mesh};
use crate::config::ServiceKey;
use crate::snapshot;

/// What a Lookup asks for, checked.
#[derive(Clone, Debug)]
pub enum Query {
    Address(SocketAddr),
    Name(String),
}

impl Mesh {
    /// Answers a lookup in `id`'s next snapshot. Returns false, answering
    /// nothing, when watching the service found would pass `limit`.
    pub fn lookup(&self, id: u64, lookup_id: u64, query: &Query, limit: usize) -> bool {
        let now = Instant::now();
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let Some(entry) = inner.subscribers.get_mut(&id) else {
            return true;
        };
        let own = &entry.sub.workload.key.namespace;
        let found: Option<ServiceKey> = match query {
            Query::Address(a) => inner.index.by_address(*a).cloned(),
            Query::Name(n) => inner.index.by_dns_name(n).cloned().or_else(|| {
                let name = snapshot::normalize_name(n);
                let name = name.strip_suffix(".cluster.local").unwrap_or(&name);
                snapshot::target(name, own)
                    .ok()
                    .filter(|k| inner.views.contains_key(k))
            }),
        };
        let (outcome, service) = match (&found, query) {
            (Some(k), _) => (
                pb::LookupOutcome::Found,
                format!("{}.{}", k.name, k.namespace),
            ),
            (None, Query::Address(_)) => (pb::LookupOutcome::OutsideMesh, String::new()),
            (None, Query::Name(_)) => (pb::LookupOutcome::Unknown, String::new()),
        };
        if let Some(k) = found {
            if !entry.watching.contains(&k) {
                if entry.watching.len() >= limit {
                    return false;
                }
                inner.interest.watch(id, &k);
                entry.watching.insert(k);
            }
        }
        let result = match outcome {
            pb::LookupOutcome::Found => "found",
            pb::LookupOutcome::OutsideMesh => "outside_mesh",
            _ => "unknown",
        };
        self.metrics.lookups.with_label_values(&[result]).inc();
        tracing::debug!(
            id,
            lookup = lookup_id,
            ?query,
            result,
            service,
            "lookup answered"
        );
        entry.sub.answer(
            pb::LookupResult {
                id: lookup_id,
                outcome: outcome as i32,
                service,
            },
            now,
        );
        true
    }

    /// Stops watching `keys` for `id` and wakes it if that drops any.
    pub fn forget(&self, id: u64, keys: &BTreeSet<ServiceKey>) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let Some(entry) = inner.subscribers.get_mut(&id) else {
            return;
        };
        let gone: Vec<ServiceKey> = keys.intersection(&entry.watching).cloned().collect();
        if gone.is_empty() {
            return;
        }
        for k in &gone {
            entry.watching.remove(k);
        }
        // Only the watcher entries: the subscriber still owns its service.
        inner.interest.unwatch(id, &gone);
        tracing::debug!(id, services = ?gone.iter().map(ToString::to_string).collect::<Vec<_>>(), "services forgotten");
        entry.sub.wake(Instant::now());
    }
}
