//! Certify: what it issues, and each refusal with the code the protocol gives it.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use tern_identity::csr::WorkloadKey;
use tern_identity::token::{new_id, Claims, TokenKey};
use tern_proto::identity::v1::identity_server::Identity as _;
use tonic::Code;

use super::*;
use crate::tokens::revoked::RevocationList;
use crate::tokens::LocalTokens;

const PAY: &str = "spiffe://cluster.local/ns/default/sa/pay";

struct Fixture {
    _dir: tempfile::TempDir,
    service: IdentityService,
    key: TokenKey,
    metrics: Arc<Metrics>,
    revoked: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load(&Source::StateDir(dir.path().to_path_buf()), "cluster.local").unwrap();
    let key_file = dir.path().join("token.key");
    let tokens = LocalTokens::load_or_generate(&key_file).unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    Fixture {
        key: TokenKey::new(&std::fs::read(&key_file).unwrap()),
        service: IdentityService::new(
            Arc::new(ca),
            Arc::new(tokens),
            Duration::from_secs(3600),
            Arc::clone(&metrics),
        )
        .with_revocation_list(RevocationList::new(dir.path().join("revoked-tokens"))),
        revoked: dir.path().join("revoked-tokens"),
        metrics,
        _dir: dir,
    }
}

impl Fixture {
    fn token(&self, sa: &str) -> String {
        self.key.sign(&Claims {
            namespace: "default".into(),
            service_account: sa.into(),
            expires: None,
            id: new_id(),
        })
    }

    async fn certify(
        &self,
        identity: &str,
        token: &str,
        csr_for: &str,
    ) -> Result<pb::CertifyResponse, Status> {
        let csr = WorkloadKey::generate()
            .unwrap()
            .csr_pem(&SpiffeId::parse(csr_for).unwrap())
            .unwrap();
        self.call_as(identity, token, csr, None).await
    }

    async fn call(
        &self,
        identity: &str,
        token: &str,
        csr_pem: String,
        tls: bool,
    ) -> Result<pb::CertifyResponse, Status> {
        let conn = ConnInfo {
            remote: Some("127.0.0.1:40000".parse().unwrap()),
            tls,
            peer_identity: None,
        };
        self.call_with(identity, token, csr_pem, conn).await
    }

    /// Over TLS, presenting a client certificate for `peer` when given.
    async fn call_as(
        &self,
        identity: &str,
        token: &str,
        csr_pem: String,
        peer: Option<&str>,
    ) -> Result<pb::CertifyResponse, Status> {
        let conn = ConnInfo {
            remote: Some("127.0.0.1:40000".parse().unwrap()),
            tls: true,
            peer_identity: peer.map(Arc::from),
        };
        self.call_with(identity, token, csr_pem, conn).await
    }

    async fn call_with(
        &self,
        identity: &str,
        token: &str,
        csr_pem: String,
        conn: ConnInfo,
    ) -> Result<pb::CertifyResponse, Status> {
        let mut request = Request::new(pb::CertifyRequest {
            identity: identity.into(),
            token: token.into(),
            csr_pem,
        });
        request.extensions_mut().insert(conn);
        self.service
            .certify(request)
            .await
            .map(Response::into_inner)
    }

    fn refusals(&self, reason: &str) -> u64 {
        self.metrics
            .certificate_refusals
            .with_label_values(&[reason])
            .get()
    }
}

#[tokio::test]
async fn a_valid_token_gets_its_identity_certified() {
    let f = fixture();
    let rsp = f.certify(PAY, &f.token("pay"), PAY).await.unwrap();
    let chain = tern_identity::pem::certs(rsp.chain_pem.as_bytes()).unwrap();
    assert_eq!(chain.len(), 2, "leaf and issuer");
    assert_eq!(tern_identity::spiffe::spiffe_id_of(&chain[0]).unwrap(), PAY);
    assert_eq!(rsp.not_after - rsp.not_before, 3600 + 60);
    assert_eq!(f.metrics.certificates_issued.get(), 1);
}

#[tokio::test]
async fn a_bad_token_is_unauthenticated() {
    let f = fixture();
    for token in ["", "tern1.bogus.token", "not-a-token"] {
        let e = f.certify(PAY, token, PAY).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // Minted with another key.
    let other = fixture();
    let e = f.certify(PAY, &other.token("pay"), PAY).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Expired.
    let expired = f.key.sign(&Claims {
        namespace: "default".into(),
        service_account: "pay".into(),
        expires: Some(1),
        id: new_id(),
    });
    let e = f.certify(PAY, &expired, PAY).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{e:?}");
    assert_eq!(f.refusals("unauthenticated"), 5);
    assert_eq!(f.metrics.certificates_issued.get(), 0);
}

#[tokio::test]
async fn an_order_token_cannot_get_a_pay_certificate() {
    let f = fixture();
    let token = f.token("order");
    let e = f.certify(PAY, &token, PAY).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("service account order"), "{e:?}");
    assert!(e.message().contains(PAY), "{e:?}");
    assert!(!e.message().contains(&token), "never the token itself");
    assert_eq!(f.refusals("permission_denied"), 1);
}

#[tokio::test]
async fn a_csr_naming_another_identity_is_invalid() {
    let f = fixture();
    let e = f
        .certify(
            PAY,
            &f.token("pay"),
            "spiffe://cluster.local/ns/default/sa/order",
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("SAN"), "{e:?}");
    let e = f
        .call(
            PAY,
            &f.token("pay"),
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = f
        .call(PAY, &f.token("pay"), "x".repeat(20_000), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(f.refusals("invalid_csr"), 3);
}

#[tokio::test]
async fn identities_outside_the_trust_domain_are_invalid() {
    let f = fixture();
    let other = "spiffe://other.org/ns/default/sa/pay";
    let e = f.certify(other, &f.token("pay"), other).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("trust domain"), "{e:?}");
    let e = f.certify("pay", &f.token("pay"), PAY).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(f.refusals("invalid_identity"), 2);
}

#[tokio::test]
async fn plaintext_calls_are_refused() {
    let f = fixture();
    let csr = WorkloadKey::generate()
        .unwrap()
        .csr_pem(&SpiffeId::parse(PAY).unwrap())
        .unwrap();
    let e = f.call(PAY, &f.token("pay"), csr, false).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("TLS"), "{e:?}");
    assert_eq!(f.refusals("plaintext"), 1);
}

#[test]
fn setup_issues_the_control_planes_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let settings = IdentitySettings {
        trust_domain: "cluster.local".into(),
        control_identity: SpiffeId::new("cluster.local", "tern", "tern-control").unwrap(),
        cert_lifetime: Duration::from_secs(24 * 3600),
        ca: Source::StateDir(state.clone()),
        tokens: TokenSettings {
            review: tokens::TokenReview::Local,
            key_file: state.join("token.key"),
            revoked_file: state.join("revoked-tokens"),
            kube: tokens::kube::KubeSettings {
                api_server: None,
                ca_file: tokens::kube::IN_CLUSTER_CA.into(),
                token_file: tokens::kube::IN_CLUSTER_TOKEN.into(),
            },
        },
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let s = setup(&settings, &metrics).unwrap();
    let own = s.authority.serving.get().unwrap();
    assert_eq!(
        own.identity,
        "spiffe://cluster.local/ns/tern/sa/tern-control"
    );
    let life = own.not_after.duration_since(own.not_before).unwrap();
    assert_eq!(life, crate::tls::OWN_CERT_LIFETIME + ca::CLOCK_SKEW);
    assert!(Path::new(&state.join("token.key")).exists());
    let json = s.authority.json();
    assert_eq!(json["control_plane_identity"], own.identity.as_str());
    assert_eq!(json["trust_domain"], "cluster.local");
    assert_eq!(json["workload_certificate_lifetime"], "1day");
}

fn csr(identity: &str) -> String {
    WorkloadKey::generate()
        .unwrap()
        .csr_pem(&SpiffeId::parse(identity).unwrap())
        .unwrap()
}

#[tokio::test]
async fn an_expired_token_renews_only_a_live_certificate_of_its_identity() {
    let f = fixture();
    let expired = f.key.sign(&Claims {
        namespace: "default".into(),
        service_account: "pay".into(),
        expires: Some(1),
        id: new_id(),
    });
    let order = "spiffe://cluster.local/ns/default/sa/order";
    for peer in [None, Some(order)] {
        let e = f.call_as(PAY, &expired, csr(PAY), peer).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{peer:?}");
        assert!(e.message().contains("expired"), "{e:?}");
    }
    f.call_as(PAY, &expired, csr(PAY), Some(PAY)).await.unwrap();
    assert_eq!(f.metrics.certificates_issued.get(), 1);
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once() {
    let f = fixture();
    let token = f.token("pay");
    f.certify(PAY, &token, PAY).await.unwrap();
    let id = f.key.open(&token).unwrap().id;
    std::fs::write(&f.revoked, format!("someone-else\n{id}  # leaked\n")).unwrap();
    for peer in [None, Some(PAY)] {
        let e = f.call_as(PAY, &token, csr(PAY), peer).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(
            e.message().contains(&format!("token {id} is revoked")),
            "{e:?}"
        );
    }
    assert_eq!(f.refusals("revoked"), 2);
    // Another token for the same identity still works.
    f.certify(PAY, &f.token("pay"), PAY).await.unwrap();
    // A list that cannot be read fails closed.
    std::fs::remove_file(&f.revoked).unwrap();
    std::fs::create_dir(&f.revoked).unwrap();
    let e = f.certify(PAY, &f.token("pay"), PAY).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}
