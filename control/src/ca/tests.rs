//! The CA: generation and reuse, loading from files, what a workload
//! certificate says, and that an issued chain works in a real handshake.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tern_identity::csr::WorkloadKey;
use tern_identity::tls::{client_config, server_config, ClientAuth, ALPN_H2};
use tern_identity::{CertStore, Credentials};
use x509_parser::prelude::GeneralName;

use super::*;

const TD: &str = "cluster.local";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", sa).unwrap()
}

fn state_ca(dir: &Path) -> Ca {
    Ca::load(&Source::StateDir(dir.to_path_buf()), TD).unwrap()
}

/// A key and a certificate for `sa` from `ca`, as a sidecar would hold them.
fn credentials(ca: &Ca, sa: &str) -> Credentials {
    let key = WorkloadKey::generate().unwrap();
    let public = check_csr(&key.csr_pem(&id(sa)).unwrap(), &id(sa)).unwrap();
    let issued = ca
        .issue(&id(sa), &public, Duration::from_secs(3600))
        .unwrap();
    Credentials::new(issued.chain, &key.private_key_der()).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generated_once_then_reused_with_private_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let first = state_ca(&dir);
    assert_eq!(mode(&dir.join(ANCHOR_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir.join(ISSUER_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let issuer_pem = std::fs::read(dir.join(ISSUER_FILE)).unwrap();
    let again = state_ca(&dir);
    assert_eq!(
        first.anchor_pem(),
        again.anchor_pem(),
        "the same trust anchor"
    );
    assert_eq!(std::fs::read(dir.join(ISSUER_FILE)).unwrap(), issuer_pem);
    assert_eq!(again.anchor_path(), dir.join(ANCHOR_FILE));
    // Ten years and one year, give or take the backdating.
    let life = |f: &CertFacts| f.not_after.duration_since(f.not_before).unwrap();
    assert_eq!(life(first.anchor()), ANCHOR_LIFETIME + CLOCK_SKEW);
    assert_eq!(life(first.issuer()), ISSUER_LIFETIME + CLOCK_SKEW);
    assert!(first
        .anchor()
        .subject
        .contains("Tern trust anchor cluster.local"));
    let json = first.json();
    assert_eq!(json["trust_domain"], TD);
    assert!(json["issuer"]["not_after"].as_str().is_some());
}

#[test]
fn a_partial_state_dir_is_refused_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    state_ca(tmp.path());
    std::fs::remove_file(tmp.path().join(ISSUER_KEY_FILE)).unwrap();
    let e = Ca::load(&Source::StateDir(tmp.path().to_path_buf()), TD)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("issuer-key.pem missing"), "{e:#}");
    // Without the root's key the CA still works (it just cannot replace its issuer).
    let tmp = tempfile::tempdir().unwrap();
    state_ca(tmp.path());
    std::fs::remove_file(tmp.path().join(ANCHOR_KEY_FILE)).unwrap();
    state_ca(tmp.path());
}

#[test]
fn an_issuer_near_its_expiry_is_replaced_from_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    generate::generate(tmp.path(), TD, now - Duration::from_secs(350 * 24 * 3600)).unwrap();
    let anchor = std::fs::read(tmp.path().join(ANCHOR_FILE)).unwrap();
    let ca = state_ca(tmp.path());
    assert_eq!(std::fs::read(tmp.path().join(ANCHOR_FILE)).unwrap(), anchor);
    let left = ca.issuer().not_after.duration_since(now).unwrap();
    assert!(
        left > ISSUER_LIFETIME - Duration::from_secs(3600),
        "{left:?}"
    );
    assert_eq!(mode(&tmp.path().join(ISSUER_KEY_FILE)), 0o600);
}

#[test]
fn files_given_by_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    state_ca(&a);
    state_ca(&b);
    let files = |anchor: &Path, cert: &Path, key: &Path| Source::Files {
        anchor: anchor.join(ANCHOR_FILE),
        issuer_cert: cert.join(ISSUER_FILE),
        issuer_key: key.join(ISSUER_KEY_FILE),
    };
    let ca = Ca::load(&files(&a, &a, &a), TD).unwrap();
    assert_eq!(ca.anchor_path(), a.join(ANCHOR_FILE));
    let e = Ca::load(&files(&a, &a, &b), TD).err().unwrap();
    assert!(format!("{e:#}").contains("does not belong"), "{e:#}");
    let e = Ca::load(&files(&a, &b, &b), TD).err().unwrap();
    assert!(
        format!("{e:#}").contains("not signed by the trust anchor"),
        "{e:#}"
    );
    // The root as its own issuer is refused: it is not sent along in chains.
    let root_as_issuer = Source::Files {
        anchor: a.join(ANCHOR_FILE),
        issuer_cert: a.join(ANCHOR_FILE),
        issuer_key: a.join(ANCHOR_KEY_FILE),
    };
    assert!(Ca::load(&root_as_issuer, TD).is_err());
    // A bundle with the root after the issuer is fine.
    let bundle = tmp.path().join("bundle.pem");
    let mut text = std::fs::read_to_string(a.join(ISSUER_FILE)).unwrap();
    text.push_str(&std::fs::read_to_string(a.join(ANCHOR_FILE)).unwrap());
    std::fs::write(&bundle, text).unwrap();
    let ca = Ca::load(
        &Source::Files {
            anchor: a.join(ANCHOR_FILE),
            issuer_cert: bundle,
            issuer_key: a.join(ISSUER_KEY_FILE),
        },
        TD,
    )
    .unwrap();
    assert_eq!(credentials(&ca, "pay").chain().len(), 2);
}

#[test]
fn a_workload_certificate_names_only_its_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = state_ca(tmp.path());
    let key = WorkloadKey::generate().unwrap();
    let public = check_csr(&key.csr_pem(&id("pay")).unwrap(), &id("pay")).unwrap();
    let before = SystemTime::now();
    let issued = ca
        .issue(&id("pay"), &public, Duration::from_secs(600))
        .unwrap();
    assert_eq!(issued.chain.len(), 2);
    let issuer_der =
        tern_identity::pem::certs(&std::fs::read(tmp.path().join(ISSUER_FILE)).unwrap()).unwrap();
    assert_eq!(issued.chain[1], issuer_der[0], "leaf, then the issuer");
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    assert!(leaf.subject().iter().next().is_none(), "empty subject");
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "a SAN with an empty subject is critical");
    assert_eq!(
        san.value.general_names,
        [GeneralName::URI("spiffe://cluster.local/ns/default/sa/pay")]
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(!leaf.is_ca());
    assert!(
        leaf.basic_constraints().unwrap().is_some(),
        "CA:FALSE spelled out"
    );
    assert_eq!(
        leaf.public_key().raw,
        rcgen::KeyPair::from_pem(&key.private_key_pem())
            .unwrap()
            .subject_public_key_info()
            .as_slice(),
        "the CSR's key, not one of the CA's making"
    );
    let not_before = unix(leaf.validity().not_before.timestamp());
    let not_after = unix(leaf.validity().not_after.timestamp());
    assert_eq!(
        (not_before, not_after),
        (issued.not_before, issued.not_after)
    );
    assert!(not_before <= before - Duration::from_secs(59));
    assert_eq!(
        not_after.duration_since(not_before).unwrap(),
        Duration::from_secs(660)
    );
    // Serial numbers differ even for the same key.
    let again = ca
        .issue(&id("pay"), &public, Duration::from_secs(600))
        .unwrap();
    let (_, again) = X509Certificate::from_der(&again.chain[0]).unwrap();
    assert_ne!(leaf.serial, again.serial);
    // Never past the issuer's own expiry.
    let long = ca
        .issue(
            &id("pay"),
            &public,
            Duration::from_secs(100 * 365 * 24 * 3600),
        )
        .unwrap();
    assert_eq!(long.not_after, ca.issuer().not_after);
}

#[test]
fn csrs_must_be_signed_and_name_exactly_the_identity() {
    let key = WorkloadKey::generate().unwrap();
    let pay_csr = key.csr_pem(&id("pay")).unwrap();
    assert!(check_csr(&pay_csr, &id("pay")).is_ok());
    match check_csr(&pay_csr, &id("order")) {
        Err(CsrError::WrongNames { found, want }) => {
            assert_eq!(found, "URI:spiffe://cluster.local/ns/default/sa/pay");
            assert_eq!(want, "spiffe://cluster.local/ns/default/sa/order");
        }
        other => panic!("{other:?}"),
    }
    // A CSR with a DNS name beside the URI.
    let mut params = CertificateParams::new(vec!["pay.example".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::URI(id("pay").to_string().try_into().unwrap()));
    let pair = rcgen::KeyPair::generate().unwrap();
    let two = params.serialize_request(&pair).unwrap().pem().unwrap();
    assert!(matches!(
        check_csr(&two, &id("pay")),
        Err(CsrError::WrongNames { .. })
    ));
    assert_eq!(check_csr("", &id("pay")), Err(CsrError::Empty));
    assert_eq!(
        check_csr(&"x".repeat(MAX_CSR_BYTES + 1), &id("pay")),
        Err(CsrError::TooLarge)
    );
    assert!(matches!(
        check_csr("garbage", &id("pay")),
        Err(CsrError::Unreadable(_))
    ));
    // Altering the request breaks its self-signature.
    let lines: Vec<&str> = pay_csr.lines().collect();
    let mut altered = lines.clone();
    let body = lines.len() / 2;
    let flipped: String = lines[body]
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 10 {
                if c == 'A' {
                    'B'
                } else {
                    'A'
                }
            } else {
                c
            }
        })
        .collect();
    altered[body] = &flipped;
    let altered = altered.join("\n");
    assert!(matches!(
        check_csr(&altered, &id("pay")),
        Err(CsrError::Unreadable(_))
    ));
}

#[tokio::test]
async fn issued_chains_pass_a_mesh_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = state_ca(tmp.path());
    let roots = tern_identity::TrustAnchors::from_pem(ca.anchor_pem().as_bytes()).unwrap();
    let server_store = CertStore::new();
    server_store.set(credentials(&ca, "pay"));
    let client_store = CertStore::new();
    client_store.set(credentials(&ca, "order"));
    let handshake = |expected: &str| {
        let server = server_config(
            Arc::clone(&server_store),
            Arc::clone(&roots),
            ClientAuth::Required,
        )
        .unwrap();
        let client = client_config(
            Some(Arc::clone(&client_store)),
            Arc::clone(&roots),
            Arc::from(expected),
            &[ALPN_H2],
        )
        .unwrap();
        async move {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let accept = tokio_rustls::TlsAcceptor::from(server).accept(s);
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let connect = tokio_rustls::TlsConnector::from(client).connect(name, c);
            let (s, c) = tokio::join!(accept, connect);
            (
                s.map(|s| tern_identity::tls::peer_identity(s.get_ref().1)),
                c.is_ok(),
            )
        }
    };
    let (server, client_ok) = handshake("spiffe://cluster.local/ns/default/sa/pay").await;
    assert!(client_ok);
    assert_eq!(
        server.unwrap().as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/order"),
        "the server sees the client's verified identity"
    );
    let (_, client_ok) = handshake("spiffe://cluster.local/ns/default/sa/ledger").await;
    assert!(
        !client_ok,
        "the client refuses a server with another identity"
    );
    // A certificate from another CA is not trusted.
    let other = tempfile::tempdir().unwrap();
    server_store.set(credentials(&state_ca(other.path()), "pay"));
    let (_, client_ok) = handshake("spiffe://cluster.local/ns/default/sa/pay").await;
    assert!(!client_ok);
}

/// During a root rotation the anchor file may gain a root, but never lose the one the issuer
/// chains to, and it holds CA certificates only.
#[test]
fn a_new_anchor_bundle_must_keep_the_issuers_root() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca = state_ca(a.path());
    let other = state_ca(b.path());
    let certs = |pem: &str| tern_identity::pem::certs(pem.as_bytes()).unwrap();
    let own = certs(ca.anchor_pem());
    let foreign = certs(other.anchor_pem());
    ca.check_anchors(&own).unwrap();
    ca.check_anchors(&[own.clone(), foreign.clone()].concat())
        .unwrap();
    ca.check_anchors(&[foreign.clone(), own.clone()].concat())
        .unwrap();
    let err = ca.check_anchors(&foreign).unwrap_err().to_string();
    assert!(err.contains("not signed by the trust anchor"), "{err}");
    let leaf = credentials(&ca, "pay").chain()[0].clone();
    let err = ca.check_anchors(&[own, vec![leaf]].concat()).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
}
