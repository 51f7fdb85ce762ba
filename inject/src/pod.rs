//! One pod template: read what the sidecar needs to know of it, then add the sidecar.
//!
//! The template is read through k8s-openapi's `ObjectMeta` and `PodSpec` (so a malformed one
//! fails naming the field that is wrong) but changed as YAML: the containers, volumes and
//! annotations added go in beside what the user wrote, which stays as written.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml::{Mapping, Value};

use crate::ports::{self, port_or_range};
use crate::sidecar::{self, Facts, InboundTls, VOLUMES};
use crate::workload::Workload;
use crate::{annotations, invalid, Error, Options, ADMIN_PORT, INIT_CONTAINER, PROXY_CONTAINER};

/// Labels the controllers put on every pod: not the workload's own, and unbounded.
const CONTROLLER_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "controller-uid",
    "job-name",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/job-completion-index",
    annotations::INJECT,
];

const SCRAPE: &str = "prometheus.io/scrape";
const SCRAPE_PORT: &str = "prometheus.io/port";
const SCRAPE_PATH: &str = "prometheus.io/path";

/// Injects the pod `template` (a mapping with `metadata` and `spec`); `prefix` is its path in
/// the object, for error messages (`spec.template.`, or empty for a Pod). Returns whether the
/// proxy went in as a native sidecar. Everything is checked before anything is changed.
pub(crate) fn inject(
    template: &mut Mapping,
    prefix: &str,
    workload: &Workload<'_>,
    options: &Options,
) -> Result<bool, Error> {
    let meta: ObjectMeta = typed(template.get("metadata"), &format!("{prefix}metadata"))?;
    let spec: PodSpec = typed(template.get("spec"), &format!("{prefix}spec"))?;
    let owner: ObjectMeta = typed(workload.metadata, "metadata")?;
    if spec.containers.is_empty() {
        return Err(invalid(
            format!("{prefix}spec.containers"),
            "missing or empty: a pod has at least one container",
        ));
    }
    let facts = read_facts(&meta, &owner, &spec, workload, options, prefix)?;
    check_names(&spec, prefix)?;

    let proxy = yaml(&sidecar::proxy_container(&facts, options))?;
    let init = yaml(&sidecar::init_container(&facts, options))?;
    let volumes = sidecar::volumes()
        .iter()
        .map(yaml)
        .collect::<Result<Vec<_>, _>>()?;

    let spec = template
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| invalid(format!("{prefix}spec"), "not a mapping"))?;
    if facts.native_sidecar {
        let inits = sequence(spec, "initContainers");
        inits.insert(0, proxy);
        inits.insert(0, init);
    } else {
        sequence(spec, "initContainers").push(init);
        sequence(spec, "containers").push(proxy);
    }
    sequence(spec, "volumes").extend(volumes);

    let notes = template_annotations(template);
    notes.insert(
        annotations::INJECTED.into(),
        crate::VERSION.to_owned().into(),
    );
    // A pod with scrape annotations of its own keeps them; the Prometheus job in manifests/
    // finds the proxy by its port name either way.
    if !notes.contains_key(SCRAPE) {
        notes.insert(SCRAPE.into(), "true".into());
        notes.insert(SCRAPE_PORT.into(), ADMIN_PORT.to_string().into());
        notes.insert(SCRAPE_PATH.into(), "/metrics".into());
    }
    Ok(facts.native_sidecar)
}

fn read_facts(
    meta: &ObjectMeta,
    owner: &ObjectMeta,
    spec: &PodSpec,
    workload: &Workload<'_>,
    options: &Options,
    prefix: &str,
) -> Result<Facts, Error> {
    let annotation = |key: &str| annotation(key, meta, owner, prefix);
    let labels = meta.labels.clone().unwrap_or_default();

    let service_name = service_name(annotation(annotations::SERVICE), &labels, meta, owner)?;
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());

    let declared = ports::declared(spec);
    let app_port = match annotation(annotations::APP_PORT) {
        Some((at, v)) => Some(
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid(at, format!("{v:?} is not a port number")))?,
        ),
        None => declared.first().copied(),
    };

    let run_to_completion = matches!(workload.kind, "Job" | "CronJob")
        || matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure"));
    let native_sidecar = match annotation(annotations::NATIVE_SIDECAR) {
        Some((_, "enabled")) => true,
        Some((_, "disabled")) => false,
        Some((at, v)) => return Err(invalid(at, format!("{v:?}: enabled or disabled"))),
        None => options.native_sidecar || run_to_completion,
    };

    let inbound_tls = match annotation(annotations::INBOUND_TLS) {
        None => InboundTls::Permissive,
        Some((_, "strict")) => InboundTls::Strict,
        Some((_, "permissive")) => InboundTls::Permissive,
        Some((_, "off")) => InboundTls::Off,
        Some((at, v)) => return Err(invalid(at, format!("{v:?}: strict, permissive or off"))),
    };

    let list = |key: &str, check: fn(&str) -> bool| -> Result<Option<String>, Error> {
        let Some((at, v)) = annotation(key) else {
            return Ok(None);
        };
        let items: Vec<&str> = v
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .collect();
        if let Some(bad) = items.iter().find(|i| !check(i)) {
            return Err(invalid(at, format!("{bad:?} in {v:?}")));
        }
        Ok((!items.is_empty()).then(|| items.join(",")))
    };

    let extra_ports = list(annotations::INBOUND_PORTS, port_or_range)?;
    let skip_inbound_ports = list(annotations::SKIP_INBOUND_PORTS, port_or_range)?;
    Ok(Facts {
        service_name,
        service_account,
        labels: workload_labels(&labels),
        app_port,
        native_sidecar,
        inbound_tls,
        served_ports: ports::served(spec, extra_ports.as_deref(), skip_inbound_ports.as_deref()),
        skip_inbound_ports,
        skip_outbound_ports: list(annotations::SKIP_OUTBOUND_PORTS, port_or_range)?,
        skip_outbound_cidrs: list(annotations::SKIP_OUTBOUND_CIDRS, cidr)?,
    })
}

/// The annotation `key` and where it was found: the pod template's wins over the workload's.
fn annotation<'m>(
    key: &str,
    meta: &'m ObjectMeta,
    owner: &'m ObjectMeta,
    prefix: &str,
) -> Option<(String, &'m str)> {
    let on = |m: &'m ObjectMeta, at: String| {
        m.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(|v| (format!("{at}annotations[{key}]"), v.as_str()))
    };
    on(meta, format!("{prefix}metadata.")).or_else(|| on(owner, "metadata.".to_owned()))
}

/// `tern.dev/service`, else the `app` label, else `app.kubernetes.io/name`, else the
/// workload's (or Pod's) name, else the Pod's `generateName` (less the pod-template-hash).
fn service_name(
    annotated: Option<(String, &str)>,
    labels: &BTreeMap<String, String>,
    meta: &ObjectMeta,
    owner: &ObjectMeta,
) -> Result<String, Error> {
    let (from, name) = if let Some((at, v)) = annotated {
        (at, v.to_owned())
    } else if let Some(v) = labels.get("app") {
        ("the app label".to_owned(), v.clone())
    } else if let Some(v) = labels.get("app.kubernetes.io/name") {
        ("the app.kubernetes.io/name label".to_owned(), v.clone())
    } else if let Some(v) = owner.name.as_ref().or(meta.name.as_ref()) {
        ("metadata.name".to_owned(), v.clone())
    } else if let Some(g) = owner
        .generate_name
        .as_deref()
        .or(meta.generate_name.as_deref())
    {
        // A Deployment's pods (as the webhook sees them) are `<deployment>-<hash>-*`.
        let base = g.trim_end_matches('-');
        let base = labels
            .get("pod-template-hash")
            .and_then(|h| base.strip_suffix(&format!("-{h}")))
            .unwrap_or(base);
        ("metadata.generateName".to_owned(), base.to_owned())
    } else {
        return Err(invalid(
            "metadata.name",
            format!(
                "no service name: set the {} annotation or an app label",
                annotations::SERVICE
            ),
        ));
    };
    if !dns_label(&name) {
        return Err(invalid(
            from,
            format!(
                "{name:?} is not a service name \
                 (a DNS label: up to 63 lowercase letters, digits and '-')"
            ),
        ));
    }
    Ok(name)
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The labels the sidecar registers its endpoint with (`version: v2` selects a canary).
fn workload_labels(labels: &BTreeMap<String, String>) -> Vec<(String, String)> {
    labels
        .iter()
        .filter(|(k, v)| !CONTROLLER_LABELS.contains(&k.as_str()) && k.len() <= 63 && v.len() <= 63)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// An IPv4 or IPv6 address or network (host bits zero), as tern-init takes them.
fn cidr(s: &str) -> bool {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    // IPv4 in the top 32 bits, so that a prefix length counts from the top either way.
    let (bits, value) = match ip {
        IpAddr::V4(v4) => (32, u128::from(u32::from(v4)) << 96),
        IpAddr::V6(v6) => (128, u128::from(v6)),
    };
    match len.map(str::parse::<u32>) {
        None => true,
        Some(Ok(len)) if len <= bits => value & u128::MAX.checked_shr(len).unwrap_or(0) == 0,
        Some(_) => false,
    }
}

/// What injection adds must not collide with what the pod already has.
fn check_names(spec: &PodSpec, prefix: &str) -> Result<(), Error> {
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        if c.name == INIT_CONTAINER || c.name == PROXY_CONTAINER {
            return Err(invalid(
                format!("{prefix}spec"),
                format!("a container is already named {:?}", c.name),
            ));
        }
    }
    for v in spec.volumes.iter().flatten() {
        if VOLUMES.contains(&v.name.as_str()) {
            return Err(invalid(
                format!("{prefix}spec.volumes"),
                format!("a volume is already named {:?}", v.name),
            ));
        }
    }
    Ok(())
}

/// Reads `value` as `T`; absent is `T::default()`.
fn typed<T: DeserializeOwned + Default>(value: Option<&Value>, field: &str) -> Result<T, Error> {
    match value {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_yaml::from_value(v.clone()).map_err(|e| invalid(field, e)),
    }
}

/// An added object as YAML, its `name` first as people write it.
fn yaml(value: &impl Serialize) -> Result<Value, Error> {
    let value = serde_yaml::to_value(value).map_err(|e| invalid("(injected objects)", e))?;
    Ok(match value {
        Value::Mapping(m) if m.contains_key("name") => {
            let mut named = Mapping::with_capacity(m.len());
            if let Some(name) = m.get("name") {
                named.insert("name".into(), name.clone());
            }
            named.extend(m.into_iter().filter(|(k, _)| k.as_str() != Some("name")));
            Value::Mapping(named)
        }
        other => other,
    })
}

/// The list at `key` of `map`, created empty when absent (or null).
fn sequence<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Vec<Value> {
    let slot = map
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !slot.is_sequence() {
        *slot = Value::Sequence(Vec::new());
    }
    match slot {
        Value::Sequence(seq) => seq,
        _ => unreachable!("made a sequence just above"),
    }
}

/// The template's annotations, creating `metadata` (first, as people write it) and
/// `annotations` when absent.
fn template_annotations(template: &mut Mapping) -> &mut Mapping {
    if !template.get("metadata").is_some_and(Value::is_mapping) {
        let mut reordered = Mapping::new();
        reordered.insert("metadata".into(), Value::Mapping(Mapping::new()));
        for (k, v) in std::mem::take(template) {
            if k.as_str() != Some("metadata") {
                reordered.insert(k, v);
            }
        }
        *template = reordered;
    }
    let meta = mapping(template, "metadata");
    mapping(meta, "annotations")
}

fn mapping<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    let slot = map
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !slot.is_mapping() {
        *slot = Value::Mapping(Mapping::new());
    }
    match slot {
        Value::Mapping(m) => m,
        _ => unreachable!("made a mapping just above"),
    }
}
