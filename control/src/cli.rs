//! Command-line flags, each also settable through a `TERN_CONTROL_*`
//! environment variable (Kubernetes sets env, not args). Flags win.
//!
//! This is the only module that knows the flags: [`Args::settings`] checks
//! them once, at the edge, into the plain settings each module takes
//! ([`Settings`]), so a bad flag fails before anything starts and no module
//! depends on clap's struct.

mod settings;
#[cfg(test)]
mod tests;

pub use settings::{ConfigSettings, ListenSettings, Settings};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::tokens::kube::{IN_CLUSTER_CA, IN_CLUSTER_TOKEN};
use crate::tokens::TokenReview;

#[derive(Debug, Parser)]
#[command(
    name = "tern-control",
    version,
    about = "Tern control plane: watches the mesh config, keeps the workload registry and pushes snapshots to sidecars."
)]
pub struct Args {
    /// Directory of mesh config YAML documents (*.yaml, *.yml); watched, and every valid change is pushed.
    #[arg(long, env = "TERN_CONTROL_CONFIG_DIR")]
    pub config_dir: PathBuf,

    /// Where services come from besides the config directory and self-registration: `config`
    /// (nowhere else) or `kubernetes` (also the cluster's Services, EndpointSlices and Pods,
    /// through KUBECONFIG or the in-cluster service account).
    #[arg(
        long,
        env = "TERN_CONTROL_DISCOVERY",
        value_enum,
        default_value = "config"
    )]
    pub discovery: crate::discovery::Discovery,

    /// Listener for the sidecars' gRPC Subscribe streams (port 0: any free port).
    #[arg(
        long,
        env = "TERN_CONTROL_GRPC_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    pub grpc_listen: SocketAddr,

    /// Admin listener: /metrics, /ready, /state (port 0: any free port).
    #[arg(
        long,
        env = "TERN_CONTROL_ADMIN_LISTEN",
        default_value = "127.0.0.1:9990"
    )]
    pub admin_listen: SocketAddr,

    /// How long a registered endpoint outlives its sidecar's stream, so a reconnect does not churn callers.
    #[arg(
        long,
        env = "TERN_CONTROL_REGISTRATION_GRACE",
        default_value = "1s",
        value_parser = humantime::parse_duration
    )]
    pub registration_grace: Duration,

    /// Quiet time after a change in the config directory before it is read, so a save is read whole
    /// (after a file is closed by its writer or renamed into place: 10ms).
    #[arg(
        long,
        env = "TERN_CONTROL_DEBOUNCE",
        default_value = "100ms",
        value_parser = humantime::parse_duration
    )]
    pub debounce: Duration,

    /// Tokio worker threads [default: one per core].
    #[arg(long, env = "TERN_CONTROL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Diagnostic log filter (tracing EnvFilter syntax), written to stderr.
    #[arg(long = "log", env = "TERN_CONTROL_LOG", default_value = "info")]
    pub log: String,

    /// Only validate the config directory: print each error (or "valid") and exit 0 if valid, 1 if not.
    #[arg(long, env = "TERN_CONTROL_CHECK")]
    pub check: bool,

    /// Where the generated CA (trust-anchor.pem, trust-anchor-key.pem, issuer.pem, issuer-key.pem)
    /// and the token key live when no CA files are given; created on first start, reused after.
    #[arg(long, env = "TERN_CONTROL_STATE_DIR", default_value = ".tern-control")]
    pub state_dir: PathBuf,

    /// The mesh trust anchor: the root CA certificate (PEM). Give it with --ca-issuer-cert and
    /// --ca-issuer-key, or none of the three to use (or generate) the CA in --state-dir.
    #[arg(long, env = "TERN_CONTROL_CA_ANCHOR")]
    pub ca_anchor: Option<PathBuf>,

    /// The issuer: an intermediate CA certificate (PEM) signed by the trust anchor.
    #[arg(long, env = "TERN_CONTROL_CA_ISSUER_CERT")]
    pub ca_issuer_cert: Option<PathBuf>,

    /// The issuer's private key (PEM, PKCS#8).
    #[arg(long, env = "TERN_CONTROL_CA_ISSUER_KEY")]
    pub ca_issuer_key: Option<PathBuf>,

    /// Trust domain of the SPIFFE ids the CA issues (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT).
    #[arg(
        long,
        env = "TERN_CONTROL_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,

    /// Lifetime of the workload certificates the CA issues (at least 1s); sidecars renew at
    /// about 70% of it.
    #[arg(
        long,
        env = "TERN_CONTROL_CERT_LIFETIME",
        default_value = "24h",
        value_parser = cert_lifetime
    )]
    pub cert_lifetime: Duration,

    /// The control plane's own SPIFFE id, presented on TLS connections
    /// [default: spiffe://TRUST_DOMAIN/ns/tern/sa/tern-control].
    #[arg(long, env = "TERN_CONTROL_IDENTITY")]
    pub identity: Option<String>,

    /// HMAC key that bootstrap tokens are signed with (`ternctl token create` reads the same file)
    /// [default: STATE_DIR/token.key, generated if missing].
    #[arg(long, env = "TERN_CONTROL_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,

    /// How Certify checks a bootstrap token: `local` (Tern tokens signed with the token key),
    /// `kubernetes` (ServiceAccount tokens, by TokenReview with the API server) or `both` (a
    /// `tern1.` token locally, any other by TokenReview).
    #[arg(
        long,
        env = "TERN_CONTROL_TOKEN_REVIEW",
        value_enum,
        default_value = "local"
    )]
    pub token_review: TokenReview,

    #[command(flatten)]
    pub kube: KubeArgs,

    /// What a sidecar does with a call to a service that has no AuthorizationPolicy.
    #[arg(
        long,
        env = "TERN_CONTROL_AUTHZ_DEFAULT",
        value_enum,
        default_value = "allow"
    )]
    pub authz_default: AuthzDefault,

    /// Token ids refused by Certify, one per line (`ternctl token revoke` appends to it); re-read
    /// on every Certify, so a revocation holds from the next request
    /// [default: STATE_DIR/revoked-tokens].
    #[arg(long, env = "TERN_CONTROL_REVOKED_TOKENS_FILE")]
    pub revoked_tokens_file: Option<PathBuf>,

    /// INSECURE, for development only: let sidecars without a client certificate subscribe
    /// (plaintext), register endpoints of Services that declare no identity and read their
    /// config. Without it, Subscribe needs the workload's certificate.
    #[arg(long, env = "TERN_CONTROL_INSECURE_PLAINTEXT_SUBSCRIBERS")]
    pub insecure_plaintext_subscribers: bool,

    /// Serve /state (the whole mesh: services, endpoints, identities, subscribers) to any peer
    /// of the admin listener, not only loopback ones (reach it with `kubectl port-forward`
    /// instead where you can).
    #[arg(long, env = "TERN_CONTROL_ADMIN_EXPOSE_STATE")]
    pub admin_expose_state: bool,

    #[command(flatten)]
    pub webhook: WebhookArgs,
}

/// Where the API server is and how to reach it (defaults: in a pod).
#[derive(Clone, Debug, clap::Args)]
pub struct KubeArgs {
    /// The Kubernetes API server that TokenReviews are posted to (https://HOST or https://HOST:PORT)
    /// [default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, env = "TERN_CONTROL_KUBE_API_SERVER")]
    pub kube_api_server: Option<String>,

    /// The CA certificates (PEM) the API server's certificate must chain to.
    #[arg(long, env = "TERN_CONTROL_KUBE_CA_FILE", default_value = IN_CLUSTER_CA)]
    pub kube_ca_file: PathBuf,

    /// The control plane's own bearer token for the API server (re-read on every review).
    #[arg(long, env = "TERN_CONTROL_KUBE_TOKEN_FILE", default_value = IN_CLUSTER_TOKEN)]
    pub kube_token_file: PathBuf,
}

/// The webhook's flags (part of tern-control's).
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookArgs {
    /// HTTPS listener for the mutating admission webhook (POST /mutate), e.g. 0.0.0.0:8443
    /// (port 0: any free port) [default: off].
    #[arg(long = "webhook-listen", env = "TERN_CONTROL_WEBHOOK_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// The proxy image the webhook injects.
    #[arg(
        long,
        env = "TERN_CONTROL_INJECT_PROXY_IMAGE",
        default_value_t = tern_inject::default_proxy_image()
    )]
    pub inject_proxy_image: String,

    /// The tern-init image the webhook injects.
    #[arg(
        long,
        env = "TERN_CONTROL_INJECT_INIT_IMAGE",
        default_value_t = tern_inject::default_init_image()
    )]
    pub inject_init_image: String,

    /// Inject the proxy as a native sidecar into every pod (pods that run to completion get one
    /// anyway).
    #[arg(long, env = "TERN_CONTROL_INJECT_NATIVE_SIDECAR")]
    pub inject_native_sidecar: bool,
}

/// The mesh-wide default for services without an AuthorizationPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthzDefault {
    Allow,
    Deny,
}

fn cert_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: a certificate lives at least 1s"));
    }
    Ok(d)
}
