//! loadgen's counters and its two output formats: the per-second progress (a human line
//! on stderr, or a JSON line on stdout) and the final JSON summary on stdout.
//!
//! Latencies of every completed call, successful or not, go into two histograms: one for
//! the whole run (the summary) and one reset every second (progress lines).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tonic::Code;

use crate::codes::code_name;
use crate::histogram::Histogram;

#[derive(Debug, Default)]
pub struct LoadStats {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<&'static str, u64>,
    pub by_replica: BTreeMap<String, u64>,
    total: Histogram,
    window: Histogram,
}

/// What one progress report says; the window counters are reset once it is taken.
/// Fields serialize in declaration order, so `type` leads each JSON line.
#[derive(Debug, PartialEq, Serialize)]
pub struct Progress {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub elapsed_s: f64,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub by_replica: BTreeMap<String, u64>,
    pub errors: BTreeMap<&'static str, u64>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl LoadStats {
    pub fn record_sent(&mut self) {
        self.sent += 1;
    }

    pub fn record_ok(&mut self, replica: &str, latency: Duration) {
        self.ok += 1;
        // Only clone the name the first time a replica is seen: this runs on every call.
        match self.by_replica.get_mut(replica) {
            Some(n) => *n += 1,
            None => {
                self.by_replica.insert(replica.to_string(), 1);
            }
        }
        self.record_latency(latency);
    }

    pub fn record_error(&mut self, code: Code, latency: Duration) {
        self.failed += 1;
        *self.errors.entry(code_name(code)).or_default() += 1;
        self.record_latency(latency);
    }

    fn record_latency(&mut self, latency: Duration) {
        let us = micros(latency);
        self.total.record(us);
        self.window.record(us);
    }

    /// Cumulative counts plus rate and percentiles of the window that ends now
    /// (`window` long), then starts a new window.
    pub fn take_progress(&mut self, elapsed: Duration, window: Duration) -> Progress {
        let secs = window.as_secs_f64();
        let rate = if secs > 0.0 {
            self.window.count() as f64 / secs
        } else {
            0.0
        };
        let p = Progress {
            kind: "progress",
            elapsed_s: round3(elapsed.as_secs_f64()),
            sent: self.sent,
            ok: self.ok,
            failed: self.failed,
            rate: round3(rate),
            p50_ms: self.window.percentile_ms(0.50),
            p99_ms: self.window.percentile_ms(0.99),
            by_replica: self.by_replica.clone(),
            errors: self.errors.clone(),
        };
        self.window.reset();
        p
    }

    /// The final summary; `rate` is completed calls per second over `duration`.
    pub fn summary(&self, duration: Duration) -> Summary<'_> {
        let secs = duration.as_secs_f64();
        let done = self.ok + self.failed;
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        Summary {
            kind: "summary",
            sent: self.sent,
            ok: self.ok,
            failed: self.failed,
            errors: &self.errors,
            p50_ms: self.total.percentile_ms(0.50),
            p90_ms: self.total.percentile_ms(0.90),
            p99_ms: self.total.percentile_ms(0.99),
            max_ms: self.total.max() as f64 / 1000.0,
            by_replica: &self.by_replica,
            duration_s: round3(secs),
            rate: round3(rate),
        }
    }
}

/// The last line loadgen prints.
#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub errors: &'a BTreeMap<&'static str, u64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub by_replica: &'a BTreeMap<String, u64>,
    pub duration_s: f64,
    pub rate: f64,
}

/// One JSON line; these types hold only strings and numbers, so encoding cannot fail.
pub fn json_line<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        serde_json::json!({"type": "error", "error": e.to_string()}).to_string()
    })
}

impl Progress {
    /// One line for people watching a terminal.
    pub fn to_human(&self) -> String {
        let mut line = format!(
            "[{:>6.1}s] sent={} ok={} errors={} rate={:.1}/s p50={:.2}ms p99={:.2}ms",
            self.elapsed_s, self.sent, self.ok, self.failed, self.rate, self.p50_ms, self.p99_ms
        );
        if !self.by_replica.is_empty() {
            let spread: Vec<String> = self
                .by_replica
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            line.push_str(&format!(" replicas[{}]", spread.join(" ")));
        }
        if !self.errors.is_empty() {
            let errs: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            line.push_str(&format!(" codes[{}]", errs.join(" ")));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// Latencies below 128 µs are recorded exactly, which keeps these checks exact.
    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn summary_shape() {
        let mut s = LoadStats::default();
        for i in 1..=4 {
            s.record_sent();
            s.record_ok(if i % 2 == 0 { "pay-2" } else { "pay-1" }, us(i * 10));
        }
        s.record_sent();
        s.record_error(Code::Unavailable, us(100));
        let line = json_line(&s.summary(Duration::from_secs(2)));
        assert!(line.starts_with(r#"{"type":"summary","sent":5,"#), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["sent"], 5);
        assert_eq!(v["ok"], 4);
        assert_eq!(v["failed"], 1);
        assert_eq!(v["errors"], json!({"UNAVAILABLE": 1}));
        assert_eq!(v["by_replica"], json!({"pay-1": 2, "pay-2": 2}));
        assert_eq!(v["p50_ms"], 0.03);
        assert_eq!(v["max_ms"], 0.1);
        assert_eq!(v["rate"], 2.5);
        assert_eq!(v["duration_s"], 2.0);
    }

    #[test]
    fn progress_window_resets() {
        let mut s = LoadStats::default();
        s.record_sent();
        s.record_ok("pay-1", us(40));
        s.record_sent();
        s.record_error(Code::DeadlineExceeded, us(80));
        let p = s.take_progress(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(p.rate, 2.0);
        assert_eq!(p.p50_ms, 0.04);
        assert_eq!(p.p99_ms, 0.08);
        let v: Value = serde_json::from_str(&json_line(&p)).unwrap_or_default();
        assert_eq!(v["type"], "progress");
        assert_eq!(v["errors"], json!({"DEADLINE_EXCEEDED": 1}));
        assert!(p.to_human().contains("pay-1=1"));

        let p = s.take_progress(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!((p.rate, p.p50_ms, p.ok, p.failed), (0.0, 0.0, 1, 1));
    }
}
