//! Which objects hold a pod template, where, and whether it is Tern's to change.

use std::fmt;

use serde_yaml::{Mapping, Value};

use crate::{annotations, invalid, pod, Error, Options, PROXY_CONTAINER};

/// What injection did to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar and the init container were added.
    Injected { native_sidecar: bool },
    /// Left as it was: it already carries the sidecar.
    AlreadyInjected,
    /// Left as it was: `tern.dev/inject: disabled` on the workload or its pod template.
    OptedOut,
    /// Left as it was: a pod on the node's network namespace must not get iptables rules.
    HostNetwork,
    /// Left as it was: not a kind that holds a pod template.
    NotAWorkload,
    /// A `List`: what happened to each item, in order.
    List(Vec<Outcome>),
}

impl Outcome {
    /// Whether the object was changed.
    pub fn changed(&self) -> bool {
        match self {
            Outcome::Injected { .. } => true,
            Outcome::List(items) => items.iter().any(Outcome::changed),
            _ => false,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Injected {
                native_sidecar: true,
            } => f.write_str("injected (native sidecar)"),
            Outcome::Injected {
                native_sidecar: false,
            } => f.write_str("injected"),
            Outcome::AlreadyInjected => f.write_str("already injected, unchanged"),
            Outcome::OptedOut => write!(f, "{}: disabled, unchanged", annotations::INJECT),
            Outcome::HostNetwork => f.write_str("hostNetwork pod, unchanged"),
            Outcome::NotAWorkload => f.write_str("not a workload, unchanged"),
            Outcome::List(items) => {
                let changed = items.iter().filter(|o| o.changed()).count();
                write!(f, "list of {}, {changed} injected", items.len())
            }
        }
    }
}

/// Where a kind keeps its pod template, as the path of mapping keys below the object.
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(&[]),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job") => Some(&["spec", "template"]),
        ("batch/v1", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// The workload's own facts the pod template's injection may fall back on.
pub(crate) struct Workload<'a> {
    pub kind: &'a str,
    pub metadata: Option<&'a Value>,
}

/// Adds the sidecar to `object`'s pod template (to each item's, for a `List`), or says why
/// it stays as it is. On error the object may be half-changed: callers drop it.
pub fn inject_object(object: &mut Value, options: &Options) -> Result<Outcome, Error> {
    let Some(map) = object.as_mapping_mut() else {
        return Ok(Outcome::NotAWorkload);
    };
    let api_version = str_at(map, "apiVersion").unwrap_or_default().to_owned();
    let kind = str_at(map, "kind").unwrap_or_default().to_owned();
    if api_version == "v1" && kind == "List" {
        return inject_list(map, options);
    }
    let Some(path) = template_path(&api_version, &kind) else {
        return Ok(Outcome::NotAWorkload);
    };
    if opted_out(map.get("metadata").and_then(Value::as_mapping)) {
        return Ok(Outcome::OptedOut);
    }
    // The workload's metadata is read while its template is changed: a copy.
    let workload_meta = map.get("metadata").cloned();
    let workload = Workload {
        kind: &kind,
        metadata: workload_meta.as_ref(),
    };
    let mut template = map;
    let mut at = String::new();
    for key in path {
        at = if at.is_empty() {
            (*key).to_owned()
        } else {
            format!("{at}.{key}")
        };
        template = template
            .get_mut(*key)
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| invalid(&at, "missing, or not a mapping"))?;
    }
    if opted_out(template.get("metadata").and_then(Value::as_mapping)) {
        return Ok(Outcome::OptedOut);
    }
    let prefix = if at.is_empty() {
        String::new()
    } else {
        format!("{at}.")
    };
    let spec = template
        .get("spec")
        .and_then(Value::as_mapping)
        .ok_or_else(|| invalid(format!("{prefix}spec"), "missing, or not a mapping"))?;
    if already_injected(template.get("metadata"), spec) {
        return Ok(Outcome::AlreadyInjected);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::HostNetwork);
    }
    let native_sidecar = pod::inject(template, &prefix, &workload, options)?;
    Ok(Outcome::Injected { native_sidecar })
}

fn inject_list(list: &mut Mapping, options: &Options) -> Result<Outcome, Error> {
    let Some(items) = list.get_mut("items") else {
        return Ok(Outcome::List(Vec::new()));
    };
    let items = items
        .as_sequence_mut()
        .ok_or_else(|| invalid("items", "not a list"))?;
    let mut outcomes = Vec::with_capacity(items.len());
    for (i, item) in items.iter_mut().enumerate() {
        let outcome = inject_object(item, options).map_err(|e| match e {
            Error::Invalid { field, message } => invalid(format!("items[{i}].{field}"), message),
            other => other,
        })?;
        outcomes.push(outcome);
    }
    Ok(Outcome::List(outcomes))
}

/// `tern.dev/inject: disabled` as an annotation or a label of `metadata`.
fn opted_out(metadata: Option<&Mapping>) -> bool {
    let Some(metadata) = metadata else {
        return false;
    };
    ["annotations", "labels"].iter().any(|field| {
        metadata
            .get(*field)
            .and_then(Value::as_mapping)
            .and_then(|m| str_at(m, annotations::INJECT))
            .is_some_and(|v| v.eq_ignore_ascii_case("disabled"))
    })
}

/// The injected annotation, or a proxy container already there (added by hand or by an
/// injection whose annotation was removed since).
fn already_injected(metadata: Option<&Value>, spec: &Mapping) -> bool {
    let annotated = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_mapping)
        .is_some_and(|a| a.contains_key(annotations::INJECTED));
    let has_proxy = ["containers", "initContainers"].iter().any(|field| {
        spec.get(*field)
            .and_then(Value::as_sequence)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
            })
    });
    annotated || has_proxy
}

pub(crate) fn str_at<'a>(map: &'a Mapping, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}
