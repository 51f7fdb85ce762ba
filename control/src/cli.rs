//! Command-line flags, each also settable through a `TERN_CONTROL_*`
//! environment variable (Kubernetes sets env, not args). Flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

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

    /// Trust domain of the SPIFFE ids the CA issues (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
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
    /// [default: spiffe://<trust-domain>/ns/tern/sa/tern-control].
    #[arg(long, env = "TERN_CONTROL_IDENTITY")]
    pub identity: Option<String>,

    /// HMAC key that bootstrap tokens are signed with (`ternctl token create` reads the same file)
    /// [default: <state-dir>/token.key, generated if missing].
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
    pub kube: crate::tokens::kube::KubeArgs,

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
    /// [default: <state-dir>/revoked-tokens].
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
    pub webhook: crate::webhook::WebhookArgs,
}

/// Which reviewer checks bootstrap tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenReview {
    Local,
    Kubernetes,
    Both,
}

/// The mesh-wide default for services without an AuthorizationPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthzDefault {
    Allow,
    Deny,
}

impl From<AuthzDefault> for crate::config::Action {
    fn from(d: AuthzDefault) -> Self {
        match d {
            AuthzDefault::Allow => crate::config::Action::Allow,
            AuthzDefault::Deny => crate::config::Action::Deny,
        }
    }
}

impl Args {
    /// The trust domain as SPIFFE ids spell it (lowercase), checked.
    pub fn trust_domain(&self) -> anyhow::Result<String> {
        tern_identity::SpiffeId::new(&self.trust_domain, "tern", "tern-control")
            .map(|id| id.trust_domain().to_owned())
            .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))
    }

    /// The control plane's own identity: `--identity`, or the default in the trust domain.
    pub fn control_identity(&self) -> anyhow::Result<tern_identity::SpiffeId> {
        let domain = self.trust_domain()?;
        let id = match &self.identity {
            None => tern_identity::SpiffeId::new(&domain, "tern", "tern-control")?,
            Some(s) => {
                tern_identity::SpiffeId::parse(s).map_err(|e| anyhow::anyhow!("--identity: {e}"))?
            }
        };
        if id.trust_domain() != domain {
            anyhow::bail!("--identity {id} is not in the trust domain {domain} (--trust-domain)");
        }
        Ok(id)
    }

    /// How the config directory is read under `--discovery`.
    pub fn load_options(&self) -> crate::config::LoadOptions {
        crate::config::LoadOptions {
            services_elsewhere: self.discovery.services_elsewhere(),
        }
    }

    /// The revocation list: `--revoked-tokens-file`, or `revoked-tokens` in the state directory.
    pub fn revoked_tokens_path(&self) -> PathBuf {
        self.revoked_tokens_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("revoked-tokens"))
    }

    /// The token key file: `--token-key-file`, or `token.key` in the state directory.
    pub fn token_key_path(&self) -> PathBuf {
        self.token_key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("token.key"))
    }
}

fn cert_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: a certificate lives at least 1s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults() {
        let a = Args::try_parse_from(["tern-control", "--config-dir", "/etc/tern"]).unwrap();
        assert_eq!(a.grpc_listen, "127.0.0.1:8090".parse().unwrap());
        assert_eq!(a.admin_listen, "127.0.0.1:9990".parse().unwrap());
        assert_eq!(a.registration_grace, Duration::from_secs(1));
        assert_eq!(a.debounce, Duration::from_millis(100));
        assert_eq!(a.discovery, crate::discovery::Discovery::Config);
        assert!(!a.load_options().services_elsewhere);
        let k = Args::try_parse_from(["tern-control", "--config-dir=/x", "--discovery=kubernetes"])
            .unwrap();
        assert!(k.load_options().services_elsewhere);
        let a = Args::try_parse_from([
            "tern-control",
            "--config-dir=/x",
            "--registration-grace=250ms",
            "--grpc-listen=127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(a.registration_grace, Duration::from_millis(250));
        assert_eq!(a.grpc_listen.port(), 0);
        assert!(Args::try_parse_from([
            "tern-control",
            "--config-dir=/x",
            "--registration-grace=soon"
        ])
        .is_err());
    }

    #[test]
    fn identity_defaults() {
        let a = Args::try_parse_from(["tern-control", "--config-dir", "/etc/tern"]).unwrap();
        assert_eq!(a.state_dir, PathBuf::from(".tern-control"));
        assert_eq!(a.token_key_path(), PathBuf::from(".tern-control/token.key"));
        assert_eq!(
            a.revoked_tokens_path(),
            PathBuf::from(".tern-control/revoked-tokens")
        );
        assert!(!a.insecure_plaintext_subscribers, "secure by default");
        assert!(!a.admin_expose_state, "/state on loopback only by default");
        assert_eq!(a.cert_lifetime, Duration::from_secs(24 * 3600));
        assert_eq!(a.authz_default, AuthzDefault::Allow);
        assert_eq!(a.token_review, TokenReview::Local);
        assert_eq!(
            a.kube.kube_token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert_eq!(
            a.control_identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/tern/sa/tern-control"
        );
        let a = Args::try_parse_from([
            "tern-control",
            "--config-dir=/x",
            "--trust-domain=Example.org",
            "--cert-lifetime=1s",
            "--authz-default=deny",
            "--token-review=both",
            "--kube-api-server=https://127.0.0.1:6443",
            "--kube-ca-file=/tmp/ca.crt",
        ])
        .unwrap();
        assert_eq!(a.token_review, TokenReview::Both);
        assert_eq!(
            a.kube.kube_api_server.as_deref(),
            Some("https://127.0.0.1:6443")
        );
        assert_eq!(a.kube.kube_ca_file, PathBuf::from("/tmp/ca.crt"));
        assert_eq!(a.cert_lifetime, Duration::from_secs(1));
        assert_eq!(a.authz_default, AuthzDefault::Deny);
        assert_eq!(
            a.control_identity().unwrap().to_string(),
            "spiffe://example.org/ns/tern/sa/tern-control"
        );
        assert!(
            Args::try_parse_from(["tern-control", "--config-dir=/x", "--cert-lifetime=500ms"])
                .is_err()
        );
        let a = Args::try_parse_from([
            "tern-control",
            "--config-dir=/x",
            "--identity=spiffe://other.org/ns/tern/sa/tern-control",
        ])
        .unwrap();
        assert!(a.control_identity().is_err(), "another trust domain");
        let a = Args::try_parse_from(["tern-control", "--config-dir=/x", "--trust-domain=a b"])
            .unwrap();
        assert!(a.trust_domain().is_err());
    }
}
