//! The discovery source's metrics, registered in the control plane's registry
//! beside the others (prefix `tern_control_`).

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

pub struct DiscoveryMetrics {
    /// Services the cluster contributes (after translation: no ExternalName).
    pub services: IntGauge,
    /// Their ready endpoints.
    pub endpoints: IntGauge,
    /// Watch events received, by `resource`: services, endpointslices, pods.
    pub events: IntCounterVec,
    /// Relists after the first list, by `resource` (410 Gone, a dropped watch).
    pub restarts: IntCounterVec,
    /// Failed list or watch requests and error events, by `resource`.
    pub errors: IntCounterVec,
}

impl DiscoveryMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(Opts::new(format!("tern_control_{name}"), help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counters = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(
                Opts::new(format!("tern_control_{name}"), help),
                &["resource"],
            )?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(DiscoveryMetrics {
            services: gauge(
                "discovered_services",
                "Services discovered in the cluster (--discovery kubernetes).",
            )?,
            endpoints: gauge(
                "discovered_endpoints",
                "Ready endpoints of the services discovered in the cluster.",
            )?,
            events: counters(
                "kube_watch_events_total",
                "Watch events received from the Kubernetes API, by resource.",
            )?,
            restarts: counters(
                "kube_watch_restarts_total",
                "Relists of a Kubernetes watch after the first (410 Gone, a dropped watch), by resource.",
            )?,
            errors: counters(
                "kube_watch_errors_total",
                "Failed Kubernetes list or watch requests and error events, by resource.",
            )?,
        })
    }
}
