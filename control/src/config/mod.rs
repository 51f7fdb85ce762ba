//! The mesh config: Kubernetes-style YAML documents in one directory,
//! parsed and validated once, here, into plain data ([`MeshConfig`]).
//!
//! [`load`] reads the directory and splits multi-document files; `raw` holds
//! the serde types exactly as written; `validate` and `traffic` check each
//! document and the references between them. Every error names the file,
//! the document (1-based) and the field. Past this module nothing parses
//! configuration again, and a `MeshConfig` is always valid.

pub mod load;
pub mod names;
mod raw;
mod traffic;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use load::{load_dir, load_dir_with, parse_files, parse_files_with};

/// How the directory is read beyond its own documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Services also come from elsewhere (`--discovery kubernetes`): a policy or
    /// `Endpoints` document may name a service no Service document declares, and a
    /// Service document may list no ports (it extends a discovered service).
    pub services_elsewhere: bool,
}

/// The only `apiVersion` this control plane reads.
pub const API_VERSION: &str = "tern.dev/v1alpha1";

/// A service is named within a namespace, as in Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One rejected field. `doc` is 1-based; 0 means the file as a whole (it
/// could not be read, or its YAML could not be split into documents).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    pub doc: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.doc > 0 {
            write!(f, ": document {}", self.doc)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with one attempt to load the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The whole validated mesh config, keyed by the service each part belongs to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshConfig {
    pub services: BTreeMap<ServiceKey, Service>,
    pub traffic: BTreeMap<ServiceKey, TrafficPolicy>,
    pub authorization: BTreeMap<ServiceKey, AuthorizationPolicy>,
    /// Static endpoints from every `Endpoints` document of a service, in file order.
    pub endpoints: BTreeMap<ServiceKey, Vec<StaticEndpoint>>,
    /// Services whose endpoints the cluster's EndpointSlices own (discovery
    /// sets it): a sidecar's registration adds none to them, so every
    /// control-plane replica pushes the same endpoints, and a pod the cluster
    /// takes out (not ready, terminating) leaves every caller.
    pub cluster_endpoints: BTreeSet<ServiceKey>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub protocol: Protocol,
    pub ports: Vec<Port>,
    pub virtual_ip: Option<IpAddr>,
    /// The other virtual IPs (a dual-stack Kubernetes Service's second
    /// ClusterIP); only discovery sets them.
    pub more_virtual_ips: Vec<IpAddr>,
    /// SPIFFE id the service's endpoints must present.
    pub identity: Option<String>,
    pub dns_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Port {
    pub name: Option<String>,
    pub port: u16,
    /// Opaque TCP: sidecars carry it as bytes (`protocol: opaque` or `tcp`).
    pub opaque: bool,
    /// `targetPort`: the port the service's workloads serve `port` on, when
    /// it differs (callers dial `port` on the virtual IP, the workload's
    /// sidecar forwards to this one). `None`: the same number.
    pub target_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrafficPolicy {
    pub name: String,
    pub load_balancer: Option<LoadBalancer>,
    pub failure_accrual: Option<FailureAccrual>,
    /// The routes as written, each already filled with the policy-wide
    /// backends, retries and timeout it did not override, then the catch-all
    /// route [`DEFAULT_ROUTE`] carrying the policy-wide settings.
    pub routes: Vec<Route>,
}

/// Name of the catch-all route every policy ends with; reserved.
pub const DEFAULT_ROUTE: &str = "default";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    RoundRobin,
    P2cEwma,
    LeastRequest,
}

/// Fields left out stay `None`: the sidecar applies its own defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FailureAccrual {
    pub consecutive_failures: Option<u32>,
    pub backoff_min: Option<Duration>,
    pub backoff_max: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub name: String,
    /// Any one matching selects the route; empty matches everything.
    pub matches: Vec<RouteMatch>,
    /// Weights add up to 100; empty means every endpoint.
    pub backends: Vec<Backend>,
    pub retry: Option<Retry>,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch {
    pub grpc: Option<GrpcMethod>,
    pub path_prefix: Option<String>,
    pub headers: Vec<HeaderMatch>,
}

/// `service: None` is any gRPC request; `method: None` any method of `service`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcMethod {
    pub service: Option<String>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: HeaderValue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderValue {
    Exact(String),
    Prefix(String),
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub subset: BTreeMap<String, String>,
    pub weight: u32,
}

/// Fields left out stay `None`/empty: the sidecar applies its own defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Retry {
    pub max_attempts: Option<u32>,
    /// gRPC status codes as numbers.
    pub retryable_codes: Vec<u32>,
    pub per_try_timeout: Option<Duration>,
    pub budget_percent: Option<f64>,
    pub budget_min_per_second: Option<u32>,
    pub backoff_base: Option<Duration>,
    pub backoff_max: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub default_action: Action,
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationRule {
    pub from: Vec<IdentityMatch>,
    /// Empty: every method.
    pub methods: Vec<GrpcMethod>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityMatch {
    Exact(String),
    Namespace(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StaticEndpoint {
    pub address: SocketAddr,
    pub labels: BTreeMap<String, String>,
    pub identity: Option<String>,
    /// metadata.name of the `Endpoints` document, shown on `/state`.
    pub source: String,
    /// Service port → the port this endpoint serves it on, where they differ
    /// (a discovered endpoint's own, resolved per EndpointSlice); empty for
    /// an `Endpoints` document, whose Service's `targetPort`s apply.
    pub target_ports: BTreeMap<u16, u16>,
}
