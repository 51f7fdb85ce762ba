//! rustls configurations for the mesh: TLS 1.3 only, the ring provider,
//! chains checked against the mesh trust anchors, and on the client side the
//! server's SPIFFE id checked against the identity discovery gave for the
//! endpoint (instead of a DNS name: mesh certificates carry no DNS names).
//!
//! Both ends check chains against the [`TrustAnchors`] bundle in force at
//! the handshake, so a configuration built once follows a rotated bundle.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    Error, OtherError, ServerConfig, SignatureScheme,
};

use crate::anchors::TrustAnchors;
use crate::store::CertStore;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Opaque TCP between sidecars: after the handshake the client names the
/// destination port in a small header, then the connection carries raw bytes.
pub const ALPN_TERN_TCP: &[u8] = b"tern.tcp/1";

pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Whether the client must present a mesh certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// Asked for but not required: the control plane issues the first
    /// certificate to a workload that has none yet.
    Optional,
}

/// A server config presenting `store`'s certificate, ALPN h2, http/1.1 and
/// (for sidecars' opaque TCP) tern.tcp/1.
pub fn server_config(
    store: Arc<CertStore>,
    anchors: Arc<TrustAnchors>,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = Arc::new(AnchoredClientVerifier {
        anchors,
        auth: client_auth,
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(store);
    // In order of preference: a client offering h2 or http/1.1 never ends up
    // on tern.tcp/1, which only sidecars dialing opaque TCP offer.
    config.alpn_protocols = vec![
        ALPN_H2.to_vec(),
        ALPN_HTTP1.to_vec(),
        ALPN_TERN_TCP.to_vec(),
    ];
    // No resumption: a resumed session skips certificate checks, so it could
    // outlive an expired or rotated certificate. Mesh connections are
    // long-lived, so a full handshake per connection costs little.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client config that accepts only a server presenting `expected` (a
/// SPIFFE id) under the mesh trust anchors, and presents `store`'s
/// certificate when it holds one.
pub fn client_config(
    store: Option<Arc<CertStore>>,
    anchors: Arc<TrustAnchors>,
    expected: Arc<str>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = Arc::new(SpiffeVerifier {
        anchors,
        expected,
        provider: provider(),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match store {
        Some(store) => builder.with_client_cert_resolver(store),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // See server_config: every connection checks the peer's certificate.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name to dial with: mesh certificates are checked by SPIFFE id,
/// and an IP address keeps rustls from sending a misleading SNI.
pub fn server_name(addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// The peer's certificate named another identity than discovery expects.
#[derive(Debug)]
pub struct WrongIdentity {
    pub expected: Arc<str>,
    pub presented: String,
}

impl fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer presented identity {}, expected {}",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for WrongIdentity {}

#[derive(Debug)]
struct SpiffeVerifier {
    anchors: Arc<TrustAnchors>,
    expected: Arc<str>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        self.anchors.with(|bundle| {
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                bundle.roots(),
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )
        })?;
        let presented = crate::spiffe::spiffe_id_of(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        if presented != *self.expected {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(WrongIdentity {
                    expected: Arc::clone(&self.expected),
                    presented,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Only TLS 1.3 is offered, so a TLS 1.2 signature is never valid here.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks client certificates with the verifier of the bundle in force at
/// each handshake (built once per bundle, so a handshake only loads a pointer).
#[derive(Debug)]
struct AnchoredClientVerifier {
    anchors: Arc<TrustAnchors>,
    auth: ClientAuth,
}

impl ClientCertVerifier for AnchoredClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.auth == ClientAuth::Required
    }

    /// No hints: they would have to outlive the bundle they came from, and
    /// mesh clients present their one certificate whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.anchors.with(|bundle| {
            bundle
                .client_verifier(self.auth)
                .verify_client_cert(end_entity, intermediates, now)
        })
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Only TLS 1.3 is accepted.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The verified SPIFFE id of a TLS peer, if it presented a certificate with one.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Arc<str>> {
    let leaf = conn.peer_certificates()?.first()?;
    crate::spiffe::spiffe_id_of(leaf).ok().map(Arc::from)
}

pub fn version_name(conn: &rustls::CommonState) -> &'static str {
    match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    }
}

/// Whether the first bytes of a connection are a TLS handshake record
/// (content type 22, version 3.x), as opposed to HTTP/1 or an HTTP/2 preface.
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, ..])
}

/// A short, bounded reason for a failed handshake, for metric labels and logs.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => "closed",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => "expired",
            CertificateError::Other(OtherError(e)) if e.is::<WrongIdentity>() => "wrong_identity",
            CertificateError::Other(OtherError(e)) if e.is::<crate::spiffe::IdError>() => {
                "no_identity"
            }
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_client_cert",
        Error::AlertReceived(a) => match a {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRequired
            | AlertDescription::AccessDenied => "rejected_by_peer",
            _ => "peer_alert",
        },
        Error::InvalidMessage(_) | Error::InappropriateHandshakeMessage { .. } => "not_tls",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        _ => "other",
    }
}
