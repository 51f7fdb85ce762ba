//! Bootstrap configuration: plain data, validated once at the edge.
//!
//! [`args`] reads flags, `TERN_*` variables and an optional YAML file into a
//! [`FileConfig`]; [`FileConfig::validate`] turns it into a [`Config`] or an
//! error naming the field and the reason. Nothing past this module parses
//! configuration again.

pub mod admin;
pub mod args;
pub mod control_plane;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod on_demand;
pub mod policy;
pub mod ports;
pub mod tracing;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use admin::AdminFile;
use control_plane::ControlPlanes;
use identity::{IdentityConfig, IdentityFile, InboundTls};
pub use inbound::{InboundConfig, InboundFile};
use limits::{ClientLimits, Limits, LimitsFile};
use on_demand::{OnDemandConfig, OnDemandFile};
use policy::{PolicyFile, ServicePolicy};
use ports::{PortItem, PortSet};
use tracing::{TracingConfig, TracingFile};

/// The bootstrap document as written in YAML (and as filled from flags).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub service_name: Option<String>,
    /// The workload's namespace (default `default`).
    pub namespace: Option<String>,
    #[serde(default)]
    pub inbound: InboundFile,
    #[serde(default)]
    pub outbound: OutboundFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub dns: DnsFile,
    pub access_log: Option<String>,
    pub drain_grace: Option<String>,
    pub connect_timeout: Option<String>,
    pub worker_threads: Option<usize>,
    /// `http://host:port` of tern-control; without it the sidecar runs on bootstrap config alone.
    pub control_plane: Option<String>,
    /// The address other sidecars reach this workload at (default: the inbound listener's).
    pub advertise: Option<String>,
    /// Labels of this workload, e.g. `version: v2`, told to the control plane.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Retry, timeout and failure-accrual settings for services that do not set their own.
    #[serde(default)]
    pub defaults: PolicyFile,
    /// Workload identity and mTLS.
    #[serde(default)]
    pub identity: IdentityFile,
    /// Subscribe to every service the control plane knows (transparent interception).
    pub watch_all_services: Option<bool>,
    /// Lookups of destinations the sidecar does not know.
    #[serde(default)]
    pub on_demand: OnDemandFile,
    /// Span export over OTLP (off without a collector).
    #[serde(default)]
    pub tracing: TracingFile,
    /// Ports whose traffic is opaque TCP (no HTTP detection), e.g. `[3306, "7000-7010"]`.
    #[serde(default)]
    pub opaque_ports: Vec<PortItem>,
    #[serde(default)]
    pub services: Vec<ServiceFile>,
    /// Protocol limits (see [`limits`]).
    #[serde(default)]
    pub limits: LimitsFile,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundFile {
    pub listen: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    pub nameserver: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: String,
    pub namespace: Option<String>,
    /// A local listener whose connections all go to this service.
    pub upstream: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// `host:port` whose A/AAAA records are the endpoints.
    pub dns: Option<String>,
    /// The SPIFFE id this service's endpoints (static or DNS) must present; with it, calls use mTLS.
    pub identity: Option<String>,
    /// The service's virtual IP (like a ClusterIP): intercepted connections to it go to the service.
    pub virtual_ip: Option<String>,
    pub retry: Option<policy::RetryFile>,
    pub timeout: Option<policy::TimeoutFile>,
    pub failure_accrual: Option<policy::AccrualFile>,
}

/// Validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub service_name: String,
    pub namespace: String,
    pub control_plane: Option<ControlPlanes>,
    pub advertise: Option<SocketAddr>,
    pub labels: BTreeMap<String, String>,
    /// Policy of services the bootstrap config does not mention.
    pub default_policy: ServicePolicy,
    pub inbound: Option<InboundConfig>,
    pub outbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `/config` answers any peer, not only loopback.
    pub admin_expose_config: bool,
    /// `/tap` is served although the admin port is not on loopback.
    pub admin_tap: bool,
    /// The only request headers whose values `/tap` shows, lowercase.
    pub tap_headers: Vec<String>,
    pub dns_nameserver: Option<SocketAddr>,
    pub access_log: AccessLogTarget,
    #[serde(with = "humantime_serde_compat")]
    pub drain_grace: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    pub worker_threads: usize,
    pub identity: Option<IdentityConfig>,
    pub inbound_tls: InboundTls,
    pub watch_all_services: bool,
    pub on_demand: OnDemandConfig,
    /// Ports carried as opaque TCP (see [`crate::tcp`]).
    pub opaque_ports: PortSet,
    pub services: Vec<ServiceConfig>,
    pub limits: Limits,
    /// Span export; `None` when off.
    pub tracing: Option<TracingConfig>,
}

impl Config {
    /// What every endpoint client is built with.
    pub fn client_limits(&self) -> ClientLimits {
        ClientLimits {
            connect_timeout: self.connect_timeout,
            max_header_list_size: self.limits.max_header_list_size,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogTarget {
    Off,
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    pub upstream: Option<SocketAddr>,
    pub discovery: DiscoveryConfig,
    /// What endpoints from local discovery must present (mTLS).
    pub identity: Option<std::sync::Arc<str>>,
    pub virtual_ip: Option<IpAddr>,
    pub policy: ServicePolicy,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryConfig {
    Static(Vec<SocketAddr>),
    Dns {
        host: String,
        port: u16,
    },
    /// Endpoints come only from the control plane.
    None,
}

/// A configuration error: which field, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid config: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let value = value.trim();
    value
        .parse()
        .ok()
        .or_else(|| bare_ipv6(value))
        .ok_or_else(|| err(field, format!("{value:?} is not an IP:port address")))
}

/// `fd00::5:4143`: an IPv6 address and a port without the brackets, which
/// is what Kubernetes makes of `$(POD_IP):4143` in an IPv6 pod. A port is
/// always expected here, so the last group is it.
fn bare_ipv6(value: &str) -> Option<SocketAddr> {
    let (ip, port) = value.rsplit_once(':')?;
    let ip: std::net::Ipv6Addr = ip.parse().ok()?;
    Some(SocketAddr::from((ip, port.parse::<u16>().ok()?)))
}

fn duration(field: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim()).map_err(|e| {
            err(
                field,
                format!("{v:?} is not a duration (like 500ms, 30s): {e}"),
            )
        }),
    }
}

/// A DNS label as Kubernetes names services: lowercase alphanumerics and '-'.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl FileConfig {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let service_name = self
            .service_name
            .clone()
            .unwrap_or_else(|| "unknown".to_string());
        let namespace = self.namespace.clone().unwrap_or_else(|| "default".into());
        if !is_dns_label(&namespace) {
            return Err(err(
                "namespace",
                format!("{namespace:?} is not a DNS label"),
            ));
        }
        let opaque_ports =
            PortSet::parse(&self.opaque_ports).map_err(|e| err("opaque_ports", e))?;
        let outbound_listen = addr(
            "outbound.listen",
            self.outbound.listen.as_deref().unwrap_or("127.0.0.1:4140"),
        )?;
        let admin_listen = addr(
            "admin.listen",
            self.admin.listen.as_deref().unwrap_or("127.0.0.1:4191"),
        )?;
        let inbound = self
            .inbound
            .validate(&[outbound_listen.port(), admin_listen.port()])?;
        let tap_headers = self.admin.tap_headers()?;
        let dns_nameserver = match self.dns.nameserver.as_deref() {
            None | Some("") | Some("system") => None,
            Some(v) => Some(addr("dns.nameserver", v)?),
        };
        let access_log = match self.access_log.as_deref().map(str::trim) {
            None | Some("stdout") | Some("-") => AccessLogTarget::Stdout,
            Some("off") | Some("none") | Some("false") => AccessLogTarget::Off,
            Some("stderr") => AccessLogTarget::Stderr,
            Some("") => {
                return Err(err(
                    "access_log",
                    "empty; use stdout, stderr, off or a path",
                ))
            }
            Some(path) => AccessLogTarget::File(PathBuf::from(path)),
        };
        let drain_grace = duration(
            "drain_grace",
            self.drain_grace.as_deref(),
            Duration::from_secs(30),
        )?;
        let connect_timeout = duration(
            "connect_timeout",
            self.connect_timeout.as_deref(),
            Duration::from_secs(1),
        )?;
        if connect_timeout.is_zero() {
            return Err(err("connect_timeout", "must be greater than zero"));
        }
        let worker_threads = self.worker_threads.unwrap_or(1);
        if !(1..=64).contains(&worker_threads) {
            return Err(err("worker_threads", "must be between 1 and 64"));
        }

        let mut names = BTreeSet::new();
        let mut listeners: Vec<(String, SocketAddr)> = vec![
            ("outbound.listen".into(), outbound_listen),
            ("admin.listen".into(), admin_listen),
        ];
        if let Some(i) = &inbound {
            listeners.push(("inbound.listen".into(), i.listen));
        }
        let mut services: Vec<ServiceConfig> = Vec::with_capacity(self.services.len());
        for (i, s) in self.services.iter().enumerate() {
            let field = |f: &str| format!("services[{i}].{f}");
            if !is_dns_label(&s.name) {
                return Err(err(
                    field("name"),
                    format!(
                        "{:?} is not a DNS label (lowercase letters, digits, '-')",
                        s.name
                    ),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(err(
                    field("name"),
                    format!("service {:?} is defined twice", s.name),
                ));
            }
            let svc_namespace = s.namespace.clone().unwrap_or_else(|| namespace.clone());
            if !is_dns_label(&svc_namespace) {
                return Err(err(
                    field("namespace"),
                    format!("{svc_namespace:?} is not a DNS label"),
                ));
            }
            let upstream = match &s.upstream {
                None => None,
                Some(u) => {
                    let a = addr(&field("upstream"), u)?;
                    listeners.push((field("upstream"), a));
                    Some(a)
                }
            };
            let discovery = match (&s.dns, s.endpoints.is_empty()) {
                (Some(_), false) => {
                    return Err(err(
                        field("dns"),
                        "a service takes either static endpoints or dns, not both",
                    ))
                }
                (Some(d), true) => {
                    let (host, port) = d
                        .trim()
                        .rsplit_once(':')
                        .ok_or_else(|| err(field("dns"), format!("{d:?} is not host:port")))?;
                    let port = port
                        .parse::<u16>()
                        .map_err(|_| err(field("dns"), format!("{port:?} is not a port")))?;
                    if host.is_empty() || port == 0 {
                        return Err(err(field("dns"), format!("{d:?} is not host:port")));
                    }
                    DiscoveryConfig::Dns {
                        host: host.to_string(),
                        port,
                    }
                }
                (None, true) => DiscoveryConfig::None,
                (None, false) => {
                    let mut eps = Vec::with_capacity(s.endpoints.len());
                    for (j, e) in s.endpoints.iter().enumerate() {
                        eps.push(addr(&format!("services[{i}].endpoints[{j}]"), e)?);
                    }
                    eps.sort();
                    eps.dedup();
                    DiscoveryConfig::Static(eps)
                }
            };
            let own = PolicyFile {
                retry: s.retry.clone(),
                timeout: s.timeout.clone(),
                failure_accrual: s.failure_accrual.clone(),
            };
            let policy = own
                .over(&self.defaults)
                .validate(&format!("services[{i}]"))?;
            let identity = match s.identity.as_deref() {
                None | Some("") => None,
                Some(id) => Some(std::sync::Arc::from(
                    tern_identity::SpiffeId::parse(id)
                        .map_err(|e| err(field("identity"), e.to_string()))?
                        .to_string(),
                )),
            };
            let virtual_ip = match s.virtual_ip.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(v) => {
                    let ip: IpAddr = v.parse().map_err(|_| {
                        err(field("virtual_ip"), format!("{v:?} is not an IP address"))
                    })?;
                    if let Some(other) = services.iter().find(|o| o.virtual_ip == Some(ip)) {
                        return Err(err(
                            field("virtual_ip"),
                            format!("{ip} is already the virtual IP of {}", other.name),
                        ));
                    }
                    Some(ip)
                }
            };
            services.push(ServiceConfig {
                name: s.name.clone(),
                namespace: svc_namespace,
                upstream,
                discovery,
                identity,
                virtual_ip,
                policy,
            });
        }
        for (i, (fa, a)) in listeners.iter().enumerate() {
            if a.port() == 0 {
                continue;
            }
            if let Some((fb, _)) = listeners[..i].iter().find(|(_, b)| b == a) {
                return Err(err(fa.clone(), format!("{a} is already used by {fb}")));
            }
        }
        let control_plane = match self.control_plane.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) => Some(ControlPlanes::parse(u).map_err(|e| err("control_plane", e))?),
        };
        // An unspecified IP (the default 0.0.0.0:4143) is told as it is: the
        // control plane puts in the address the sidecar connects from (the
        // pod IP).
        let advertise = match self.advertise.as_deref() {
            Some(a) => Some(addr("advertise", a)?),
            None => inbound.as_ref().map(|i| i.listen),
        };
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > 63 || v.len() > 63 {
                return Err(err(
                    format!("labels.{k}"),
                    "keys and values are 1-63 characters",
                ));
            }
        }
        let default_policy = self.defaults.validate("defaults")?;
        let (identity, inbound_tls) =
            self.identity
                .validate(&service_name, &namespace, control_plane.as_ref())?;
        Ok(Config {
            service_name,
            namespace,
            control_plane,
            advertise,
            labels: self.labels.clone(),
            default_policy,
            inbound,
            outbound_listen,
            admin_listen,
            admin_expose_config: self.admin.expose_config.unwrap_or(false),
            admin_tap: self.admin.tap.unwrap_or(false),
            tap_headers,
            dns_nameserver,
            access_log,
            drain_grace,
            connect_timeout,
            worker_threads,
            identity,
            inbound_tls,
            watch_all_services: self.watch_all_services.unwrap_or(false),
            on_demand: self.on_demand.validate()?,
            opaque_ports,
            services,
            limits: self.limits.validate()?,
            tracing: self.tracing.validate()?,
        })
    }
}

/// Durations appear in `/config` the way they are written in YAML.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
