//! Mesh mTLS handshakes between the configs of `tern_identity::tls`, over an
//! in-memory pipe, with certificates from a throwaway CA.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tern_identity::tls::{self, ClientAuth, ALPN_H2};
use tern_identity::{Bundle, CertStore, ConnTls, Credentials, TrustAnchors};
use tokio_rustls::{TlsAcceptor, TlsConnector};

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, id: &str) -> Arc<CertStore> {
    let store = CertStore::new();
    store.set(credentials(ca, id));
    store
}

fn credentials(ca: &Ca, id: &str) -> Credentials {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Credentials::new(vec![cert.der().clone()], &der).unwrap()
}

fn roots(ca: &Ca) -> Arc<TrustAnchors> {
    bundle(&[ca]).map(TrustAnchors::new).unwrap()
}

/// The roots of `cas` as one PEM bundle.
fn bundle(cas: &[&Ca]) -> Result<Bundle, tern_identity::anchors::AnchorsError> {
    let certs: Vec<CertificateDer<'static>> = cas.iter().map(|c| c.cert.clone()).collect();
    Bundle::parse(tern_identity::pem::encode_certs(&certs).as_bytes())
}

const PAY: &str = "spiffe://cluster.local/ns/default/sa/pay";
const ORDER: &str = "spiffe://cluster.local/ns/default/sa/order";

/// Runs one handshake: the server presents `server`, the client `client`
/// and expects `expected`. Returns the client's error reason or what the
/// server saw of the client.
async fn handshake(
    server: Arc<CertStore>,
    server_roots: Arc<TrustAnchors>,
    client: Option<Arc<CertStore>>,
    client_roots: Arc<TrustAnchors>,
    expected: &str,
) -> Result<ConnTls, (&'static str, Option<&'static str>)> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_cfg = tls::server_config(server, server_roots, ClientAuth::Required).unwrap();
    let client_cfg =
        tls::client_config(client, client_roots, Arc::from(expected), &[ALPN_H2]).unwrap();
    let srv = tokio::spawn(async move {
        let s = TlsAcceptor::from(server_cfg).accept(b).await;
        s.map(|s| {
            let c = s.get_ref().1;
            (
                ConnTls {
                    version: Some(tls::version_name(c)),
                    peer_identity: tls::peer_identity(c),
                },
                c.alpn_protocol().map(<[u8]>::to_vec),
            )
        })
        .map_err(|e| tls::failure_reason(&e))
    });
    let name = tls::server_name("127.0.0.1".parse().unwrap());
    let client = TlsConnector::from(client_cfg).connect(name, a).await;
    let server = srv.await.unwrap();
    match (client, server) {
        (Ok(_), Ok((conn, alpn))) => {
            assert_eq!(alpn.as_deref(), Some(ALPN_H2));
            Ok(conn)
        }
        (Err(e), s) => Err((tls::failure_reason(&e), s.err())),
        (Ok(_), Err(s)) => Err(("ok", Some(s))),
    }
}

#[tokio::test]
async fn mutual_tls_checks_identity_and_ca() {
    let mesh = ca();
    let other = ca();
    let pay = leaf(&mesh, PAY);
    let order = leaf(&mesh, ORDER);

    // Right identity both ways: TLS 1.3, and the server sees the client's id.
    let ok = handshake(
        Arc::clone(&pay),
        roots(&mesh),
        Some(Arc::clone(&order)),
        roots(&mesh),
        PAY,
    )
    .await
    .unwrap();
    assert_eq!(ok.version, Some("TLSv1.3"));
    assert_eq!(ok.peer_identity.as_deref(), Some(ORDER));

    // order posing as pay: valid mesh cert, wrong identity.
    let err = handshake(
        Arc::clone(&order),
        roots(&mesh),
        Some(Arc::clone(&order)),
        roots(&mesh),
        PAY,
    )
    .await
    .unwrap_err();
    assert_eq!(err.0, "wrong_identity");

    // A server from another CA.
    let impostor = leaf(&other, PAY);
    let err = handshake(
        impostor,
        roots(&other),
        Some(Arc::clone(&order)),
        roots(&mesh),
        PAY,
    )
    .await
    .unwrap_err();
    assert_eq!(err.0, "unknown_ca");

    // A client from another CA, or with no certificate, is refused by the server.
    let stranger = leaf(&other, ORDER);
    let err = handshake(
        Arc::clone(&pay),
        roots(&mesh),
        Some(stranger),
        roots(&mesh),
        PAY,
    )
    .await
    .unwrap_err();
    assert_eq!(err.1, Some("unknown_ca"));
    let err = handshake(Arc::clone(&pay), roots(&mesh), None, roots(&mesh), PAY)
        .await
        .unwrap_err();
    assert_eq!(err.1, Some("no_client_cert"));
}

#[tokio::test]
async fn a_renewed_certificate_is_presented_by_the_next_handshake() {
    let mesh = ca();
    let pay = leaf(&mesh, PAY);
    let order = leaf(&mesh, ORDER);
    let first = pay.get().unwrap().chain()[0].clone();
    // Renewal swaps the credentials in place.
    pay.set(credentials(&mesh, PAY));
    let now = pay.get().unwrap().chain()[0].clone();
    assert_ne!(first, now);
    let ok = handshake(pay, roots(&mesh), Some(order), roots(&mesh), PAY)
        .await
        .unwrap();
    assert_eq!(ok.peer_identity.as_deref(), Some(ORDER));
}

/// A root rotation as the sidecars see it: the same configs, built once, follow the bundle in
/// force at each handshake. Old root, then old and new, then new only.
#[tokio::test]
async fn handshakes_follow_a_replaced_bundle() {
    let old = ca();
    let new = ca();
    let server_anchors = roots(&old);
    let client_anchors = roots(&old);
    let pay_old = leaf(&old, PAY);
    let order_new = leaf(&new, ORDER);
    let try_with = |server: &Arc<CertStore>, client: &Arc<CertStore>| {
        handshake(
            Arc::clone(server),
            Arc::clone(&server_anchors),
            Some(Arc::clone(client)),
            Arc::clone(&client_anchors),
            PAY,
        )
    };
    // Only the old root: a client certificate from the new one is refused.
    let err = try_with(&pay_old, &order_new).await.unwrap_err();
    assert_eq!(err.1, Some("unknown_ca"));

    // Both roots: old and new certificates meet.
    server_anchors.replace(bundle(&[&old, &new]).unwrap());
    client_anchors.replace(bundle(&[&old, &new]).unwrap());
    let ok = try_with(&pay_old, &order_new).await.unwrap();
    assert_eq!(ok.peer_identity.as_deref(), Some(ORDER));

    // Only the new root: the old server certificate is refused by the client, a renewed one
    // from the new root is accepted.
    server_anchors.replace(bundle(&[&new]).unwrap());
    client_anchors.replace(bundle(&[&new]).unwrap());
    let err = try_with(&pay_old, &order_new).await.unwrap_err();
    assert_eq!(err.0, "unknown_ca");
    let pay_new = leaf(&new, PAY);
    let ok = try_with(&pay_new, &order_new).await.unwrap();
    assert_eq!(ok.peer_identity.as_deref(), Some(ORDER));
}
