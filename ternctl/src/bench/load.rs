//! The load generator: unary `PayService/Pay` calls over one HTTP/2
//! connection, either closed loop (N calls always in flight) or open loop (a
//! fixed rate, whatever the responses do), with per-call latency kept in µs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tern_proto::demo::v1::pay_service_client::PayServiceClient;
use tern_proto::demo::v1::PayRequest;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

pub type Client = PayServiceClient<Channel>;

/// A call slower than this counts as an error rather than stalling a phase.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Open loop: beyond this many calls in flight the path is saturated; further
/// ticks are counted as dropped instead of piling up tasks without bound.
const MAX_IN_FLIGHT: usize = 10_000;

/// What one phase measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    /// Calls that returned OK.
    pub requests: u64,
    pub errors: u64,
    /// Open loop only: calls not sent because too many were in flight.
    pub dropped: u64,
    pub seconds: f64,
    /// OK calls per second of the phase.
    pub rps: f64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub p999_us: u32,
    pub max_us: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl Phase {
    fn new(
        mut lat: Vec<u32>,
        errors: u64,
        dropped: u64,
        elapsed: Duration,
        first_error: Option<String>,
    ) -> Self {
        lat.sort_unstable();
        let seconds = elapsed.as_secs_f64();
        let requests = lat.len() as u64;
        Phase {
            requests,
            errors,
            dropped,
            seconds,
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            p50_us: percentile(&lat, 0.50),
            p99_us: percentile(&lat, 0.99),
            p999_us: percentile(&lat, 0.999),
            max_us: lat.last().copied().unwrap_or(0),
            first_error,
        }
    }
}

/// Nearest-rank percentile of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One HTTP/2 connection to `addr`; every call of a path shares it.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .context("building the client endpoint")?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(PayServiceClient::new(channel))
}

/// One call that must succeed before anything is measured, so a broken path
/// reports its gRPC status instead of a table of errors.
pub async fn check(client: &Client) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..3 {
        match client.clone().pay(request()).await {
            Ok(_) => return Ok(()),
            Err(status) => last = Some(status),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match last {
        Some(status) => Err(anyhow::anyhow!("the first call failed: {status}")),
        None => Ok(()),
    }
}

pub fn request() -> PayRequest {
    PayRequest {
        order_id: "bench-0001".into(),
        amount_cents: 1250,
        currency: "EUR".into(),
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// `concurrency` callers, each sending its next call as soon as the last
/// returns, until `duration` has passed.
pub async fn closed_loop(client: &Client, concurrency: usize, duration: Duration) -> Phase {
    let start = Instant::now();
    let deadline = start + duration;
    let mut callers = JoinSet::new();
    for _ in 0..concurrency {
        let mut client = client.clone();
        callers.spawn(async move {
            let req = request();
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.pay(req.clone()).await {
                    Ok(_) => lat.push(micros(t.elapsed())),
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(done) = callers.join_next().await {
        match done {
            Ok((l, e, f)) => {
                lat.extend(l);
                errors += e;
                first_error = first_error.or(f);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("caller task failed: {e}"));
            }
        }
    }
    Phase::new(lat, errors, 0, start.elapsed(), first_error)
}

/// `total` calls, `concurrency` at a time; the count, not a duration, bounds
/// the phase, so runs under callgrind compare call for call.
pub async fn fixed_count(client: &Client, concurrency: usize, total: u64) -> Phase {
    let start = Instant::now();
    let left = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(total));
    let mut callers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let mut client = client.clone();
        let left = std::sync::Arc::clone(&left);
        callers.spawn(async move {
            let req = request();
            let (mut lat, mut errors, mut first_error) = (Vec::new(), 0u64, None);
            let take = |n: u64| n.checked_sub(1);
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    take,
                )
                .is_ok()
            {
                let t = Instant::now();
                match client.pay(req.clone()).await {
                    Ok(_) => lat.push(micros(t.elapsed())),
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    let (mut lat, mut errors, mut first_error) = (Vec::new(), 0, None);
    while let Some(done) = callers.join_next().await {
        if let Ok((l, e, f)) = done {
            lat.extend(l);
            errors += e;
            first_error = first_error.or(f);
        } else {
            errors += 1;
        }
    }
    Phase::new(lat, errors, 0, start.elapsed(), first_error)
}

/// Starts calls at `rate` per second for `duration`, each on its own task, and
/// waits for the last to return. The timer ticks every millisecond and sends
/// whatever the schedule says is due, so rates above 1000/s go out in small
/// bursts. Latency runs from the moment a call's task starts.
pub async fn open_loop(client: &Client, rate: u32, duration: Duration) -> Phase {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let mut calls: JoinSet<Result<u32, String>> = JoinSet::new();
    let mut lat = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut errors = 0u64;
    let mut dropped = 0u64;
    let mut first_error = None;
    let mut record = |r: Result<Result<u32, String>, tokio::task::JoinError>| match r {
        Ok(Ok(us)) => lat.push(us),
        Ok(Err(e)) => {
            errors += 1;
            first_error.get_or_insert(e);
        }
        Err(e) => {
            errors += 1;
            first_error.get_or_insert_with(|| format!("call task failed: {e}"));
        }
    };

    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as u64 + 1).min(total);
        while sent < due {
            sent += 1;
            if calls.len() >= MAX_IN_FLIGHT {
                dropped += 1;
                continue;
            }
            let mut client = client.clone();
            calls.spawn(async move {
                let t = Instant::now();
                match client.pay(request()).await {
                    Ok(_) => Ok(micros(t.elapsed())),
                    Err(status) => Err(status.to_string()),
                }
            });
        }
        while let Some(r) = calls.try_join_next() {
            record(r);
        }
    }
    while let Some(r) = calls.join_next().await {
        record(r);
    }
    Phase::new(lat, errors, dropped, start.elapsed(), first_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.50), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&[7], 0.999), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn phase_rate_and_order() {
        let p = Phase::new(vec![30, 10, 20], 1, 0, Duration::from_secs(2), None);
        assert_eq!((p.requests, p.p50_us, p.max_us), (3, 20, 30));
        assert!((p.rps - 1.5).abs() < 1e-9);
    }
}
