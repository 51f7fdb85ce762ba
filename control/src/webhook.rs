//! The mutating admission webhook: HTTPS `POST /mutate`, where the Kubernetes API server sends
//! an `AdmissionReview` v1 for each Pod created in a namespace labelled `tern.dev/inject:
//! enabled`, and gets back a JSONPatch that adds the sidecar ([`review`]). The mutation is
//! `tern_inject`'s, the same as `ternctl inject`.
//!
//! The listener presents a server certificate from the control plane's own CA for
//! `tern-control.tern.svc` and `tern-control.tern.svc.cluster.local` (the API server checks it
//! against the webhook configuration's `caBundle`: the trust anchor), re-issued at about 70%
//! of its lifetime. Off unless `--webhook-listen` is given.

pub mod review;

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::ca::{self, Ca};
use crate::metrics::Metrics;
use crate::tls::{renewal_time, HANDSHAKE_TIMEOUT, OWN_CERT_LIFETIME};

/// The names the API server reaches the webhook by (the `tern-control` Service in `tern`).
pub const DNS_NAMES: [&str; 2] = [
    "tern-control.tern.svc",
    "tern-control.tern.svc.cluster.local",
];
/// The API server sends objects of at most 3 MiB; a review wraps one (plus, for updates, the
/// old one).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
const RENEW_RETRY: Duration = Duration::from_secs(10);

/// Whether and where the webhook listens, and what it injects (`--webhook-listen`,
/// `--inject-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSettings {
    /// `None`: the webhook is off.
    pub listen: Option<SocketAddr>,
    pub inject: tern_inject::Options,
}

/// The webhook's current certificate, swapped in place on renewal.
struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Some(Arc::clone(&current))
    }
}

/// A fresh key and a server certificate for [`DNS_NAMES`], and when it expires.
fn issue(ca: &Ca) -> anyhow::Result<(CertifiedKey, SystemTime, SystemTime)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued = ca.issue_server(&DNS_NAMES, &key, OWN_CERT_LIFETIME)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = tern_identity::tls::provider()
        .key_provider
        .load_private_key(der)
        .context("loading the webhook key")?;
    Ok((
        CertifiedKey::new(issued.chain, signer),
        issued.not_before,
        issued.not_after,
    ))
}

/// Binds `settings.listen`, issues the certificate and serves until `stop`; returns the
/// bound address. `None` when the webhook is off.
pub async fn start(
    settings: &WebhookSettings,
    ca: Arc<Ca>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(listen) = settings.listen else {
        return Ok(None);
    };
    let (certified, not_before, not_after) =
        issue(&ca).context("issuing the webhook's certificate")?;
    metrics
        .certificate_expiry
        .with_label_values(&["webhook"])
        .set(ca::unix_seconds(not_after));
    let cert = Arc::new(ServingCert {
        current: RwLock::new(Arc::new(certified)),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(tern_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .context("webhook TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&cert) as Arc<dyn ResolvesServerCert>);
    tls.alpn_protocols = vec![tern_identity::tls::ALPN_HTTP1.to_vec()];
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the webhook listener on {listen}"))?;
    let addr = listener.local_addr().context("webhook listener address")?;
    tracing::info!(
        webhook = %addr,
        names = ?DNS_NAMES,
        not_after = %ca::rfc3339(not_after),
        "serving the admission webhook"
    );
    tokio::spawn(keep_fresh(
        cert,
        ca,
        Arc::clone(&metrics),
        renewal_time(not_before, not_after),
        stop.clone(),
    ));
    tokio::spawn(serve(
        listener,
        TlsAcceptor::from(Arc::new(tls)),
        Arc::new(settings.inject.clone()),
        metrics,
        stop,
    ));
    Ok(Some(addr))
}

/// Re-issues the certificate in `cert` when `due` and at about 70% of each new one's lifetime,
/// until `stop`. Handshakes pick the new one up at once; open connections keep theirs.
async fn keep_fresh(
    cert: Arc<ServingCert>,
    ca: Arc<Ca>,
    metrics: Arc<Metrics>,
    mut due: SystemTime,
    stop: CancellationToken,
) {
    loop {
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(Duration::from_secs(1));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match issue(&ca) {
            Ok((certified, not_before, not_after)) => {
                *cert.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
                metrics
                    .certificate_expiry
                    .with_label_values(&["webhook"])
                    .set(ca::unix_seconds(not_after));
                let not_after_text = ca::rfc3339(not_after);
                tracing::info!(not_after = %not_after_text, "renewed the webhook's certificate");
                due = renewal_time(not_before, not_after);
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(%error, "cannot renew the webhook's certificate; retrying");
                due = SystemTime::now() + RENEW_RETRY;
            }
        }
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    options: Arc<tern_inject::Options>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let options = Arc::clone(&options);
        let metrics = Arc::clone(&metrics);
        let http = http.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let options = Arc::clone(&options);
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(handle(req, &options, &metrics).await) }
            });
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended with error");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    options: &tern_inject::Options,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/mutate" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "POST only\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            metrics
                .webhook_reviews
                .with_label_values(&["bad_request"])
                .inc();
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("reading the body: {e}\n"),
            );
        }
    };
    match review::review(&body, options) {
        Ok(answer) => {
            metrics
                .webhook_reviews
                .with_label_values(&[answer.decision.result()])
                .inc();
            match &answer.decision {
                review::Decision::Denied(why) => {
                    let object = &answer.object;
                    tracing::warn!(%object, reason = %why, "admission review denied");
                }
                decision => tracing::info!(object = %answer.object, ?decision, "admission review"),
            }
            let text = serde_json::to_vec(&answer.body).unwrap_or_default();
            reply(StatusCode::OK, "application/json", text)
        }
        Err(e) => {
            metrics
                .webhook_reviews
                .with_label_values(&["bad_request"])
                .inc();
            tracing::info!(error = %e, "not an admission review");
            reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    rsp
}
