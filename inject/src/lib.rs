//! Sidecar injection for Kubernetes: the one mutation behind both `ternctl inject` and
//! tern-control's mutating admission webhook.
//!
//! Every pod template of a Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob
//! (`spec.jobTemplate.spec.template`) or bare Pod gets:
//! - the `tern-proxy` sidecar container: its `TERN_*` environment (service, namespace and pod
//!   IP through the downward API, the control plane, the mounted trust anchors, a projected
//!   ServiceAccount token, the listeners), its ports, `/ready` and `/live` probes on the admin
//!   port, resources, and a non-root, read-only, no-capability security context;
//! - the `tern-init` init container, which redirects every inbound TCP port but the skipped ones
//!   and all outbound TCP to the proxy, for IPv4 and IPv6 (the only container with `NET_ADMIN`
//!   and `NET_RAW`); the proxy forwards inbound only to the ports the app serves (`ports`);
//! - the volumes those mount, the Prometheus scrape annotations (when the pod has none of its
//!   own) and [`annotations::INJECTED`], which makes injecting twice the same as once.
//!
//! Native-sidecar mode puts the proxy among the init containers, right after `tern-init`, with
//! `restartPolicy: Always` and a startup probe: the kubelet starts the app only once the proxy
//! is ready, and stops the proxy by itself when the app of a Job ends. It is the default for
//! pods that run to completion (Jobs, CronJobs, `restartPolicy` Never or OnFailure).
//!
//! Workloads that opt out (`tern.dev/inject: disabled`), pods on the host network and every
//! other document pass through unchanged. The added objects are k8s-openapi types; what the
//! user wrote is never round-tripped through them, so fields this crate's schema version does
//! not know survive as they were.

#![forbid(unsafe_code)]

mod documents;
mod pod;
mod ports;
mod sidecar;
mod workload;

#[cfg(test)]
mod tests;

pub use documents::{inject_yaml, DocumentError, Injected, Report};
pub use workload::{inject_object, Outcome};

/// This crate's version: the image tags and the value of [`annotations::INJECTED`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The sidecar container's name.
pub const PROXY_CONTAINER: &str = "tern-proxy";
/// The init container's name (and the command it runs).
pub const INIT_CONTAINER: &str = "tern-init";
/// The proxy's inbound listener (`0.0.0.0`), where tern-init redirects inbound connections.
pub const INBOUND_PORT: u16 = 4143;
/// The proxy's generic outbound listener (`127.0.0.1`), where tern-init redirects the app's
/// outbound connections.
pub const OUTBOUND_PORT: u16 = 4140;
/// The proxy's admin listener (`0.0.0.0`): metrics, probes, `/shutdown`.
pub const ADMIN_PORT: u16 = 4191;
/// The user the proxy runs as; tern-init leaves this user's traffic alone.
pub const PROXY_UID: i64 = 2102;
/// tern-control's gRPC port inside the cluster: the headless Service, whose name resolves to
/// every ready replica, so the sidecar picks one and moves to another when it fails.
pub const CONTROL_PLANE_URL: &str = "https://tern-control-replicas.tern.svc:8090";
/// The ConfigMap (in the workload's namespace) holding the mesh trust anchor.
pub const TRUST_ANCHORS_CONFIGMAP: &str = "tern-trust-anchors";
/// The key of the trust anchor in that ConfigMap.
pub const TRUST_ANCHORS_KEY: &str = "trust-anchor.pem";
/// The audience of the projected ServiceAccount token the proxy proves its identity with.
pub const TOKEN_AUDIENCE: &str = "tern";
/// Lifetime asked for that token; the kubelet refreshes it well before it ends.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// Annotation (and label) keys Tern reads or writes on workloads and pod templates.
pub mod annotations {
    /// `disabled` on the workload or its pod template (annotation or label): leave it alone.
    pub const INJECT: &str = "tern.dev/inject";
    /// Written by injection, with the version that injected.
    pub const INJECTED: &str = "tern.dev/injected";
    /// The mesh service the workload belongs to [default: the `app` label, then
    /// `app.kubernetes.io/name`, then the workload's name].
    pub const SERVICE: &str = "tern.dev/service";
    /// `enabled` or `disabled`: the proxy as a native sidecar (overrides the default).
    pub const NATIVE_SIDECAR: &str = "tern.dev/native-sidecar";
    /// The app port inbound traffic is forwarded to [default: the first container port].
    pub const APP_PORT: &str = "tern.dev/app-port";
    /// The inbound listener's mode: `strict`, `permissive` (default) or `off`.
    pub const INBOUND_TLS: &str = "tern.dev/inbound-tls";
    /// Comma-separated ports (or ranges) the app serves besides the ones its containers
    /// declare (and its probes name): the sidecar forwards inbound connections to these ports
    /// and refuses every other one.
    pub const INBOUND_PORTS: &str = "tern.dev/inbound-ports";
    /// Comma-separated ports (or ranges) tern-init does not redirect inbound: they reach the
    /// app directly, in plaintext, and never through the sidecar.
    pub const SKIP_INBOUND_PORTS: &str = "tern.dev/skip-inbound-ports";
    /// Comma-separated ports (or ranges) tern-init does not redirect outbound.
    pub const SKIP_OUTBOUND_PORTS: &str = "tern.dev/skip-outbound-ports";
    /// Comma-separated IPv4 or IPv6 CIDRs (or addresses) tern-init does not redirect outbound.
    pub const SKIP_OUTBOUND_CIDRS: &str = "tern.dev/skip-outbound-cidrs";
}

/// What injection adds that a cluster may want different.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The proxy image; by default `tern/proxy:<version>`.
    pub proxy_image: String,
    /// The init image, holding `tern-init`; by default `tern/init:<version>`.
    pub init_image: String,
    /// The proxy as a native sidecar for every pod, not only for those that run to completion.
    pub native_sidecar: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proxy_image: default_proxy_image(),
            init_image: default_init_image(),
            native_sidecar: false,
        }
    }
}

pub fn default_proxy_image() -> String {
    format!("tern/proxy:{VERSION}")
}

pub fn default_init_image() -> String {
    format!("tern/init:{VERSION}")
}

/// Why an object cannot be injected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The document is not YAML (`line` counts from 1 in the whole input).
    #[error("invalid YAML{}: {message}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Yaml {
        line: Option<usize>,
        message: String,
    },
    /// A field of a workload is missing or malformed, or a Tern annotation has a bad value.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

pub(crate) fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::Invalid {
        field: field.into(),
        message: message.to_string(),
    }
}
