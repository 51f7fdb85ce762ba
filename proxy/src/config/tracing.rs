//! The `tracing:` section: where spans go and how many requests start a trace.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, err, ConfigError};

/// Spans held for export at most; past it they are dropped and counted.
const DEFAULT_QUEUE_SIZE: usize = 2048;
/// How long the exporter waits to fill a batch.
const DEFAULT_BATCH_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    /// `host:port` of an OTLP/gRPC trace collector; without it no span is recorded.
    pub collector: Option<String>,
    /// Share of requests without a `traceparent` that start a sampled trace (0 to 1).
    pub sample_rate: Option<f64>,
    pub queue_size: Option<usize>,
    pub batch_delay: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TracingConfig {
    /// `http://host:port`.
    pub collector: String,
    pub sample_rate: f64,
    pub queue_size: usize,
    #[serde(with = "super::humantime_serde_compat")]
    pub batch_delay: Duration,
}

impl TracingFile {
    /// `None` when no collector is set: tracing is off.
    pub fn validate(&self) -> Result<Option<TracingConfig>, ConfigError> {
        let sample_rate = self.sample_rate.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(err("tracing.sample_rate", "must be between 0 and 1"));
        }
        let collector = match self.collector.as_deref().map(str::trim) {
            None | Some("") | Some("off") => return Ok(None),
            Some(c) => collector_uri(c)?,
        };
        let queue_size = self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if queue_size == 0 {
            return Err(err("tracing.queue_size", "must be greater than zero"));
        }
        let batch_delay = duration(
            "tracing.batch_delay",
            self.batch_delay.as_deref(),
            DEFAULT_BATCH_DELAY,
        )?;
        Ok(Some(TracingConfig {
            collector,
            sample_rate,
            queue_size,
            batch_delay,
        }))
    }
}

/// `host:port` (or `http://host:port`) as the URI the gRPC client dials.
fn collector_uri(c: &str) -> Result<String, ConfigError> {
    if c.starts_with("https://") {
        return Err(err(
            "tracing.collector",
            "TLS to the collector is not supported; give host:port of a plaintext OTLP/gRPC receiver",
        ));
    }
    let uri = match c.strip_prefix("http://") {
        Some(_) => c.to_string(),
        None => format!("http://{c}"),
    };
    let parsed: http::Uri = uri
        .parse()
        .map_err(|e| err("tracing.collector", format!("{c:?}: {e}")))?;
    match (parsed.host(), parsed.port_u16()) {
        (Some(_), Some(_)) => Ok(uri),
        _ => Err(err("tracing.collector", format!("{c:?} is not host:port"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(collector: Option<&str>, rate: Option<f64>) -> TracingFile {
        TracingFile {
            collector: collector.map(str::to_string),
            sample_rate: rate,
            ..TracingFile::default()
        }
    }

    #[test]
    fn off_without_a_collector() {
        assert!(file(None, None).validate().ok().flatten().is_none());
    }

    #[test]
    fn collector_and_rate() {
        let c = file(Some("otel:4317"), Some(0.25)).validate();
        let c = c.ok().flatten().expect("tracing on");
        assert_eq!(c.collector, "http://otel:4317");
        assert_eq!(c.sample_rate, 0.25);
        assert_eq!(c.queue_size, DEFAULT_QUEUE_SIZE);
    }

    #[test]
    fn bad_values_are_refused() {
        for (collector, rate) in [
            (Some("otel"), None),
            (Some("https://otel:4317"), None),
            (Some("otel:4317"), Some(1.5)),
            (Some("otel:4317"), Some(-0.1)),
        ] {
            assert!(
                file(collector, rate).validate().is_err(),
                "{collector:?} {rate:?}"
            );
        }
    }
}
