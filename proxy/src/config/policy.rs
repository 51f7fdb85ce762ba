//! Per-service resilience policy: retries, timeouts, failure accrual.
//!
//! Each field may be set per service in YAML; what a service leaves out comes
//! from the proxy-wide defaults (flags / `TERN_*`), and then from built-in
//! defaults close to what Linkerd and Istio users expect.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, err, ConfigError};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub retry: Option<RetryFile>,
    pub timeout: Option<TimeoutFile>,
    pub failure_accrual: Option<AccrualFile>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    /// Attempts in all, the first included; 1 turns retries off.
    pub max_attempts: Option<u32>,
    /// gRPC status codes (names like UNAVAILABLE or numbers) that are retried.
    pub grpc_codes: Option<Vec<String>>,
    /// Largest request body kept for replay; larger bodies are not retried.
    pub buffer_bytes: Option<usize>,
    pub budget_percent: Option<f32>,
    pub budget_min_per_second: Option<u32>,
    pub budget_ttl: Option<String>,
    pub backoff_base: Option<String>,
    pub backoff_max: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutFile {
    pub per_try: Option<String>,
    pub overall: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccrualFile {
    /// Consecutive failures that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: Option<u32>,
    pub backoff_min: Option<String>,
    pub backoff_max: Option<String>,
    /// Never eject below this many available endpoints.
    pub min_available: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePolicy {
    pub retry: RetryPolicy,
    pub timeout: TimeoutPolicy,
    pub accrual: AccrualPolicy,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub grpc_codes: Vec<u32>,
    pub buffer_bytes: usize,
    pub budget_percent: f32,
    pub budget_min_per_second: u32,
    #[serde(with = "super::humantime_serde_compat")]
    pub budget_ttl: Duration,
    #[serde(with = "super::humantime_serde_compat")]
    pub backoff_base: Duration,
    #[serde(with = "super::humantime_serde_compat")]
    pub backoff_max: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeoutPolicy {
    #[serde(with = "super::humantime_serde_compat::option")]
    pub per_try: Option<Duration>,
    #[serde(with = "super::humantime_serde_compat::option")]
    pub overall: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AccrualPolicy {
    pub consecutive_failures: u32,
    #[serde(with = "super::humantime_serde_compat")]
    pub backoff_min: Duration,
    #[serde(with = "super::humantime_serde_compat")]
    pub backoff_max: Duration,
    pub min_available: usize,
}

impl ServicePolicy {
    /// The hop to the local app: one attempt, no ejection, no timeouts of its own.
    pub fn local_app() -> Self {
        Self {
            retry: RetryPolicy {
                max_attempts: 1,
                grpc_codes: vec![14],
                buffer_bytes: 0,
                budget_percent: 0.0,
                budget_min_per_second: 0,
                budget_ttl: Duration::from_secs(10),
                backoff_base: Duration::ZERO,
                backoff_max: Duration::ZERO,
            },
            timeout: TimeoutPolicy {
                per_try: None,
                overall: None,
            },
            accrual: AccrualPolicy {
                consecutive_failures: 0,
                backoff_min: Duration::from_secs(1),
                backoff_max: Duration::from_secs(1),
                min_available: 1,
            },
        }
    }
}

impl PolicyFile {
    /// `self` over `defaults`: a field set here wins.
    pub fn over(&self, defaults: &PolicyFile) -> PolicyFile {
        fn pick<T: Clone>(a: &Option<T>, b: &Option<T>) -> Option<T> {
            a.clone().or_else(|| b.clone())
        }
        let r = self.retry.clone().unwrap_or_default();
        let dr = defaults.retry.clone().unwrap_or_default();
        let t = self.timeout.clone().unwrap_or_default();
        let dt = defaults.timeout.clone().unwrap_or_default();
        let a = self.failure_accrual.clone().unwrap_or_default();
        let da = defaults.failure_accrual.clone().unwrap_or_default();
        PolicyFile {
            retry: Some(RetryFile {
                max_attempts: pick(&r.max_attempts, &dr.max_attempts),
                grpc_codes: pick(&r.grpc_codes, &dr.grpc_codes),
                buffer_bytes: pick(&r.buffer_bytes, &dr.buffer_bytes),
                budget_percent: pick(&r.budget_percent, &dr.budget_percent),
                budget_min_per_second: pick(&r.budget_min_per_second, &dr.budget_min_per_second),
                budget_ttl: pick(&r.budget_ttl, &dr.budget_ttl),
                backoff_base: pick(&r.backoff_base, &dr.backoff_base),
                backoff_max: pick(&r.backoff_max, &dr.backoff_max),
            }),
            timeout: Some(TimeoutFile {
                per_try: pick(&t.per_try, &dt.per_try),
                overall: pick(&t.overall, &dt.overall),
            }),
            failure_accrual: Some(AccrualFile {
                consecutive_failures: pick(&a.consecutive_failures, &da.consecutive_failures),
                backoff_min: pick(&a.backoff_min, &da.backoff_min),
                backoff_max: pick(&a.backoff_max, &da.backoff_max),
                min_available: pick(&a.min_available, &da.min_available),
            }),
        }
    }

    /// Validates with `field` as the prefix of every error's field path.
    pub fn validate(&self, field: &str) -> Result<ServicePolicy, ConfigError> {
        let r = self.retry.clone().unwrap_or_default();
        let t = self.timeout.clone().unwrap_or_default();
        let a = self.failure_accrual.clone().unwrap_or_default();
        let f = |s: &str| format!("{field}.{s}");
        let max_attempts = r.max_attempts.unwrap_or(3);
        if !(1..=10).contains(&max_attempts) {
            return Err(err(f("retry.max_attempts"), "must be between 1 and 10"));
        }
        let grpc_codes = match &r.grpc_codes {
            None => vec![14],
            Some(names) => names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    tern_proto::grpc_code::parse(n).ok_or_else(|| {
                        err(
                            f(&format!("retry.grpc_codes[{i}]")),
                            format!("{n:?} is not a gRPC status code"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        for (i, c) in grpc_codes.iter().enumerate() {
            // Retrying these would repeat a call that the server answered on purpose.
            if tern_proto::grpc_code::never_retried(*c) {
                return Err(err(
                    f(&format!("retry.grpc_codes[{i}]")),
                    "OK, INVALID_ARGUMENT, PERMISSION_DENIED and UNAUTHENTICATED are never retried",
                ));
            }
        }
        let budget_percent = r.budget_percent.unwrap_or(0.2);
        if !(0.0..=10.0).contains(&budget_percent) {
            return Err(err(
                f("retry.budget_percent"),
                "must be between 0 and 10 (1000%)",
            ));
        }
        let backoff_base = duration(
            &f("retry.backoff_base"),
            r.backoff_base.as_deref(),
            Duration::from_millis(25),
        )?;
        let backoff_max = duration(
            &f("retry.backoff_max"),
            r.backoff_max.as_deref(),
            Duration::from_millis(250),
        )?;
        if backoff_max < backoff_base {
            return Err(err(
                f("retry.backoff_max"),
                "is smaller than retry.backoff_base",
            ));
        }
        let budget_ttl = duration(
            &f("retry.budget_ttl"),
            r.budget_ttl.as_deref(),
            Duration::from_secs(10),
        )?;
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&budget_ttl) {
            return Err(err(f("retry.budget_ttl"), "must be between 1s and 60s"));
        }
        let positive = |name: &str, v: Option<&str>| -> Result<Option<Duration>, ConfigError> {
            match v {
                None => Ok(None),
                Some(s) => {
                    let d = duration(&f(name), Some(s), Duration::ZERO)?;
                    if d.is_zero() {
                        return Err(err(f(name), "must be greater than zero"));
                    }
                    Ok(Some(d))
                }
            }
        };
        let accrual_min = duration(
            &f("failure_accrual.backoff_min"),
            a.backoff_min.as_deref(),
            Duration::from_secs(1),
        )?;
        let accrual_max = duration(
            &f("failure_accrual.backoff_max"),
            a.backoff_max.as_deref(),
            Duration::from_secs(60),
        )?;
        if accrual_max < accrual_min || accrual_min.is_zero() {
            return Err(err(
                f("failure_accrual.backoff_max"),
                "must be at least backoff_min, which must be > 0",
            ));
        }
        let budget_min_per_second = r.budget_min_per_second.unwrap_or(10);
        if budget_min_per_second > tern_proto::MAX_BUDGET_MIN_PER_SECOND {
            return Err(err(
                f("retry.budget_min_per_second"),
                format!("must be at most {}", tern_proto::MAX_BUDGET_MIN_PER_SECOND),
            ));
        }
        Ok(ServicePolicy {
            retry: RetryPolicy {
                max_attempts,
                grpc_codes,
                buffer_bytes: r.buffer_bytes.unwrap_or(64 * 1024),
                budget_percent,
                budget_min_per_second,
                budget_ttl,
                backoff_base,
                backoff_max,
            },
            timeout: TimeoutPolicy {
                per_try: positive("timeout.per_try", t.per_try.as_deref())?,
                overall: positive("timeout.overall", t.overall.as_deref())?,
            },
            accrual: AccrualPolicy {
                consecutive_failures: a.consecutive_failures.unwrap_or(7),
                backoff_min: accrual_min,
                backoff_max: accrual_max,
                min_available: a.min_available.unwrap_or(1),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_are_sane() {
        let p = PolicyFile::default().validate("services[0]").unwrap();
        assert_eq!(p.retry.max_attempts, 3);
        assert_eq!(p.retry.grpc_codes, vec![14]);
        assert_eq!(p.retry.buffer_bytes, 65536);
        assert_eq!(p.accrual.consecutive_failures, 7);
        assert_eq!(p.timeout.per_try, None);
    }

    #[test]
    fn a_budget_floor_tower_cannot_hold_is_refused() {
        let p = PolicyFile {
            retry: Some(RetryFile {
                budget_min_per_second: Some(u32::MAX),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = p.validate("defaults").unwrap_err().to_string();
        assert!(e.contains("budget_min_per_second"), "{e}");
    }

    #[test]
    fn service_fields_win_over_defaults() {
        let svc = PolicyFile {
            retry: Some(RetryFile {
                max_attempts: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        };
        let defaults = PolicyFile {
            retry: Some(RetryFile {
                max_attempts: Some(2),
                grpc_codes: Some(vec!["resource-exhausted".into()]),
                ..Default::default()
            }),
            timeout: Some(TimeoutFile {
                per_try: Some("200ms".into()),
                overall: None,
            }),
            ..Default::default()
        };
        let p = svc.over(&defaults).validate("s").unwrap();
        assert_eq!(p.retry.max_attempts, 5);
        assert_eq!(p.retry.grpc_codes, vec![8]);
        assert_eq!(p.timeout.per_try, Some(Duration::from_millis(200)));
    }

    #[test]
    fn never_retried_codes_are_refused() {
        let f = PolicyFile {
            retry: Some(RetryFile {
                grpc_codes: Some(vec!["UNAVAILABLE".into(), "PERMISSION_DENIED".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = f.validate("services[1]").unwrap_err();
        assert_eq!(e.field, "services[1].retry.grpc_codes[1]");
        let f = PolicyFile {
            retry: Some(RetryFile {
                grpc_codes: Some(vec!["NOPE".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(f.validate("s").unwrap_err().field, "s.retry.grpc_codes[0]");
    }
}
