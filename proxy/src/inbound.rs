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
    let params = ClientParams::for_service(
        metrics,
        &config.service_name,
        config.connect_timeout,
        policy.accrual.clone(),
        false,
    );
    let balancer = Balancer::spawn(
        Arc::clone(&service),
        tokio::sync::watch::channel(discovery::fixed(&[inbound.app])).1,
        params,
    );
    Arc::new(Target::new(
        service,
        balancer,
        Routes::single("local app", policy),
    ))
}
