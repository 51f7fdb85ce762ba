//! Workload identity end to end: the real `tern-control` generating its CA in the test's
//! directory, bootstrap tokens from the real `ternctl token create`, Certify over TLS to the
//! control plane's own identity, and registration over Subscribe decided by the client
//! certificate (or its absence) rather than by what the Hello claims.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tern_proto::control::v1 as pb;
use tern_proto::control::v1::control_plane_client::ControlPlaneClient;
use tern_proto::control::v1::sidecar_message::Kind;
use tern_proto::test::v1::EchoRequest;
use tern_tests::control::{ConfigDir, Control, SidecarView};
use tern_tests::identity::{
    certify, leaf_sans, mint_token, start_control, tls_channel, token_create, verify_chain,
    CONTROL_IDENTITY,
};
use tern_tests::mesh::{connect, echo_client};
use tern_tests::{
    eventually, free_addr, within, App, Must, Proxy, ProxySpec, TestDir, CALL_TIMEOUT,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

const PAY: &str = "spiffe://cluster.local/ns/default/sa/pay";
const ORDER: &str = "spiffe://cluster.local/ns/default/sa/order";

/// `pay` declares its identity; `order` declares none.
const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  ports: [{name: grpc, port: 50051}]
  identity: spiffe://cluster.local/ns/default/sa/pay
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: order, namespace: default}
spec:
  ports: [{name: grpc, port: 50052}]
";

struct Cp {
    control: Control,
    anchors: String,
    _dir: TestDir,
}

async fn start(label: &str) -> Cp {
    let dir = TestDir::new(label).must();
    let config = ConfigDir::with_services(dir.path(), SERVICES).must();
    let (control, anchor) = start_control(dir.path(), &config, &[]).await.must();
    let anchors = std::fs::read_to_string(&anchor).unwrap();
    Cp {
        control,
        anchors,
        _dir: dir,
    }
}

fn hello(service: &str, identity: &str, address: &str, calls: &[&str]) -> pb::Hello {
    pb::Hello {
        service: service.into(),
        identity: identity.into(),
        address: address.into(),
        calls: calls.iter().map(ToString::to_string).collect(),
        ..Default::default()
    }
}

/// Subscribes on `channel` with `hello` and waits for the first snapshot, or the status that
/// ended the stream. Returns the open stream's sender too (dropping it ends the subscription).
async fn subscribe(
    channel: Channel,
    hello: pb::Hello,
) -> Result<(pb::Snapshot, mpsc::Sender<pb::SidecarMessage>), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SidecarMessage {
        kind: Some(Kind::Hello(hello)),
    })
    .await
    .unwrap();
    let mut client = ControlPlaneClient::new(channel);
    let mut stream = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match within(CALL_TIMEOUT, stream.message()).await.must()? {
        Some(snapshot) => Ok((snapshot, tx)),
        None => Err(tonic::Status::unknown(
            "the stream ended without a snapshot",
        )),
    }
}

async fn plaintext(cp: &Cp) -> Channel {
    Channel::from_shared(cp.control.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A bad token gets UNAUTHENTICATED, an `order` token cannot get a `pay` certificate, and a
/// `pay` token gets a chain whose leaf names exactly pay's SPIFFE id and verifies to the trust
/// anchor; each outcome is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_issues_only_what_the_token_grants() {
    let cp = start("identity-certify").await;
    let grpc = cp.control.grpc;
    let state = &cp.control.state_dir;

    let e = certify(
        grpc,
        &cp.anchors,
        CONTROL_IDENTITY,
        PAY,
        "tern1.forged.token",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let order_token = mint_token(state, "default", "order").must();
    let e = certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &order_token)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(!e.message().contains(&order_token), "{e:?}");

    let pay_token = mint_token(state, "default", "pay").must();
    let (chain, key) = certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &pay_token)
        .await
        .unwrap();
    assert_eq!(leaf_sans(&chain).must(), [format!("URI:{PAY}")]);
    verify_chain(&cp.anchors, &chain, &key, PAY).await.must();
    assert!(
        verify_chain(&cp.anchors, &chain, &key, ORDER)
            .await
            .is_err(),
        "the chain is pay's, not order's"
    );

    let metric = |name: &'static str, reason: Option<&'static str>| {
        let control = &cp.control;
        async move {
            let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
            control.metric(name, &labels).await.must()
        }
    };
    assert_eq!(
        metric("tern_control_certificates_issued_total", None).await,
        1.0
    );
    let refusals = "tern_control_certificate_refusals_total";
    assert_eq!(metric(refusals, Some("unauthenticated")).await, 1.0);
    assert_eq!(metric(refusals, Some("permission_denied")).await, 1.0);

    let state = cp.control.state().await.must();
    let identity = &state["identity"];
    assert_eq!(identity["trust_domain"], "cluster.local");
    assert_eq!(identity["control_plane_identity"], CONTROL_IDENTITY);
    assert!(
        identity["trust_anchor"]["not_after"].is_string(),
        "{identity}"
    );
    assert!(identity["issuer"]["not_after"].is_string(), "{identity}");
}

/// The control plane presents its own identity: a client that expects another one refuses the
/// handshake, and the control plane counts the failed handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_presents_its_own_identity() {
    let cp = start("identity-control-id").await;
    let grpc = cp.control.grpc;
    let pay_token = mint_token(&cp.control.state_dir, "default", "pay").must();
    let impostor = "spiffe://cluster.local/ns/tern/sa/someone-else";
    let e = certify(grpc, &cp.anchors, impostor, PAY, &pay_token)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(CONTROL_IDENTITY), "{e:?}");
    eventually(Duration::from_secs(5), || async {
        let failed = cp
            .control
            .metric("tern_control_tls_handshake_failures_total", &[])
            .await?;
        Ok((failed < 1.0).then(|| format!("{failed} failed handshakes counted")))
    })
    .await
    .must();
    // The right expectation works on the same listener.
    certify(grpc, &cp.anchors, CONTROL_IDENTITY, PAY, &pay_token)
        .await
        .unwrap();
}

/// Registration is decided by the client certificate, not the Hello: without one a Subscribe is
/// refused (whatever it claims); with pay's certificate the pay endpoint registers and callers see
/// it with pay's identity, unless the Hello claims another identity than the certificate's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_follows_the_client_certificate() {
    let cp = start("identity-registration").await;
    let grpc = cp.control.grpc;

    for h in [
        hello("order", "", "127.0.0.1:7002", &["pay"]),
        hello("pay", "", "127.0.0.1:7001", &[]),
        hello("order", ORDER, "", &[]),
    ] {
        let e = subscribe(plaintext(&cp).await, h).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("client certificate"), "{e:?}");
    }

    let certificate = |sa: &'static str, id: &'static str| {
        let cp = &cp;
        async move {
            let token = mint_token(&cp.control.state_dir, "default", sa).must();
            let (chain, key) = certify(grpc, &cp.anchors, CONTROL_IDENTITY, id, &token)
                .await
                .unwrap();
            let client = Some((chain.as_str(), key.as_str()));
            tls_channel(grpc, &cp.anchors, CONTROL_IDENTITY, client)
                .await
                .must()
        }
    };
    let e = subscribe(
        certificate("pay", PAY).await,
        hello("pay", ORDER, "127.0.0.1:7001", &[]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let _pay = subscribe(
        certificate("pay", PAY).await,
        hello("pay", "", "127.0.0.1:7001", &[]),
    )
    .await
    .unwrap();

    // A caller subscribing now sees the endpoint with the identity the certificate proved.
    let (snapshot, _caller) = subscribe(
        certificate("order", ORDER).await,
        hello("order", "", "", &["pay"]),
    )
    .await
    .unwrap();
    let pay = snapshot.services.iter().find(|s| s.name == "pay").unwrap();
    let endpoints: Vec<(&str, &str)> = pay
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.identity.as_str()))
        .collect();
    assert_eq!(endpoints, [("127.0.0.1:7001", PAY)]);
    let state = cp.control.state().await.must();
    let subscribers = state["subscribers"].as_array().unwrap();
    assert!(
        subscribers
            .iter()
            .any(|s| s["service"] == "pay" && s["identity"] == PAY),
        "{state}"
    );
}

/// Real sidecars with identities: each gets its certificate from tern-control with a token
/// from `ternctl token create`, subscribes over TLS with it, and `order` calls `pay` over mTLS;
/// `pay`'s endpoint reaches `order` with the identity pay's certificate proved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_get_certificates_and_call_each_other_over_mtls() {
    let cp = start("identity-sidecars").await;
    let dir = cp._dir.path();
    let anchor = cp.control.trust_anchor().display().to_string();
    let url = format!("https://{}", cp.control.grpc);
    let identity_flags = |service: &str| {
        let token = mint_token(&cp.control.state_dir, "default", service).must();
        let file = dir.join(format!("{service}.token"));
        std::fs::write(&file, token).unwrap();
        vec![
            "--control-plane".to_string(),
            url.clone(),
            "--identity-trust-anchors".to_string(),
            anchor.clone(),
            "--identity-token-file".to_string(),
            file.display().to_string(),
        ]
    };
    let app = App::echo_server(dir, "pay-app").await.must();
    let pay_flags = identity_flags("pay");
    let pay_flags: Vec<&str> = pay_flags.iter().map(String::as_str).collect();
    let pay = Proxy::start(
        dir,
        ProxySpec::new("pay-sidecar", "pay")
            .inbound(app.addr)
            .args(&pay_flags),
    )
    .await
    .must();
    let target = free_addr().must();
    let order_flags = identity_flags("order");
    let order_flags: Vec<&str> = order_flags.iter().map(String::as_str).collect();
    let order = Proxy::start(
        dir,
        ProxySpec::new("order-sidecar", "order")
            .upstream("pay", target)
            .args(&order_flags),
    )
    .await
    .must();

    let want = vec![pay.inbound.to_string()];
    eventually(Duration::from_secs(5), || async {
        let view = SidecarView(order.config().await?);
        Ok((view.endpoints("pay") != want).then(|| view.summary("pay")))
    })
    .await
    .must();
    let mut client = echo_client(connect(target).await.must());
    let reply = within(
        CALL_TIMEOUT,
        client.unary(EchoRequest {
            message: "over mTLS".into(),
            ..Default::default()
        }),
    )
    .await
    .must()
    .unwrap();
    assert_eq!(reply.into_inner().message, "over mTLS");
    // pay's sidecar saw order's verified identity on a TLS connection.
    eventually(Duration::from_secs(5), || async {
        let log = pay.proc.stdout();
        let seen = log.contains(&format!("\"peer_identity\":\"{ORDER}\""))
            && log.contains("\"tls\":\"TLSv1.3\"");
        Ok((!seen).then(|| format!("pay sidecar access log: {log}")))
    })
    .await
    .must();

    assert_eq!(
        cp.control
            .metric("tern_control_certificates_issued_total", &[])
            .await
            .must(),
        2.0
    );
    let state = cp.control.state().await.must();
    let pay_service = state["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "pay")
        .unwrap();
    assert_eq!(pay_service["endpoints"][0]["identity"], PAY, "{state}");
    let identities: Vec<&str> = state["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["identity"].as_str())
        .collect();
    assert!(
        identities.contains(&PAY) && identities.contains(&ORDER),
        "{state}"
    );
}

/// `ternctl token create` without a key says where it looked and what to do.
#[test]
fn token_create_needs_the_control_planes_key() {
    let dir = TestDir::new("identity-token").must();
    let state = dir.path().join("no-state").display().to_string();
    let out = token_create(&["--state-dir", &state, "--service-account", "pay"]).must();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "no token key at {state}/token.key: start tern-control first or pass --token-key-file"
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
