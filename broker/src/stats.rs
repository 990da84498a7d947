//! Process-wide latency histograms of the broker's durable path, for operators (`GET /metrics`
//! on the admin API) and for benchmarks that compare a send's receipt with the disk.
//!
//! [`FSYNC`](crate::stats::FSYNC) times every `fdatasync` of a topic log's group commit
//! ([`crate::log::Unsynced::sync`]); [`RECEIPT`](crate::stats::RECEIPT) times each stored send
//! from its hand-off to its topic to its receipt being queued for the client. Under sustained
//! load the disk's own tail (single syncs of tens of milliseconds) shows here, where a short
//! quiet probe of the disk never sees it.
//!
//! A [`Histogram`](crate::stats::Histogram) is lock-free: recording is two relaxed atomic
//! adds, so any thread records without waiting. A [`Snapshot`](crate::stats::Snapshot) copies
//! the counters; the later of two snapshots minus the earlier is the histogram of what was
//! recorded in between (one benchmark row, one scrape interval). Buckets are 10 µs wide below
//! 10 ms, then each decade up to 100 s is cut into 90 buckets one tenth of its start wide
//! (1 ms from 10 ms, 10 ms from 100 ms, ...), and one bucket holds everything above 100 s: a
//! quantile is the upper bound of the bucket it falls in, at most 10 µs high below 10 ms and
//! at most 10% above.
//!
//! Not done: per-topic histograms (these are the process's, shared by every broker in it),
//! exact values (only buckets), resets (subtract snapshots instead).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Every `fdatasync` of a topic log's group commit, failed ones too.
pub static FSYNC: Histogram = Histogram::new();

/// Each stored send (not a refused one nor a duplicate): from when its connection hands it to
/// its topic to when its receipt is queued for the client.
pub static RECEIPT: Histogram = Histogram::new();

/// Width of the linear buckets.
const LINEAR_WIDTH_NS: u64 = 10_000;
/// End of the linear buckets; decades of [`PER_DECADE`] buckets follow.
const LINEAR_END_NS: u64 = 10_000_000;
const LINEAR_BUCKETS: usize = (LINEAR_END_NS / LINEAR_WIDTH_NS) as usize;
/// Decades after the linear buckets: 10 ms to 100 s.
const DECADES: usize = 4;
const PER_DECADE: usize = 90;
/// The linear buckets, the decades', and the one above 100 s.
const BUCKETS: usize = LINEAR_BUCKETS + DECADES * PER_DECADE + 1;

/// Upper bounds of the Prometheus buckets, in nanoseconds (Prometheus's defaults, finer
/// below 5 ms). Each is a bucket bound, so each cumulative count is exact.
const PROMETHEUS_BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Durations counted in buckets; see the module docs for the bucket bounds.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// An empty histogram (`const`, for a `static`).
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get(bucket_of(ns)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts so far. Taken while others record, it may hold a duration in its bucket
    /// but not yet in its sum (or the reverse); the count is always the buckets' total.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

/// A histogram's counts at one moment; `later - earlier` is what was recorded in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    buckets: Box<[u64]>,
    sum_ns: u64,
}

impl Snapshot {
    /// Durations counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Their total.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns)
    }

    /// The `q`-quantile (`q` in 0..=1; 0.99 is the p99): the upper bound of the bucket holding
    /// the `ceil(q × count)`-th smallest duration (the smallest for `q` = 0). `None` if empty.
    /// A duration above 100 s reads as 100 s.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        // Clamped to 1..=count, so it is found below.
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        let bucket = self.buckets.iter().position(|&n| {
            seen += n;
            seen >= rank
        })?;
        Some(Duration::from_nanos(upper_bound_ns(bucket)))
    }

    /// The median ([`Snapshot::quantile`] 0.5).
    pub fn p50(&self) -> Option<Duration> {
        self.quantile(0.5)
    }

    /// The 99th percentile ([`Snapshot::quantile`] 0.99).
    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }

    /// Upper bound of the highest bucket counted in (100 s for one above 100 s). `None` if
    /// empty.
    pub fn max(&self) -> Option<Duration> {
        let bucket = self.buckets.iter().rposition(|&n| n > 0)?;
        Some(Duration::from_nanos(upper_bound_ns(bucket)))
    }

    /// Durations counted that are at most `bound` (exact when `bound` is a bucket bound, as
    /// Prometheus's `le`; otherwise those of the buckets ending at or below it).
    pub fn count_at_most(&self, bound: Duration) -> u64 {
        let ns = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        self.buckets
            .iter()
            .enumerate()
            .take_while(|(i, _)| upper_bound_ns(*i) <= ns && *i + 1 < BUCKETS)
            .map(|(_, n)| n)
            .sum()
    }

    /// Appends this snapshot as a Prometheus histogram `name` (text exposition format 0.0.4:
    /// `# HELP`, `# TYPE`, cumulative `name_bucket{le="..."}` in seconds, `name_sum`,
    /// `name_count`).
    pub fn write_prometheus(&self, name: &str, help: &str, out: &mut String) {
        let count = self.count();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ns in PROMETHEUS_BOUNDS_NS {
            let n = self.count_at_most(Duration::from_nanos(ns));
            let le = ns as f64 / 1e9;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum().as_secs_f64());
        let _ = writeln!(out, "{name}_count {count}");
    }
}

impl std::ops::Sub for &Snapshot {
    type Output = Snapshot;

    /// What was recorded between `rhs` and `self` (counts never go down; a larger `rhs`
    /// saturates to zero).
    fn sub(self, rhs: &Snapshot) -> Snapshot {
        Snapshot {
            buckets: self
                .buckets
                .iter()
                .zip(rhs.buckets.iter())
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(rhs.sum_ns),
        }
    }
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;

    fn sub(self, rhs: Snapshot) -> Snapshot {
        &self - &rhs
    }
}

/// The broker's histograms in the Prometheus text format, for `GET /metrics`.
pub fn prometheus_text() -> String {
    let mut out = String::new();
    FSYNC.snapshot().write_prometheus(
        "magnetar_broker_fsync_seconds",
        "Time of each fdatasync of a topic log's group commit.",
        &mut out,
    );
    RECEIPT.snapshot().write_prometheus(
        "magnetar_broker_receipt_seconds",
        "Time from a send's hand-off to its topic to its receipt being queued (stored sends).",
        &mut out,
    );
    out
}

/// The bucket of a duration of `ns`: buckets include their upper bound (as Prometheus's
/// `le`), so `ns - 1` is placed in half-open ranges.
fn bucket_of(ns: u64) -> usize {
    let v = ns.saturating_sub(1);
    if v < LINEAR_END_NS {
        return (v / LINEAR_WIDTH_NS) as usize;
    }
    let mut start = LINEAR_END_NS;
    let mut first = LINEAR_BUCKETS;
    for _ in 0..DECADES {
        if v < start * 10 {
            return first + ((v - start) / (start / 10)) as usize;
        }
        start *= 10;
        first += PER_DECADE;
    }
    BUCKETS - 1
}

/// Upper bound (inclusive) of `bucket`; the last one, unbounded, reads as its lower bound.
fn upper_bound_ns(bucket: usize) -> u64 {
    if bucket < LINEAR_BUCKETS {
        return (bucket as u64 + 1) * LINEAR_WIDTH_NS;
    }
    let mut start = LINEAR_END_NS;
    let mut i = bucket - LINEAR_BUCKETS;
    for _ in 0..DECADES {
        if i < PER_DECADE {
            return start + (i as u64 + 1) * (start / 10);
        }
        start *= 10;
        i -= PER_DECADE;
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn buckets_hold_their_upper_bound_and_follow_each_other() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(10_000), 0);
        assert_eq!(bucket_of(10_001), 1);
        assert_eq!(bucket_of(LINEAR_END_NS), LINEAR_BUCKETS - 1);
        assert_eq!(bucket_of(LINEAR_END_NS + 1), LINEAR_BUCKETS);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        let mut previous = 0;
        for b in 0..BUCKETS - 1 {
            let upper = upper_bound_ns(b);
            assert!(upper > previous, "bucket {b}");
            assert_eq!(bucket_of(upper), b, "upper bound of {b}");
            assert_eq!(bucket_of(upper + 1), b + 1, "just above {b}");
            previous = upper;
        }
        assert_eq!(upper_bound_ns(BUCKETS - 1), 100_000_000_000);
    }

    #[test]
    fn resolution_is_10_us_below_10_ms_and_a_tenth_above() {
        for b in 1..BUCKETS - 1 {
            let (low, high) = (upper_bound_ns(b - 1), upper_bound_ns(b));
            if high <= LINEAR_END_NS {
                assert_eq!(high - low, LINEAR_WIDTH_NS);
            } else {
                assert!((high - low) * 10 <= low, "bucket {b}: {low}..{high}");
            }
        }
    }

    #[test]
    fn quantiles_of_known_durations() {
        let h = Histogram::new();
        assert_eq!(h.snapshot().p99(), None);
        assert_eq!(h.snapshot().max(), None);
        // 1..=100 times 100 µs: the p50 is the 50th (5 ms), the p99 the 99th (9.9 ms).
        for i in 1..=100 {
            h.record(us(100 * i));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.sum(), us(100 * 5050));
        assert_eq!(s.p50(), Some(ms(5)));
        assert_eq!(s.p99(), Some(us(9_900)));
        assert_eq!(s.quantile(1.0), Some(ms(10)));
        assert_eq!(s.quantile(0.0), Some(us(100)));
        assert_eq!(s.max(), Some(ms(10)));
        // A value inside a bucket reads as its upper bound.
        h.record(us(123) + Duration::from_nanos(1));
        h.record(Duration::from_micros(19_500));
        h.record(Duration::from_secs(1000));
        let s = h.snapshot();
        // The 2nd of 103, after the one at 100 µs.
        assert_eq!(s.quantile(0.015), Some(us(130)));
        assert_eq!(s.max(), Some(Duration::from_secs(100)));
        assert_eq!(s.p99(), Some(ms(20)));
    }

    #[test]
    fn later_minus_earlier_is_what_was_recorded_in_between() {
        let h = Histogram::new();
        for _ in 0..1000 {
            h.record(us(50));
        }
        let before = h.snapshot();
        for _ in 0..98 {
            h.record(us(200));
        }
        h.record(ms(22));
        h.record(ms(22));
        let between = &h.snapshot() - &before;
        assert_eq!(between.count(), 100);
        assert_eq!(between.sum(), us(98 * 200) + ms(44));
        assert_eq!(between.p50(), Some(us(200)));
        // 22 ms is a bucket's upper bound, which the bucket includes.
        assert_eq!(between.p99(), Some(ms(22)));
        assert_eq!(between.max(), Some(ms(22)));
        // Over all of it the 22 ms syncs are under 1%.
        assert_eq!(h.snapshot().p99(), Some(us(200)));
        assert_eq!((before.clone() - h.snapshot()).count(), 0);
    }

    #[test]
    fn concurrent_recording_loses_nothing() {
        let h = Histogram::new();
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = &h;
                s.spawn(move || {
                    for i in 0..10_000 {
                        h.record(us(t * 1000 + i % 100));
                    }
                });
            }
        });
        assert_eq!(h.snapshot().count(), 40_000);
    }

    #[test]
    fn prometheus_text_is_cumulative_and_ends_at_the_count() {
        for ns in PROMETHEUS_BOUNDS_NS {
            assert_eq!(
                upper_bound_ns(bucket_of(ns)),
                ns,
                "{ns} ns is a bucket bound"
            );
        }
        let h = Histogram::new();
        for d in [
            us(40),
            us(50),
            us(51),
            ms(3),
            ms(30),
            Duration::from_secs(200),
        ] {
            h.record(d);
        }
        let mut out = String::new();
        h.snapshot()
            .write_prometheus("x_seconds", "Test.", &mut out);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "# HELP x_seconds Test.");
        assert_eq!(lines[1], "# TYPE x_seconds histogram");
        assert_eq!(lines[2], "x_seconds_bucket{le=\"0.00005\"} 2");
        assert_eq!(lines[3], "x_seconds_bucket{le=\"0.0001\"} 3");
        assert!(lines.contains(&"x_seconds_bucket{le=\"0.005\"} 4"));
        assert!(lines.contains(&"x_seconds_bucket{le=\"0.05\"} 5"));
        assert!(lines.contains(&"x_seconds_bucket{le=\"10\"} 5"));
        assert!(lines.contains(&"x_seconds_bucket{le=\"+Inf\"} 6"));
        assert!(lines.contains(&"x_seconds_count 6"));
        assert!(lines.contains(&"x_seconds_sum 200.033141"));
    }
}
