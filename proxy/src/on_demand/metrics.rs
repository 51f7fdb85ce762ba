//! The lookups' metrics, registered beside the proxy's own.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, Opts, Registry};

pub struct LookupMetrics {
    /// `tern_lookup_duration_seconds{result}`; its count is the number of lookups.
    duration: HistogramVec,
    pub dropped: IntCounter,
}

impl LookupMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tern_lookup_duration_seconds",
                "On-demand lookups of a destination the sidecar did not know, by result (found, outside_mesh, unknown, no_answer): how long the connection or request waited.",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["result"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let dropped = IntCounter::with_opts(Opts::new(
            "tern_on_demand_services_dropped_total",
            "Services found by lookups and dropped after going unused for the idle timeout.",
        ))?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(Self { duration, dropped })
    }

    pub fn observe(&self, result: &str, took: Duration) {
        self.duration
            .with_label_values(&[result])
            .observe(took.as_secs_f64());
    }
}
