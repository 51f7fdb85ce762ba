//! Exponential backoff for Tern's retry, reconnect and ejection loops.
//!
//! An [`ExpBackoff`] names a first delay (`base`), a ceiling (`max`) and how the delay is
//! jittered; [`ExpBackoff::delay`] gives the delay before a numbered attempt. Attempt 0 waits
//! about `base`, and each further attempt doubles that until `max`. The caller keeps the attempt
//! count, so resetting after a success is setting it back to 0.
//!
//! ```
//! use std::time::Duration;
//! use tern_backoff::{ExpBackoff, Jitter};
//!
//! const RECONNECT: ExpBackoff =
//!     ExpBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(Jitter::Spread(0.5));
//! assert!(RECONNECT.delay(0) >= Duration::from_millis(50));
//! assert_eq!(RECONNECT.ceiling(10), Duration::from_secs(5));
//! ```

use std::time::Duration;

/// How a delay is drawn around its exponential ceiling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// Exactly the ceiling.
    None,
    /// Uniform in `[0, ceiling)` ("full jitter"): never above `max`.
    Full,
    /// Uniform in `[ceiling · (1 − s), ceiling · (1 + s))` for a spread `s` in `[0, 1]`:
    /// `Spread(0.1)` is ±10%. The spread applies after the cap, so a delay may exceed `max`
    /// by up to `s · max`.
    Spread(f64),
}

/// `min(max, base · 2^attempt)`, jittered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpBackoff {
    /// The delay of attempt 0 (before jitter).
    pub base: Duration,
    /// The ceiling the doubling stops at (before jitter).
    pub max: Duration,
    pub jitter: Jitter,
}

impl ExpBackoff {
    /// Doubling from `base` up to `max`, without jitter.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: Jitter::None,
        }
    }

    /// The same backoff with `jitter`.
    pub const fn jitter(self, jitter: Jitter) -> Self {
        Self { jitter, ..self }
    }

    /// `min(max, base · 2^attempt)`, saturating for any `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.checked_pow(attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before attempt number `attempt` (counted from 0), jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let factor = match self.jitter {
            Jitter::None => return ceiling,
            Jitter::Full => fastrand::f64(),
            Jitter::Spread(s) => {
                let s = s.clamp(0.0, 1.0);
                1.0 - s + 2.0 * s * fastrand::f64()
            }
        };
        // `Duration::mul_f64` would panic when a spread pushes a huge ceiling past Duration::MAX.
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn attempts() -> impl Iterator<Item = u32> {
        (0..70).chain([100, 1_000, u32::MAX / 2, u32::MAX - 1, u32::MAX])
    }

    #[test]
    fn ceiling_doubles_from_base_and_stops_at_max() {
        let b = ExpBackoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let secs: Vec<u64> = [0, 1, 2, 3, 4, 5, 6, 31, 32, u32::MAX]
            .map(|n| b.ceiling(n).as_secs())
            .into();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]);
    }

    #[test]
    fn no_jitter_is_the_ceiling() {
        let b = ExpBackoff::new(100 * MS, 6400 * MS);
        for n in attempts() {
            assert_eq!(b.delay(n), b.ceiling(n));
        }
        assert_eq!(b.delay(6), 6400 * MS);
    }

    #[test]
    fn full_jitter_stays_below_the_ceiling_and_max() {
        let b = ExpBackoff::new(10 * MS, 100 * MS).jitter(Jitter::Full);
        for _ in 0..200 {
            for n in attempts() {
                let d = b.delay(n);
                assert!(d <= b.ceiling(n), "attempt {n}: {d:?}");
                assert!(d <= b.max, "attempt {n}: {d:?}");
            }
            assert!(b.delay(0) <= 10 * MS);
            assert!(b.delay(2) <= 40 * MS);
        }
    }

    #[test]
    fn spread_stays_within_its_band() {
        for spread in [0.0, 0.1, 0.5, 1.0] {
            let b =
                ExpBackoff::new(100 * MS, Duration::from_secs(5)).jitter(Jitter::Spread(spread));
            for _ in 0..200 {
                for n in attempts() {
                    let (d, c) = (b.delay(n), b.ceiling(n));
                    assert!(c <= b.max);
                    assert!(
                        d >= c.mul_f64(1.0 - spread).saturating_sub(MS),
                        "attempt {n}: {d:?}"
                    );
                    assert!(d <= c.mul_f64(1.0 + spread) + MS, "attempt {n}: {d:?}");
                }
            }
        }
    }

    #[test]
    fn huge_values_saturate_instead_of_overflowing() {
        let b = ExpBackoff::new(Duration::MAX, Duration::MAX);
        for n in attempts() {
            assert_eq!(b.ceiling(n), Duration::MAX);
            assert!(b.jitter(Jitter::Full).delay(n) <= Duration::MAX);
            // The ±50% band around Duration::MAX saturates rather than panicking.
            let spread = b.jitter(Jitter::Spread(0.5)).delay(n);
            assert!(
                spread >= Duration::from_secs(u64::MAX / 4),
                "attempt {n}: {spread:?}"
            );
        }
        let zero = ExpBackoff::new(Duration::ZERO, Duration::from_secs(1)).jitter(Jitter::Full);
        for n in attempts() {
            assert_eq!(zero.delay(n), Duration::ZERO);
        }
    }

    #[test]
    fn max_below_base_wins() {
        let b = ExpBackoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.delay(0), Duration::from_secs(1));
    }
}
