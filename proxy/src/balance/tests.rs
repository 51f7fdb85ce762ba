#![allow(clippy::unwrap_used)]
use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::discovery::Endpoint;

fn params() -> ClientParams {
    ClientParams {
        client: crate::config::limits::ClientLimits {
            connect_timeout: Duration::from_secs(1),
            max_header_list_size: 65536,
        },
        open_connections: IntGauge::new("c", "c").unwrap(),
        oversized: IntCounter::new("o", "o").unwrap(),
        endpoints_gauge: None,
        accrual: AccrualPolicy {
            consecutive_failures: 0,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            min_available: 1,
        },
        ejections: IntCounter::new("x", "x").unwrap(),
        ejected: IntGauge::new("y", "y").unwrap(),
        identity: None,
    }
}

fn ep(port: u16, version: &str) -> Endpoint {
    let mut e = Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)));
    e.labels.insert("version".into(), version.into());
    e
}

fn set(ports: &[u16]) -> EndpointSet {
    Arc::new(ports.iter().map(|p| ep(*p, "v1")).collect())
}

fn v(version: &str) -> Labels {
    [("version".to_string(), version.to_string())]
        .into_iter()
        .collect()
}

async fn settle(b: &Balancer, n: usize) {
    for _ in 0..100 {
        if b.endpoint_addrs().len() == n {
            return;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn round_robin_is_even_and_follows_updates() {
    let (tx, rx) = watch::channel(set(&[1, 2, 3]));
    let b = Balancer::spawn("pay".into(), rx, params());
    let mut counts = HashMap::new();
    for _ in 0..999 {
        *counts
            .entry(b.pick(None, None).unwrap().addr().port())
            .or_insert(0) += 1;
    }
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![333; 3]);

    let kept = b.pick(None, None).unwrap();
    tx.send(set(&[2, 3])).unwrap();
    settle(&b, 2).await;
    assert_eq!(b.endpoint_addrs().len(), 2);
    for _ in 0..10 {
        assert_ne!(b.pick(None, None).unwrap().addr().port(), 1);
    }
    if kept.addr().port() != 1 {
        // The client of an endpoint that stayed is the same object (pooled connections survive).
        let again = (0..4)
            .map(|_| b.pick(None, None).unwrap())
            .find(|c| c.addr() == kept.addr())
            .unwrap();
        assert!(Arc::ptr_eq(&again, &kept));
    }
    tx.send(set(&[])).unwrap();
    settle(&b, 0).await;
    assert!(matches!(
        b.pick(None, None),
        Err(ProxyError::NoEndpoints { .. })
    ));
}

#[tokio::test]
async fn subsets_select_by_labels_and_avoid_is_a_preference() {
    let (_tx, rx) = watch::channel(Arc::new(vec![ep(1, "v1"), ep(2, "v1"), ep(3, "v2")]));
    let b = Balancer::spawn("pay".into(), rx, params());
    b.set_subsets(vec![v("v1"), v("v2")]);
    for _ in 0..10 {
        assert_eq!(b.pick(Some(&v("v2")), None).unwrap().addr().port(), 3);
        assert_ne!(b.pick(Some(&v("v1")), None).unwrap().addr().port(), 3);
    }
    // Avoiding the only member still returns it (fail open).
    let only = SocketAddr::from(([127, 0, 0, 1], 3));
    assert_eq!(b.pick(Some(&v("v2")), Some(only)).unwrap().addr(), only);
    b.set_subsets(vec![v("v3")]);
    assert!(b.pick(Some(&v("v3")), None).is_err());
}

#[tokio::test]
async fn p2c_prefers_the_faster_and_less_loaded_endpoint() {
    let (_tx, rx) = watch::channel(set(&[1, 2]));
    let b = Balancer::spawn("pay".into(), rx, params());
    b.set_algorithm(Algorithm::P2cEwma);
    let slow = b.pick(None, None).unwrap();
    let fast = (0..10)
        .map(|_| b.pick(None, None).unwrap())
        .find(|c| c.addr() != slow.addr())
        .unwrap();
    slow.load.observe(Duration::from_millis(50));
    fast.load.observe(Duration::from_micros(500));
    for _ in 0..20 {
        assert_eq!(b.pick(None, None).unwrap().addr(), fast.addr());
    }
    b.set_algorithm(Algorithm::LeastRequest);
    let _busy: Vec<_> = (0..3).map(|_| start_request(&fast)).collect();
    for _ in 0..20 {
        assert_eq!(b.pick(None, None).unwrap().addr(), slow.addr());
    }
}
