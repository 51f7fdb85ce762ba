//! Validation of bootstrap config: every bad field is named.
#![allow(clippy::unwrap_used)]

use clap::Parser;

use super::args::Args;
use super::*;

fn parse(args: &[&str]) -> Result<Config, ConfigError> {
    let mut v = vec!["tern-proxy"];
    v.extend_from_slice(args);
    let a = Args::try_parse_from(v).unwrap();
    a.load().map(|(_, c)| c)
}

#[test]
fn flags_build_services() {
    let c = parse(&[
        "--upstream",
        "pay=127.0.0.1:5001",
        "--endpoints",
        "pay=127.0.0.1:7002,127.0.0.1:7001",
        "--dns",
        "echo=echo.mesh.test:9000",
    ])
    .unwrap();
    assert_eq!(c.services.len(), 2);
    let pay = &c.services[0];
    assert_eq!(pay.upstream, Some("127.0.0.1:5001".parse().unwrap()));
    match &pay.discovery {
        DiscoveryConfig::Static(e) => assert_eq!(e[0], "127.0.0.1:7001".parse().unwrap()),
        other => panic!("unexpected {other:?}"),
    }
    match &c.services[1].discovery {
        DiscoveryConfig::Dns { host, port } => {
            assert_eq!(host, "echo.mesh.test");
            assert_eq!(*port, 9000);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bad_values_name_the_field() {
    let e = parse(&["--endpoints", "pay=127.0.0.1:7001,nope"]).unwrap_err();
    assert_eq!(e.field, "services[0].endpoints[1]");
    let e = parse(&["--drain-grace", "soon"]).unwrap_err();
    assert_eq!(e.field, "drain_grace");
    let e = parse(&["--endpoints", "Pay=127.0.0.1:1"]).unwrap_err();
    assert_eq!(e.field, "services[0].name");
    let e = parse(&["--upstream", "nameless"]).unwrap_err();
    assert_eq!(e.field, "--upstream");
    let e = parse(&[
        "--inbound-app",
        "127.0.0.1:80",
        "--inbound-listen",
        "127.0.0.1:4191",
    ])
    .unwrap_err();
    assert!(e.to_string().contains("already used"), "{e}");
}

#[test]
fn dns_and_static_are_exclusive() {
    let e = parse(&["--endpoints", "pay=127.0.0.1:1", "--dns", "pay=pay.test:1"]).unwrap_err();
    assert_eq!(e.field, "services[0].dns");
}

#[test]
fn yaml_unknown_field_is_rejected_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.yaml");
    std::fs::write(
        &path,
        "services:\n  - name: pay\n    endpoint: [127.0.0.1:1]\n",
    )
    .unwrap();
    let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("unknown field `endpoint`"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
}

#[test]
fn yaml_and_flags_merge() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.yaml");
    std::fs::write(
        &path,
        "service_name: order\naccess_log: off\nservices:\n  - name: pay\n    endpoints: [127.0.0.1:7001]\n",
    )
    .unwrap();
    let c = parse(&[
        "--config",
        path.to_str().unwrap(),
        "--upstream",
        "pay=127.0.0.1:5001",
    ])
    .unwrap();
    assert_eq!(c.service_name, "order");
    assert_eq!(c.access_log, AccessLogTarget::Off);
    assert_eq!(
        c.services[0].upstream,
        Some("127.0.0.1:5001".parse().unwrap())
    );
}

#[test]
fn identity_settings_are_validated() {
    // No trust anchors: no mTLS, and asking for strict inbound is an error.
    let c = parse(&["--service-name", "pay"]).unwrap();
    assert!(c.identity.is_none());
    assert_eq!(c.inbound_tls, identity::InboundTls::Off);
    let e = parse(&["--inbound-tls", "strict"]).unwrap_err();
    assert_eq!(e.field, "identity.inbound_tls");

    let base = [
        "--service-name",
        "pay",
        "--identity-trust-anchors",
        "/etc/tern/anchors.pem",
        "--identity-token-file",
        "/var/run/tern/token",
        "--control-plane",
        "https://tern-control:8090",
    ];
    let c = parse(&base).unwrap();
    let id = c.identity.unwrap();
    assert_eq!(
        id.id.to_string(),
        "spiffe://cluster.local/ns/default/sa/pay"
    );
    assert_eq!(id.server.to_string(), "https://tern-control:8090");
    assert_eq!(
        &*id.control_plane_identity,
        "spiffe://cluster.local/ns/tern/sa/tern-control"
    );
    // Default with an identity: strict.
    assert_eq!(c.inbound_tls, identity::InboundTls::Strict);

    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        parse(&v)
    };
    let c = with(&[
        "--service-account",
        "pay-sa",
        "--trust-domain",
        "example.org",
        "--inbound-tls",
        "permissive",
    ])
    .unwrap();
    assert_eq!(
        c.identity.unwrap().id.to_string(),
        "spiffe://example.org/ns/default/sa/pay-sa"
    );
    assert_eq!(c.inbound_tls, identity::InboundTls::Permissive);
    assert_eq!(
        with(&["--inbound-tls", "sometimes"]).unwrap_err().field,
        "identity.inbound_tls"
    );
    assert_eq!(
        with(&["--service-account", "a b"]).unwrap_err().field,
        "identity.service_account"
    );
    // Certificates are never requested in plaintext.
    let mut plain = base[..6].to_vec();
    plain.extend_from_slice(&["--control-plane", "http://tern-control:8090"]);
    assert_eq!(parse(&plain).unwrap_err().field, "identity.server");
    plain.extend_from_slice(&["--identity-server", "https://tern-control:8090"]);
    assert_eq!(parse(&plain).unwrap_err().field, "control_plane");
    let e = parse(&[
        "--identity-trust-anchors",
        "/a.pem",
        "--control-plane",
        "https://c:1",
    ])
    .unwrap_err();
    assert_eq!(e.field, "identity.token_file");
    // Endpoint identities must be SPIFFE ids.
    let c = with(&[
        "--endpoints",
        "echo=127.0.0.1:1",
        "--endpoint-identity",
        "echo=spiffe://cluster.local/ns/default/sa/echo",
    ])
    .unwrap();
    assert_eq!(
        c.services[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/echo")
    );
    let e = with(&[
        "--endpoints",
        "echo=127.0.0.1:1",
        "--endpoint-identity",
        "echo=echo",
    ])
    .unwrap_err();
    assert_eq!(e.field, "services[0].identity");
}

#[test]
fn interception_settings_parse() {
    let c = parse(&[
        "--inbound-transparent",
        "--opaque-ports",
        "6379,7000-7001",
        "--virtual-ip",
        "pay=10.96.0.10",
    ])
    .unwrap();
    let inbound = c.inbound.unwrap();
    assert!(inbound.transparent);
    assert_eq!(inbound.app, None);
    assert_eq!(inbound.listen, "0.0.0.0:4143".parse().unwrap());
    assert!(c.opaque_ports.contains(6379) && c.opaque_ports.contains(7001));
    assert!(!c.opaque_ports.contains(7002));
    assert_eq!(
        c.services[0].virtual_ip,
        Some("10.96.0.10".parse().unwrap())
    );
    // Without either flag there is still no inbound listener.
    assert!(parse(&[]).unwrap().inbound.is_none());
    let c = parse(&[
        "--inbound-transparent=false",
        "--inbound-app",
        "127.0.0.1:8080",
    ])
    .unwrap();
    assert!(!c.inbound.unwrap().transparent);

    let e = parse(&["--opaque-ports", "redis"]).unwrap_err();
    assert_eq!(e.field, "opaque_ports");
    let e = parse(&["--virtual-ip", "pay=10.96.0"]).unwrap_err();
    assert_eq!(e.field, "services[0].virtual_ip");
    let e = parse(&[
        "--virtual-ip",
        "pay=10.96.0.10",
        "--virtual-ip",
        "web=10.96.0.10",
    ])
    .unwrap_err();
    assert!(e.reason.contains("already the virtual IP of pay"), "{e}");
}

#[test]
fn yaml_takes_opaque_ports_as_numbers_or_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.yaml");
    std::fs::write(
        &path,
        "opaque_ports: [3306, \"7000-7002\"]\ninbound: {app: 127.0.0.1:8080, transparent: true}\n\
         services:\n  - name: pay\n    virtual_ip: 10.96.0.20\n",
    )
    .unwrap();
    let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.opaque_ports.to_string(), "3306,7000-7002");
    assert!(c.inbound.unwrap().transparent);
    assert_eq!(
        c.services[0].virtual_ip,
        Some("10.96.0.20".parse().unwrap())
    );
}

#[test]
fn admin_config_is_loopback_only_unless_exposed() {
    let c = parse(&["--service-name", "pay"]).unwrap();
    assert!(!c.admin_expose_config);
    let c = parse(&["--service-name", "pay", "--admin-expose-config"]).unwrap();
    assert!(c.admin_expose_config);
    let c = parse(&["--service-name", "pay", "--admin-expose-config=false"]).unwrap();
    assert!(!c.admin_expose_config);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.yaml");
    std::fs::write(&path, "service_name: pay\nadmin:\n  expose_config: true\n").unwrap();
    let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert!(c.admin_expose_config);
}

#[test]
fn inbound_ports_are_the_apps_and_never_the_sidecars() {
    let c = parse(&[
        "--inbound-transparent",
        "--inbound-app",
        "127.0.0.1:8080",
        "--inbound-ports",
        "9000-9002,7000",
    ])
    .unwrap();
    let ports = c.inbound.unwrap().ports;
    assert_eq!(ports.to_string(), "7000,8080,9000-9002");
    // Without --inbound-ports, transparent inbound serves the app's port alone.
    let c = parse(&["--inbound-transparent"]).unwrap();
    assert!(c.inbound.unwrap().ports.is_empty());
    for (args, why) in [
        (
            ["--inbound-transparent", "--inbound-ports", "4143"],
            "sidecar's own",
        ),
        (
            ["--inbound-transparent", "--inbound-ports", "4191"],
            "sidecar's own",
        ),
        (
            ["--inbound-transparent", "--inbound-ports", "http"],
            "not a port",
        ),
        (
            ["--inbound-transparent=false", "--inbound-ports", "8080"],
            "needs inbound.transparent",
        ),
    ] {
        let e = parse(&args).unwrap_err();
        assert_eq!(e.field, "inbound.ports", "{e}");
        assert!(e.reason.contains(why), "{e}");
    }
}

#[test]
fn ipv6_addresses_may_come_without_brackets() {
    // What Kubernetes makes of `$(POD_IP):4143` in an IPv6 pod.
    let c = parse(&[
        "--advertise",
        "fd00:10:1::5:4143",
        "--inbound-app",
        "[fd00:10:1::5]:8080",
    ])
    .unwrap();
    assert_eq!(c.advertise, Some("[fd00:10:1::5]:4143".parse().unwrap()));
    assert_eq!(
        c.inbound.unwrap().app,
        Some("[fd00:10:1::5]:8080".parse().unwrap())
    );
    for bad in ["fd00::1", "fd00::1:http", "10.0.0.1"] {
        assert_eq!(parse(&["--advertise", bad]).unwrap_err().field, "advertise");
    }
}

#[test]
fn tap_is_configured_by_flag_env_and_file() {
    let c = parse(&["--service-name", "pay"]).unwrap();
    assert!(!c.admin_tap);
    assert_eq!(c.tap_headers, super::admin::DEFAULT_TAP_HEADERS);
    let c = parse(&[
        "--service-name",
        "pay",
        "--admin-tap",
        "--tap-headers",
        "X-Canary, te",
    ])
    .unwrap();
    assert!(c.admin_tap);
    assert_eq!(c.tap_headers, ["x-canary", "te"]);
    let e = parse(&["--service-name", "pay", "--tap-headers", "bad header"]).unwrap_err();
    assert!(e.to_string().contains("tap_headers"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.yaml");
    std::fs::write(
        &path,
        "service_name: pay\nadmin:\n  tap: true\n  tap_headers: [x-request-id]\n",
    )
    .unwrap();
    let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert!(c.admin_tap);
    assert_eq!(c.tap_headers, ["x-request-id"]);
}
