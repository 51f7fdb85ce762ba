//! The demo apps as test processes: `pay` replicas (with their injected faults and the counts
//! they print when stopped), `order`, `loadgen` and its JSON summary; and tonic calls of
//! `PayService` with what they came to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::Value;
use tern_proto::demo::v1::pay_service_client::PayServiceClient;
use tern_proto::demo::v1::PayRequest;
use tonic::Code;

use crate::mesh::connect;
use crate::process::{binary, Proc, START_TIMEOUT};
use crate::{within, CALL_TIMEOUT};

/// The service name the pay replicas are registered under in the client sidecar.
pub const PAY_SERVICE: &str = "pay";
const PAY_LISTENING: &str = "pay listening on ";
const ORDER_LISTENING: &str = "order listening on ";
/// How long a stopped pay may take to exit (it drains its own calls first).
pub const PAY_STOP: Duration = Duration::from_secs(10);

/// A running `pay` replica.
pub struct Pay {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub replica: String,
    /// The flags it was started with, for a restart.
    pub flags: Vec<String>,
}

/// What a pay replica counted, from the line it prints on stderr when it stops: `served`
/// is every call it answered (failed ones included), `failed` the ones it failed on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayCounts {
    pub served: u64,
    pub failed: u64,
}

impl Pay {
    /// `pay --replica NAME` on a free port, with `flags` (faults, latency) appended.
    pub async fn start(dir: &Path, replica: &str, flags: &[&str]) -> Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(dir, replica, replica, any, flags).await
    }

    /// Like [`Pay::start`] on a given address; `label` names the log files, so a restarted
    /// replica keeps the logs of its earlier run.
    pub async fn start_on(
        dir: &Path,
        label: &str,
        replica: &str,
        listen: SocketAddr,
        flags: &[&str],
    ) -> Result<Self> {
        let mut args = vec![
            "--listen".to_string(),
            listen.to_string(),
            "--replica".to_string(),
            replica.to_string(),
        ];
        args.extend(flags.iter().map(ToString::to_string));
        let mut proc = Proc::spawn(dir, label, &binary("pay")?, &args)?;
        let rest = proc.wait_for_line(PAY_LISTENING, START_TIMEOUT).await?;
        let addr_text = rest.split_whitespace().next().unwrap_or_default();
        let addr = addr_text
            .parse()
            .with_context(|| format!("{label} printed a bad address in {rest:?}"))?;
        Ok(Self {
            proc,
            addr,
            replica: replica.to_string(),
            flags: flags.iter().map(ToString::to_string).collect(),
        })
    }

    /// SIGTERM, wait for the exit, and read the counts it printed.
    pub async fn stop(&mut self) -> Result<PayCounts> {
        self.proc.begin_stop();
        let status = self.proc.wait_exit(PAY_STOP).await?;
        if !status.success() {
            bail!(
                "{} exited with {status}\n{}",
                self.replica,
                self.proc.diagnostics()
            );
        }
        parse_pay_counts(&self.proc.stderr(), &self.replica)
            .with_context(|| self.proc.diagnostics())
    }
}

/// Reads `pay NAME stopped: served=N failed=M`.
pub fn parse_pay_counts(stderr: &str, replica: &str) -> Result<PayCounts> {
    let prefix = format!("pay {replica} stopped: ");
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .with_context(|| format!("no {prefix:?} line on stderr"))?;
    let mut served = None;
    let mut failed = None;
    for field in line.split_whitespace() {
        match field.split_once('=') {
            Some(("served", n)) => served = n.parse().ok(),
            Some(("failed", n)) => failed = n.parse().ok(),
            _ => {}
        }
    }
    match (served, failed) {
        (Some(served), Some(failed)) => Ok(PayCounts { served, failed }),
        _ => bail!("cannot read the counts in {line:?}"),
    }
}

/// A running `order` app calling pay at `pay`.
pub struct Order {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Order {
    pub async fn start(dir: &Path, pay: SocketAddr) -> Result<Self> {
        let args = [
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--pay-host".to_string(),
            pay.ip().to_string(),
            "--pay-port".to_string(),
            pay.port().to_string(),
        ];
        let mut proc = Proc::spawn(dir, "order", &binary("order")?, &args)?;
        let rest = proc.wait_for_line(ORDER_LISTENING, START_TIMEOUT).await?;
        let addr = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("order printed a bad address in {rest:?}"))?;
        Ok(Self { proc, addr })
    }
}

/// loadgen's final JSON line.
#[derive(Clone, Debug)]
pub struct LoadSummary {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub by_replica: BTreeMap<String, u64>,
    pub p99_ms: f64,
    pub raw: Value,
}

impl LoadSummary {
    pub fn parse(line: &str) -> Result<Self> {
        let raw: Value =
            serde_json::from_str(line).with_context(|| format!("summary line {line:?}"))?;
        if raw["type"] != "summary" {
            bail!("not a summary line: {line}");
        }
        let count = |key: &str| {
            raw[key]
                .as_u64()
                .with_context(|| format!("no {key} in {line}"))
        };
        let map = |key: &str| -> BTreeMap<String, u64> {
            raw[key]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Self {
            sent: count("sent")?,
            ok: count("ok")?,
            failed: count("failed")?,
            errors: map("errors"),
            by_replica: map("by_replica"),
            p99_ms: raw["p99_ms"].as_f64().unwrap_or(f64::NAN),
            raw,
        })
    }

    pub fn replica(&self, name: &str) -> u64 {
        self.by_replica.get(name).copied().unwrap_or(0)
    }
}

/// A running `loadgen`.
pub struct Loadgen {
    pub proc: Proc,
    duration: Duration,
}

impl Loadgen {
    /// `loadgen --target TARGET --rate RATE --duration DURATION` plus `extra` flags.
    pub fn spawn(
        dir: &Path,
        label: &str,
        target: SocketAddr,
        rate: u32,
        duration: Duration,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec![
            "--target".to_string(),
            target.to_string(),
            "--rate".to_string(),
            rate.to_string(),
            "--duration".to_string(),
            format!("{}ms", duration.as_millis()),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        let proc = Proc::spawn(dir, label, &binary("loadgen")?, &args)?;
        Ok(Self { proc, duration })
    }

    /// Waits for loadgen to finish (its duration plus its calls' 5 s deadline at most) and
    /// returns its summary.
    pub async fn summary(&mut self) -> Result<LoadSummary> {
        let limit = self.duration + Duration::from_secs(10);
        let status = self.proc.wait_exit(limit).await?;
        let stdout = self.proc.stdout();
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.contains("\"summary\""))
            .with_context(|| {
                format!(
                    "loadgen ({status}) printed no summary\n{}",
                    self.proc.diagnostics()
                )
            })?;
        LoadSummary::parse(line)
    }
}

/// A valid payment; `i` makes the order id unique.
pub fn pay_request(i: usize) -> PayRequest {
    PayRequest {
        order_id: format!("e2e-{i}"),
        amount_cents: 1999,
        currency: "EUR".to_string(),
    }
}

/// One call's outcome as the caller saw it.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The replica that answered, or the status the call failed with.
    pub result: Result<String, tonic::Status>,
    pub started: Instant,
    pub elapsed: Duration,
}

/// What many calls came to.
#[derive(Clone, Default)]
pub struct Tally {
    pub ok: u64,
    /// Failed calls by gRPC code (tonic's `Debug` name of the code).
    pub failed: BTreeMap<String, u64>,
    pub by_replica: BTreeMap<String, u64>,
    /// A few failure messages, for the test's message.
    pub samples: Vec<String>,
    latencies: Vec<Duration>,
}

impl Tally {
    pub fn of(outcomes: &[Outcome]) -> Self {
        let mut tally = Self::default();
        for o in outcomes {
            tally.latencies.push(o.elapsed);
            match &o.result {
                Ok(replica) => {
                    tally.ok += 1;
                    *tally.by_replica.entry(replica.clone()).or_default() += 1;
                }
                Err(status) => {
                    *tally
                        .failed
                        .entry(format!("{:?}", status.code()))
                        .or_default() += 1;
                    if tally.samples.len() < 5 {
                        tally
                            .samples
                            .push(format!("{:?}: {}", status.code(), status.message()));
                    }
                }
            }
        }
        tally.latencies.sort();
        tally
    }

    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn code(&self, code: Code) -> u64 {
        self.failed.get(&format!("{code:?}")).copied().unwrap_or(0)
    }

    /// The latency below which a share `q` of the calls finished.
    pub fn percentile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.latencies.len() as f64) * q).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok {:?}, failed {:?}, p50 {:?}, p99 {:?}, max {:?}, first failures {:?}",
            self.ok,
            self.by_replica,
            self.failed,
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0),
            self.samples
        )
    }
}

/// `calls` unary Pay calls on one connection to `target`, `concurrency` at a time. Only a call
/// that hangs past [`CALL_TIMEOUT`] is an error; gRPC failures are outcomes.
pub async fn pay_many(
    target: SocketAddr,
    calls: usize,
    concurrency: usize,
) -> Result<Vec<Outcome>> {
    let client = PayServiceClient::new(connect(target).await?);
    futures::stream::iter(0..calls)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let started = Instant::now();
                let result = within(CALL_TIMEOUT, client.pay(pay_request(i)))
                    .await
                    .with_context(|| format!("call {i}"))?;
                Ok::<_, anyhow::Error>(Outcome {
                    result: result.map(|r| r.into_inner().replica),
                    started,
                    elapsed: started.elapsed(),
                })
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await
}
