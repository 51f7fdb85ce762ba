//! Multi-document input and errors.

use super::*;
use crate::{Error, Outcome};

#[test]
fn documents_keep_their_order_and_empty_ones_vanish() {
    let input =
        format!("# leading comment only\n---\n{SERVICE}---\n\n---\n{DEPLOYMENT}--- \n{CONFIGMAP}");
    let out = inject_yaml(&input, &Options::default()).unwrap();
    let kinds: Vec<(usize, Option<&str>)> = out
        .reports
        .iter()
        .map(|r| (r.index, r.kind.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        [
            (1, Some("Service")),
            (2, Some("Deployment")),
            (3, Some("ConfigMap"))
        ]
    );
    assert_eq!(
        out.reports[1].to_string(),
        "document 2 (Deployment pay-v2): injected"
    );
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&out.output)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[0], serde_yaml::from_str::<Value>(SERVICE).unwrap());
    assert_eq!(docs[2], serde_yaml::from_str::<Value>(CONFIGMAP).unwrap());
    assert!(
        out.output.contains("# pay's ClusterIP\n"),
        "comments of unchanged documents stay"
    );
}

#[test]
fn invalid_yaml_names_the_document_and_line() {
    let broken = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  template: [unclosed\n";
    let input = format!("{SERVICE}---\n{broken}---\n{CONFIGMAP}");
    let e = inject_yaml(&input, &Options::default()).unwrap_err();
    assert_eq!(e.index, 2);
    assert_eq!(e.kind.as_deref(), Some("Deployment"));
    assert_eq!(e.name.as_deref(), Some("web"));
    let Error::Yaml { line, .. } = &e.error else {
        panic!("{e}");
    };
    // SERVICE has 9 lines, then the separator; the broken flow sequence is reported at or
    // after its own line.
    assert!(line.is_some_and(|l| l >= 16), "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with("document 2 (Deployment web): invalid YAML at line "),
        "{text}"
    );

    // Not YAML at all, nothing to name it by.
    let e = inject_yaml("a: b: c\n", &Options::default()).unwrap_err();
    assert_eq!((e.index, e.kind.as_deref()), (1, None));
    assert!(
        e.to_string()
            .starts_with("document 1: invalid YAML at line 1"),
        "{e}"
    );
}

#[test]
fn malformed_workloads_name_the_field() {
    let no_containers = DEPLOYMENT.replace("      containers:\n", "      containerz:\n");
    let e = inject_yaml(&no_containers, &Options::default()).unwrap_err();
    let Error::Invalid { field, message } = &e.error else {
        panic!("{e}");
    };
    assert_eq!(field, "spec.template.spec.containers");
    assert!(message.contains("at least one container"), "{message}");
    assert_eq!(e.name.as_deref(), Some("pay-v2"));

    let no_template =
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: 1}\n";
    let e = inject_yaml(no_template, &Options::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "document 1 (Deployment x): spec.template: missing, or not a mapping"
    );

    let taken = DEPLOYMENT.replace(
        "      containers:\n",
        "      volumes:\n        - {name: tern-token, emptyDir: {}}\n      containers:\n",
    );
    let e = inject_yaml(&taken, &Options::default()).unwrap_err();
    assert!(
        e.to_string().contains("already named \"tern-token\""),
        "{e}"
    );

    let upper = DEPLOYMENT.replace("{app: pay,", "{app: Pay,");
    let e = inject_yaml(&upper, &Options::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("the app label: \"Pay\" is not a service name"),
        "{e}"
    );
}

#[test]
fn one_bad_document_fails_the_whole_input() {
    let input =
        format!("{DEPLOYMENT}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: 7\n");
    let e = inject_yaml(&input, &Options::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "document 2 (Pod p): spec: missing, or not a mapping"
    );
}

#[test]
fn pods_need_a_service_name() {
    let pod =
        "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - {name: app, image: busybox}\n";
    let e = inject_yaml(pod, &Options::default()).unwrap_err();
    assert!(e.to_string().contains("no service name"), "{e}");
    // As the webhook sees a Deployment's pod: named by generateName less the template hash.
    let generated = "apiVersion: v1\nkind: Pod\nmetadata:\n  generateName: web-7d9f8c6b5-\n  labels: {pod-template-hash: 7d9f8c6b5}\nspec:\n  containers:\n    - {name: app, image: busybox}\n";
    let doc = inject_one(generated);
    let proxy = super::container(&doc["spec"], "containers", "tern-proxy").unwrap();
    assert_eq!(
        super::env_of(proxy, "TERN_SERVICE_NAME").as_deref(),
        Some("web")
    );
    let labelled = "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - {name: app, image: busybox}\nmetadata:\n  labels: {app: web}\n";
    let out = inject_yaml(labelled, &Options::default()).unwrap();
    assert_eq!(
        out.reports[0].outcome,
        Outcome::Injected {
            native_sidecar: false
        }
    );
    let doc: Value = serde_yaml::from_str(&out.output).unwrap();
    assert_eq!(doc["metadata"]["labels"]["app"].as_str(), Some("web"));
    assert!(doc["metadata"]["annotations"]["tern.dev/injected"].is_string());
}

#[test]
fn a_template_without_metadata_gets_it_first() {
    let text = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    spec:\n      containers:\n        - {name: agent, image: busybox}\n";
    let out = inject_yaml(text, &Options::default()).unwrap();
    let doc: Value = serde_yaml::from_str(&out.output).unwrap();
    let template = doc["spec"]["template"].as_mapping().unwrap();
    let keys: Vec<&str> = template.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(keys, ["metadata", "spec"]);
    let proxy =
        super::container(&doc["spec"]["template"]["spec"], "containers", "tern-proxy").unwrap();
    assert_eq!(
        super::env_of(proxy, "TERN_SERVICE_NAME").as_deref(),
        Some("agent")
    );
}
