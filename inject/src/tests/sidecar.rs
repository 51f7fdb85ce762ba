//! What the proxy and the init container look like.

use super::*;
use crate::{Error, INIT_CONTAINER, PROXY_CONTAINER, VERSION};

fn injected_spec(text: &str) -> Value {
    pod_spec(&inject_one(text), &["spec", "template"]).clone()
}

#[test]
fn the_proxy_gets_its_environment() {
    let spec = injected_spec(DEPLOYMENT);
    let proxy = container(&spec, "containers", PROXY_CONTAINER).unwrap();
    let want = [
        ("TERN_SERVICE_NAME", "pay"),
        ("TERN_NAMESPACE", "field:metadata.namespace"),
        ("POD_IP", "field:status.podIP"),
        ("TERN_ADVERTISE", "$(POD_IP):4143"),
        ("TERN_INBOUND_LISTEN", "0.0.0.0:4143"),
        ("TERN_INBOUND_TRANSPARENT", "true"),
        ("TERN_INBOUND_PORTS", "50051"),
        ("TERN_INBOUND_APP", "$(POD_IP):50051"),
        ("TERN_OUTBOUND_LISTEN", "127.0.0.1:4140"),
        ("TERN_ADMIN_LISTEN", "0.0.0.0:4191"),
        (
            "TERN_CONTROL_PLANE",
            "https://tern-control-replicas.tern.svc:8090",
        ),
        (
            "TERN_IDENTITY_TRUST_ANCHORS",
            "/var/run/tern/trust-anchors/trust-anchor.pem",
        ),
        ("TERN_IDENTITY_TOKEN_FILE", "/var/run/tern/token/token"),
        ("TERN_SERVICE_ACCOUNT", "pay"),
        ("TERN_INBOUND_TLS", "permissive"),
        // The controller's pod-template-hash is not the workload's own label.
        ("TERN_LABELS", "app=pay,version=v2"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(env(proxy), want);
    assert_eq!(
        proxy["image"].as_str(),
        Some(format!("tern/proxy:{VERSION}").as_str())
    );
}

#[test]
fn service_name_and_account_fall_back_in_order() {
    let annotated = DEPLOYMENT.replace(
        "      labels: {app: pay, version: v2, pod-template-hash: abc123}\n",
        "      labels: {app: pay, version: v2, pod-template-hash: abc123}\n      annotations: {tern.dev/service: payments}\n",
    );
    let on_workload = DEPLOYMENT.replace(
        "  namespace: default\n",
        "  namespace: default\n  annotations: {tern.dev/service: payments}\n",
    );
    let by_k8s_label = DEPLOYMENT.replace(
        "labels: {app: pay, version: v2,",
        "labels: {app.kubernetes.io/name: billing, version: v2,",
    );
    let by_name = DEPLOYMENT
        .replace("labels: {app: pay, version: v2,", "labels: {version: v2,")
        .replace("      serviceAccountName: pay\n", "");
    for (text, service, account) in [
        (annotated.as_str(), "payments", "pay"),
        (on_workload.as_str(), "payments", "pay"),
        (by_k8s_label.as_str(), "billing", "pay"),
        (by_name.as_str(), "pay-v2", "default"),
    ] {
        let spec = injected_spec(text);
        let proxy = container(&spec, "containers", PROXY_CONTAINER).unwrap();
        assert_eq!(env_of(proxy, "TERN_SERVICE_NAME").as_deref(), Some(service));
        assert_eq!(
            env_of(proxy, "TERN_SERVICE_ACCOUNT").as_deref(),
            Some(account)
        );
    }
}

#[test]
fn the_proxy_has_ports_probes_resources_and_no_privileges() {
    let spec = injected_spec(DEPLOYMENT);
    let proxy = container(&spec, "containers", PROXY_CONTAINER).unwrap();
    let ports: Vec<(&str, u64)> = proxy["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [("tern-inbound", 4143), ("tern-admin", 4191)]);
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(4191)
    );
    assert_eq!(
        proxy["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/live")
    );
    assert_eq!(
        proxy["livenessProbe"]["httpGet"]["port"].as_u64(),
        Some(4191)
    );
    assert!(proxy.get("startupProbe").is_none());
    assert!(proxy.get("restartPolicy").is_none());
    for part in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                proxy["resources"][part][resource].is_string(),
                "{part}.{resource}"
            );
        }
    }
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["runAsUser"].as_u64(), Some(2102));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert!(sc["capabilities"].get("add").is_none());
    let mounts: Vec<&str> = proxy["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, ["tern-token", "tern-trust-anchors"]);
}

#[test]
fn the_init_container_alone_gets_net_admin() {
    let spec = injected_spec(DEPLOYMENT);
    assert_eq!(names(&spec, "initContainers"), [INIT_CONTAINER]);
    let init = container(&spec, "initContainers", INIT_CONTAINER).unwrap();
    assert_eq!(
        init["image"].as_str(),
        Some(format!("tern/init:{VERSION}").as_str())
    );
    assert_eq!(init["command"][0].as_str(), Some("tern-init"));
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "--proxy-uid",
            "2102",
            "--proxy-inbound-port",
            "4143",
            "--proxy-outbound-port",
            "4140",
            "--proxy-admin-port",
            "4191",
        ]
    );
    let sc = &init["securityContext"];
    assert_eq!(sc["runAsUser"].as_u64(), Some(0));
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(false));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    let add: Vec<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(add, ["NET_ADMIN", "NET_RAW"]);
    // The app keeps its own (empty) capabilities.
    let app = container(&spec, "containers", "pay").unwrap();
    assert!(app.get("securityContext").is_none());
}

#[test]
fn every_inbound_port_is_redirected_and_the_proxy_forwards_to_the_served_ones() {
    let text = DEPLOYMENT.replace(
        "  namespace: default\n",
        "  namespace: default\n  annotations:\n    tern.dev/inbound-ports: \"9000-9002\"\n    \
         tern.dev/skip-inbound-ports: \"9001\"\n",
    );
    let spec = injected_spec(&text);
    let proxy = container(&spec, "containers", PROXY_CONTAINER).unwrap();
    let vars = env(proxy);
    let ports = vars.iter().find(|(k, _)| k == "TERN_INBOUND_PORTS");
    assert_eq!(ports.map(|(_, v)| v.as_str()), Some("9000,9002,50051"));
    let init = container(&spec, "initContainers", INIT_CONTAINER).unwrap();
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(!args.contains(&"--inbound-ports"), "{args:?}");
    assert_eq!(args[8..], ["--skip-inbound-ports", "9001"]);
}

#[test]
fn skip_annotations_become_init_flags() {
    let text = DEPLOYMENT.replace(
        "  namespace: default\n",
        "  namespace: default\n  annotations:\n    tern.dev/skip-inbound-ports: \"9000, 9100-9200\"\n    \
         tern.dev/skip-outbound-ports: \"5432\"\n    tern.dev/skip-outbound-cidrs: 10.0.0.0/8,169.254.169.254,fd00:ec2::254\n",
    );
    let spec = injected_spec(&text);
    let init = container(&spec, "initContainers", INIT_CONTAINER).unwrap();
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args[8..],
        [
            "--skip-inbound-ports",
            "9000,9100-9200",
            "--skip-outbound-ports",
            "5432",
            "--skip-outbound-cidrs",
            "10.0.0.0/8,169.254.169.254,fd00:ec2::254"
        ]
    );
    for (key, bad) in [
        ("tern.dev/skip-inbound-ports", "80,http"),
        ("tern.dev/inbound-ports", "9000-"),
        ("tern.dev/skip-outbound-ports", "9-3"),
        ("tern.dev/skip-outbound-cidrs", "10.0.0.0/33"),
        ("tern.dev/skip-outbound-cidrs", "10.0.0.1/8"),
        ("tern.dev/skip-outbound-cidrs", "fd00::1/8"),
        ("tern.dev/skip-outbound-cidrs", "fd00::/129"),
        ("tern.dev/app-port", "0"),
        ("tern.dev/inbound-tls", "sometimes"),
        ("tern.dev/native-sidecar", "yes"),
    ] {
        let text = DEPLOYMENT.replace(
            "  namespace: default\n",
            &format!("  namespace: default\n  annotations: {{{key}: \"{bad}\"}}\n"),
        );
        let e = inject_yaml(&text, &Options::default()).unwrap_err();
        let Error::Invalid { field, .. } = &e.error else {
            panic!("{e}");
        };
        assert_eq!(field, &format!("metadata.annotations[{key}]"), "{e}");
        assert_eq!((e.index, e.name.as_deref()), (1, Some("pay-v2")));
    }
}

#[test]
fn volumes_token_and_trust_anchors() {
    let spec = injected_spec(DEPLOYMENT);
    let volumes = spec["volumes"].as_sequence().unwrap();
    let token = &volumes[0];
    assert_eq!(token["name"].as_str(), Some("tern-token"));
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"].as_str(), Some("tern"));
    assert_eq!(projected["expirationSeconds"].as_u64(), Some(3600));
    assert_eq!(projected["path"].as_str(), Some("token"));
    assert_eq!(
        volumes[1]["configMap"]["name"].as_str(),
        Some("tern-trust-anchors")
    );
    assert!(volumes[2]["emptyDir"].is_mapping());
}

#[test]
fn scrape_annotations_unless_the_pod_has_its_own() {
    let doc = inject_one(DEPLOYMENT);
    let a = &doc["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(a["prometheus.io/port"].as_str(), Some("4191"));
    assert_eq!(a["prometheus.io/path"].as_str(), Some("/metrics"));
    let own = DEPLOYMENT.replace(
        "      labels: {app: pay, version: v2, pod-template-hash: abc123}\n",
        "      labels: {app: pay, version: v2, pod-template-hash: abc123}\n      annotations: {prometheus.io/scrape: \"true\", prometheus.io/port: \"9102\"}\n",
    );
    let doc = inject_one(&own);
    let a = &doc["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/port"].as_str(), Some("9102"));
    assert_eq!(a["tern.dev/injected"].as_str(), Some(VERSION));
}

#[test]
fn native_sidecar_mode_starts_the_proxy_before_the_app() {
    let text = DEPLOYMENT.replace(
        "      containers:\n",
        "      initContainers:\n        - {name: migrate, image: busybox}\n      containers:\n",
    );
    let options = Options {
        native_sidecar: true,
        proxy_image: "registry.example/tern-proxy:dev".into(),
        init_image: "registry.example/tern-init:dev".into(),
    };
    let doc = inject_one_with(&text, &options);
    let spec = pod_spec(&doc, &["spec", "template"]);
    assert_eq!(
        names(spec, "initContainers"),
        [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
    );
    assert_eq!(names(spec, "containers"), ["pay"]);
    let proxy = container(spec, "initContainers", PROXY_CONTAINER).unwrap();
    assert_eq!(proxy["restartPolicy"].as_str(), Some("Always"));
    assert_eq!(
        proxy["startupProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    assert_eq!(
        proxy["image"].as_str(),
        Some("registry.example/tern-proxy:dev")
    );
    let init = container(spec, "initContainers", INIT_CONTAINER).unwrap();
    assert_eq!(
        init["image"].as_str(),
        Some("registry.example/tern-init:dev")
    );

    // Without native mode, tern-init runs after the app's own init containers.
    let doc = inject_one(&text);
    let spec = pod_spec(&doc, &["spec", "template"]);
    assert_eq!(names(spec, "initContainers"), ["migrate", INIT_CONTAINER]);
}

#[test]
fn the_app_port_is_the_first_tcp_port_or_the_annotated_one() {
    let udp_first = DEPLOYMENT.replace(
        "            - {name: grpc, containerPort: 50051}\n",
        "            - {name: dns, containerPort: 53, protocol: UDP}\n            - {name: grpc, containerPort: 50051}\n",
    );
    let spec = injected_spec(&udp_first);
    let proxy = container(&spec, "containers", PROXY_CONTAINER).unwrap();
    assert_eq!(
        env_of(proxy, "TERN_INBOUND_APP").as_deref(),
        Some("$(POD_IP):50051")
    );
    let annotated = DEPLOYMENT.replace(
        "  namespace: default\n",
        "  namespace: default\n  annotations: {tern.dev/app-port: \"8080\", tern.dev/inbound-tls: strict}\n",
    );
    let spec = injected_spec(&annotated);
    let proxy = container(&spec, "containers", PROXY_CONTAINER).unwrap();
    assert_eq!(
        env_of(proxy, "TERN_INBOUND_APP").as_deref(),
        Some("$(POD_IP):8080")
    );
    assert_eq!(env_of(proxy, "TERN_INBOUND_TLS").as_deref(), Some("strict"));
    // No port at all: no inbound listener.
    let none = DEPLOYMENT.replace(
        "          ports:\n            - {name: grpc, containerPort: 50051}\n",
        "",
    );
    let spec = injected_spec(&none);
    let proxy = container(&spec, "containers", PROXY_CONTAINER).unwrap();
    assert_eq!(env_of(proxy, "TERN_INBOUND_APP"), None);
    // ...and every inbound port redirected (tern-init's default).
    let init = container(&spec, "initContainers", INIT_CONTAINER).unwrap();
    assert_eq!(init["args"].as_sequence().unwrap().len(), 8);
}
