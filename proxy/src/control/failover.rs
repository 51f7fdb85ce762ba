//! Which control-plane replica to subscribe to.
//!
//! With Kubernetes discovery tern-control runs as several replicas that agree
//! on everything a sidecar is sent, so any one of them will do. At each
//! (re)connect every configured host is resolved again (a headless Service
//! name gives the replicas that are up now) and the addresses are tried in
//! turn until one answers: each sidecar starts at its own random place in the
//! sorted list, so a fleet spreads over the replicas, and the replica whose
//! stream just ended is tried last. Reconnect pacing is the caller's
//! (tern-backoff in `Client::run`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tonic::transport::Channel;

use super::channel;
use crate::config::control_plane::ControlPlanes;
use crate::identity::Identity;

pub struct Replicas {
    planes: ControlPlanes,
    /// Where in the sorted address list this sidecar starts.
    offset: usize,
    /// The replica of the last subscription.
    last: Mutex<Option<SocketAddr>>,
}

impl Replicas {
    pub fn new(planes: ControlPlanes) -> Self {
        Self {
            planes,
            offset: fastrand::usize(..),
            last: Mutex::new(None),
        }
    }

    pub fn planes(&self) -> &ControlPlanes {
        &self.planes
    }

    /// A channel to the first replica that accepts one, and its address.
    pub async fn connect(
        &self,
        identity: Option<&Arc<Identity>>,
    ) -> Result<(Channel, SocketAddr), String> {
        let addrs = resolve(&self.planes).await?;
        let mut failures = Vec::new();
        for addr in order(addrs, self.offset, self.last()) {
            match channel::connect(addr, self.planes.tls(), identity).await {
                Ok(c) => return Ok((c, addr)),
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
        }
        Err(failures.join("; "))
    }

    /// Records a subscription to `addr`; true when an earlier one was to
    /// another replica (a failover).
    pub fn subscribed(&self, addr: SocketAddr) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.replace(addr).is_some_and(|before| before != addr)
    }

    fn last(&self) -> Option<SocketAddr> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every address of every configured host, sorted, once each.
pub async fn resolve(planes: &ControlPlanes) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = Vec::new();
    let mut failures = Vec::new();
    for (host, port) in planes.hosts() {
        match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(found) => addrs.extend(found),
            Err(e) => failures.push(format!("resolving {host}: {e}")),
        }
    }
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(failures.join("; "));
    }
    Ok(addrs)
}

/// `addrs` rotated to start at `offset`, with `last` (if among them) moved
/// to the end.
fn order(mut addrs: Vec<SocketAddr>, offset: usize, last: Option<SocketAddr>) -> Vec<SocketAddr> {
    if !addrs.is_empty() {
        let n = offset % addrs.len();
        addrs.rotate_left(n);
    }
    if let Some(pos) = last.and_then(|l| addrs.iter().position(|a| *a == l)) {
        let a = addrs.remove(pos);
        addrs.push(a);
    }
    addrs
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn each_sidecar_starts_at_its_own_place_and_tries_the_lost_replica_last() {
        let all = addrs(&["10.0.0.1:8090", "10.0.0.2:8090", "10.0.0.3:8090"]);
        assert_eq!(order(all.clone(), 4, None), [all[1], all[2], all[0]]);
        assert_eq!(
            order(all.clone(), 4, Some(all[2])),
            [all[1], all[0], all[2]]
        );
        // A lost replica no longer listed changes nothing.
        let gone = "10.0.0.9:8090".parse().unwrap();
        assert_eq!(order(all.clone(), 0, Some(gone)), all);
        assert!(order(Vec::new(), 3, Some(gone)).is_empty());
    }

    #[tokio::test]
    async fn names_and_lists_resolve_to_every_address_once() {
        let planes = ControlPlanes::parse(
            "http://localhost:8090,http://127.0.0.1:8090,http://127.0.0.2:8090",
        )
        .unwrap();
        let found = resolve(&planes).await.unwrap();
        assert!(found.contains(&"127.0.0.1:8090".parse().unwrap()));
        assert!(found.contains(&"127.0.0.2:8090".parse().unwrap()));
        let v4: Vec<_> = found.iter().filter(|a| a.is_ipv4()).collect();
        assert_eq!(v4.len(), 2, "{found:?}");
        let none = ControlPlanes::parse("http://no-such-host.invalid:8090").unwrap();
        assert!(resolve(&none).await.unwrap_err().contains("no-such-host"));
    }

    #[test]
    fn a_subscription_elsewhere_is_a_failover() {
        let r = Replicas::new(ControlPlanes::parse("http://a:1").unwrap());
        let (a, b) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
        assert!(!r.subscribed(a));
        assert!(!r.subscribed(a));
        assert!(r.subscribed(b));
    }
}
