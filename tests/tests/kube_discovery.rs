//! Kubernetes discovery end to end: the real `tern-control --discovery kubernetes` watching
//! Services, EndpointSlices and Pods, its config directory holding no Service at all, and a
//! client subscribed over mTLS (a certificate from tern-control's own CA) that calls `pay`.
//!
//! This machine has no Kubernetes API server, so a stand-in plays it ([`tern_tests::kube_watch`]):
//! real TLS, a kubeconfig naming it (through `KUBECONFIG`), and the list/watch protocol as the
//! API server speaks it — resourceVersions, JSON-lines watch events, bookmarks, 410 Gone that
//! forces a relist, and watches cut mid-stream — serving k8s-openapi-serialized objects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use tern_proto::control::v1 as pb;
use tern_proto::control::v1::control_plane_client::ControlPlaneClient;
use tern_proto::control::v1::sidecar_message::Kind as Msg;
use tern_tests::control::{pay_policy, ConfigDir, Control};
use tern_tests::identity::{certify, mint_token, tls_channel, CONTROL_IDENTITY};
use tern_tests::kube_watch::{Changes, Kind, KubeWatchStandIn};
use tern_tests::{eventually, http1, within, Must, TestDir};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const BEARER: &str = "tern-control-serviceaccount-token";
const ORDER: &str = "spiffe://cluster.local/ns/default/sa/order";
const PAY: &str = "spiffe://cluster.local/ns/default/sa/pay";
/// How long a change may take to reach the subscriber (a relist waits out kube-rs' backoff).
const SETTLE: Duration = Duration::from_secs(15);

fn service(name: &str, ip: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "selector": {"app": name},
            "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"}]}
    }))
    .unwrap()
}

/// A pay pod at `ip`; with the injected `tern-proxy` container when `sidecar`.
fn pod(name: &str, ip: &str, sidecar: bool) -> Pod {
    let mut containers =
        vec![json!({"name": "pay", "ports": [{"name": "grpc", "containerPort": 8080}]})];
    if sidecar {
        containers.push(json!({"name": "tern-proxy", "ports": [
            {"name": "tern-inbound", "containerPort": 4143}, {"name": "tern-admin", "containerPort": 4191}]}));
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "pay", "version": "v1"}},
        "spec": {"serviceAccountName": "pay", "containers": containers},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

/// pay's EndpointSlice listing `pods` (name, ip), all ready.
fn slice(pods: &[(&str, &str)]) -> EndpointSlice {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|(name, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": "default", "name": name}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "pay-x7k2p", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "pay"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

struct Cluster {
    api: KubeWatchStandIn,
    control: Control,
    snapshots: Streaming<pb::Snapshot>,
    last: pb::Snapshot,
    _hello: mpsc::Sender<pb::SidecarMessage>,
    _dir: TestDir,
}

/// The stand-in holding pay (pay-1 with a sidecar, pay-2 without), audit and `bystanders`
/// pods of no service, tern-control on it with only a TrafficPolicy for pay in its directory,
/// and `order` subscribed over mTLS calling pay and audit.
async fn start(label: &str, bystanders: usize) -> Cluster {
    let dir = TestDir::new(label).must();
    let api = KubeWatchStandIn::start(BEARER).await.must();
    let mut objects = Changes::default();
    objects.apply(&service("pay", "10.96.0.20")).unwrap();
    objects.apply(&service("audit", "10.96.0.30")).unwrap();
    objects.apply(&pod("pay-1", "10.1.0.1", true)).unwrap();
    objects.apply(&pod("pay-2", "10.1.0.2", false)).unwrap();
    objects.apply(&pod("pay-3", "10.1.0.3", true)).unwrap();
    objects
        .apply(&slice(&[("pay-1", "10.1.0.1"), ("pay-2", "10.1.0.2")]))
        .unwrap();
    for i in 0..bystanders {
        let ip = format!("10.2.{}.{}", i / 250, i % 250 + 1);
        objects
            .apply(&pod(&format!("batch-{i}"), &ip, false))
            .unwrap();
    }
    api.cut_watches_with(objects);
    let kubeconfig = api
        .write_kubeconfig(&dir.path().join("kubeconfig"), BEARER)
        .must();
    let policy = pay_policy("  loadBalancer: ROUND_ROBIN\n");
    let config = ConfigDir::with_services(dir.path(), &policy).must();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let control = Control::start_with_env(
        dir.path(),
        "tern-control",
        &config,
        any,
        &["--discovery".into(), "kubernetes".into()],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    )
    .await
    .must();
    let (snapshots, last, hello) = subscribe(&control).await;
    Cluster {
        api,
        control,
        snapshots,
        last,
        _hello: hello,
        _dir: dir,
    }
}

/// Subscribes as `order` over mTLS with a certificate from tern-control's CA.
async fn subscribe(
    control: &Control,
) -> (
    Streaming<pb::Snapshot>,
    pb::Snapshot,
    mpsc::Sender<pb::SidecarMessage>,
) {
    let anchors = std::fs::read_to_string(control.trust_anchor()).unwrap();
    let token = mint_token(&control.state_dir, "default", "order").must();
    let (chain, key) = certify(control.grpc, &anchors, CONTROL_IDENTITY, ORDER, &token)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", control.proc.diagnostics()));
    let channel = tls_channel(
        control.grpc,
        &anchors,
        CONTROL_IDENTITY,
        Some((&chain, &key)),
    )
    .await
    .must();
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        service: "order".into(),
        identity: ORDER.into(),
        calls: vec!["pay".into(), "audit.default".into()],
        ..Default::default()
    };
    tx.send(pb::SidecarMessage {
        kind: Some(Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let mut stream = ControlPlaneClient::new(channel)
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = within(SETTLE, stream.message())
        .await
        .must()
        .unwrap()
        .expect("a first snapshot");
    (stream, first, tx)
}

fn find<'a>(s: &'a pb::Snapshot, name: &str) -> Option<&'a pb::ServiceConfig> {
    s.services.iter().find(|c| c.name == name)
}

/// `name`'s endpoints as `address identity` (identity `-` when empty), sorted.
fn endpoints(s: &pb::Snapshot, name: &str) -> Vec<String> {
    let mut out: Vec<String> = find(s, name)
        .map(|c| {
            c.endpoints
                .iter()
                .map(|e| match e.identity.as_str() {
                    "" => format!("{} -", e.address),
                    id => format!("{} {id}", e.address),
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

impl Cluster {
    /// Reads snapshots until `ok` holds for the latest one.
    async fn until(&mut self, what: &str, ok: impl Fn(&pb::Snapshot) -> bool) {
        let deadline = Instant::now() + SETTLE;
        while !ok(&self.last) {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = within(left, self.snapshots.message()).await;
            match next {
                Ok(Ok(Some(s))) => self.last = s,
                other => panic!(
                    "{what}: {other:?}; last snapshot {:#?}\n{}\nrequests: {:#?}",
                    self.last,
                    self.control.proc.diagnostics(),
                    self.api.requests()
                ),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_services_become_mesh_services() {
    // More pods than kube-rs lists in one page (500): the list is paged with `continue`.
    let mut c = start("kube-discovery", 600).await;
    c.until("pay from the cluster", |s| endpoints(s, "pay").len() == 2)
        .await;
    let pay = find(&c.last, "pay").unwrap().clone();
    assert!(pay.declared, "{pay:?}");
    assert_eq!(pay.namespace, "default");
    assert_eq!(pay.virtual_ip, "10.96.0.20");
    let ports: Vec<(String, u32)> = pay.ports.iter().map(|p| (p.name.clone(), p.port)).collect();
    assert_eq!(ports, [("grpc".to_string(), 50051)]);
    // The sidecar pod over mTLS at its inbound port, the other in plaintext at its own port.
    assert_eq!(
        endpoints(&c.last, "pay"),
        [
            format!("10.1.0.1:4143 {PAY}"),
            "10.1.0.2:8080 -".to_string()
        ]
    );
    assert_eq!(
        pay.endpoints[0].labels.get("version").map(String::as_str),
        Some("v1")
    );
    // The directory's TrafficPolicy applies to the cluster's service.
    let traffic = pay.traffic.as_ref().unwrap();
    assert_eq!(traffic.name, "pay");
    assert_eq!(traffic.load_balancer, pb::LoadBalancer::RoundRobin as i32);
    let audit = find(&c.last, "audit").expect("audit, with no endpoints, is still a service");
    assert_eq!(audit.virtual_ip, "10.96.0.30");

    // pay-2 leaves the EndpointSlice: it leaves the snapshot.
    c.api.apply(&slice(&[("pay-1", "10.1.0.1")])).must();
    c.until("pay-2 gone", |s| endpoints(s, "pay").len() == 1)
        .await;
    assert_eq!(endpoints(&c.last, "pay"), [format!("10.1.0.1:4143 {PAY}")]);

    // A pod that gains the sidecar (a re-created pod, say) is reached over mTLS.
    c.api
        .apply(&slice(&[("pay-1", "10.1.0.1"), ("pay-2", "10.1.0.2")]))
        .must();
    c.api.apply(&pod("pay-2", "10.1.0.2", true)).must();
    c.until("pay-2 with a sidecar", |s| {
        endpoints(s, "pay").contains(&format!("10.1.0.2:4143 {PAY}"))
    })
    .await;
    assert_eq!(endpoints(&c.last, "pay").len(), 2);

    let ready = http1::get(c.control.admin, "/ready").await.must();
    assert_eq!(ready.status, 200, "ready once the cluster is listed");
    let services = c
        .control
        .metric("tern_control_discovered_services", &[])
        .await
        .must();
    assert_eq!(services, 2.0);
    let requests = c.api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("/api/v1/pods?") && r.contains("continue=c-")),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{requests:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_restarts_lose_nothing() {
    let mut c = start("kube-discovery-restarts", 0).await;
    c.until("pay from the cluster", |s| endpoints(s, "pay").len() == 2)
        .await;
    let lists_before = lists(&c.api);

    // Every watch is cut mid-stream and pay-3 joins before anyone reconnects: the watches
    // resume from their last resourceVersion and replay it, with no relist.
    let mut join = Changes::default();
    join.apply(&slice(&[
        ("pay-1", "10.1.0.1"),
        ("pay-2", "10.1.0.2"),
        ("pay-3", "10.1.0.3"),
    ]))
    .unwrap();
    c.api.cut_watches_with(join);
    c.until("pay-3 after a cut watch", |s| {
        endpoints(s, "pay").len() == 3
    })
    .await;
    assert_eq!(
        lists(&c.api),
        lists_before,
        "a resumed watch needs no relist"
    );

    // Every version so far expires while pay-1 leaves and audit is deleted: resuming gets
    // 410 Gone, the watchers relist, and the relist shows both changes.
    let mut meanwhile = Changes::default();
    meanwhile
        .apply(&slice(&[("pay-2", "10.1.0.2"), ("pay-3", "10.1.0.3")]))
        .unwrap();
    meanwhile.delete(Kind::Service, "default", "audit");
    c.api.expire_with(meanwhile);
    c.until("pay-1 and audit gone after 410 Gone", |s| {
        endpoints(s, "pay").len() == 2 && find(s, "audit").is_none()
    })
    .await;
    assert_eq!(
        endpoints(&c.last, "pay"),
        [
            "10.1.0.2:8080 -".to_string(),
            format!("10.1.0.3:4143 {PAY}")
        ]
    );
    assert!(c.api.gone() >= 1, "a watch was told 410 Gone");
    assert!(lists(&c.api) > lists_before, "and relisted");
    let restarts = c
        .control
        .metric("tern_control_kube_watch_restarts_total", &[])
        .await
        .must();
    assert!(restarts >= 1.0, "restarts {restarts}");

    // After the relist the watches carry on: a later change still arrives, once.
    c.api.apply(&service("audit", "10.96.0.31")).must();
    c.until("audit back", |s| {
        find(s, "audit").is_some_and(|a| a.virtual_ip == "10.96.0.31")
    })
    .await;
    assert_eq!(endpoints(&c.last, "pay").len(), 2);
}

/// List (not watch) requests served so far.
fn lists(api: &KubeWatchStandIn) -> usize {
    api.requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count()
}

/// An API server that cannot be reached: tern-control serves, but `/ready` stays 503 (a sidecar
/// would get a mesh without the cluster's services) and the failed lists are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_keeps_the_control_plane_unready() {
    let dir = TestDir::new("kube-discovery-unreachable").must();
    let api = KubeWatchStandIn::start(BEARER).await.must();
    // The right CA and token, but for a port nothing listens on.
    let closed = tern_tests::free_addr().must();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, BEARER).must();
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    std::fs::write(
        &kubeconfig,
        text.replace(&api.url(), &format!("https://{closed}")),
    )
    .unwrap();
    let config = ConfigDir::with_services(dir.path(), "").must();
    let control = Control::start_with_env(
        dir.path(),
        "tern-control",
        &config,
        "127.0.0.1:0".parse().unwrap(),
        &["--discovery".into(), "kubernetes".into()],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    )
    .await
    .must();
    eventually(SETTLE, || async {
        let errors = control
            .metric("tern_control_kube_watch_errors_total", &[])
            .await?;
        Ok((errors < 3.0).then(|| format!("{errors} watch errors")))
    })
    .await
    .must();
    let ready = http1::get(control.admin, "/ready").await.must();
    assert_eq!(ready.status, 503, "{}", ready.text());
}
