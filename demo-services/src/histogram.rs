//! A fixed-size log-linear latency histogram (microseconds), the way HdrHistogram buckets:
//! values below 128 are exact, larger ones fall into 64 buckets per power of two, so a
//! reported percentile is within 1/64 (~1.6%) of the true sample. Memory is constant
//! (3,776 counters, ~30 KiB) however long loadgen runs or however high the rate.

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const LINEAR: u64 = 2 * SUB;
const BUCKETS: usize = (64 - SUB_BITS as usize) * SUB as usize + SUB as usize;

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = v >> shift;
    (shift as u64 * SUB + sub) as usize
}

/// Lowest value and width of bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < LINEAR {
        return (i, 1);
    }
    let shift = i / SUB - 1;
    let sub = i - shift * SUB;
    (sub << shift, 1 << shift)
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn record(&mut self, micros: u64) {
        self.counts[index_of(micros)] += 1;
        self.count += 1;
        self.min = self.min.min(micros);
        self.max = self.max.max(micros);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest recorded value, exact (not bucketed); 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn reset(&mut self) {
        self.counts.fill(0);
        self.count = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// The nearest-rank `q`-quantile (`q` in 0..=1), e.g. `0.99` for p99; 0 when empty.
    /// Reports the middle of the bucket holding that rank, clamped to the observed range.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let q = if q.is_finite() {
            q.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, width) = bucket_bounds(i);
                return (low + (width - 1) / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// `percentile(q)` in milliseconds, rounded to microseconds, for JSON output.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.percentile(q) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        let mut next = 0u64;
        for i in 0..BUCKETS {
            let (low, width) = bucket_bounds(i);
            assert_eq!(low, next, "bucket {i}");
            assert_eq!(index_of(low), i);
            assert_eq!(index_of(low + (width - 1)), i);
            next = low.wrapping_add(width);
        }
        assert_eq!(next, 0, "last bucket must end at u64::MAX");
        assert_eq!(index_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn empty_is_zero() {
        let h = Histogram::new();
        assert_eq!(h.percentile(0.5), 0);
        assert_eq!(h.percentile(0.99), 0);
        assert_eq!(h.max(), 0);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.percentile(0.5), 50);
        assert_eq!(h.percentile(0.9), 90);
        assert_eq!(h.percentile(0.99), 99);
        assert_eq!(h.percentile(1.0), 100);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.max(), 100);
    }

    #[test]
    fn large_values_within_relative_error() {
        let mut h = Histogram::new();
        for v in (1..=10_000u64).map(|i| i * 997) {
            h.record(v);
        }
        for (q, exact) in [(0.5, 5_000 * 997), (0.9, 9_000 * 997), (0.99, 9_900 * 997)] {
            let got = h.percentile(q) as f64;
            let err = (got - exact as f64).abs() / exact as f64;
            assert!(err <= 1.0 / 64.0, "q={q} got={got} exact={exact}");
        }
        assert_eq!(h.max(), 10_000 * 997);
        assert_eq!(h.percentile(1.0), 10_000 * 997);
    }

    #[test]
    fn single_sample_reports_itself() {
        let mut h = Histogram::new();
        h.record(123_456);
        assert_eq!(h.percentile(0.5), 123_456);
        assert_eq!(h.percentile_ms(0.99), 123.456);
        h.reset();
        assert_eq!(h.count(), 0);
        assert_eq!(h.percentile(0.5), 0);
    }
}
