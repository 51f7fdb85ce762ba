//! Power of two choices: pick two endpoints at random, send to the cheaper.
//!
//! Cost is either the requests in flight (least request) or a peak-EWMA of
//! response latency scaled by the requests in flight (P2C EWMA, as in
//! Finagle and Linkerd): a slow endpoint's estimate jumps up at once and
//! decays slowly, so it sheds load as soon as it slows down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{badness, Algorithm};
use crate::accrual::now_ms;
use crate::endpoint::EndpointClient;

/// Decay time constant of the latency estimate.
const TAU_MS: f64 = 10_000.0;
/// The estimate of an endpoint with no sample yet: cheap, but not free.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;

#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    stamp_ms: AtomicU64,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            stamp_ms: AtomicU64::new(now_ms()),
        }
    }
}

impl Load {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records a response latency. Races between concurrent updates lose a
    /// sample at worst, which an estimate can afford.
    pub fn observe(&self, rtt: Duration) {
        let now = now_ms();
        let rtt = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let dt = now.saturating_sub(self.stamp_ms.swap(now, Ordering::Relaxed)) as f64;
        let next = if rtt > prev {
            rtt
        } else {
            let w = (-dt / TAU_MS).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    fn cost(&self, algo: Algorithm) -> f64 {
        let pending = f64::from(self.in_flight()) + 1.0;
        match algo {
            Algorithm::LeastRequest => pending,
            _ => f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) * pending,
        }
    }
}

/// Counts a request to `ep` in flight until the returned guard is dropped.
pub fn start(ep: &Arc<EndpointClient>) -> InFlight {
    ep.load.in_flight.fetch_add(1, Ordering::Relaxed);
    InFlight(Arc::clone(ep))
}

/// A request in flight to an endpoint; dropped when its response ends.
pub struct InFlight(Arc<EndpointClient>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Two random distinct candidates; `None` when both are bad, so the caller
/// scans for a good one.
pub(super) fn pick(
    eps: &[Arc<EndpointClient>],
    algo: Algorithm,
    now: u64,
    avoid: Option<SocketAddr>,
) -> Option<Arc<EndpointClient>> {
    let n = eps.len();
    if n == 1 {
        return Some(Arc::clone(&eps[0]));
    }
    let i = fastrand::usize(..n);
    let j = (i + 1 + fastrand::usize(..n - 1)) % n;
    let (a, b) = (&eps[i], &eps[j]);
    let (ba, bb) = (badness(a, now, avoid), badness(b, now, avoid));
    let choice = match (ba, bb) {
        (0, 0) => {
            if a.load.cost(algo) <= b.load.cost(algo) {
                a
            } else {
                b
            }
        }
        (0, _) => a,
        (_, 0) => b,
        _ => return None,
    };
    choice.accrual.try_acquire(now).then(|| Arc::clone(choice))
}
