//! The documents exactly as written in YAML.
//!
//! Every struct denies unknown fields, so a typo is an error instead of a
//! setting that silently does nothing. Values stay as written (durations as
//! strings, names unchecked); [`super::validate`] turns them into the model.
//! Optional fields are `Option` so that validation can say which one is
//! missing instead of serde's path-less "missing field". `Serialize` is for
//! the test that checks docs/CONFIGURATION.md shows every field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One YAML document: the Kubernetes-style envelope. `spec` stays untyped
/// until `kind` says which spec type to read it as.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub metadata: Option<Metadata>,
    pub spec: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    // Accepted so that documents can be kept in Kubernetes tooling; unused.
    #[allow(dead_code)]
    pub labels: Option<BTreeMap<String, String>>,
    #[allow(dead_code)]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(rename = "virtualIP")]
    pub virtual_ip: Option<String>,
    pub identity: Option<String>,
    pub dns_name: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: Option<String>,
    pub port: Option<u16>,
    /// The port the workload serves `port` on; defaults to `port`.
    #[serde(rename = "targetPort")]
    pub target_port: Option<u16>,
    /// `opaque` (or `tcp`): carried as bytes, never parsed as HTTP.
    pub protocol: Option<PortProtocol>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    Opaque,
    Tcp,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub service: Option<String>,
    pub load_balancer: Option<LoadBalancer>,
    pub failure_accrual: Option<FailureAccrualSpec>,
    pub retries: Option<RetrySpec>,
    pub timeout: Option<String>,
    pub backends: Option<Vec<BackendSpec>>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancer {
    RoundRobin,
    P2cEwma,
    LeastRequest,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailureAccrualSpec {
    pub consecutive_failures: Option<u32>,
    pub backoff: Option<MinMax>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MinMax {
    pub min: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    pub max_attempts: Option<u32>,
    pub retryable_codes: Option<Vec<String>>,
    pub per_try_timeout: Option<String>,
    pub backoff: Option<BaseMax>,
    pub budget: Option<BudgetSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BaseMax {
    pub base: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetSpec {
    pub percent: Option<f64>,
    pub min_per_second: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<MatchSpec>>,
    pub backends: Option<Vec<BackendSpec>>,
    pub retries: Option<RetrySpec>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    pub grpc: Option<GrpcMethodSpec>,
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatchSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodSpec {
    pub service: Option<String>,
    pub method: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchSpec {
    pub name: Option<String>,
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub present: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub service: Option<String>,
    pub default: Option<Action>,
    #[serde(default)]
    pub rules: Vec<AuthorizationRuleSpec>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRuleSpec {
    #[serde(default)]
    pub from: Vec<IdentitySpec>,
    #[serde(default)]
    pub methods: Vec<GrpcMethodSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    pub identity: Option<String>,
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsSpec {
    pub service: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub address: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub identity: Option<String>,
}
