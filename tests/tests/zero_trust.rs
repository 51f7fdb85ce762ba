//! Zero trust at the control plane: attacks on the real `tern-control` by workloads inside the
//! cluster. Only a workload proven by its client certificate subscribes; it registers only the
//! Services its identity is admitted to, only at its own IP, never over another workload's
//! address; it learns only its namespace and what it names; `/state` answers loopback peers
//! only; bootstrap tokens expire by default and can be revoked by id.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tern_tests::control::{ConfigDir, Control};
use tern_tests::identity::{
    certify, certify_with, mint_token, start_control, tls_channel, token_create, token_revoke,
    CONTROL_IDENTITY,
};
use tern_tests::netns::{self, Network};
use tern_tests::subscribe::{endpoints, hello, plaintext, services, subscribe};
use tern_tests::{eventually, Must, TestDir};
use tonic::transport::Channel;
use tonic::Code;

const PAY: &str = "spiffe://cluster.local/ns/default/sa/pay";
const ORDER: &str = "spiffe://cluster.local/ns/default/sa/order";
const BILLING_RUNNER: &str = "spiffe://cluster.local/ns/default/sa/billing-runner";
const INSECURE: &str = "--insecure-plaintext-subscribers";

/// `pay` and `order` declare no identity (their service accounts of the same name are
/// admitted); `billing` declares `billing-runner`. In namespace `finance`, `ledger` admits
/// callers of its own namespace, `audit` admits `order`.
const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  ports: [{name: grpc, port: 50051}]
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: order, namespace: default}
spec:
  ports: [{name: grpc, port: 50052}]
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: billing, namespace: default}
spec:
  ports: [{name: grpc, port: 50053}]
  identity: spiffe://cluster.local/ns/default/sa/billing-runner
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: ledger, namespace: finance}
spec:
  ports: [{name: grpc, port: 50054}]
---
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger, namespace: finance}
spec:
  service: ledger
  rules: [{from: [{namespace: finance}]}]
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: audit, namespace: finance}
spec:
  ports: [{name: grpc, port: 50055}]
---
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: finance}
spec:
  service: audit
  rules: [{from: [{identity: spiffe://cluster.local/ns/default/sa/order}]}]
";

struct Cp {
    control: Control,
    anchors: String,
    dir: TestDir,
}

async fn start(label: &str, extra: &[&str]) -> Cp {
    let dir = TestDir::new(label).must();
    let config = ConfigDir::with_services(dir.path(), SERVICES).must();
    let (control, anchor) = start_control(dir.path(), &config, extra).await.must();
    let anchors = std::fs::read_to_string(&anchor).unwrap();
    Cp {
        control,
        anchors,
        dir,
    }
}

impl Cp {
    /// A certificate (chain, key) for `namespace/sa`, with a token from `ternctl token create`.
    async fn certificate(&self, namespace: &str, sa: &str) -> (String, String) {
        let token = mint_token(&self.control.state_dir, namespace, sa).must();
        let id = format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}");
        let c = &self.control;
        certify(c.grpc, &self.anchors, CONTROL_IDENTITY, &id, &token)
            .await
            .unwrap()
    }

    /// A TLS channel presenting the certificate of `default/sa`.
    async fn as_sa(&self, sa: &str) -> Channel {
        self.as_identity("default", sa).await
    }

    async fn as_identity(&self, namespace: &str, sa: &str) -> Channel {
        let (chain, key) = self.certificate(namespace, sa).await;
        let client = Some((chain.as_str(), key.as_str()));
        tls_channel(self.control.grpc, &self.anchors, CONTROL_IDENTITY, client)
            .await
            .must()
    }

    async fn plaintext(&self) -> Channel {
        plaintext(self.control.grpc).await.must()
    }

    /// What a caller with `order`'s certificate sees of `service`.
    async fn seen(&self, service: &str) -> Vec<(String, String)> {
        let calls = [service];
        let s = subscribe(self.as_sa("order").await, hello("order", "", &calls))
            .await
            .unwrap();
        endpoints(&s.first, service)
    }

    async fn refusals(&self, reason: &str) -> f64 {
        let name = "tern_control_subscribe_refusals_total";
        self.control
            .metric(name, &[("reason", reason)])
            .await
            .must()
    }
}

fn ep(address: &str, identity: &str) -> (String, String) {
    (address.to_string(), identity.to_string())
}

#[track_caller]
fn refused(r: Result<impl Sized, tonic::Status>, code: Code, needle: &str) -> tonic::Status {
    let Err(e) = r else {
        panic!("accepted; want {code:?} mentioning {needle:?}");
    };
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(needle), "want {needle:?} in {e:?}");
    e
}

/// Without a client certificate a Subscribe is refused before it registers or learns anything,
/// whether over plaintext h2c or TLS without one; each refusal is counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_without_a_certificate_are_refused() {
    let cp = start("zt-plaintext", &[]).await;
    let need = "client certificate";
    let r = subscribe(cp.plaintext().await, hello("pay", "127.0.0.1:7001", &[])).await;
    refused(r, Code::Unauthenticated, need);
    let mut everything = hello("order", "", &[]);
    everything.all_services = true;
    let r = subscribe(cp.plaintext().await, everything.clone()).await;
    refused(r, Code::Unauthenticated, need);
    let no_cert = tls_channel(cp.control.grpc, &cp.anchors, CONTROL_IDENTITY, None)
        .await
        .must();
    let r = subscribe(no_cert, everything).await;
    refused(r, Code::Unauthenticated, need);

    assert_eq!(cp.seen("pay").await, []);
    assert_eq!(cp.refusals("no_client_certificate").await, 3.0);
    let log = cp.control.proc.stderr();
    assert!(log.contains("subscription refused"), "{log}");
}

/// A certificate registers only for the Services its identity is admitted to: the declared
/// identity, else the service account named like the Service in its namespace. Naming another
/// Service without an address (for its inbound policy) is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_registers_only_where_its_identity_is_admitted() {
    let cp = start("zt-admitted", &[]).await;
    let r = subscribe(cp.as_sa("order").await, hello("pay", "127.0.0.1:7001", &[])).await;
    refused(r, Code::PermissionDenied, "default/pay");
    let r = subscribe(cp.as_sa("order").await, hello("pay", "", &[])).await;
    refused(r, Code::PermissionDenied, "default/pay");
    let r = subscribe(
        cp.as_sa("billing").await,
        hello("billing", "127.0.0.1:7003", &[]),
    )
    .await;
    refused(r, Code::PermissionDenied, BILLING_RUNNER);

    let _order = subscribe(
        cp.as_sa("order").await,
        hello("order", "127.0.0.1:7002", &[]),
    )
    .await
    .unwrap();
    let runner = cp.as_sa("billing-runner").await;
    let _billing = subscribe(runner, hello("billing", "127.0.0.1:7003", &[]))
        .await
        .unwrap();
    assert_eq!(cp.seen("pay").await, []);
    assert_eq!(cp.seen("order").await, [ep("127.0.0.1:7002", ORDER)]);
    assert_eq!(
        cp.seen("billing").await,
        [ep("127.0.0.1:7003", BILLING_RUNNER)]
    );
    assert!(cp.refusals("not_admitted").await >= 3.0);
}

/// The address registered is at the stream's peer IP: another IP is refused, an unspecified
/// one (0.0.0.0) becomes the peer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registered_address_is_the_peers() {
    let cp = start("zt-peer-ip", &[]).await;
    let r = subscribe(cp.as_sa("pay").await, hello("pay", "10.9.9.9:4143", &[])).await;
    refused(r, Code::PermissionDenied, "127.0.0.1");
    let _pay = subscribe(cp.as_sa("pay").await, hello("pay", "0.0.0.0:4143", &[]))
        .await
        .unwrap();
    assert_eq!(cp.seen("pay").await, [ep("127.0.0.1:4143", PAY)]);
    assert_eq!(cp.refusals("address_not_peer").await, 1.0);
}

/// An address another identity holds is refused, not taken over: neither by another
/// certificate (for another Service) nor, where plaintext subscribers are allowed at all, by a
/// plaintext one downgrading callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_address_is_not_taken_over() {
    let cp = start("zt-held", &[INSECURE]).await;
    let _pay = subscribe(cp.as_sa("pay").await, hello("pay", "127.0.0.1:7001", &[]))
        .await
        .unwrap();
    let r = subscribe(
        cp.as_sa("order").await,
        hello("order", "127.0.0.1:7001", &[]),
    )
    .await;
    refused(r, Code::AlreadyExists, PAY);
    let r = subscribe(cp.plaintext().await, hello("pay", "127.0.0.1:7001", &[])).await;
    refused(r, Code::AlreadyExists, PAY);
    assert_eq!(cp.seen("pay").await, [ep("127.0.0.1:7001", PAY)]);
    assert_eq!(cp.seen("order").await, []);
    assert_eq!(cp.refusals("address_held").await, 2.0);
    // The escape hatch is loud about itself.
    let log = cp.control.proc.stderr();
    let warned = log
        .lines()
        .any(|l| l.contains("WARN") && l.contains(INSECURE));
    assert!(warned, "{log}");
}

/// With `all_services` a subscriber learns the services of its own namespace and those of
/// others that their authorization policies let it call (`--authz-default allow` for those
/// without one); a service it names it learns regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_its_namespace_and_what_it_may_call() {
    let cp = start("zt-scope", &[]).await;
    let mut all = hello("order", "", &[]);
    all.all_services = true;
    let s = subscribe(cp.as_sa("order").await, all.clone())
        .await
        .unwrap();
    assert_eq!(
        services(&s.first),
        [
            "default/billing",
            "default/order",
            "default/pay",
            "finance/audit"
        ]
    );
    all.calls = vec!["ledger.finance".into()];
    let s = subscribe(cp.as_sa("order").await, all).await.unwrap();
    assert!(services(&s.first).contains(&"finance/ledger".to_string()));

    let denied = start("zt-scope-deny", &["--authz-default", "deny"]).await;
    let mut finance = hello("ledger", "", &[]);
    finance.namespace = "finance".into();
    finance.all_services = true;
    let s = subscribe(denied.as_identity("finance", "ledger").await, finance)
        .await
        .unwrap();
    assert_eq!(services(&s.first), ["finance/audit", "finance/ledger"]);
}

/// `GET path` on `admin` from `pod`: the status line.
async fn status_from(pod: &netns::Pod, admin: std::net::SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n");
    let target = admin.to_string();
    let args = [
        "tcp",
        "--target",
        &target,
        "--send",
        &request,
        "--read-to-end",
    ];
    let report = pod.client(&args, false).await.must();
    let reply = report["reply"].as_str().unwrap_or_default().to_string();
    reply.lines().next().unwrap_or_default().to_string()
}

/// `/state` answers loopback peers only unless `--admin-expose-state`; `/metrics`, `/ready`
/// and `/live` stay open to the network (probes, scraping). The attacker is a pod (a network
/// namespace) on the cluster network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_answers_loopback_only() {
    if let Some(skip) = netns::missing_prerequisite().map(|w| tern_tests::missing(&w)) {
        return skip.must();
    }
    let mut net = Network::create().must();
    let attacker = net.pod("attacker").must();
    let admin_any = "--admin-listen=0.0.0.0:0";
    let cp = start("zt-state", &[admin_any]).await;
    let admin = std::net::SocketAddr::from((net.gateway(), cp.control.admin.port()));
    assert!(status_from(&attacker, admin, "/state")
        .await
        .contains("403"));
    for open in ["/metrics", "/ready", "/live"] {
        let status = status_from(&attacker, admin, open).await;
        assert!(status.contains("200"), "{open}: {status}");
    }
    cp.control.state().await.must();
    let refused = "tern_control_admin_refusals_total";
    assert_eq!(cp.control.metric(refused, &[]).await.must(), 1.0);

    let exposed = start("zt-state-exposed", &[admin_any, "--admin-expose-state"]).await;
    let admin = std::net::SocketAddr::from((net.gateway(), exposed.control.admin.port()));
    assert!(status_from(&attacker, admin, "/state")
        .await
        .contains("200"));
}

/// The claims of a Tern token, decoded (their signature is the control plane's business).
fn claims(token: &str) -> serde_json::Value {
    let body = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `ternctl token create`: (token, what it said on stderr).
fn create(cp: &Cp, sa: &str, extra: &[&str]) -> (String, String) {
    let state = cp.control.state_dir.display().to_string();
    let mut args = vec!["--state-dir", &state, "--service-account", sa];
    args.extend_from_slice(extra);
    let out = token_create(&args).must();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    (token, String::from_utf8(out.stderr).unwrap())
}

fn revoke(cp: &Cp, id: &str) {
    let state = cp.control.state_dir.display().to_string();
    let out = token_revoke(&["--state-dir", &state, id]).must();
    assert!(out.status.success(), "{out:?}");
}

/// Tokens expire after 24 hours unless `--ttl` says otherwise, and `token create` names each
/// by its id (on stderr: stdout stays the token alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_by_default_and_name_their_id() {
    let cp = start("zt-token-ttl", &[]).await;
    let (token, said) = create(&cp, "pay", &[]);
    let c = claims(&token);
    let exp = c["exp"].as_f64().expect("an expiry by default");
    assert!((exp - now() - 86_400.0).abs() < 60.0, "{c}");
    let id = c["jti"].as_str().unwrap();
    assert!(said.contains(id), "{said}");
    let (token, _) = create(&cp, "pay", &["--ttl", "1h"]);
    let exp = claims(&token)["exp"].as_f64().unwrap();
    assert!((exp - now() - 3_600.0).abs() < 60.0);
}

/// `ternctl token revoke ID` is honoured by the next Certify, with no restart; other tokens
/// for the same identity still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_certifies_nothing() {
    let cp = start("zt-token-revoke", &[]).await;
    let grpc = cp.control.grpc;
    let (token, _) = create(&cp, "pay", &[]);
    certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &token)
        .await
        .unwrap();
    let id = claims(&token)["jti"].as_str().unwrap().to_string();
    revoke(&cp, &id);
    let r = certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &token).await;
    refused(r, Code::Unauthenticated, "revoked");
    let (other, _) = create(&cp, "pay", &[]);
    certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &other)
        .await
        .unwrap();
    let name = "tern_control_certificate_refusals_total";
    let revoked = cp.control.metric(name, &[("reason", "revoked")]).await;
    assert_eq!(revoked.must(), 1.0);
}

/// An expired token bootstraps nothing; it still renews the certificate of a caller that
/// presents a live one for the same identity, until it is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_only_renews_a_live_certificate() {
    let cp = start("zt-token-renew", &[]).await;
    let grpc = cp.control.grpc;
    let (token, _) = create(&cp, "pay", &["--ttl", "2s"]);
    let (chain, key) = certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &token)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        let expired = now() >= claims(&token)["exp"].as_f64().unwrap_or_default();
        Ok((!expired).then(|| "not yet expired".to_string()))
    })
    .await
    .must();
    let r = certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &token).await;
    refused(r, Code::Unauthenticated, "expired");
    let live = Some((chain.as_str(), key.as_str()));
    let renew = || certify_with(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &token, live);
    renew().await.unwrap();
    // Another identity's live certificate does not help.
    let (o_chain, o_key) = cp.certificate("default", "order").await;
    let other = Some((o_chain.as_str(), o_key.as_str()));
    let r = certify_with(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &token, other).await;
    refused(r, Code::Unauthenticated, "expired");
    revoke(&cp, claims(&token)["jti"].as_str().unwrap());
    refused(renew().await, Code::Unauthenticated, "revoked");
    let _ = &cp.dir;
}
