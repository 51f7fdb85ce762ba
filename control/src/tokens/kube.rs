//! The Kubernetes reviewer: a workload's projected ServiceAccount token,
//! posted to the API server as a TokenReview (`authentication.k8s.io/v1`,
//! audience `tern`).
//!
//! The call authenticates with the control plane's own ServiceAccount token
//! (re-read on every call: the kubelet rotates it) and trusts only the
//! cluster CA (`ca.crt`, also re-read), checking the API server's certificate
//! for the host it is dialled by: the service IP or `kubernetes.default.svc`,
//! both of which API server certificates carry.
//!
//! A token is accepted only when the answer says `authenticated: true`, lists
//! the audience `tern` (when it lists audiences) and names a user
//! `system:serviceaccount:<namespace>:<name>`. A token the API server does not
//! authenticate is [`ReviewError::Rejected`]; an API server out of reach, slow
//! (more than [`TIMEOUT`]), refusing the control plane's own credentials or
//! answering nonsense is [`ReviewError::Unavailable`]: that says nothing about
//! the token. Neither token is ever logged or put in an error (the answer
//! echoes the reviewed token in its `spec`, so its body is never shown).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{ReviewError, Reviewed, TokenReviewer, MAX_TOKEN_BYTES};

/// The audience the injected sidecar's projected token is issued for.
pub const AUDIENCE: &str = "tern";
pub const TOKENREVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// A review that takes longer than this is UNAVAILABLE.
pub const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
const SA_PREFIX: &str = "system:serviceaccount:";
/// Where Kubernetes (1.29 and later) names the token it reviewed (`JTI=<id>`).
const CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// Where the API server is and how to reach it (`--kube-*`; the defaults are
/// a pod's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSettings {
    /// `https://HOST[:PORT]`; `None`: from the `KUBERNETES_SERVICE_*` variables.
    pub api_server: Option<String>,
    /// The CA certificates (PEM) the API server's certificate must chain to.
    pub ca_file: PathBuf,
    /// The control plane's own bearer token (re-read on every review).
    pub token_file: PathBuf,
}

/// Reviews tokens with the API server's TokenReview.
pub struct KubeTokenReview {
    url: Uri,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    ca_file: PathBuf,
    token_file: PathBuf,
    timeout: Duration,
}

impl KubeTokenReview {
    /// The reviewer `settings` describe; the API server URL from the
    /// `KUBERNETES_SERVICE_*` variables when not given. Reads the CA file once
    /// to fail early.
    pub fn from_settings(settings: &KubeSettings) -> anyhow::Result<KubeTokenReview> {
        let url = match &settings.api_server {
            Some(url) => url.clone(),
            None => in_cluster_url(
                std::env::var("KUBERNETES_SERVICE_HOST").ok(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok(),
            )?,
        };
        let reviewer = Self::new(&url, settings.ca_file.clone(), settings.token_file.clone())?;
        reviewer
            .tls()
            .map_err(|e| anyhow::anyhow!("--kube-ca-file: {e}"))?;
        Ok(reviewer)
    }

    pub fn new(url: &str, ca_file: PathBuf, token_file: PathBuf) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("API server URL {url:?}"))?;
        if uri.scheme_str() != Some("https") {
            bail!("API server URL {url:?}: not https://");
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            bail!("API server URL {url:?}: give only https://HOST[:PORT]");
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("API server URL {url:?}: no host"))?;
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = match bare.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(bare.clone())
                .with_context(|| format!("API server URL {url:?}: host"))?,
        };
        let port = uri.port_u16().unwrap_or(443);
        let url = format!("https://{host}:{port}{TOKENREVIEWS_PATH}").parse()?;
        Ok(KubeTokenReview {
            url,
            host: bare,
            port,
            server_name,
            ca_file,
            token_file,
            timeout: TIMEOUT,
        })
    }

    /// The TokenReview endpoint this reviewer posts to.
    pub fn url(&self) -> &Uri {
        &self.url
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let pem = std::fs::read(&self.ca_file)
            .map_err(|e| format!("reading {}: {e}", self.ca_file.display()))?;
        let roots = tern_identity::pem::roots(&pem)
            .map_err(|e| format!("{}: {e}", self.ca_file.display()))?;
        let mut config =
            rustls::ClientConfig::builder_with_provider(tern_identity::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    async fn check(&self, token: &str) -> Result<Reviewed, ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Rejected("no token".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ReviewError::Rejected(format!(
                "token longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let (status, body) = tokio::time::timeout(self.timeout, self.post(token))
            .await
            .map_err(|_| {
                ReviewError::Unavailable(format!(
                    "the Kubernetes API server at {} did not answer the TokenReview within {:?}",
                    self.url, self.timeout
                ))
            })??;
        interpret(status, &body, token)
    }

    async fn post(&self, token: &str) -> Result<(StatusCode, Bytes), ReviewError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            ReviewError::Unavailable(format!("TokenReview at {}: {what}: {e}", self.url))
        };
        let bearer = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| unavailable(&format!("reading {}", self.token_file.display()), &e))?;
        let bearer = bearer.trim();
        if bearer.is_empty() {
            return Err(unavailable(
                "the control plane's token",
                &format!("{} is empty", self.token_file.display()),
            ));
        }
        let tls = self.tls().map_err(|e| unavailable("cluster CA", &e))?;
        let request = build_request(&self.url, bearer, token)
            .map_err(|e| unavailable("building the request", &e))?;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unavailable("connecting", &e))?;
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(tls)
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| unavailable("TLS handshake", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable("HTTP handshake", &e))?;
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unavailable("request", &e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unavailable("reading the response", &e))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::pin!(conn);
        tokio::select! {
            result = exchange => result,
            ended = &mut conn => Err(match ended {
                Ok(()) => unavailable("connection", &"closed before the answer"),
                Err(e) => unavailable("connection", &e),
            }),
        }
    }
}

impl TokenReviewer for KubeTokenReview {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Reviewed, ReviewError>> {
        Box::pin(self.check(token))
    }
}

/// `https://HOST:PORT` from the variables Kubernetes sets in every pod.
pub fn in_cluster_url(host: Option<String>, port: Option<String>) -> anyhow::Result<String> {
    let (Some(host), Some(port)) = (host.filter(|h| !h.is_empty()), port) else {
        bail!(
            "no Kubernetes API server: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are \
             not set (not in a pod?); give --kube-api-server"
        );
    };
    let port: u16 = port
        .trim()
        .parse()
        .with_context(|| format!("KUBERNETES_SERVICE_PORT {port:?}"))?;
    if host.contains(':') {
        Ok(format!("https://[{host}]:{port}"))
    } else {
        Ok(format!("https://{host}:{port}"))
    }
}

/// The TokenReview to create for `token`, audience `tern`.
pub fn review_body(token: &str) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![AUDIENCE.to_owned()]),
        },
        ..Default::default()
    })
}

/// The POST that creates the TokenReview, authenticated with `bearer`.
pub fn build_request(url: &Uri, bearer: &str, token: &str) -> anyhow::Result<Request<Full<Bytes>>> {
    let host = url
        .authority()
        .ok_or_else(|| anyhow::anyhow!("no authority in {url}"))?
        .as_str()
        .to_owned();
    let mut auth = header::HeaderValue::try_from(format!("Bearer {bearer}"))
        .map_err(|_| anyhow::anyhow!("the control plane's token is not a valid header value"))?;
    auth.set_sensitive(true);
    Ok(Request::post(url.clone())
        .header(header::HOST, host)
        .header(header::AUTHORIZATION, auth)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(review_body(token)?)))?)
}

/// What the API server's answer says about the token.
pub fn interpret(status: StatusCode, body: &[u8], token: &str) -> Result<Reviewed, ReviewError> {
    if !status.is_success() {
        let detail = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .map(|m| format!(": {}", scrub(&m, token)))
            .unwrap_or_default();
        let hint = match status {
            StatusCode::UNAUTHORIZED => {
                " (the control plane's own ServiceAccount token was refused)"
            }
            StatusCode::FORBIDDEN => {
                " (the control plane may not create tokenreviews: check its RBAC)"
            }
            _ => "",
        };
        return Err(ReviewError::Unavailable(format!(
            "the Kubernetes API server answered the TokenReview with {status}{hint}{detail}"
        )));
    }
    let review: TokenReview = serde_json::from_slice(body).map_err(|e| {
        ReviewError::Unavailable(format!(
            "the Kubernetes API server's TokenReview answer does not read: {e}"
        ))
    })?;
    let Some(result) = review.status else {
        return Err(ReviewError::Unavailable(
            "the Kubernetes API server's TokenReview answer has no status".into(),
        ));
    };
    if result.authenticated != Some(true) {
        let why = result
            .error
            .filter(|e| !e.is_empty())
            .map(|e| scrub(&e, token))
            .unwrap_or_else(|| "not authenticated".into());
        return Err(ReviewError::Rejected(format!(
            "Kubernetes TokenReview: {why}"
        )));
    }
    if let Some(audiences) = &result.audiences {
        if !audiences.iter().any(|a| a == AUDIENCE) {
            return Err(ReviewError::Rejected(format!(
                "Kubernetes TokenReview: the token is not for the audience {AUDIENCE:?} (it is for {})",
                scrub(&audiences.join(", "), token)
            )));
        }
    }
    let user = result.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, service_account)) = service_account(&username) else {
        return Err(ReviewError::Rejected(format!(
            "Kubernetes TokenReview: the token authenticates {:?}, not a ServiceAccount",
            truncate(&scrub(&username, token), 256)
        )));
    };
    let token_id = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get(CREDENTIAL_ID))
        .and_then(|ids| ids.first())
        .map(|id| id.strip_prefix("JTI=").unwrap_or(id).to_owned())
        .or(user.uid.map(|uid| format!("uid:{uid}")))
        .map(|id| truncate(&scrub(&id, token), 128).to_owned())
        .unwrap_or_else(|| "kubernetes".into());
    // The API server refuses expired ServiceAccount tokens itself.
    Ok(Reviewed {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        token_id,
        expired: false,
    })
}

/// `system:serviceaccount:<namespace>:<name>` as (namespace, name).
fn service_account(username: &str) -> Option<(&str, &str)> {
    let (namespace, name) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some((namespace, name))
}

/// `text` with the reviewed token cut out, should an answer echo it.
fn scrub(text: &str, token: &str) -> String {
    if token.is_empty() {
        return text.to_owned();
    }
    text.replace(token, "<token>")
}

fn truncate(s: &str, max: usize) -> &str {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests;
