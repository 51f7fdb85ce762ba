#![allow(clippy::unwrap_used)]

mod documents;
mod sidecar;
mod workloads;

use serde_yaml::Value;

use crate::{inject_yaml, Options};

pub(crate) const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: pay-v2
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels: {app: pay, version: v2}
  template:
    metadata:
      labels: {app: pay, version: v2, pod-template-hash: abc123}
    spec:
      serviceAccountName: pay
      containers:
        - name: pay
          image: tern/demo:0.1.0
          command: [pay, --listen, 0.0.0.0:50051]
          ports:
            - {name: grpc, containerPort: 50051}
          resources:
            requests: {cpu: 1}
";

pub(crate) const SERVICE: &str = "\
# pay's ClusterIP
apiVersion: v1
kind: Service
metadata:
  name: pay
spec:
  selector: {app: pay}
  ports:
    - {name: grpc, port: 50051, targetPort: 50051}
";

pub(crate) const CONFIGMAP: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  config.yaml: |
    a: 1
    # not a separator
    b: [x, y]
  number: \"42\"
";

/// Injects `input` with the default options and returns the one document out as a value.
pub(crate) fn inject_one(input: &str) -> Value {
    inject_one_with(input, &Options::default())
}

pub(crate) fn inject_one_with(input: &str, options: &Options) -> Value {
    let out = inject_yaml(input, options).unwrap();
    assert_eq!(out.reports.len(), 1, "{:?}", out.reports);
    serde_yaml::from_str(&out.output).unwrap()
}

pub(crate) fn pod_spec<'a>(doc: &'a Value, path: &[&str]) -> &'a Value {
    let mut v = doc;
    for key in path {
        v = &v[*key];
    }
    &v["spec"]
}

pub(crate) fn container<'a>(spec: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    spec[list]
        .as_sequence()?
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
}

pub(crate) fn names(spec: &Value, list: &str) -> Vec<String> {
    spec[list]
        .as_sequence()
        .map(|cs| {
            cs.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The proxy's environment as name → value (or the downward API field path).
pub(crate) fn env(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = match e["value"].as_str() {
                Some(v) => v.to_owned(),
                None => format!(
                    "field:{}",
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap()
                ),
            };
            (name, value)
        })
        .collect()
}

pub(crate) fn env_of(container: &Value, name: &str) -> Option<String> {
    env(container)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}
