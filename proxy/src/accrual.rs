//! Failure accrual: passive health checking of endpoints.
//!
//! Consecutive failures (refused connections, retryable statuses, timeouts)
//! eject an endpoint for a backoff that doubles with each ejection; when it
//! runs out, exactly one request is let through as a probe. A success ends
//! the ejection, a failure ejects again for longer. The balancer never lets
//! ejections take the available endpoints below a floor: it fails open.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tern_backoff::{ExpBackoff, Jitter};

use crate::config::policy::AccrualPolicy;

/// Milliseconds on a process-wide monotonic clock (0 means "not ejected").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // +1 so that no real instant is ever 0.
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

#[derive(Debug, Default)]
pub struct Accrual {
    consecutive: AtomicU32,
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    probing: AtomicBool,
}

impl Accrual {
    pub fn is_ejected(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && (now < until || self.probing.load(Ordering::Acquire))
    }

    /// Whether a request may go to this endpoint now; past an ejection's end
    /// only the one caller that wins the probe gets `true`.
    pub fn try_acquire(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Records a success; true when it ends an ejection.
    pub fn success(&self) -> bool {
        self.consecutive.store(0, Ordering::Relaxed);
        if self.ejected_until.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.ejections.store(0, Ordering::Relaxed);
        self.probing.store(false, Ordering::Release);
        self.ejected_until.swap(0, Ordering::AcqRel) != 0
    }

    /// Records a failure; true when it starts a new ejection. `may_eject` is
    /// false when ejecting would go below the balancer's floor.
    pub fn failure(&self, policy: &AccrualPolicy, now: u64, may_eject: bool) -> bool {
        if policy.consecutive_failures == 0 {
            return false;
        }
        let failures = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let was_ejected = self.ejected_until.load(Ordering::Acquire) != 0;
        let failed_probe = was_ejected && self.probing.load(Ordering::Acquire);
        if !(failed_probe || (!was_ejected && failures >= policy.consecutive_failures && may_eject))
        {
            return false;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed);
        let backoff = backoff(policy, n);
        self.ejected_until
            .store(now + backoff.as_millis() as u64, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        !was_ejected
    }
}

/// `min · 2ⁿ`, capped at `max`, with ±10% jitter so that endpoints ejected
/// together are not probed together.
fn backoff(policy: &AccrualPolicy, n: u32) -> Duration {
    ExpBackoff::new(policy.backoff_min, policy.backoff_max)
        .jitter(Jitter::Spread(0.1))
        .delay(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AccrualPolicy {
        AccrualPolicy {
            consecutive_failures: 3,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            min_available: 1,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_and_probes_back() {
        let a = Accrual::default();
        let p = policy();
        assert!(!a.failure(&p, 1000, true));
        assert!(!a.failure(&p, 1000, true));
        a.success();
        assert!(!a.failure(&p, 1000, true));
        assert!(!a.failure(&p, 1000, true));
        assert!(
            a.failure(&p, 1000, true),
            "third consecutive failure ejects"
        );
        assert!(!a.try_acquire(1050));
        assert!(a.is_ejected(1050));
        // After the backoff exactly one probe is let through.
        assert!(a.try_acquire(1200));
        assert!(!a.try_acquire(1200));
        // The probe fails: ejected again, for longer (200ms ±10%).
        assert!(!a.failure(&p, 1200, true));
        assert!(!a.try_acquire(1350));
        assert!(a.try_acquire(1450));
        assert!(a.success(), "a successful probe ends the ejection");
        assert!(a.try_acquire(1451));
        assert!(!a.is_ejected(1451));
    }

    #[test]
    fn floor_prevents_ejection_and_zero_disables() {
        let a = Accrual::default();
        for _ in 0..10 {
            assert!(!a.failure(&policy(), 1000, false));
        }
        assert!(a.try_acquire(1000));
        let off = AccrualPolicy {
            consecutive_failures: 0,
            ..policy()
        };
        for _ in 0..10 {
            assert!(!a.failure(&off, 1000, true));
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = policy();
        assert!(backoff(&p, 0) <= Duration::from_millis(110));
        assert!(backoff(&p, 2) >= Duration::from_millis(360));
        assert!(backoff(&p, 30) <= Duration::from_millis(1100));
    }
}
