//! Prometheus metrics of the proxy, all prefixed `tern_`.
//!
//! Label sets stay bounded: services come from config, routes are gRPC methods
//! capped per service (extra ones count as `overflow`), never paths of HTTP
//! requests, endpoint addresses or anything per request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// How many distinct routes one service may have in labels.
const MAX_ROUTES_PER_SERVICE: usize = 100;
pub const OVERFLOW_ROUTE: &str = "overflow";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Per direction: service → route → handles.
type RoutesByService = HashMap<Arc<str>, HashMap<Box<str>, Arc<RouteMetrics>>>;

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    responses: IntCounterVec,
    duration: HistogramVec,
    pub proxy_errors: IntCounterVec,
    pub stream_errors: IntCounterVec,
    pub open_connections: IntGaugeVec,
    pub connections: IntCounterVec,
    pub upstream_open_connections: IntGaugeVec,
    pub endpoints: IntGaugeVec,
    pub access_log_dropped: IntCounter,
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub timeouts: IntCounterVec,
    pub ejections: IntCounterVec,
    pub ejected: IntGaugeVec,
    pub control_connected: IntGauge,
    /// Subscriptions made to another control-plane replica than the last.
    pub control_failovers: IntCounter,
    pub config_updates: IntCounterVec,
    pub config_version: IntGauge,
    pub config_last_push: Gauge,
    /// Inbound requests the authorization policy denied (`authz.rs`).
    pub authz_denied: IntCounterVec,
    /// Connections and requests refused by a protocol limit
    /// ([`crate::config::limits`]), by listener and reason.
    pub protocol_rejections: IntCounterVec,
    routes: [RwLock<RoutesByService>; 2],
}

/// Response counters one route keeps resolved: a route sees a handful of
/// (status class, gRPC status, tls, peer) combinations, and looking one up
/// here costs a few comparisons where `with_label_values` hashes seven labels.
const MAX_RESPONSE_HANDLES: usize = 32;

/// Metric handles of one (direction, service, route), resolved once and reused.
pub struct RouteMetrics {
    pub direction: Direction,
    pub service: Arc<str>,
    pub route: Arc<str>,
    pub requests: IntCounter,
    pub duration: Histogram,
    responses: IntCounterVec,
    resolved: RwLock<Vec<(ResponseLabels, IntCounter)>>,
}

#[derive(PartialEq, Eq)]
struct ResponseLabels {
    status_class: &'static str,
    grpc_status: &'static str,
    tls: &'static str,
    peer_identity: Box<str>,
}

impl RouteMetrics {
    /// Counts one response. `tls` is "true" or "false"; `peer_identity` is
    /// the verified SPIFFE id of the other side (the caller inbound, the
    /// endpoint outbound) or "".
    pub fn count_response(
        &self,
        status_class: &'static str,
        grpc_status: &'static str,
        tls: &'static str,
        peer_identity: &str,
    ) {
        let same = |l: &ResponseLabels| {
            l.status_class == status_class
                && l.grpc_status == grpc_status
                && l.tls == tls
                && *l.peer_identity == *peer_identity
        };
        {
            let read = self.resolved.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, c)) = read.iter().find(|(l, _)| same(l)) {
                c.inc();
                return;
            }
        }
        let counter = self.responses.with_label_values(&[
            self.direction.as_str(),
            &self.service,
            &self.route,
            status_class,
            grpc_status,
            tls,
            peer_identity,
        ]);
        let mut write = self.resolved.write().unwrap_or_else(|p| p.into_inner());
        if write.len() < MAX_RESPONSE_HANDLES && !write.iter().any(|(l, _)| same(l)) {
            let labels = ResponseLabels {
                status_class,
                grpc_status,
                tls,
                peer_identity: peer_identity.into(),
            };
            write.push((labels, counter.clone()));
        }
        counter.inc();
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tern_requests_total",
                "Requests received, by direction, target service and route (gRPC method).",
            ),
            &["direction", "service", "route"],
        )?;
        let responses = IntCounterVec::new(
            Opts::new("tern_responses_total", "Responses completed, by direction, service, route, HTTP status class, gRPC status, whether the mesh hop was mTLS, and the peer's verified identity (bounded by the mesh's service accounts)."),
            &["direction", "service", "route", "status_class", "grpc_status", "tls", "peer_identity"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tern_request_duration_seconds",
                "Time from request received to response end.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["direction", "service", "route"],
        )?;
        let proxy_errors = IntCounterVec::new(
            Opts::new(
                "tern_proxy_errors_total",
                "Requests the proxy answered itself because it could not forward them, by reason.",
            ),
            &["direction", "service", "reason"],
        )?;
        let stream_errors = IntCounterVec::new(
            Opts::new("tern_stream_errors_total", "Responses that ended without a clean end of stream (cancelled by the caller, reset by the peer)."),
            &["direction", "service", "reason"],
        )?;
        let open_connections = IntGaugeVec::new(
            Opts::new(
                "tern_open_connections",
                "Accepted connections currently open, by listener direction.",
            ),
            &["direction"],
        )?;
        let connections = IntCounterVec::new(
            Opts::new(
                "tern_connections_total",
                "Connections accepted, by listener direction.",
            ),
            &["direction"],
        )?;
        let upstream_open_connections = IntGaugeVec::new(
            Opts::new(
                "tern_upstream_open_connections",
                "Connections currently open to endpoints, by service.",
            ),
            &["service"],
        )?;
        let endpoints = IntGaugeVec::new(
            Opts::new("tern_endpoints", "Endpoints currently known, by service."),
            &["service"],
        )?;
        let access_log_dropped = IntCounter::new(
            "tern_access_log_dropped_total",
            "Access log lines dropped because the writer could not keep up.",
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "tern_retries_total",
                "Retries made, by service and reason (what failed in the previous attempt).",
            ),
            &["service", "reason"],
        )?;
        let retry_budget_exhausted = IntCounterVec::new(
            Opts::new(
                "tern_retry_budget_exhausted_total",
                "Retryable failures not retried because the service's retry budget was spent.",
            ),
            &["service"],
        )?;
        let timeouts = IntCounterVec::new(
            Opts::new(
                "tern_timeouts_total",
                "Attempts that hit the per-try timeout, and requests that hit their deadline.",
            ),
            &["service", "kind"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "tern_ejections_total",
                "Endpoints ejected by failure accrual.",
            ),
            &["service"],
        )?;
        let ejected = IntGaugeVec::new(
            Opts::new(
                "tern_ejected_endpoints",
                "Endpoints currently ejected by failure accrual.",
            ),
            &["service"],
        )?;
        for c in [&retries, &retry_budget_exhausted, &timeouts, &ejections] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(ejected.clone()))?;
        let control_connected = IntGauge::new(
            "tern_control_connected",
            "1 while the stream to the control plane is up.",
        )?;
        let control_failovers = IntCounter::new(
            "tern_control_failovers_total",
            "Subscriptions to another control-plane replica than the previous one.",
        )?;
        let config_updates = IntCounterVec::new(
            Opts::new(
                "tern_config_updates_total",
                "Config snapshots received, by result (ack: applied, nack: rejected).",
            ),
            &["result"],
        )?;
        let config_version = IntGauge::new(
            "tern_config_version",
            "Version of the config snapshot in force (0: bootstrap only).",
        )?;
        let config_last_push = Gauge::new(
            "tern_config_last_push_timestamp_seconds",
            "When the config in force was applied, seconds since the Unix epoch.",
        )?;
        registry.register(Box::new(control_connected.clone()))?;
        registry.register(Box::new(control_failovers.clone()))?;
        registry.register(Box::new(config_updates.clone()))?;
        registry.register(Box::new(config_version.clone()))?;
        registry.register(Box::new(config_last_push.clone()))?;
        let authz_denied = IntCounterVec::new(
            Opts::new(
                "tern_authz_denied_total",
                "Inbound requests denied by the authorization policy, by service and caller identity (\"\" for none; bounded by the mesh's identities).",
            ),
            &["service", "peer_identity"],
        )?;
        registry.register(Box::new(authz_denied.clone()))?;
        let protocol_rejections = IntCounterVec::new(
            Opts::new(
                "tern_protocol_rejections_total",
                "Connections and requests refused or cut off by a protocol limit, by listener and reason (max_connections, fd_reserve, handshake_timeout, idle_timeout, client_resets, header_list_size, response_header_list_size, accept_error, port_not_served: inbound to a port the app does not serve).",
            ),
            &["listener", "reason"],
        )?;
        registry.register(Box::new(protocol_rejections.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(responses.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(proxy_errors.clone()))?;
        registry.register(Box::new(stream_errors.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(upstream_open_connections.clone()))?;
        registry.register(Box::new(endpoints.clone()))?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        registry.register(Box::new(ProcessCollector::new()?))?;
        Ok(Self {
            registry,
            requests,
            responses,
            duration,
            proxy_errors,
            stream_errors,
            open_connections,
            connections,
            upstream_open_connections,
            endpoints,
            access_log_dropped,
            retries,
            retry_budget_exhausted,
            timeouts,
            ejections,
            ejected,
            control_connected,
            control_failovers,
            config_updates,
            config_version,
            config_last_push,
            authz_denied,
            protocol_rejections,
            routes: [RwLock::default(), RwLock::default()],
        })
    }

    /// The handles for one route, created on first use.
    pub fn route(
        &self,
        direction: Direction,
        service: &Arc<str>,
        route: &str,
    ) -> Arc<RouteMetrics> {
        let table = &self.routes[direction as usize];
        {
            let read = table.read().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = read.get(service.as_ref()).and_then(|s| s.get(route)) {
                return Arc::clone(r);
            }
        }
        let mut write = table.write().unwrap_or_else(|p| p.into_inner());
        let routes = write.entry(Arc::clone(service)).or_default();
        let key: &str = if routes.len() >= MAX_ROUTES_PER_SERVICE && !routes.contains_key(route) {
            OVERFLOW_ROUTE
        } else {
            route
        };
        if let Some(r) = routes.get(key) {
            return Arc::clone(r);
        }
        let labels = [direction.as_str(), service.as_ref(), key];
        let r = Arc::new(RouteMetrics {
            direction,
            service: Arc::clone(service),
            route: Arc::from(key),
            requests: self.requests.with_label_values(&labels),
            duration: self.duration.with_label_values(&labels),
            responses: self.responses.clone(),
            resolved: RwLock::default(),
        });
        routes.insert(key.into(), Arc::clone(&r));
        r
    }

    pub fn encode(&self) -> Result<String, prometheus::Error> {
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

/// Process RSS and CPU, read from /proc at scrape time.
struct ProcessCollector {
    descs: Vec<Desc>,
    rss: Gauge,
    cpu: prometheus::Counter,
    start: Gauge,
}

impl ProcessCollector {
    fn new() -> Result<Self, prometheus::Error> {
        let rss = Gauge::new(
            "tern_process_resident_memory_bytes",
            "Resident memory of the proxy process.",
        )?;
        let cpu = prometheus::Counter::new(
            "tern_process_cpu_seconds_total",
            "User and system CPU time of the proxy process.",
        )?;
        let start = Gauge::new(
            "tern_process_start_time_seconds",
            "Start time of the process since the Unix epoch.",
        )?;
        start.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        let mut descs = Vec::new();
        for c in [&rss as &dyn Collector, &cpu, &start] {
            descs.extend(c.desc().into_iter().cloned());
        }
        Ok(Self {
            descs,
            rss,
            cpu,
            start,
        })
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(rss) = read_rss_bytes() {
            self.rss.set(rss as f64);
        }
        if let Some(cpu) = read_cpu_seconds() {
            // Counters only go up: add what was used since the last scrape.
            let delta = cpu - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
        }
        let mut out = Vec::with_capacity(3);
        out.extend(self.rss.collect());
        out.extend(self.cpu.collect());
        out.extend(self.start.collect());
        out
    }
}

fn read_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime from /proc/self/stat, in USER_HZ ticks (100 per second on Linux).
fn read_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields resume after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn routes_are_capped_per_service() {
        let m = Metrics::new().unwrap();
        let svc: Arc<str> = "pay".into();
        for i in 0..(MAX_ROUTES_PER_SERVICE + 10) {
            m.route(Direction::Outbound, &svc, &format!("pkg.Svc/M{i}"))
                .requests
                .inc();
        }
        let text = m.encode().unwrap();
        assert!(text.contains("route=\"overflow\""));
        let routes = text
            .lines()
            .filter(|l| l.starts_with("tern_requests_total{"))
            .count();
        assert_eq!(routes, MAX_ROUTES_PER_SERVICE + 1);
    }

    #[test]
    fn responses_count_per_label_set_beyond_the_resolved_handles() {
        let m = Metrics::new().unwrap();
        let svc: Arc<str> = "pay".into();
        let r = m.route(Direction::Inbound, &svc, "pkg.Svc/M");
        let peers: Vec<String> = (0..MAX_RESPONSE_HANDLES + 3)
            .map(|i| format!("spiffe://cluster.local/ns/default/sa/c{i}"))
            .collect();
        for peer in &peers {
            r.count_response("2xx", "OK", "true", peer);
            r.count_response("2xx", "OK", "true", peer);
        }
        r.count_response("5xx", "UNAVAILABLE", "false", "");
        let text = m.encode().unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tern_responses_total{"))
            .collect();
        assert_eq!(lines.len(), peers.len() + 1, "{text}");
        assert!(lines
            .iter()
            .all(|l| l.ends_with(" 2") || l.contains("UNAVAILABLE")));
        let last = peers.last().unwrap();
        assert!(lines
            .iter()
            .any(|l| l.contains(last.as_str()) && l.ends_with(" 2")));
    }

    #[test]
    fn process_metrics_are_exposed() {
        let m = Metrics::new().unwrap();
        let text = m.encode().unwrap();
        assert!(
            text.contains("# TYPE tern_process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(text.contains("tern_process_resident_memory_bytes "));
    }
}
