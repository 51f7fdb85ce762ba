//! The `tern.identity.v1.Identity` service: the CA signs a workload's CSR
//! for the identity its bootstrap token proves.
//!
//! Certify checks, in this order, and refuses with the code the protocol
//! defines (`proto/proto/tern/identity/v1/identity.proto`):
//! 1. the call came over TLS (a token must not cross the network in the
//!    clear) and the token reviews into a namespace and service account
//!    (UNAUTHENTICATED otherwise; UNAVAILABLE if the reviewer cannot decide);
//! 2. the token's id is not in the revocation list (UNAUTHENTICATED; read
//!    afresh each time, see [`tokens::revoked`]; UNAVAILABLE if unreadable);
//! 3. the identity asked for is a SPIFFE id of this trust domain (INVALID_ARGUMENT);
//! 4. its namespace and service account are the token's (PERMISSION_DENIED);
//! 5. the token has not expired — or the caller presents a live client
//!    certificate for that very identity: a running workload renews with the
//!    token it started with, but a leaked expired token bootstraps nothing
//!    (UNAUTHENTICATED);
//! 6. the CSR reads, its self-signature verifies, and its only SAN is that
//!    identity as a URI (INVALID_ARGUMENT).
//!
//! Every issuance and refusal is logged (naming the token by its id, never
//! the token) and counted.

mod anchors;

pub use anchors::follow as follow_anchors;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tern_identity::tls::{server_config, ClientAuth};
use tern_identity::{CertStore, SpiffeId, TrustAnchors};
use tern_proto::identity::v1 as pb;
use tern_proto::identity::v1::identity_server::IdentityServer;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};

use crate::ca::{self, Ca, CsrError, Issued, Source};
use crate::metrics::Metrics;
use crate::tls::{issue_own, ConnInfo};
use crate::tokens::revoked::RevocationList;
use crate::tokens::{self, ReviewError, Reviewed, TokenReviewer, TokenSettings};

/// Bound on a whole CertifyRequest (the CSR alone is bounded tighter).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_IDENTITY_BYTES: usize = 1024;

/// What the identity side starts with, checked at the edge (`--trust-domain`,
/// `--identity`, `--cert-lifetime`, the CA and token flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentitySettings {
    /// As SPIFFE ids spell it (lowercase).
    pub trust_domain: String,
    /// The control plane's own SPIFFE id, in `trust_domain`.
    pub control_identity: SpiffeId,
    /// Lifetime of the workload certificates the CA issues.
    pub cert_lifetime: Duration,
    pub ca: Source,
    pub tokens: TokenSettings,
}

/// The control plane's identity side: its CA, its own certificate and what
/// `/state` says about them.
pub struct Authority {
    pub ca: Arc<Ca>,
    /// The bundle client certificates are checked against: `ca`'s anchor file, reloaded
    /// when it changes ([`follow_anchors`]).
    pub anchors: Arc<TrustAnchors>,
    /// The control plane's own certificate, renewed in place.
    pub serving: Arc<CertStore>,
    pub control_identity: SpiffeId,
    pub cert_lifetime: Duration,
    pub token_key_file: PathBuf,
}

impl Authority {
    /// The identity part of `/state`.
    pub fn json(&self) -> Value {
        let mut v = self.ca.json();
        let bundle = self.anchors.current();
        v["trust_anchors_in_force"] = serde_json::json!({
            "roots": bundle.len(),
            "fingerprint": bundle.fingerprint(),
        });
        v["control_plane_identity"] = Value::from(self.control_identity.to_string());
        v["control_plane_certificate_expires"] = self
            .serving
            .get()
            .map(|c| Value::from(ca::rfc3339(c.not_after)))
            .unwrap_or(Value::Null);
        v["workload_certificate_lifetime"] =
            Value::from(humantime::format_duration(self.cert_lifetime).to_string());
        v["token_key_file"] = Value::from(self.token_key_file.display().to_string());
        v
    }
}

/// Everything the identity side needs at start.
pub struct Setup {
    pub authority: Arc<Authority>,
    pub service: IdentityService,
    pub acceptor: TlsAcceptor,
}

/// Loads (or generates) the CA and the token key, issues the control plane's
/// own certificate and builds the TLS acceptor of the gRPC listener.
pub fn setup(settings: &IdentitySettings, metrics: &Arc<Metrics>) -> anyhow::Result<Setup> {
    let control_identity = settings.control_identity.clone();
    let ca = Arc::new(Ca::load(&settings.ca, &settings.trust_domain)?);
    let token_key_file = settings.tokens.key_file.clone();
    let reviewer = tokens::reviewer(&settings.tokens)?;
    let serving = CertStore::new();
    let own =
        issue_own(&ca, &control_identity).context("issuing the control plane's certificate")?;
    let expiry = |name: &str, t| {
        metrics
            .certificate_expiry
            .with_label_values(&[name])
            .set(ca::unix_seconds(t));
    };
    expiry("trust_anchor", ca.anchor().not_after);
    expiry("issuer", ca.issuer().not_after);
    expiry("control_plane", own.not_after);
    serving.set(own);
    let anchors = TrustAnchors::from_pem(ca.anchor_pem().as_bytes()).context("trust anchor")?;
    metrics
        .trust_anchors
        .set(i64::try_from(anchors.current().len()).unwrap_or(i64::MAX));
    let tls = server_config(
        Arc::clone(&serving),
        Arc::clone(&anchors),
        ClientAuth::Optional,
    )
    .context("TLS server config")?;
    let revoked = RevocationList::new(settings.tokens.revoked_file.clone());
    tracing::info!(path = %revoked.path().display(), "bootstrap token revocation list (read on every Certify)");
    let service = IdentityService::new(
        Arc::clone(&ca),
        reviewer,
        settings.cert_lifetime,
        Arc::clone(metrics),
    )
    .with_revocation_list(revoked);
    Ok(Setup {
        authority: Arc::new(Authority {
            ca,
            anchors,
            serving,
            control_identity,
            cert_lifetime: settings.cert_lifetime,
            token_key_file,
        }),
        service,
        acceptor: TlsAcceptor::from(tls),
    })
}

pub struct IdentityService {
    ca: Arc<Ca>,
    reviewer: Arc<dyn TokenReviewer>,
    lifetime: Duration,
    metrics: Arc<Metrics>,
    revoked: Option<RevocationList>,
}

/// Why Certify said no.
#[derive(Debug)]
enum Refusal {
    Plaintext,
    Unauthenticated(String),
    Revoked(String),
    Unavailable(String),
    InvalidIdentity(String),
    WrongIdentity { granted: String, asked: String },
    InvalidCsr(CsrError),
    Internal(String),
}

impl Refusal {
    /// The metric label.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Plaintext => "plaintext",
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::Revoked(_) => "revoked",
            Refusal::Unavailable(_) => "unavailable",
            Refusal::InvalidIdentity(_) => "invalid_identity",
            Refusal::WrongIdentity { .. } => "permission_denied",
            Refusal::InvalidCsr(_) => "invalid_csr",
            Refusal::Internal(_) => "internal",
        }
    }

    fn status(&self) -> Status {
        match self {
            Refusal::Plaintext => Status::unauthenticated(
                "Certify is served over TLS only (verify the control plane's identity): a token \
                 must not cross the network in the clear",
            ),
            Refusal::Unauthenticated(m) => Status::unauthenticated(m.clone()),
            Refusal::Revoked(id) => {
                Status::unauthenticated(format!("bootstrap token: token {id} is revoked"))
            }
            Refusal::Unavailable(m) => Status::unavailable(m.clone()),
            Refusal::InvalidIdentity(m) => Status::invalid_argument(m.clone()),
            Refusal::WrongIdentity { granted, asked } => Status::permission_denied(format!(
                "the token grants {granted}; it cannot certify identity {asked}"
            )),
            Refusal::InvalidCsr(e) => Status::invalid_argument(e.to_string()),
            Refusal::Internal(m) => Status::internal(m.clone()),
        }
    }
}

impl IdentityService {
    pub fn new(
        ca: Arc<Ca>,
        reviewer: Arc<dyn TokenReviewer>,
        lifetime: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        IdentityService {
            ca,
            reviewer,
            lifetime,
            metrics,
            revoked: None,
        }
    }

    /// Refuses the tokens whose ids `list` names.
    pub fn with_revocation_list(mut self, list: RevocationList) -> Self {
        self.revoked = Some(list);
        self
    }

    /// The tonic service, with the request size bounded.
    pub fn into_server(self) -> IdentityServer<IdentityService> {
        IdentityServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn decide(
        &self,
        conn: &ConnInfo,
        req: &pb::CertifyRequest,
        token_id: &mut Option<String>,
    ) -> Result<(SpiffeId, Issued), Refusal> {
        if !conn.tls {
            return Err(Refusal::Plaintext);
        }
        let reviewed: Reviewed = self
            .reviewer
            .review(&req.token)
            .await
            .map_err(|e| match e {
                ReviewError::Rejected(m) => {
                    Refusal::Unauthenticated(format!("bootstrap token: {m}"))
                }
                ReviewError::Unavailable(m) => Refusal::Unavailable(m),
            })?;
        *token_id = Some(reviewed.token_id.clone());
        if let Some(list) = &self.revoked {
            match list.contains(&reviewed.token_id).await {
                Ok(false) => {}
                Ok(true) => return Err(Refusal::Revoked(reviewed.token_id.clone())),
                // Fail closed: better no certificate than one for a revoked token.
                Err(e) => return Err(Refusal::Unavailable(e)),
            }
        }
        if req.identity.len() > MAX_IDENTITY_BYTES {
            return Err(Refusal::InvalidIdentity(format!(
                "identity: longer than {MAX_IDENTITY_BYTES} bytes"
            )));
        }
        let id = SpiffeId::parse(&req.identity)
            .map_err(|e| Refusal::InvalidIdentity(format!("identity: {e}")))?;
        if id.trust_domain() != self.ca.trust_domain() {
            return Err(Refusal::InvalidIdentity(format!(
                "identity {id} is not in this mesh's trust domain {}",
                self.ca.trust_domain()
            )));
        }
        if id.namespace() != reviewed.namespace || id.service_account() != reviewed.service_account
        {
            return Err(Refusal::WrongIdentity {
                granted: format!(
                    "namespace {} service account {}",
                    reviewed.namespace, reviewed.service_account
                ),
                asked: id.to_string(),
            });
        }
        if reviewed.expired && conn.peer_identity.as_deref() != Some(id.to_string().as_str()) {
            return Err(Refusal::Unauthenticated(
                "bootstrap token: token expired (it renews only the certificate of a caller \
                 presenting a live one for the same identity; mint a new token with \
                 `ternctl token create`)"
                    .into(),
            ));
        }
        let key = ca::check_csr(&req.csr_pem, &id).map_err(Refusal::InvalidCsr)?;
        let issued = self
            .ca
            .issue(&id, &key, self.lifetime)
            .map_err(|e| Refusal::Internal(format!("the CA cannot sign: {e}")))?;
        Ok((id, issued))
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let conn = ConnInfo::of(&request);
        let req = request.into_inner();
        let mut token_id = None;
        match self.decide(&conn, &req, &mut token_id).await {
            Ok((id, issued)) => {
                self.metrics.certificates_issued.inc();
                tracing::info!(
                    identity = %id,
                    token_id = token_id.as_deref().unwrap_or_default(),
                    peer = %peer(&conn),
                    not_after = %ca::rfc3339(issued.not_after),
                    "certificate issued"
                );
                Ok(Response::new(pb::CertifyResponse {
                    chain_pem: issued.chain_pem(),
                    not_before: ca::unix_seconds(issued.not_before),
                    not_after: ca::unix_seconds(issued.not_after),
                }))
            }
            Err(refusal) => {
                let status = refusal.status();
                self.metrics
                    .certificate_refusals
                    .with_label_values(&[refusal.reason()])
                    .inc();
                tracing::warn!(
                    reason = refusal.reason(),
                    token_id = token_id.as_deref().unwrap_or("-"),
                    peer = %peer(&conn),
                    identity = %truncate(&req.identity, 256),
                    detail = status.message(),
                    "certificate refused"
                );
                Err(status)
            }
        }
    }
}

fn peer(conn: &ConnInfo) -> String {
    conn.remote
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into())
}

/// At most `max` bytes of `s`, cut at a character boundary (for logs).
fn truncate(s: &str, max: usize) -> &str {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests;
