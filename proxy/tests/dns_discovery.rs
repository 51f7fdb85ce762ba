//! DNS discovery against a real dnsmasq: record sets are served from an `--addn-hosts` file
//! that the test rewrites and reloads with SIGHUP, with a 1s TTL so changes are seen quickly.
//!
//! Without dnsmasq the tests are skipped loudly, except under `CI=true` where they fail: CI
//! must exercise the real resolver path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tern_proxy::discovery::dns::{resolver, spawn_watch, Nameserver};
use tern_proxy::discovery::{Endpoint, EndpointSet};
use tern_test_support::dnsmasq::{dnsmasq_binary, Dnsmasq, TTL};
use tern_test_support::TestDir;
use tokio::sync::watch;

/// A dnsmasq and the directory of its hosts file and log, removed after it stops.
struct Dns {
    dnsmasq: Dnsmasq,
    _dir: TestDir,
}

impl std::ops::Deref for Dns {
    type Target = Dnsmasq;
    fn deref(&self) -> &Dnsmasq {
        &self.dnsmasq
    }
}

/// Starts dnsmasq, or returns `None` after a loud skip notice when it is not installed.
async fn dnsmasq(name: &str, hosts: &str, extra: &[&str]) -> Option<Dns> {
    let Some(binary) = dnsmasq_binary() else {
        tern_test_support::missing(&format!("dnsmasq not installed ({name})")).unwrap();
        return None;
    };
    let dir = TestDir::new(&format!("dns-{name}")).unwrap();
    let dnsmasq = Dnsmasq::start(&binary, dir.path(), hosts, extra)
        .await
        .unwrap();
    Some(Dns { dnsmasq, _dir: dir })
}

fn endpoints(addrs: &[&str]) -> Vec<Endpoint> {
    addrs
        .iter()
        .map(|a| Endpoint::new(a.parse().unwrap()))
        .collect()
}

/// Waits until the published set equals `want`, failing with the last set seen after `within`.
async fn wait_for(rx: &mut watch::Receiver<EndpointSet>, want: &[Endpoint], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let current = rx.borrow_and_update().clone();
        if current.as_slice() == want {
            return;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!("after {within:?} the set is {current:?}, want {want:?}");
        }
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[tokio::test]
async fn a_records_are_published_and_follow_changes() {
    init_tracing();
    let two = "127.0.0.11 pay.mesh.test\n127.0.0.12 pay.mesh.test\n";
    let Some(dns) = dnsmasq("a-records", two, &[]).await else {
        return;
    };
    let resolver = resolver(&Nameserver::Addr(dns.addr)).unwrap();
    let (tx, mut rx) = watch::channel(EndpointSet::default());
    let task = spawn_watch(resolver, "pay".into(), "pay.mesh.test".into(), 8080, tx);

    let want = endpoints(&["127.0.0.11:8080", "127.0.0.12:8080"]);
    wait_for(&mut rx, &want, Duration::from_secs(5)).await;

    dns.set_hosts(&format!("{two}127.0.0.13 pay.mesh.test\n"))
        .unwrap();
    let want = endpoints(&["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"]);
    wait_for(&mut rx, &want, TTL + Duration::from_secs(1)).await;

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("watch task ends once its receivers are gone")
        .unwrap();
}

#[tokio::test]
async fn srv_records_and_vanished_names() {
    init_tracing();
    let hosts = "127.0.0.21 api.mesh.test\nfd00::21 api.mesh.test\n127.0.0.31 gone.mesh.test\n";
    let srv = "--srv-host=_grpc._tcp.api.mesh.test,api.mesh.test,9443";
    let Some(dns) = dnsmasq("srv", hosts, &[srv]).await else {
        return;
    };
    let resolver = resolver(&Nameserver::Addr(dns.addr)).unwrap();

    // SRV: A and AAAA of the target, on the SRV port rather than the given one.
    let (srv_tx, mut srv_rx) = watch::channel(EndpointSet::default());
    let srv_name = "_grpc._tcp.api.mesh.test.".to_owned();
    let _srv_task = spawn_watch(resolver.clone(), "api".into(), srv_name, 1, srv_tx);
    let want = endpoints(&["127.0.0.21:9443", "[fd00::21]:9443"]);
    wait_for(&mut srv_rx, &want, Duration::from_secs(5)).await;

    // A name that stops existing (NXDOMAIN) empties the set rather than keeping stale endpoints.
    let (gone_tx, mut gone_rx) = watch::channel(EndpointSet::default());
    let _gone_task = spawn_watch(
        resolver,
        "gone".into(),
        "gone.mesh.test".into(),
        80,
        gone_tx,
    );
    wait_for(
        &mut gone_rx,
        &endpoints(&["127.0.0.31:80"]),
        Duration::from_secs(5),
    )
    .await;
    dns.set_hosts("127.0.0.21 api.mesh.test\nfd00::21 api.mesh.test\n")
        .unwrap();
    wait_for(&mut gone_rx, &[], TTL + Duration::from_secs(1)).await;
    assert_eq!(*srv_rx.borrow(), Arc::new(want));
}
