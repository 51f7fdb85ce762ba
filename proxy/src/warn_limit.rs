//! Rate-limited warnings, for events a peer can cause at will.

use std::sync::atomic::{AtomicU64, Ordering};

/// At most one warning per second for a kind of event an attacker can make
/// happen at will (failed accepts, failed handshakes, refused ports); the
/// rest are counted and their number given with the next line that is written.
#[derive(Default)]
pub struct WarnLimiter {
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    /// `Some(n)`: write the line now, mentioning `n` suppressed since the last.
    pub fn allow(&self) -> Option<u64> {
        let now = crate::accrual::now_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_and_the_rest_counted() {
        let w = WarnLimiter::default();
        assert_eq!(w.allow(), Some(0));
        assert_eq!(w.allow(), None);
        assert_eq!(w.allow(), None);
        assert_eq!(w.suppressed.load(Ordering::Relaxed), 2);
    }
}
