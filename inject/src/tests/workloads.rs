//! Which documents are injected where, and which are left alone.

use serde_yaml::Value;

use super::*;
use crate::{inject_object, Outcome, INIT_CONTAINER, PROXY_CONTAINER, VERSION};

/// A workload of `kind` whose pod template sits at `path`.
fn workload(api_version: &str, kind: &str, path: &[&str]) -> String {
    let restart = if kind == "Job" || kind == "CronJob" {
        "Never"
    } else {
        "Always"
    };
    let template = format!(
        "metadata:\n  labels: {{app: batch}}\nspec:\n  restartPolicy: {restart}\n  \
         containers:\n    - name: main\n      image: busybox\n"
    );
    let mut nested = String::new();
    for (depth, key) in path.iter().enumerate() {
        nested.push_str(&format!("{}{key}:\n", "  ".repeat(depth)));
    }
    let body: String = template
        .lines()
        .map(|l| format!("{}{l}\n", "  ".repeat(path.len())))
        .collect();
    format!("apiVersion: {api_version}\nkind: {kind}\nmetadata:\n  name: thing\n{nested}{body}")
}

#[test]
fn every_workload_kind_gets_the_sidecar_in_its_pod_template() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("apps/v1", "Deployment", &["spec", "template"]),
        ("apps/v1", "StatefulSet", &["spec", "template"]),
        ("apps/v1", "DaemonSet", &["spec", "template"]),
        ("apps/v1", "ReplicaSet", &["spec", "template"]),
        ("batch/v1", "Job", &["spec", "template"]),
        (
            "batch/v1",
            "CronJob",
            &["spec", "jobTemplate", "spec", "template"],
        ),
    ];
    for (api_version, kind, path) in cases {
        let text = workload(api_version, kind, path);
        let doc = inject_one(&text);
        let spec = pod_spec(&doc, path);
        let all: Vec<String> = [names(spec, "initContainers"), names(spec, "containers")].concat();
        assert!(all.contains(&INIT_CONTAINER.to_owned()), "{kind}: {all:?}");
        assert!(all.contains(&PROXY_CONTAINER.to_owned()), "{kind}: {all:?}");
        assert!(all.contains(&"main".to_owned()), "{kind}: {all:?}");
        let mut template = &doc;
        for key in *path {
            template = &template[*key];
        }
        assert_eq!(
            template["metadata"]["annotations"]["tern.dev/injected"].as_str(),
            Some(VERSION),
            "{kind}"
        );
    }
    // A bare Pod: the object is its own template.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: solo\nspec:\n  containers:\n    - {name: app, image: busybox}\n";
    let doc = inject_one(pod);
    assert_eq!(names(&doc["spec"], "containers"), ["app", PROXY_CONTAINER]);
    assert_eq!(names(&doc["spec"], "initContainers"), [INIT_CONTAINER]);
    assert_eq!(
        doc["metadata"]["annotations"]["tern.dev/injected"].as_str(),
        Some(VERSION)
    );
}

#[test]
fn jobs_get_a_native_sidecar_by_default() {
    for (kind, path) in [
        ("Job", vec!["spec", "template"]),
        ("CronJob", vec!["spec", "jobTemplate", "spec", "template"]),
    ] {
        let doc = inject_one(&workload("batch/v1", kind, &path));
        let spec = pod_spec(&doc, &path);
        assert_eq!(names(spec, "containers"), ["main"], "{kind}");
        assert_eq!(
            names(spec, "initContainers"),
            [INIT_CONTAINER, PROXY_CONTAINER],
            "{kind}"
        );
        let proxy = container(spec, "initContainers", PROXY_CONTAINER).unwrap();
        assert_eq!(proxy["restartPolicy"].as_str(), Some("Always"));
    }
    // Opting out of the native sidecar: the app must then call /shutdown itself.
    let text = workload("batch/v1", "Job", &["spec", "template"]).replace(
        "      labels: {app: batch}\n",
        "      labels: {app: batch}\n      annotations: {tern.dev/native-sidecar: disabled}\n",
    );
    let doc = inject_one(&text);
    let spec = pod_spec(&doc, &["spec", "template"]);
    assert_eq!(names(spec, "containers"), ["main", PROXY_CONTAINER]);
}

#[test]
fn non_workloads_pass_through_unchanged() {
    for text in [SERVICE, CONFIGMAP] {
        let out = inject_yaml(text, &Options::default()).unwrap();
        assert_eq!(out.reports[0].outcome, Outcome::NotAWorkload);
        // The same value, and in fact the same bytes (comments kept).
        let before: Value = serde_yaml::from_str(text).unwrap();
        let after: Value = serde_yaml::from_str(&out.output).unwrap();
        assert_eq!(before, after);
        assert_eq!(out.output, text);
    }
    // Kinds with a pod template but another API group are not ours to touch.
    let other = DEPLOYMENT.replace("apps/v1", "example.com/v1");
    let out = inject_yaml(&other, &Options::default()).unwrap();
    assert_eq!(out.reports[0].outcome, Outcome::NotAWorkload);
    assert_eq!(out.output, other);
}

#[test]
fn opting_out_leaves_the_workload_unchanged() {
    let on_workload = DEPLOYMENT.replace(
        "  namespace: default\n",
        "  namespace: default\n  annotations:\n    tern.dev/inject: disabled\n",
    );
    let on_template = DEPLOYMENT.replace(
        "      labels: {app: pay, version: v2, pod-template-hash: abc123}\n",
        "      labels: {app: pay, version: v2, pod-template-hash: abc123}\n      annotations: {tern.dev/inject: disabled}\n",
    );
    let as_label = DEPLOYMENT.replace(
        "pod-template-hash: abc123}",
        "pod-template-hash: abc123, tern.dev/inject: disabled}",
    );
    for text in [on_workload, on_template, as_label] {
        let out = inject_yaml(&text, &Options::default()).unwrap();
        assert_eq!(out.reports[0].outcome, Outcome::OptedOut);
        assert_eq!(out.output, text);
    }
}

#[test]
fn host_network_pods_are_left_alone() {
    let text = DEPLOYMENT.replace(
        "      serviceAccountName: pay\n",
        "      serviceAccountName: pay\n      hostNetwork: true\n",
    );
    let out = inject_yaml(&text, &Options::default()).unwrap();
    assert_eq!(out.reports[0].outcome, Outcome::HostNetwork);
    assert_eq!(out.output, text);
}

#[test]
fn injecting_twice_equals_injecting_once() {
    let input = format!("{SERVICE}---\n{DEPLOYMENT}---\n{CONFIGMAP}");
    for native in [false, true] {
        let options = Options {
            native_sidecar: native,
            ..Options::default()
        };
        let once = inject_yaml(&input, &options).unwrap();
        let twice = inject_yaml(&once.output, &options).unwrap();
        assert_eq!(once.output, twice.output);
        assert_eq!(twice.reports[1].outcome, Outcome::AlreadyInjected);
    }
    // A proxy container without the annotation (removed by hand) also counts.
    let once = inject_one(DEPLOYMENT);
    let mut stripped = once.clone();
    stripped["spec"]["template"]["metadata"]["annotations"]
        .as_mapping_mut()
        .unwrap()
        .remove("tern.dev/injected");
    let mut again = stripped.clone();
    assert_eq!(
        inject_object(&mut again, &Options::default()).unwrap(),
        Outcome::AlreadyInjected
    );
    assert_eq!(again, stripped);
}

#[test]
fn what_the_user_wrote_survives_as_written() {
    // A field this crate's schema does not know, and a quantity written as a number.
    let text = DEPLOYMENT.replace(
        "          image: tern/demo:0.1.0\n",
        "          image: tern/demo:0.1.0\n          someFutureField: {x: 1}\n",
    );
    let doc = inject_one(&text);
    let spec = pod_spec(&doc, &["spec", "template"]);
    let app = container(spec, "containers", "pay").unwrap();
    assert_eq!(app["someFutureField"]["x"].as_u64(), Some(1));
    assert_eq!(app["resources"]["requests"]["cpu"].as_u64(), Some(1));
    // Everything but the added parts is as it was.
    let mut original: Value = serde_yaml::from_str(&text).unwrap();
    let mut injected = doc.clone();
    for doc in [&mut original, &mut injected] {
        let t = &mut doc["spec"]["template"];
        t["metadata"]
            .as_mapping_mut()
            .unwrap()
            .remove("annotations");
        let spec = t["spec"].as_mapping_mut().unwrap();
        for key in ["initContainers", "volumes"] {
            spec.remove(key);
        }
        let containers = spec
            .get_mut("containers")
            .unwrap()
            .as_sequence_mut()
            .unwrap();
        containers.retain(|c| c["name"].as_str() != Some(PROXY_CONTAINER));
    }
    assert_eq!(original, injected);
}

#[test]
fn lists_are_injected_item_by_item() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}{}",
        indent_item(DEPLOYMENT),
        indent_item(SERVICE)
    );
    let out = inject_yaml(&list, &Options::default()).unwrap();
    assert_eq!(
        out.reports[0].outcome,
        Outcome::List(vec![
            Outcome::Injected {
                native_sidecar: false
            },
            Outcome::NotAWorkload
        ])
    );
    let doc: Value = serde_yaml::from_str(&out.output).unwrap();
    let spec = pod_spec(&doc["items"][0], &["spec", "template"]);
    assert!(container(spec, "containers", PROXY_CONTAINER).is_some());
    assert_eq!(doc["items"][1]["kind"].as_str(), Some("Service"));
}

fn indent_item(doc: &str) -> String {
    let mut out = String::new();
    for (i, line) in doc.lines().filter(|l| !l.starts_with('#')).enumerate() {
        out.push_str(if i == 0 { "  - " } else { "    " });
        out.push_str(line);
        out.push('\n');
    }
    out
}
