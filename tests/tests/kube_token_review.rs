//! Certify with Kubernetes ServiceAccount tokens: the real `tern-control` started with
//! `--token-review kubernetes` (and `both`), posting each token it is given as a TokenReview
//! over TLS to an API server.
//!
//! This machine has no Kubernetes API server, so a stand-in on loopback plays it
//! ([`tern_tests::kube_api`]): real TLS with a certificate for 127.0.0.1 signed by its own CA
//! (the file `--kube-ca-file` names), and the checks a real API server makes of a TokenReview
//! create (the path, the caller's bearer token from `--kube-token-file`, the JSON content type,
//! a body that reads as an `authentication.k8s.io/v1` TokenReview through k8s-openapi). It
//! authenticates only the tokens it is told about, for the audience `tern`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use tern_tests::control::{ConfigDir, Control};
use tern_tests::identity::{
    certify, leaf_sans, mint_token, start_control, token_create, CONTROL_IDENTITY,
};
use tern_tests::kube_api::{KnownToken, KubeApiStandIn};
use tern_tests::{Must, TestDir};
use tonic::Code;

const PAY: &str = "spiffe://cluster.local/ns/default/sa/pay";
const ORDER: &str = "spiffe://cluster.local/ns/default/sa/order";
/// What the kubelet would project into the pay pod (audience `tern`); opaque to tern-control.
const PAY_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InN0YW5kLWluIn0.cGF5LXRlcm4.c2ln";
/// A pay token issued for another audience (the API server's own, say).
const PAY_API_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InN0YW5kLWluIn0.cGF5LWFwaQ.c2ln";
const CONTROL_BEARER: &str = "tern-control-serviceaccount-token";

const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  ports: [{name: grpc, port: 50051}]
  identity: spiffe://cluster.local/ns/default/sa/pay
";

fn known() -> HashMap<String, KnownToken> {
    let pay = |audience: &str| KnownToken {
        namespace: "default".into(),
        service_account: "pay".into(),
        audiences: vec![audience.into()],
    };
    HashMap::from([
        (PAY_TOKEN.to_string(), pay("tern")),
        (
            PAY_API_TOKEN.to_string(),
            pay("https://kubernetes.default.svc"),
        ),
    ])
}

/// The stand-in API server and tern-control reviewing with it (`mode`: kubernetes or both).
async fn start(dir: &Path, mode: &str) -> (KubeApiStandIn, Control, String) {
    let api = KubeApiStandIn::start(dir, CONTROL_BEARER, known())
        .await
        .must();
    let token_file = dir.join("control-sa-token");
    std::fs::write(&token_file, format!("{CONTROL_BEARER}\n")).unwrap();
    let config = ConfigDir::with_services(dir, SERVICES).must();
    let url = api.url();
    let ca = api.ca_file.display().to_string();
    let token = token_file.display().to_string();
    let (control, anchor) = start_control(
        dir,
        &config,
        &[
            "--token-review",
            mode,
            "--kube-api-server",
            &url,
            "--kube-ca-file",
            &ca,
            "--kube-token-file",
            &token,
        ],
    )
    .await
    .must();
    let anchors = std::fs::read_to_string(anchor).unwrap();
    (api, control, anchors)
}

#[tokio::test]
async fn service_account_tokens_are_reviewed_by_the_api_server() {
    let dir = TestDir::new("kube-token-review").must();
    let (mut api, control, anchors) = start(dir.path(), "kubernetes").await;
    let ask = |identity: &'static str, token: &'static str| {
        let anchors = anchors.clone();
        let grpc = control.grpc;
        async move { certify(grpc, &anchors, CONTROL_IDENTITY, identity, token).await }
    };

    // The projected pay token: a pay certificate.
    let (chain, _key) = ask(PAY, PAY_TOKEN)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", control.proc.diagnostics()));
    assert_eq!(leaf_sans(&chain).unwrap(), vec![format!("URI:{PAY}")]);
    assert_eq!(api.reviews(), vec![PAY_TOKEN.to_string()]);
    assert!(api.refused().is_empty(), "{:?}", api.refused());

    // The same token for another identity: the token is good, the identity is not its.
    let status = ask(ORDER, PAY_TOKEN).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A token the API server does not know, and one for another audience: UNAUTHENTICATED.
    let status = ask(PAY, "eyJhbGciOiJSUzI1NiJ9.dW5rbm93bg.c2ln")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = ask(PAY, PAY_API_TOKEN).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // A Tern token (signed with a key this control plane does not read) means nothing to the
    // API server either: under `kubernetes` it goes there too.
    let key_file = dir.path().join("some-token.key");
    std::fs::write(&key_file, [7u8; 32]).unwrap();
    let out = token_create(&[
        "--token-key-file",
        &key_file.display().to_string(),
        "--namespace",
        "default",
        "--service-account",
        "pay",
    ])
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let tern = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let status = certify(control.grpc, &anchors, CONTROL_IDENTITY, PAY, &tern)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(api.refused().is_empty(), "{:?}", api.refused());

    // The control plane's own token is read on every call: a rotated (here: wrong) one is
    // refused by the API server, which is UNAVAILABLE, not a bad workload token.
    let token_file = dir.path().join("control-sa-token");
    std::fs::write(&token_file, "stale-token").unwrap();
    let status = ask(PAY, PAY_TOKEN).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("401"), "{status:?}");
    std::fs::write(&token_file, CONTROL_BEARER).unwrap();
    ask(PAY, PAY_TOKEN).await.unwrap();

    // The API server down: UNAVAILABLE (the control plane cannot decide), not UNAUTHENTICATED.
    api.stop().await;
    let status = ask(PAY, PAY_TOKEN).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("TokenReview"), "{status:?}");

    // No token, the control plane's or a workload's, in its log.
    let log = format!("{}{}", control.proc.stdout(), control.proc.stderr());
    for secret in [PAY_TOKEN, PAY_API_TOKEN, CONTROL_BEARER, tern.as_str()] {
        assert!(!log.contains(secret), "the log shows a token:\n{log}");
    }
}

#[tokio::test]
async fn both_reviews_tern_tokens_locally_and_others_with_the_api_server() {
    let dir = TestDir::new("kube-token-review-both").must();
    let (api, control, anchors) = start(dir.path(), "both").await;
    let (chain, _) = certify(control.grpc, &anchors, CONTROL_IDENTITY, PAY, PAY_TOKEN)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", control.proc.diagnostics()));
    assert_eq!(leaf_sans(&chain).unwrap(), vec![format!("URI:{PAY}")]);
    let tern = mint_token(&control.state_dir, "default", "pay").unwrap();
    let (chain, _) = certify(control.grpc, &anchors, CONTROL_IDENTITY, PAY, &tern)
        .await
        .unwrap();
    assert_eq!(leaf_sans(&chain).unwrap(), vec![format!("URI:{PAY}")]);
    // Only the ServiceAccount token went to the API server.
    assert_eq!(api.reviews(), vec![PAY_TOKEN.to_string()]);
    // A forged Tern token is refused locally, without asking the API server.
    let status = certify(
        control.grpc,
        &anchors,
        CONTROL_IDENTITY,
        PAY,
        "tern1.e30.AAAA",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(api.reviews().len(), 1);
}
