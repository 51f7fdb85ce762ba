//! The objects injection adds, as k8s-openapi types: the proxy container, the init container
//! and their volumes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{
    Options, ADMIN_PORT, CONTROL_PLANE_URL, INBOUND_PORT, INIT_CONTAINER, OUTBOUND_PORT,
    PROXY_CONTAINER, PROXY_UID, TOKEN_AUDIENCE, TOKEN_EXPIRATION_SECONDS, TRUST_ANCHORS_CONFIGMAP,
    TRUST_ANCHORS_KEY,
};

pub(crate) const TOKEN_VOLUME: &str = "tern-token";
pub(crate) const TRUST_ANCHORS_VOLUME: &str = "tern-trust-anchors";
/// iptables takes a lock file under /run; the init container's root filesystem is read-only.
pub(crate) const XTABLES_LOCK_VOLUME: &str = "tern-xtables-lock";
pub(crate) const VOLUMES: &[&str] = &[TOKEN_VOLUME, TRUST_ANCHORS_VOLUME, XTABLES_LOCK_VOLUME];

pub(crate) const TOKEN_DIR: &str = "/var/run/tern/token";
pub(crate) const TOKEN_FILE: &str = "token";
pub(crate) const TRUST_ANCHORS_DIR: &str = "/var/run/tern/trust-anchors";

/// The inbound listener's mode (`TERN_INBOUND_TLS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InboundTls {
    Strict,
    /// The default when injected: the kubelet's probes and callers outside the mesh reach the
    /// app through the redirect in plaintext, mesh callers with mTLS.
    Permissive,
    Off,
}

impl InboundTls {
    fn as_str(self) -> &'static str {
        match self {
            InboundTls::Strict => "strict",
            InboundTls::Permissive => "permissive",
            InboundTls::Off => "off",
        }
    }
}

/// What the sidecar is told about its pod.
#[derive(Clone, Debug)]
pub(crate) struct Facts {
    pub service_name: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub app_port: Option<u16>,
    /// The ports the app serves, as `TERN_INBOUND_PORTS` (see [`crate::ports`]).
    pub served_ports: Option<String>,
    pub native_sidecar: bool,
    pub inbound_tls: InboundTls,
    pub skip_inbound_ports: Option<String>,
    pub skip_outbound_ports: Option<String>,
    pub skip_outbound_cidrs: Option<String>,
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn env_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn admin_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        ..Probe::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

fn resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(quantities(requests)),
        limits: Some(quantities(limits)),
        ..ResourceRequirements::default()
    }
}

fn capabilities(add: &[&str]) -> Capabilities {
    Capabilities {
        add: (!add.is_empty()).then(|| add.iter().map(|c| (*c).to_owned()).collect()),
        drop: Some(vec!["ALL".to_owned()]),
    }
}

fn runtime_default_seccomp() -> Option<SeccompProfile> {
    Some(SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    })
}

/// The `tern-proxy` container.
pub(crate) fn proxy_container(f: &Facts, options: &Options) -> Container {
    let mut vars = vec![
        env("TERN_SERVICE_NAME", &f.service_name),
        env_field("TERN_NAMESPACE", "metadata.namespace"),
        env_field("POD_IP", "status.podIP"),
        // The kubelet expands $(POD_IP) from the variable above.
        env("TERN_ADVERTISE", format!("$(POD_IP):{INBOUND_PORT}")),
        env("TERN_INBOUND_LISTEN", format!("0.0.0.0:{INBOUND_PORT}")),
        // Connections tern-init redirected go to the app port they were sent to, at the pod IP.
        env("TERN_INBOUND_TRANSPARENT", "true"),
    ];
    // Only to a port the app serves: any other is refused.
    if let Some(ports) = &f.served_ports {
        vars.push(env("TERN_INBOUND_PORTS", ports));
    }
    // Mesh traffic sent to the inbound port itself goes to the app's (first) port, at the pod
    // IP like the rest: a listener the app bound to 127.0.0.1 stays private.
    if let Some(port) = f.app_port {
        vars.push(env("TERN_INBOUND_APP", format!("$(POD_IP):{port}")));
    }
    vars.extend([
        env("TERN_OUTBOUND_LISTEN", format!("127.0.0.1:{OUTBOUND_PORT}")),
        env("TERN_ADMIN_LISTEN", format!("0.0.0.0:{ADMIN_PORT}")),
        env("TERN_CONTROL_PLANE", CONTROL_PLANE_URL),
        env(
            "TERN_IDENTITY_TRUST_ANCHORS",
            format!("{TRUST_ANCHORS_DIR}/{TRUST_ANCHORS_KEY}"),
        ),
        env(
            "TERN_IDENTITY_TOKEN_FILE",
            format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        ),
        env("TERN_SERVICE_ACCOUNT", &f.service_account),
        env("TERN_INBOUND_TLS", f.inbound_tls.as_str()),
    ]);
    if !f.labels.is_empty() {
        let labels: Vec<String> = f.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        vars.push(env("TERN_LABELS", labels.join(",")));
    }
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    };
    let mut readiness = admin_probe("/ready");
    readiness.period_seconds = Some(5);
    let mut liveness = admin_probe("/live");
    liveness.initial_delay_seconds = Some(10);
    let (restart_policy, startup_probe) = if f.native_sidecar {
        // The kubelet starts the next container only once this probe has passed.
        let mut startup = admin_probe("/ready");
        startup.period_seconds = Some(1);
        startup.failure_threshold = Some(120);
        (Some("Always".to_owned()), Some(startup))
    } else {
        (None, None)
    };
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(options.proxy_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        env: Some(vars),
        ports: Some(vec![
            port("tern-inbound", INBOUND_PORT),
            port("tern-admin", ADMIN_PORT),
        ]),
        readiness_probe: Some(readiness),
        liveness_probe: Some(liveness),
        startup_probe,
        restart_policy,
        resources: Some(resources(
            &[("cpu", "10m"), ("memory", "32Mi")],
            // One worker thread: a whole core is the most it uses.
            &[("cpu", "1"), ("memory", "256Mi")],
        )),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(capabilities(&[])),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            seccomp_profile: runtime_default_seccomp(),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount(TOKEN_VOLUME, TOKEN_DIR),
            mount(TRUST_ANCHORS_VOLUME, TRUST_ANCHORS_DIR),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// tern-init's flags (`init/src/args.rs`): the proxy's user and ports, and what never to
/// redirect. Every other inbound port is redirected, declared or not: nothing reaches the app
/// around the proxy, which then forwards only to the ports the app serves.
pub(crate) mod init_flags {
    pub const PROXY_UID: &str = "--proxy-uid";
    pub const INBOUND_PORT: &str = "--proxy-inbound-port";
    pub const OUTBOUND_PORT: &str = "--proxy-outbound-port";
    pub const ADMIN_PORT: &str = "--proxy-admin-port";
    pub const SKIP_INBOUND_PORTS: &str = "--skip-inbound-ports";
    pub const SKIP_OUTBOUND_PORTS: &str = "--skip-outbound-ports";
    pub const SKIP_OUTBOUND_CIDRS: &str = "--skip-outbound-cidrs";
}

/// The `tern-init` container: installs the iptables redirects, then exits.
pub(crate) fn init_container(f: &Facts, options: &Options) -> Container {
    let mut args: Vec<String> = [
        (init_flags::PROXY_UID, PROXY_UID.to_string()),
        (init_flags::INBOUND_PORT, INBOUND_PORT.to_string()),
        (init_flags::OUTBOUND_PORT, OUTBOUND_PORT.to_string()),
        (init_flags::ADMIN_PORT, ADMIN_PORT.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .collect();
    for (flag, value) in [
        (init_flags::SKIP_INBOUND_PORTS, &f.skip_inbound_ports),
        (init_flags::SKIP_OUTBOUND_PORTS, &f.skip_outbound_ports),
        (init_flags::SKIP_OUTBOUND_CIDRS, &f.skip_outbound_cidrs),
    ] {
        if let Some(value) = value {
            args.push(flag.to_owned());
            args.push(value.clone());
        }
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(options.init_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec![INIT_CONTAINER.to_owned()]),
        args: Some(args),
        resources: Some(resources(
            &[("cpu", "10m"), ("memory", "10Mi")],
            &[("cpu", "100m"), ("memory", "64Mi")],
        )),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            // Only what changing the pod's own iptables needs, and only here.
            capabilities: Some(capabilities(&["NET_ADMIN", "NET_RAW"])),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            seccomp_profile: runtime_default_seccomp(),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_LOCK_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..VolumeMount::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The volumes the two containers mount.
pub(crate) fn volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: TOKEN_FILE.to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: TRUST_ANCHORS_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: TRUST_ANCHORS_CONFIGMAP.to_owned(),
                items: Some(vec![KeyToPath {
                    key: TRUST_ANCHORS_KEY.to_owned(),
                    path: TRUST_ANCHORS_KEY.to_owned(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: XTABLES_LOCK_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ]
}
