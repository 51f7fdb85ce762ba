#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser as _;

use super::*;
use crate::ca::Source;
use crate::config::Action;
use crate::discovery::Discovery;

fn args(extra: &[&str]) -> Args {
    let mut v = vec!["tern-control", "--config-dir=/x"];
    v.extend_from_slice(extra);
    Args::try_parse_from(v).unwrap()
}

fn settings(extra: &[&str]) -> Settings {
    args(extra).settings().unwrap()
}

fn error(extra: &[&str]) -> String {
    args(extra).settings().unwrap_err().to_string()
}

#[test]
fn defaults() {
    let s = settings(&[]);
    assert_eq!(s.config.dir, PathBuf::from("/x"));
    assert_eq!(s.listen.grpc, "127.0.0.1:8090".parse().unwrap());
    assert_eq!(s.listen.admin, "127.0.0.1:9990".parse().unwrap());
    assert_eq!(s.registration_grace, Duration::from_secs(1));
    assert_eq!(s.config.debounce, Duration::from_millis(100));
    assert_eq!(s.discovery, Discovery::Config);
    assert!(!s.config.options.services_elsewhere);
    let k = settings(&["--discovery=kubernetes"]);
    assert!(k.config.options.services_elsewhere);
    assert_eq!(args(&["--discovery=kubernetes"]).config(), k.config);
    let s = settings(&["--registration-grace=250ms", "--grpc-listen=127.0.0.1:0"]);
    assert_eq!(s.registration_grace, Duration::from_millis(250));
    assert_eq!(s.listen.grpc.port(), 0);
    assert!(Args::try_parse_from([
        "tern-control",
        "--config-dir=/x",
        "--registration-grace=soon"
    ])
    .is_err());
}

#[test]
fn identity_defaults() {
    let s = settings(&[]);
    let id = &s.identity;
    assert_eq!(id.ca, Source::StateDir(".tern-control".into()));
    assert_eq!(id.tokens.key_file, PathBuf::from(".tern-control/token.key"));
    assert_eq!(
        id.tokens.revoked_file,
        PathBuf::from(".tern-control/revoked-tokens")
    );
    assert!(!s.insecure_plaintext_subscribers, "secure by default");
    assert!(!s.admin_expose_state, "/state on loopback only by default");
    assert_eq!(id.cert_lifetime, Duration::from_secs(24 * 3600));
    assert_eq!(s.authz_default, Action::Allow);
    assert_eq!(id.tokens.review, TokenReview::Local);
    assert_eq!(
        id.tokens.kube.token_file,
        PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    assert_eq!(id.tokens.kube.api_server, None);
    assert_eq!(id.trust_domain, "cluster.local");
    assert_eq!(
        id.control_identity.to_string(),
        "spiffe://cluster.local/ns/tern/sa/tern-control"
    );
    let s = settings(&[
        "--trust-domain=Example.org",
        "--cert-lifetime=1s",
        "--authz-default=deny",
        "--token-review=both",
        "--kube-api-server=https://127.0.0.1:6443",
        "--kube-ca-file=/tmp/ca.crt",
        "--state-dir=/s",
        "--token-key-file=/k/token.key",
    ]);
    let id = &s.identity;
    assert_eq!(id.tokens.review, TokenReview::Both);
    assert_eq!(
        id.tokens.kube.api_server.as_deref(),
        Some("https://127.0.0.1:6443")
    );
    assert_eq!(id.tokens.kube.ca_file, PathBuf::from("/tmp/ca.crt"));
    assert_eq!(id.tokens.key_file, PathBuf::from("/k/token.key"));
    assert_eq!(id.tokens.revoked_file, PathBuf::from("/s/revoked-tokens"));
    assert_eq!(id.cert_lifetime, Duration::from_secs(1));
    assert_eq!(s.authz_default, Action::Deny);
    assert_eq!(id.trust_domain, "example.org");
    assert_eq!(
        id.control_identity.to_string(),
        "spiffe://example.org/ns/tern/sa/tern-control"
    );
    assert!(
        Args::try_parse_from(["tern-control", "--config-dir=/x", "--cert-lifetime=500ms"]).is_err()
    );
}

#[test]
fn identity_flags_are_checked_at_the_edge() {
    let e = error(&["--identity=spiffe://other.org/ns/tern/sa/tern-control"]);
    assert_eq!(
        e,
        "--identity spiffe://other.org/ns/tern/sa/tern-control is not in the trust domain \
         cluster.local (--trust-domain)"
    );
    assert!(error(&["--identity=pay"]).starts_with("--identity: "));
    assert!(error(&["--trust-domain=a b"]).starts_with("--trust-domain: "));
}

#[test]
fn ca_flags_go_together() {
    assert_eq!(
        settings(&["--state-dir=/s"]).identity.ca,
        Source::StateDir("/s".into())
    );
    assert_eq!(
        error(&["--ca-anchor=/a"]),
        "--ca-anchor, --ca-issuer-cert and --ca-issuer-key go together: give all three, \
         or none to use the CA in --state-dir"
    );
    let all = settings(&[
        "--ca-anchor=/a",
        "--ca-issuer-cert=/c",
        "--ca-issuer-key=/k",
    ]);
    assert_eq!(
        all.identity.ca,
        Source::Files {
            anchor: "/a".into(),
            issuer_cert: "/c".into(),
            issuer_key: "/k".into(),
        }
    );
}

#[test]
fn webhook_settings() {
    let off = settings(&[]).webhook;
    assert_eq!(off.listen, None);
    assert_eq!(off.inject, tern_inject::Options::default());
    let on = settings(&[
        "--webhook-listen=0.0.0.0:8443",
        "--inject-proxy-image=registry/proxy:1",
        "--inject-native-sidecar",
    ])
    .webhook;
    assert_eq!(on.listen, Some("0.0.0.0:8443".parse().unwrap()));
    assert_eq!(on.inject.proxy_image, "registry/proxy:1");
    assert_eq!(on.inject.init_image, tern_inject::default_init_image());
    assert!(on.inject.native_sidecar);
}
