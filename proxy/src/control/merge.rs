//! Keeping track of what is in force when snapshots are incremental: each
//! applied one is merged into the complete picture, service by service.

use tern_proto::control::v1 as pb;

use super::{Applied, Rejected};

/// The complete snapshot in force after `snap` was applied (or rejected
/// with `rejected`) on top of `last`.
pub fn in_force(
    last: Option<pb::Snapshot>,
    snap: pb::Snapshot,
    rejected: Option<&Rejected>,
) -> Option<pb::Snapshot> {
    if rejected.is_some_and(|r| r.whole) {
        return last;
    }
    if !snap.incremental {
        return Some(snap);
    }
    let Some(mut current) = last else {
        // Never sent first on a stream; nothing to merge into.
        return None;
    };
    let key = |s: &pb::ServiceConfig| format!("{}.{}", s.name, s.namespace);
    let kept = |k: &str| rejected.is_some_and(|r| r.services.iter().any(|s| s == k));
    current.services.retain(|s| {
        let k = key(s);
        !snap.removed.contains(&k) && (kept(&k) || !snap.services.iter().any(|n| key(n) == k))
    });
    current
        .services
        .extend(snap.services.into_iter().filter(|s| !kept(&key(s))));
    current
        .services
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    if snap.inbound.is_some() && !rejected.is_some_and(|r| r.inbound) {
        current.inbound = snap.inbound;
    }
    current.version = snap.version;
    current.config_version = snap.config_version;
    Some(current)
}

/// The services `/config` lists after an incremental snapshot.
pub fn listed(before: Option<&Applied>, changed: Vec<String>, removed: &[String]) -> Vec<String> {
    let mut all: Vec<String> = before
        .map(|a| a.services.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !removed.contains(s))
        .chain(changed)
        .collect();
    all.sort();
    all.dedup();
    all
}
