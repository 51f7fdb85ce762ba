//! Sidecar injection for Kubernetes, end to end: the real `ternctl inject` on the demo
//! manifests, the manifests under `manifests/` against the Kubernetes schemas
//! (`kubernetes-validate`), and tern-control's admission webhook over HTTPS, whose JSONPatch
//! must turn a Pod into exactly what `ternctl inject` prints for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use tern_tests::control::{ConfigDir, Control};
use tern_tests::k8s::{self, documents, inject_ok, manifests_dir, ternctl_inject};
use tern_tests::{Must, TestDir};

const DEMO: &str = "manifests/demo/demo.yaml";

fn demo_injected_path() -> PathBuf {
    manifests_dir().join("demo-injected/demo.yaml")
}

#[test]
fn demo_injected_is_what_ternctl_inject_prints_now() {
    let output = inject_ok(&[DEMO], None).must();
    k8s::check_generated(
        &demo_injected_path(),
        &output,
        "what `ternctl inject manifests/demo/demo.yaml` prints",
    )
    .must();
}

#[test]
fn the_mesh_config_map_carries_the_example_mesh() {
    let expected = k8s::mesh_config_manifest().must();
    k8s::check_generated(
        &manifests_dir().join("control/mesh-config.yaml"),
        &expected,
        "control/examples/mesh/ as a ConfigMap",
    )
    .must();
}

/// In the cluster the Services come from Kubernetes (`--discovery kubernetes`): the ConfigMap
/// and the injected demo declare no `tern.dev` Service, and tern-control accepts the
/// ConfigMap's policies, which name services only the cluster declares.
#[test]
fn the_cluster_manifests_declare_no_tern_service() {
    let control =
        std::fs::read_to_string(manifests_dir().join("control/tern-control.yaml")).unwrap();
    assert!(
        control.contains("name: TERN_CONTROL_DISCOVERY\n              value: kubernetes"),
        "tern-control.yaml runs with --discovery kubernetes"
    );
    let map = std::fs::read_to_string(manifests_dir().join("control/mesh-config.yaml")).unwrap();
    let map: serde_yaml::Value = serde_yaml::from_str(&map).unwrap();
    let data = map["data"].as_mapping().expect("the ConfigMap's data");
    assert!(!data.is_empty());
    let dir = TestDir::new("mesh-config-check").must();
    for (name, text) in data {
        let (name, text) = (name.as_str().unwrap(), text.as_str().unwrap());
        assert!(
            !text.lines().any(|l| l.trim_end() == "kind: Service"),
            "{name} declares a Service"
        );
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let check = Command::new(tern_tests::binary("tern-control").must())
        .args(["--check", "--discovery", "kubernetes", "--config-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let demo = std::fs::read_to_string(demo_injected_path()).unwrap();
    assert!(
        !demo.contains("tern.dev/v1alpha1"),
        "the injected demo holds a tern.dev document"
    );
}

#[test]
fn manifests_and_inject_output_validate_against_the_kubernetes_schemas() {
    let dir = TestDir::new("k8s-validate").must();
    let mut files = k8s::all_manifests().must();
    assert!(files.len() >= 6, "{files:?}");
    // Fresh output too, in both modes, and for the run-to-completion kinds.
    let jobs = dir.path().join("jobs.yaml");
    std::fs::write(&jobs, JOBS).unwrap();
    for (name, args) in [
        ("demo.yaml", vec![DEMO]),
        ("demo-native.yaml", vec![DEMO, "--native-sidecar"]),
        ("jobs-injected.yaml", vec![jobs.to_str().unwrap()]),
    ] {
        let out = dir.path().join(name);
        std::fs::write(&out, inject_ok(&args, None).must()).unwrap();
        files.push(out);
    }
    // Ok(false): not installed, and skipped loudly (an error under CI).
    k8s::kubernetes_validate(&files).must();
}

#[test]
fn injecting_twice_equals_injecting_once() {
    for native in [false, true] {
        let mut args = vec![DEMO];
        if native {
            args.push("--native-sidecar");
        }
        let once = inject_ok(&args, None).must();
        let mut again = vec!["-"];
        if native {
            again.push("--native-sidecar");
        }
        let twice = inject_ok(&again, Some(&once)).must();
        assert_eq!(once, twice, "native={native}");
    }
}

#[test]
fn opted_out_workloads_and_other_documents_pass_through() {
    let input = format!("{OPTED_OUT}---\n{SERVICE}---\n{CONFIGMAP}");
    let out = ternctl_inject(&["-"], Some(&input)).must();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(documents(&stdout).must(), documents(&input).must());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in [
        "stdin: document 1 (Deployment legacy): tern.dev/inject: disabled, unchanged",
        "stdin: document 2 (Service pay): not a workload, unchanged",
        "stdin: document 3 (ConfigMap settings): not a workload, unchanged",
    ] {
        assert!(stderr.contains(line), "{line:?} not in:\n{stderr}");
    }
}

#[test]
fn invalid_yaml_fails_naming_the_document() {
    let input = format!("{SERVICE}---\n{BROKEN}");
    let out = ternctl_inject(&["-"], Some(&input)).must();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing half-injected is printed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stdin: document 2 (Deployment web): invalid YAML at line "),
        "{stderr}"
    );
    let file = ternctl_inject(&["no/such/file.yaml"], None).must();
    assert_eq!(file.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&file.stderr).contains("no/such/file.yaml"));
}

/// Every init container injection writes is a command line tern-init accepts.
#[test]
fn tern_init_accepts_the_injected_arguments() {
    let tern_init = tern_tests::process::target_profile_dir()
        .must()
        .join("tern-init");
    if !tern_init.is_file() {
        tern_tests::missing("the tern-init binary (cargo build --workspace --bins)").must();
        return;
    }
    let annotated = OPTED_OUT
        .replace("tern.dev/inject: disabled", "tern.dev/skip-outbound-cidrs: 169.254.169.254/32")
        .replace(
            "metadata:\n  name: legacy\n",
            "metadata:\n  name: legacy\n  annotations:\n    tern.dev/skip-inbound-ports: \"9000-9010\"\n    tern.dev/skip-outbound-ports: \"5432\"\n",
        );
    let mut checked = 0;
    for input in [
        inject_ok(&[DEMO], None).must(),
        inject_ok(&["-"], Some(JOBS)).must(),
        inject_ok(&["-"], Some(&annotated)).must(),
    ] {
        for doc in documents(&input).must() {
            for init in init_containers(&doc) {
                let args: Vec<String> = init["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect();
                let out = Command::new(&tern_init)
                    .arg("--dry-run")
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "tern-init --dry-run {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "{checked}");
}

fn init_containers(doc: &Value) -> Vec<&Value> {
    let spec = match doc["kind"].as_str() {
        Some("CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        Some("Pod") => &doc["spec"],
        _ => &doc["spec"]["template"]["spec"],
    };
    spec["initContainers"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["name"] == "tern-init").collect())
        .unwrap_or_default()
}

/// The Pod a ReplicaSet of `deployment` (in the plain demo) would create.
fn pod_of(deployment: &str) -> Result<Value> {
    let text = std::fs::read_to_string(tern_tests::process::repo_root().join(DEMO))?;
    let docs = documents(&text)?;
    let d = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == deployment)
        .ok_or_else(|| anyhow!("no Deployment {deployment} in {DEMO}"))?;
    let template = &d["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    labels["pod-template-hash"] = json!("5d8f7c9b4");
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{deployment}-5d8f7c9b4-"),
            "namespace": "default",
            "labels": labels,
        },
        "spec": template["spec"],
    }))
}

fn review(kind: &str, object: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0d7a7ad0-4b8e-4a39-9b1b-2d1f6a3c9e01",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

async fn webhook_answer(addr: SocketAddr, control: &Control, body: &Value) -> Result<Value> {
    let rsp = k8s::post_review(
        addr,
        &control.trust_anchor(),
        k8s::WEBHOOK_NAME,
        &serde_json::to_vec(body)?,
    )
    .await?;
    if rsp.status != 200 {
        bail!("webhook answered {}: {}", rsp.status, rsp.text());
    }
    let answer: Value = serde_json::from_slice(&rsp.body).context("webhook answer")?;
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "0d7a7ad0-4b8e-4a39-9b1b-2d1f6a3c9e01"
    );
    Ok(answer["response"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_patch_makes_a_pod_what_ternctl_inject_prints() {
    let dir = TestDir::new("webhook").must();
    let config = ConfigDir::with_demo_services(dir.path()).must();
    let control = Control::start(
        dir.path(),
        "control",
        &config,
        &["--webhook-listen", "127.0.0.1:0"],
    )
    .await
    .must();
    let ready = control
        .proc
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("tern-control ready: ").map(str::to_owned))
        .unwrap();
    let addr: SocketAddr = ready
        .split_whitespace()
        .find_map(|f| f.strip_prefix("webhook="))
        .ok_or_else(|| anyhow!("no webhook= in the ready line {ready:?}"))
        .must()
        .parse()
        .unwrap();
    assert!(ready.starts_with(&format!("grpc={} admin={}", control.grpc, control.admin)));

    let mut job_pod = pod_of("order").must();
    job_pod["spec"]["restartPolicy"] = json!("Never");
    for pod in [pod_of("pay-v2").must(), pod_of("order").must(), job_pod] {
        let rsp = webhook_answer(addr, &control, &review("Pod", &pod))
            .await
            .must();
        assert_eq!(rsp["allowed"], true, "{rsp}");
        assert_eq!(rsp["patchType"], "JSONPatch", "{rsp}");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(rsp["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();

        let cli = inject_ok(&["-"], Some(&serde_json::to_string(&pod).unwrap())).must();
        let cli = documents(&cli).must();
        assert_eq!(cli.len(), 1);
        assert_eq!(patched, cli[0], "webhook and CLI disagree on {pod}");
        let annotations = &patched["metadata"]["annotations"];
        assert!(annotations["tern.dev/injected"].is_string(), "{patched}");
    }

    // An injected Pod, and anything but a Pod, are allowed as they are.
    let injected = documents(
        &inject_ok(
            &["-"],
            Some(&serde_json::to_string(&pod_of("pay").must()).unwrap()),
        )
        .must(),
    )
    .must()
    .remove(0);
    for body in [
        review("Pod", &injected),
        review("Service", &json!({"apiVersion": "v1", "kind": "Service"})),
    ] {
        let rsp = webhook_answer(addr, &control, &body).await.must();
        assert_eq!(rsp["allowed"], true);
        assert!(rsp.get("patch").is_none(), "{rsp}");
    }
    // Not an AdmissionReview: 400.
    let rsp = k8s::post_review(addr, &control.trust_anchor(), k8s::WEBHOOK_NAME, b"{}")
        .await
        .must();
    assert_eq!(rsp.status, 400);
    // The certificate is for the Service's names only.
    let wrong = k8s::post_review(
        addr,
        &control.trust_anchor(),
        "tern-control.other.svc",
        b"{}",
    )
    .await;
    assert!(
        wrong.is_err(),
        "a certificate for another name was accepted"
    );
    let reviews = control
        .metric(
            "tern_control_webhook_reviews_total",
            &[("result", "injected")],
        )
        .await
        .must();
    assert_eq!(reviews, 3.0);
}

const JOBS: &str = "\
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: default
spec:
  template:
    metadata:
      labels: {app: migrate}
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: tern/demo:0.1.0
          command: [/bin/sh, -c, 'run-migrations && curl -X POST localhost:4191/shutdown']
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
  namespace: default
spec:
  schedule: \"0 * * * *\"
  jobTemplate:
    spec:
      template:
        metadata:
          labels: {app: report}
        spec:
          restartPolicy: OnFailure
          containers:
            - name: report
              image: tern/demo:0.1.0
              ports:
                - containerPort: 8080
";

const OPTED_OUT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: legacy
spec:
  selector:
    matchLabels: {app: legacy}
  template:
    metadata:
      labels: {app: legacy}
      annotations:
        tern.dev/inject: disabled
    spec:
      containers:
        - name: legacy
          image: legacy:1
          ports:
            - containerPort: 8080
";

const SERVICE: &str = "\
# kept as written
apiVersion: v1
kind: Service
metadata:
  name: pay
spec:
  selector: {app: pay}
  ports:
    - {name: grpc, port: 50051, targetPort: 50051}
";

const CONFIGMAP: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  app.yaml: |
    retries: 3
    # a comment inside the data
  flag: \"true\"
";

const BROKEN: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  template: {unclosed: [
";
