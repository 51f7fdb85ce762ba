//! A stand-in for the Kubernetes API server's TokenReview endpoint, on loopback over real TLS.
//!
//! This machine has no Kubernetes API server, so tests that need one start this instead. It
//! checks what a real API server checks of a TokenReview create: `POST
//! /apis/authentication.k8s.io/v1/tokenreviews`, the caller's bearer token (401 otherwise), a
//! JSON content type (415 otherwise) and a body that reads as an `authentication.k8s.io/v1`
//! TokenReview (k8s-openapi's own deserialization; 400 otherwise). It answers `201 Created` with
//! the TokenReview and its status, as a real one does: authenticated for the tokens it was told
//! about (when the review asks for an audience they were issued for), not authenticated for any
//! other. Its certificate is signed by its own CA for `127.0.0.1` and `kubernetes.default.svc`,
//! like an API server's (service IP and DNS name).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

pub const TOKENREVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A token the stand-in authenticates: whose it is and which audiences it was issued for.
#[derive(Clone, Debug)]
pub struct KnownToken {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
}

#[derive(Default)]
struct Seen {
    /// Reviews that passed every check, by the token reviewed.
    reviews: Vec<String>,
    /// Requests refused, and why.
    refused: Vec<String>,
}

struct Shared {
    bearer: String,
    known: HashMap<String, KnownToken>,
    seen: Mutex<Seen>,
}

pub struct KubeApiStandIn {
    pub addr: SocketAddr,
    /// The CA (PEM) its certificate is signed by: what `--kube-ca-file` names.
    pub ca_file: PathBuf,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl KubeApiStandIn {
    /// Listens on a free loopback port, writing its CA to `dir/kube-ca.crt`; accepts only callers
    /// presenting `bearer`.
    pub async fn start(
        dir: &Path,
        bearer: &str,
        known: HashMap<String, KnownToken>,
    ) -> Result<Self> {
        let (ca_pem, config) = tls_config()?;
        let ca_file = dir.join("kube-ca.crt");
        std::fs::write(&ca_file, ca_pem).context("writing the stand-in's CA")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            bearer: bearer.to_owned(),
            known,
            seen: Mutex::default(),
        });
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(serve(listener, acceptor, Arc::clone(&shared)));
        Ok(KubeApiStandIn {
            addr,
            ca_file,
            shared,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The tokens of the reviews that passed every check, in order.
    pub fn reviews(&self) -> Vec<String> {
        self.lock().reviews.clone()
    }

    /// The requests it refused, and why.
    pub fn refused(&self) -> Vec<String> {
        self.lock().refused.clone()
    }

    /// Stops listening: connections are refused from now on.
    pub async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.shared.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for KubeApiStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CA, and a server config presenting a certificate it signed.
pub(crate) fn tls_config() -> Result<(String, Arc<rustls::ServerConfig>)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubernetes stand-in CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![
        "kubernetes.default.svc".to_string(),
        "kubernetes".to_string(),
    ])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let cert = params.signed_by(&key, &issuer)?;
    let chain = vec![cert.der().clone(), ca_cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(tern_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), Arc::new(config)))
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    serve_tls(listener, acceptor, service).await;
}

/// Serves `service` over TLS on every connection `listener` accepts, HTTP/1.1 or HTTP/2 as the
/// client picks, as an API server does; a failed handshake ends only its own connection.
pub(crate) async fn serve_tls<S, B>(listener: TcpListener, acceptor: TlsAcceptor, service: S)
where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
        });
    }
}

async fn handle(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match check(shared, req).await {
        Ok(review) => json(StatusCode::CREATED, &review),
        Err((code, why)) => {
            shared
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refused
                .push(format!("{code}: {why}"));
            let status = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": why, "code": code.as_u16(),
            });
            json(code, &status)
        }
    }
}

async fn check(
    shared: &Shared,
    req: Request<hyper::body::Incoming>,
) -> Result<TokenReview, (StatusCode, String)> {
    if req.uri().path() != TOKENREVIEWS_PATH {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no such path {}", req.uri().path()),
        ));
    }
    if req.method() != Method::POST {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} not allowed", req.method()),
        ));
    }
    let expected = format!("Bearer {}", shared.bearer);
    if req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        return Err((StatusCode::UNAUTHORIZED, "Unauthorized".into()));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.split(';').next().map(str::trim) != Some("application/json") {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported media type {content_type:?}"),
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?
        .to_bytes();
    let mut review: TokenReview = serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("not a TokenReview: {e}")))?;
    let token = review.spec.token.clone().unwrap_or_default();
    let asked = review.spec.audiences.clone().unwrap_or_default();
    shared
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reviews
        .push(token.clone());
    let found = shared.known.get(&token).and_then(|known| {
        let common: Vec<String> = if asked.is_empty() {
            known.audiences.clone()
        } else {
            asked
                .iter()
                .filter(|a| known.audiences.contains(a))
                .cloned()
                .collect()
        };
        (!common.is_empty()).then_some((known, common))
    });
    review.status = Some(match found {
        Some((known, audiences)) => TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences),
            user: Some(UserInfo {
                username: Some(format!(
                    "system:serviceaccount:{}:{}",
                    known.namespace, known.service_account
                )),
                uid: Some(format!("uid-{}", known.service_account)),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{}", known.namespace),
                    "system:authenticated".into(),
                ]),
                extra: Some(
                    [(
                        "authentication.kubernetes.io/credential-id".to_string(),
                        vec![format!("JTI=jti-{}", known.service_account)],
                    )]
                    .into(),
                ),
            }),
            error: None,
        },
        None => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("[invalid bearer token, token lookup failed]".into()),
            ..Default::default()
        },
    });
    Ok(review)
}

fn json<T: serde::Serialize>(code: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
