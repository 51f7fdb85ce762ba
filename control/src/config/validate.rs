//! Turns parsed documents into a [`MeshConfig`]: checks each document's
//! spec, that names are unique, and that every reference resolves.
//!
//! All documents are checked and every error is returned, so one reload
//! reports everything wrong with an edit instead of one error per save.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::{names, raw, traffic};
use super::{
    Action, AuthorizationPolicy, AuthorizationRule, ConfigError, IdentityMatch, LoadOptions,
    MeshConfig, Port, Protocol, Service, ServiceKey, StaticEndpoint,
};

/// Where a document is: every error carries it.
#[derive(Clone, Debug)]
pub struct At {
    pub file: PathBuf,
    /// 1-based position in its file.
    pub doc: usize,
}

impl At {
    pub fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            doc: self.doc,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.doc)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    TrafficPolicy,
    AuthorizationPolicy,
    Endpoints,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Service,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
        Kind::Endpoints,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Endpoints => "Endpoints",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

pub enum Spec {
    Service(raw::ServiceSpec),
    TrafficPolicy(raw::TrafficPolicySpec),
    AuthorizationPolicy(raw::AuthorizationPolicySpec),
    Endpoints(raw::EndpointsSpec),
}

/// A document whose envelope is valid and whose spec has its Rust shape.
pub struct Parsed {
    pub at: At,
    pub kind: Kind,
    pub name: String,
    pub namespace: String,
    pub spec: Spec,
}

pub fn build(docs: Vec<Parsed>, options: LoadOptions) -> Result<MeshConfig, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut seen: HashMap<(Kind, String, String), At> = HashMap::new();
    let mut duplicates = BTreeSet::new();
    for (i, d) in docs.iter().enumerate() {
        let id = (d.kind, d.namespace.clone(), d.name.clone());
        if let Some(first) = seen.get(&id) {
            // Reported once, here, and not again for what its spec repeats.
            duplicates.insert(i);
            errors.push(d.at.err(
                "metadata.name",
                format!(
                    "duplicate {} `{}/{}`, first defined in {first}",
                    d.kind.name(),
                    d.namespace,
                    d.name
                ),
            ));
        } else {
            seen.insert(id, d.at.clone());
        }
    }
    // Every Service name counts as declared even if its spec is bad, so one
    // mistake is reported once and not again at each reference.
    let declared: BTreeSet<ServiceKey> = docs
        .iter()
        .filter(|d| d.kind == Kind::Service)
        .map(|d| ServiceKey::new(&d.namespace, &d.name))
        .collect();
    let declared = Declared {
        here: declared,
        elsewhere: options.services_elsewhere,
    };

    let mut config = MeshConfig::default();
    let mut traffic_at: HashMap<ServiceKey, At> = HashMap::new();
    let mut authz_at: HashMap<ServiceKey, At> = HashMap::new();
    let mut endpoint_at: HashMap<SocketAddr, (ServiceKey, At)> = HashMap::new();
    for (i, d) in docs.into_iter().enumerate() {
        if duplicates.contains(&i) {
            continue;
        }
        let result = match &d.spec {
            Spec::Service(spec) => service(&d.at, spec, options).map(|s| {
                config
                    .services
                    .insert(ServiceKey::new(&d.namespace, &d.name), s);
            }),
            Spec::TrafficPolicy(spec) => {
                target(&d, spec.service.as_deref(), &declared, &mut traffic_at).and_then(|key| {
                    let policy = traffic::policy(&d.at, &d.name, spec)?;
                    config.traffic.insert(key, policy);
                    Ok(())
                })
            }
            Spec::AuthorizationPolicy(spec) => {
                target(&d, spec.service.as_deref(), &declared, &mut authz_at).and_then(|key| {
                    let policy = authorization(&d.at, &d.name, spec)?;
                    config.authorization.insert(key, policy);
                    Ok(())
                })
            }
            Spec::Endpoints(spec) => {
                let mut no_dupes = HashMap::new();
                target(&d, spec.service.as_deref(), &declared, &mut no_dupes).and_then(|key| {
                    let eps = endpoints(&d.at, &d.name, spec, &key, &mut endpoint_at)?;
                    config.endpoints.entry(key).or_default().extend(eps);
                    Ok(())
                })
            }
        };
        if let Err(e) = result {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// The services documents may refer to: those declared here, and any at
/// all when services also come from elsewhere (a discovery source).
struct Declared {
    here: BTreeSet<ServiceKey>,
    elsewhere: bool,
}

/// Resolves `spec.service` in the document's namespace and claims it in
/// `claimed`, so that two policies of one kind cannot target one service.
fn target(
    d: &Parsed,
    service: Option<&str>,
    declared: &Declared,
    claimed: &mut HashMap<ServiceKey, At>,
) -> Result<ServiceKey, ConfigError> {
    let name = service.ok_or_else(|| d.at.err("spec.service", "is required"))?;
    names::dns_label(name).map_err(|m| d.at.err("spec.service", m))?;
    let key = ServiceKey::new(&d.namespace, name);
    if !declared.here.contains(&key) && !declared.elsewhere {
        return Err(d.at.err(
            "spec.service",
            format!("unknown Service `{key}`: no Service document declares it"),
        ));
    }
    if let Some(first) = claimed.get(&key) {
        return Err(d.at.err(
            "spec.service",
            format!(
                "Service `{key}` already has a {} ({first}); merge them into one",
                d.kind.name()
            ),
        ));
    }
    claimed.insert(key.clone(), d.at.clone());
    Ok(key)
}

fn service(at: &At, spec: &raw::ServiceSpec, options: LoadOptions) -> Result<Service, ConfigError> {
    // A document extending a discovered service may leave the ports to it.
    if spec.ports.is_empty() && !options.services_elsewhere {
        return Err(at.err("spec.ports", "at least one port is required"));
    }
    let mut ports = Vec::with_capacity(spec.ports.len());
    let mut port_names = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = match p.port {
            Some(0) => return Err(at.err(format!("{field}.port"), "must be 1-65535")),
            Some(n) => n,
            None => return Err(at.err(format!("{field}.port"), "is required")),
        };
        if p.target_port == Some(0) {
            return Err(at.err(format!("{field}.targetPort"), "must be 1-65535"));
        }
        if let Some(name) = &p.name {
            names::dns_label(name).map_err(|m| at.err(format!("{field}.name"), m))?;
            if !port_names.insert(name.clone()) {
                return Err(at.err(
                    format!("{field}.name"),
                    format!("duplicate port name `{name}`"),
                ));
            }
        }
        ports.push(Port {
            name: p.name.clone(),
            port,
            opaque: p.protocol.is_some(),
            target_port: p.target_port.filter(|t| *t != port),
        });
    }
    let virtual_ip = match &spec.virtual_ip {
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| at.err("spec.virtualIP", format!("`{ip}` is not an IP address")))?,
        ),
        None => None,
    };
    if let Some(id) = &spec.identity {
        names::spiffe_id(id).map_err(|m| at.err("spec.identity", m))?;
    }
    if let Some(dns) = &spec.dns_name {
        names::dns_subdomain(dns).map_err(|m| at.err("spec.dnsName", m))?;
    }
    Ok(Service {
        protocol: match spec.protocol {
            Some(raw::Protocol::Http) => Protocol::Http,
            Some(raw::Protocol::Grpc) | None => Protocol::Grpc,
        },
        ports,
        virtual_ip,
        more_virtual_ips: Vec::new(),
        identity: spec.identity.clone(),
        dns_name: spec.dns_name.clone(),
    })
}

fn authorization(
    at: &At,
    name: &str,
    spec: &raw::AuthorizationPolicySpec,
) -> Result<AuthorizationPolicy, ConfigError> {
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, r) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        if r.from.is_empty() {
            return Err(at.err(
                format!("{field}.from"),
                "name at least one client (identity or namespace)",
            ));
        }
        let mut from = Vec::with_capacity(r.from.len());
        for (j, f) in r.from.iter().enumerate() {
            let field = format!("{field}.from[{j}]");
            from.push(match (&f.identity, &f.namespace) {
                (Some(id), None) => {
                    names::spiffe_id(id).map_err(|m| at.err(format!("{field}.identity"), m))?;
                    // Sidecars match callers by trust domain, namespace and service account.
                    tern_identity::SpiffeId::parse(id)
                        .map_err(|e| at.err(format!("{field}.identity"), e.to_string()))?;
                    IdentityMatch::Exact(id.clone())
                }
                (None, Some(ns)) => {
                    names::dns_label(ns).map_err(|m| at.err(format!("{field}.namespace"), m))?;
                    IdentityMatch::Namespace(ns.clone())
                }
                _ => return Err(at.err(field, "set exactly one of identity or namespace")),
            });
        }
        let mut methods = Vec::with_capacity(r.methods.len());
        for (j, m) in r.methods.iter().enumerate() {
            let field = format!("{field}.methods[{j}]");
            if m.service.is_none() {
                return Err(at.err(format!("{field}.service"), "is required"));
            }
            methods.push(traffic::grpc_method(at, &field, m)?);
        }
        rules.push(AuthorizationRule { from, methods });
    }
    Ok(AuthorizationPolicy {
        name: name.to_owned(),
        // A policy exists to restrict callers, so what no rule allows is denied.
        default_action: match spec.default {
            Some(raw::Action::Allow) => Action::Allow,
            Some(raw::Action::Deny) | None => Action::Deny,
        },
        rules,
    })
}

fn endpoints(
    at: &At,
    name: &str,
    spec: &raw::EndpointsSpec,
    key: &ServiceKey,
    seen: &mut HashMap<SocketAddr, (ServiceKey, At)>,
) -> Result<Vec<StaticEndpoint>, ConfigError> {
    let mut out = Vec::with_capacity(spec.endpoints.len());
    for (i, e) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        let text = e
            .address
            .as_deref()
            .ok_or_else(|| at.err(format!("{field}.address"), "is required"))?;
        let address: SocketAddr = text.parse().map_err(|_| {
            at.err(
                format!("{field}.address"),
                format!("`{text}` is not an ip:port address"),
            )
        })?;
        if let Some((other, first)) = seen.get(&address) {
            return Err(at.err(
                format!("{field}.address"),
                format!("{address} is already an endpoint of `{other}` ({first})"),
            ));
        }
        seen.insert(address, (key.clone(), at.clone()));
        let labels = labels(at, &format!("{field}.labels"), &e.labels)?;
        if let Some(id) = &e.identity {
            names::spiffe_id(id).map_err(|m| at.err(format!("{field}.identity"), m))?;
        }
        out.push(StaticEndpoint {
            address,
            labels,
            identity: e.identity.clone(),
            source: name.to_owned(),
            target_ports: BTreeMap::new(),
        });
    }
    Ok(out)
}

/// Checks a label map (endpoint labels or a backend's subset selector).
pub fn labels(
    at: &At,
    field: &str,
    labels: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    for (k, v) in labels {
        names::label_key(k).map_err(|m| at.err(format!("{field}.{k}"), m))?;
        names::label_value(v).map_err(|m| at.err(format!("{field}.{k}"), m))?;
    }
    Ok(labels.clone())
}
