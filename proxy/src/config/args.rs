//! Command-line flags and `TERN_*` environment variables, merged over the YAML file.
//!
//! Precedence: flag > environment variable > file > default. Repeatable flags
//! (`--upstream`, `--endpoints`, `--dns`) take `;`-separated lists from the
//! environment, since Kubernetes can only set one value per variable.

use std::path::PathBuf;

use clap::Parser;

use super::{err, Config, ConfigError, FileConfig, ServiceFile};

#[derive(Debug, Parser)]
#[command(
    name = "tern-proxy",
    version,
    about = "Tern sidecar proxy: carries a workload's gRPC and HTTP traffic through the mesh."
)]
pub struct Args {
    /// Bootstrap YAML file; flags and TERN_* variables override what it sets.
    #[arg(long, env = "TERN_CONFIG")]
    pub config: Option<PathBuf>,

    /// Service the local workload belongs to (labels inbound metrics and logs).
    #[arg(long, env = "TERN_SERVICE_NAME")]
    pub service_name: Option<String>,

    /// Namespace of the local workload [default: default].
    #[arg(long, env = "TERN_NAMESPACE")]
    pub namespace: Option<String>,

    /// tern-control's push API, e.g. http://127.0.0.1:8090, or several replicas comma-separated
    /// (each host may be a name resolving to several) [default: none, bootstrap config only].
    #[arg(long, env = "TERN_CONTROL_PLANE")]
    pub control_plane: Option<String>,

    /// Address other sidecars reach this workload at [default: the inbound listener's].
    #[arg(long, env = "TERN_ADVERTISE")]
    pub advertise: Option<String>,

    /// KEY=VALUE labels of this workload (e.g. version=v2), comma-separated or repeated.
    #[arg(long = "label", env = "TERN_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Inbound listener: mesh traffic for the local app [default: 0.0.0.0:4143].
    #[arg(long, env = "TERN_INBOUND_LISTEN")]
    pub inbound_listen: Option<String>,

    /// The local app inbound traffic is forwarded to; without it (and without
    /// --inbound-transparent) there is no inbound listener.
    #[arg(long, env = "TERN_INBOUND_APP")]
    pub inbound_app: Option<String>,

    /// Ask the control plane for every service it knows, not only the ones configured here: for
    /// an intercepted app, whose connections may go to any service's virtual IP [default: false].
    #[arg(long, env = "TERN_WATCH_ALL_SERVICES", num_args = 0..=1, default_missing_value = "true")]
    pub watch_all_services: Option<bool>,

    /// How long a connection to an unknown destination, or a request naming
    /// an unknown authority, waits for the control plane to say what it is
    /// before it fails with UNAVAILABLE naming the destination [default: 1s].
    #[arg(long, env = "TERN_LOOKUP_TIMEOUT")]
    pub lookup_timeout: Option<String>,

    /// How long an address the control plane says is outside the mesh is
    /// passed through without asking again [default: 30s].
    #[arg(long, env = "TERN_OUTSIDE_MESH_TTL")]
    pub outside_mesh_ttl: Option<String>,

    /// A service this sidecar looked up and has not used for this long is
    /// dropped (the control plane stops sending it) [default: 10m].
    #[arg(long, env = "TERN_SERVICE_IDLE_TIMEOUT")]
    pub service_idle_timeout: Option<String>,

    /// Transparent inbound: connections iptables redirected to the inbound
    /// listener go to the app on the IP and port they were sent to (the pod
    /// IP, never loopback), if it is a port the app serves [default: false].
    #[arg(long, env = "TERN_INBOUND_TRANSPARENT", num_args = 0..=1, default_missing_value = "true")]
    pub inbound_transparent: Option<bool>,

    /// Ports the app serves besides --inbound-app's (e.g. 8080,9000-9010): the only ones
    /// transparent inbound forwards to; any other port is refused [default: none].
    #[arg(long, env = "TERN_INBOUND_PORTS", value_delimiter = ',')]
    pub inbound_ports: Vec<String>,

    /// Ports carried as opaque TCP, no protocol detection (e.g. 3306,6379,7000-7010).
    #[arg(long, env = "TERN_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<String>,

    /// NAME=IP: service NAME's virtual IP (like a ClusterIP); intercepted
    /// connections to it go to NAME. The control plane can push it too.
    #[arg(long = "virtual-ip", env = "TERN_VIRTUAL_IPS", value_delimiter = ';')]
    pub virtual_ips: Vec<String>,

    /// Generic outbound listener, routing by :authority / Host [default: 127.0.0.1:4140].
    #[arg(long, env = "TERN_OUTBOUND_LISTEN")]
    pub outbound_listen: Option<String>,

    /// Admin listener: /metrics, /ready, /live, /config, /tap, /explain, /shutdown [default: 127.0.0.1:4191].
    #[arg(long, env = "TERN_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,

    /// Serve /config to any peer, not only loopback (it maps the mesh: services, endpoints,
    /// identities, policies); `kubectl port-forward` reaches it without this [default: false].
    #[arg(long, env = "TERN_ADMIN_EXPOSE_CONFIG", num_args = 0..=1, default_missing_value = "true")]
    pub admin_expose_config: Option<bool>,

    /// Serve /tap (a live stream of request metadata) even though --admin-listen is not a
    /// loopback address; it still answers loopback peers only unless --admin-expose-config
    /// [default: false: /tap is on only when the admin port listens on loopback].
    #[arg(long, env = "TERN_ADMIN_TAP", num_args = 0..=1, default_missing_value = "true")]
    pub admin_tap: Option<bool>,

    /// Request headers whose values /tap shows, comma-separated (no other header value ever
    /// leaves the sidecar through /tap) [default: content-type,user-agent,grpc-timeout,te].
    #[arg(long, env = "TERN_TAP_HEADERS", value_delimiter = ',')]
    pub tap_headers: Vec<String>,

    /// NAME=ADDR: an explicit outbound port; every request accepted on ADDR goes to service NAME.
    #[arg(long = "upstream", env = "TERN_UPSTREAMS", value_delimiter = ';')]
    pub upstreams: Vec<String>,

    /// NAME=ADDR[,ADDR...]: static endpoints of service NAME.
    #[arg(long = "endpoints", env = "TERN_ENDPOINTS", value_delimiter = ';')]
    pub endpoints: Vec<String>,

    /// NAME=HOST:PORT: service NAME's endpoints are HOST's A/AAAA records, re-resolved at TTL.
    #[arg(long = "dns", env = "TERN_DNS", value_delimiter = ';')]
    pub dns: Vec<String>,

    /// Nameserver (IP:port) for DNS discovery [default: the system's resolv.conf].
    #[arg(long, env = "TERN_DNS_NAMESERVER")]
    pub dns_nameserver: Option<String>,

    /// Where access log lines go: stdout, stderr, off, or a file path [default: stdout].
    #[arg(long, env = "TERN_ACCESS_LOG")]
    pub access_log: Option<String>,

    /// host:port of an OTLP/gRPC trace collector: each sampled request becomes a span there
    /// [default: none, no spans].
    #[arg(long, env = "TERN_TRACE_COLLECTOR")]
    pub trace_collector: Option<String>,

    /// Share of requests without a traceparent that start a sampled trace, 0 to 1; an
    /// incoming traceparent's sampled flag always decides for its request [default: 0].
    #[arg(long, env = "TERN_TRACE_SAMPLE_RATE")]
    pub trace_sample_rate: Option<f64>,

    /// How long SIGTERM waits for in-flight requests before exiting [default: 30s].
    #[arg(long, env = "TERN_DRAIN_GRACE")]
    pub drain_grace: Option<String>,

    /// Timeout for connecting to an endpoint [default: 1s].
    #[arg(long, env = "TERN_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,

    /// Attempts per request, the first included (1 = no retries) [default: 3].
    #[arg(long, env = "TERN_RETRY_ATTEMPTS")]
    pub retry_attempts: Option<u32>,

    /// gRPC codes that are retried, comma-separated names or numbers [default: UNAVAILABLE].
    #[arg(long, env = "TERN_RETRY_GRPC_CODES", value_delimiter = ',')]
    pub retry_grpc_codes: Vec<String>,

    /// Largest request body buffered for replay; larger ones are not retried [default: 65536].
    #[arg(long, env = "TERN_RETRY_BUFFER_BYTES")]
    pub retry_buffer_bytes: Option<usize>,

    /// Timeout of each attempt, until response headers (and, for gRPC, its first message).
    #[arg(long, env = "TERN_PER_TRY_TIMEOUT")]
    pub per_try_timeout: Option<String>,

    /// Timeout of the whole request, retries included; an incoming grpc-timeout can only shorten it.
    #[arg(long, env = "TERN_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,

    /// Consecutive failures that eject an endpoint for a backoff period (0 = never) [default: 7].
    #[arg(long, env = "TERN_FAILURE_ACCRUAL")]
    pub failure_accrual: Option<u32>,

    /// PEM file of the mesh trust anchors; turns on mTLS (needs an https:// control plane).
    #[arg(long, env = "TERN_IDENTITY_TRUST_ANCHORS")]
    pub identity_trust_anchors: Option<String>,

    /// File holding the bootstrap token that proves this workload's service account.
    #[arg(long, env = "TERN_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<String>,

    /// SPIFFE trust domain [default: cluster.local].
    #[arg(long, env = "TERN_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,

    /// Service account the workload runs as [default: the service name].
    #[arg(long, env = "TERN_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// SPIFFE id the control plane must present [default: spiffe://TRUST_DOMAIN/ns/tern/sa/tern-control].
    #[arg(long, env = "TERN_CONTROL_PLANE_IDENTITY")]
    pub control_plane_identity: Option<String>,

    /// tern-control's Identity service, https://host:port, or several comma-separated
    /// [default: the --control-plane URL].
    #[arg(long, env = "TERN_IDENTITY_SERVER")]
    pub identity_server: Option<String>,

    /// Inbound port mode: strict (mTLS only), permissive (mTLS or plaintext), off [default: strict with identity].
    #[arg(long, env = "TERN_INBOUND_TLS")]
    pub inbound_tls: Option<String>,

    /// NAME=SPIFFE-ID: the identity service NAME's static or DNS endpoints must present.
    #[arg(
        long = "endpoint-identity",
        env = "TERN_ENDPOINT_IDENTITIES",
        value_delimiter = ';'
    )]
    pub endpoint_identities: Vec<String>,

    /// Largest header block of a request or response, HTTP/1 and HTTP/2, in bytes (names,
    /// values and 32 per field) [default: 65536].
    #[arg(long, env = "TERN_MAX_HEADER_LIST_SIZE")]
    pub max_header_list_size: Option<u32>,

    /// HTTP/2 streams open at once on one downstream connection [default: 200].
    #[arg(long, env = "TERN_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,

    /// Streams one downstream connection may cancel within 10 s before it is sent GOAWAY and
    /// closed; the upstream connections it shares with others are never touched [default: 200].
    #[arg(long, env = "TERN_MAX_CLIENT_RESETS")]
    pub max_client_resets: Option<u32>,

    /// Close a downstream connection with no request in flight for this long [default: 5m].
    #[arg(long, env = "TERN_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,

    /// Time a new connection has for its TLS handshake and protocol detection [default: 10s].
    #[arg(long, env = "TERN_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<String>,

    /// Open connections per listener; more are refused at accept [default: 20000].
    #[arg(long, env = "TERN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// How long a request without a deadline of its own (no grpc-timeout, no route or
    /// --request-timeout) waits for its response head; 0 waits forever [default: 5m].
    #[arg(long, env = "TERN_RESPONSE_TIMEOUT")]
    pub response_timeout: Option<String>,

    /// Tokio worker threads [default: 1].
    #[arg(long, env = "TERN_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Diagnostic log filter (tracing EnvFilter syntax), written to stderr.
    #[arg(long = "log", env = "TERN_LOG", default_value = "info")]
    pub log: String,
}

impl Args {
    /// Reads the file (if any), applies flags over it and validates the result.
    pub fn load(&self) -> Result<(FileConfig, Config), ConfigError> {
        let mut file = match &self.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
                serde_yaml::from_str::<FileConfig>(&text).map_err(|e| {
                    err(
                        format!("{}", path.display()),
                        // serde_yaml names the field path and line for unknown or mistyped fields.
                        e.to_string(),
                    )
                })?
            }
        };
        self.apply(&mut file)?;
        let config = file.validate()?;
        Ok((file, config))
    }

    fn apply(&self, f: &mut FileConfig) -> Result<(), ConfigError> {
        fn set(dst: &mut Option<String>, src: &Option<String>) {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        set(&mut f.service_name, &self.service_name);
        set(&mut f.namespace, &self.namespace);
        set(&mut f.control_plane, &self.control_plane);
        set(&mut f.advertise, &self.advertise);
        for l in self.labels.iter().filter(|s| !s.trim().is_empty()) {
            let (k, v) = split_pair("--label", l)?;
            f.labels.insert(k.to_string(), v.to_string());
        }
        set(&mut f.inbound.listen, &self.inbound_listen);
        set(&mut f.inbound.app, &self.inbound_app);
        if self.watch_all_services.is_some() {
            f.watch_all_services = self.watch_all_services;
        }
        set(&mut f.on_demand.lookup_timeout, &self.lookup_timeout);
        set(&mut f.on_demand.outside_mesh_ttl, &self.outside_mesh_ttl);
        set(&mut f.on_demand.idle_timeout, &self.service_idle_timeout);
        if self.inbound_transparent.is_some() {
            f.inbound.transparent = self.inbound_transparent;
        }
        if !self.inbound_ports.is_empty() {
            f.inbound.ports = port_items(&self.inbound_ports);
        }
        if !self.opaque_ports.is_empty() {
            f.opaque_ports = port_items(&self.opaque_ports);
        }
        set(&mut f.outbound.listen, &self.outbound_listen);
        set(&mut f.admin.listen, &self.admin_listen);
        if self.admin_expose_config.is_some() {
            f.admin.expose_config = self.admin_expose_config;
        }
        if self.admin_tap.is_some() {
            f.admin.tap = self.admin_tap;
        }
        if !self.tap_headers.is_empty() {
            f.admin.tap_headers = Some(self.tap_headers.clone());
        }
        set(&mut f.dns.nameserver, &self.dns_nameserver);
        set(&mut f.access_log, &self.access_log);
        set(&mut f.tracing.collector, &self.trace_collector);
        if self.trace_sample_rate.is_some() {
            f.tracing.sample_rate = self.trace_sample_rate;
        }
        set(&mut f.drain_grace, &self.drain_grace);
        set(&mut f.connect_timeout, &self.connect_timeout);
        if self.worker_threads.is_some() {
            f.worker_threads = self.worker_threads;
        }
        self.apply_limits(&mut f.limits);
        let id = &mut f.identity;
        set(&mut id.trust_anchors, &self.identity_trust_anchors);
        set(&mut id.token_file, &self.identity_token_file);
        set(&mut id.trust_domain, &self.trust_domain);
        set(&mut id.service_account, &self.service_account);
        set(&mut id.control_plane_identity, &self.control_plane_identity);
        set(&mut id.inbound_tls, &self.inbound_tls);
        set(&mut id.server, &self.identity_server);
        let d = &mut f.defaults;
        let retry = d.retry.get_or_insert_with(Default::default);
        if self.retry_attempts.is_some() {
            retry.max_attempts = self.retry_attempts;
        }
        if !self.retry_grpc_codes.is_empty() {
            retry.grpc_codes = Some(self.retry_grpc_codes.clone());
        }
        if self.retry_buffer_bytes.is_some() {
            retry.buffer_bytes = self.retry_buffer_bytes;
        }
        let timeout = d.timeout.get_or_insert_with(Default::default);
        set(&mut timeout.per_try, &self.per_try_timeout);
        set(&mut timeout.overall, &self.request_timeout);
        if self.failure_accrual.is_some() {
            d.failure_accrual
                .get_or_insert_with(Default::default)
                .consecutive_failures = self.failure_accrual;
        }
        for u in self.upstreams.iter().filter(|s| !s.trim().is_empty()) {
            let (name, addr) = split_pair("--upstream", u)?;
            service(f, name).upstream = Some(addr.to_string());
        }
        for e in self.endpoints.iter().filter(|s| !s.trim().is_empty()) {
            let (name, addrs) = split_pair("--endpoints", e)?;
            service(f, name).endpoints = addrs
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(String::from)
                .collect();
        }
        for d in self.dns.iter().filter(|s| !s.trim().is_empty()) {
            let (name, host) = split_pair("--dns", d)?;
            service(f, name).dns = Some(host.to_string());
        }
        for v in self.virtual_ips.iter().filter(|s| !s.trim().is_empty()) {
            let (name, ip) = split_pair("--virtual-ip", v)?;
            service(f, name).virtual_ip = Some(ip.to_string());
        }
        for e in self
            .endpoint_identities
            .iter()
            .filter(|s| !s.trim().is_empty())
        {
            let (name, id) = split_pair("--endpoint-identity", e)?;
            service(f, name).identity = Some(id.to_string());
        }
        Ok(())
    }
}

impl Args {
    fn apply_limits(&self, l: &mut super::limits::LimitsFile) {
        fn set<T: Clone>(dst: &mut Option<T>, src: &Option<T>) {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        set(&mut l.max_header_list_size, &self.max_header_list_size);
        set(&mut l.max_concurrent_streams, &self.max_concurrent_streams);
        set(&mut l.max_client_resets, &self.max_client_resets);
        set(&mut l.idle_timeout, &self.idle_timeout);
        set(&mut l.handshake_timeout, &self.handshake_timeout);
        set(&mut l.max_connections, &self.max_connections);
        set(&mut l.response_timeout, &self.response_timeout);
    }
}

fn port_items(list: &[String]) -> Vec<super::ports::PortItem> {
    list.iter()
        .map(|p| super::ports::PortItem::Text(p.clone()))
        .collect()
}

fn split_pair<'a>(flag: &str, value: &'a str) -> Result<(&'a str, &'a str), ConfigError> {
    match value.split_once('=') {
        Some((n, v)) if !n.trim().is_empty() => Ok((n.trim(), v.trim())),
        _ => Err(err(flag, format!("{value:?} is not NAME=VALUE"))),
    }
}

/// The named service's entry in the file, created when the flags name a new one.
fn service<'a>(f: &'a mut FileConfig, name: &str) -> &'a mut ServiceFile {
    let pos = match f.services.iter().position(|s| s.name == name) {
        Some(p) => p,
        None => {
            f.services.push(ServiceFile {
                name: name.to_string(),
                ..ServiceFile::default()
            });
            f.services.len() - 1
        }
    };
    &mut f.services[pos]
}
