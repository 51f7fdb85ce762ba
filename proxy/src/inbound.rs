//! Inbound: mesh traffic for the local app.
//!
//! The app is a target with one static endpoint, so inbound requests go
//! through the same stack (metrics, access log, pooled connections) as
//! outbound ones. The caller's sidecar owns retries, so the local hop makes
//! one attempt and never ejects the app.

use std::sync::Arc;

use crate::balance::{Balancer, ClientParams};
use crate::config::policy::ServicePolicy;
use crate::config::{Config, InboundConfig};
use crate::discovery;
use crate::metrics::Metrics;
use crate::router::Target;
use crate::routes::Routes;

pub fn app_target(config: &Config, inbound: &InboundConfig, metrics: &Metrics) -> Arc<Target> {
    let service: Arc<str> = Arc::from(config.service_name.as_str());
    let policy = ServicePolicy::local_app();
    let params = ClientParams {
        connect_timeout: config.connect_timeout,
        open_connections: metrics
            .upstream_open_connections
            .with_label_values(&[&config.service_name]),
        endpoints_gauge: None,
        accrual: policy.accrual.clone(),
        ejections: metrics.ejections.with_label_values(&[&config.service_name]),
        ejected: metrics.ejected.with_label_values(&[&config.service_name]),
    };
    let balancer = Balancer::spawn(
        Arc::clone(&service),
        discovery::fixed(&[inbound.app]),
        params,
    );
    Arc::new(Target::new(
        service,
        balancer,
        Routes::single("local app", policy),
    ))
}
