//! Quotas and usage per tenant and per user.
//!
//! Each tenant and each user has a [`Meter`]: token buckets for publish messages/s and
//! bytes/s, gauges of connections and subscriptions, and usage counters. A publish over the
//! rate is never dropped and never refused: it gets a time before which the host does not
//! hand it to the backend. The connection's ordered operations task waits for that time,
//! its operations pile up, and past the in-flight limit the connection stops reading its
//! socket — TCP pushes back to the client, which is slowed to its rate. Connections and
//! subscriptions over their limit are refused with `quota-exceeded`, which each protocol
//! turns into its own signal (MQTT CONNACK/SUBACK quota codes, ...).
//!
//! Limits are read from the tenancy each time a meter is made and on every admin change,
//! so they apply live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::LimitsConfig;

/// Longest burst a bucket allows, in seconds of its rate.
const BURST_SECONDS: f64 = 0.1;

/// A token bucket that lends: [`reserve`](Bucket::reserve) always succeeds and says how long
/// the caller must wait for the tokens it took.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    /// Tokens available at `at` (negative: owed).
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket {
            rate,
            tokens: rate * BURST_SECONDS,
            at: Instant::now(),
        }
    }

    fn reserve(&mut self, n: f64, now: Instant) -> Duration {
        let burst = self.rate * BURST_SECONDS;
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(burst.max(1.0));
        self.at = now;
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Usage counters, as the admin API and metrics show them.
#[derive(Debug, Default, serde::Serialize, Clone, PartialEq)]
pub struct Usage {
    pub connections: i64,
    pub subscriptions: i64,
    pub published_msgs: u64,
    pub published_bytes: u64,
    pub delivered_msgs: u64,
    pub delivered_bytes: u64,
    /// Publishes that had to wait for the rate limit.
    pub throttled_msgs: u64,
    /// Connections and subscriptions refused by a limit.
    pub refused: u64,
    /// Bytes the tenant's topics hold in the backend (sampled every few seconds).
    pub stored_bytes: u64,
}

/// One tenant's or one user's limits and usage.
#[derive(Debug)]
pub struct Meter {
    limits: Mutex<(LimitsConfig, Option<Bucket>, Option<Bucket>)>,
    connections: AtomicI64,
    subscriptions: AtomicI64,
    published_msgs: AtomicU64,
    published_bytes: AtomicU64,
    delivered_msgs: AtomicU64,
    delivered_bytes: AtomicU64,
    throttled_msgs: AtomicU64,
    refused: AtomicU64,
    stored_bytes: AtomicU64,
}

impl Meter {
    fn new(limits: LimitsConfig) -> Meter {
        let m = Meter {
            limits: Mutex::new((LimitsConfig::default(), None, None)),
            connections: AtomicI64::new(0),
            subscriptions: AtomicI64::new(0),
            published_msgs: AtomicU64::new(0),
            published_bytes: AtomicU64::new(0),
            delivered_msgs: AtomicU64::new(0),
            delivered_bytes: AtomicU64::new(0),
            throttled_msgs: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
        };
        m.set_limits(limits);
        m
    }

    /// Applies new limits (buckets restart full when a rate changes).
    pub fn set_limits(&self, limits: LimitsConfig) {
        let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        if l.0 == limits && (l.1.is_some() || limits.publish_msgs_per_sec.is_none()) {
            return;
        }
        let bucket = |r: Option<f64>| r.filter(|r| *r > 0.0).map(Bucket::new);
        *l = (
            limits.clone(),
            bucket(limits.publish_msgs_per_sec),
            bucket(limits.publish_bytes_per_sec),
        );
    }

    /// Takes `msgs` messages of `bytes` in all from the buckets; returns how long to hold
    /// them back.
    fn reserve_publish(&self, msgs: usize, bytes: usize, now: Instant) -> Duration {
        self.published_msgs
            .fetch_add(msgs as u64, Ordering::Relaxed);
        self.published_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let a =
            l.1.as_mut()
                .map_or(Duration::ZERO, |b| b.reserve(msgs as f64, now));
        let b =
            l.2.as_mut()
                .map_or(Duration::ZERO, |b| b.reserve(bytes as f64, now));
        let wait = a.max(b);
        if !wait.is_zero() {
            self.throttled_msgs
                .fetch_add(msgs as u64, Ordering::Relaxed);
        }
        wait
    }

    fn max(&self, pick: fn(&LimitsConfig) -> Option<u32>) -> Option<i64> {
        pick(&self.limits.lock().unwrap_or_else(|p| p.into_inner()).0).map(i64::from)
    }

    pub fn usage(&self) -> Usage {
        Usage {
            connections: self.connections.load(Ordering::Relaxed),
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            published_msgs: self.published_msgs.load(Ordering::Relaxed),
            published_bytes: self.published_bytes.load(Ordering::Relaxed),
            delivered_msgs: self.delivered_msgs.load(Ordering::Relaxed),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            throttled_msgs: self.throttled_msgs.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            stored_bytes: self.stored_bytes.load(Ordering::Relaxed),
        }
    }

    /// Whether the tenant's stored bytes are at or over its `max_stored_bytes`.
    pub fn storage_full(&self) -> bool {
        let max = self
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .max_stored_bytes;
        max.is_some_and(|m| self.stored_bytes.load(Ordering::Relaxed) >= m)
    }
}

/// The meters of one connection's principal: its tenant's and its user's.
#[derive(Debug, Clone)]
pub struct Meters {
    pub tenant: Arc<Meter>,
    pub user: Arc<Meter>,
}

/// Which gauge an admission counts against.
#[derive(Debug, Clone, Copy)]
pub enum Gauge {
    Connections,
    Subscriptions,
}

impl Meters {
    /// Counts one more connection or subscription, unless that goes over a limit.
    pub fn admit(&self, gauge: Gauge) -> bool {
        fn pick(m: &Meter, gauge: Gauge) -> (&AtomicI64, Option<i64>) {
            match gauge {
                Gauge::Connections => (&m.connections, m.max(|l| l.max_connections)),
                Gauge::Subscriptions => (&m.subscriptions, m.max(|l| l.max_subscriptions)),
            }
        }
        let mut taken: Vec<&AtomicI64> = Vec::new();
        for m in [&*self.tenant, &*self.user] {
            let (counter, max) = pick(m, gauge);
            let now = counter.fetch_add(1, Ordering::AcqRel) + 1;
            taken.push(counter);
            if max.is_some_and(|max| now > max) {
                for c in taken {
                    c.fetch_sub(1, Ordering::AcqRel);
                }
                m.refused.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        true
    }

    /// Gives back what [`admit`](Self::admit) counted.
    pub fn release(&self, gauge: Gauge) {
        for m in [&*self.tenant, &*self.user] {
            match gauge {
                Gauge::Connections => m.connections.fetch_sub(1, Ordering::AcqRel),
                Gauge::Subscriptions => m.subscriptions.fetch_sub(1, Ordering::AcqRel),
            };
        }
    }

    /// The instant before which a publish of `msgs` messages (one, or an append's records)
    /// of `bytes` in all must not reach the backend.
    pub fn publish_at(&self, msgs: usize, bytes: usize) -> Option<Instant> {
        let now = Instant::now();
        let wait = self
            .tenant
            .reserve_publish(msgs, bytes, now)
            .max(self.user.reserve_publish(msgs, bytes, now));
        (!wait.is_zero()).then(|| now + wait)
    }

    pub fn delivered(&self, bytes: usize) {
        for m in [&*self.tenant, &*self.user] {
            m.delivered_msgs.fetch_add(1, Ordering::Relaxed);
            m.delivered_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// Every meter of the gateway.
#[derive(Debug, Default)]
pub struct Quotas {
    tenants: Mutex<HashMap<String, Arc<Meter>>>,
    users: Mutex<HashMap<String, Arc<Meter>>>,
}

impl Quotas {
    /// The meters of a principal, made on first use with the given limits (or updated to them).
    pub fn meters(
        &self,
        tenant: &str,
        tenant_limits: LimitsConfig,
        user: &str,
        user_limits: LimitsConfig,
    ) -> Meters {
        let get = |map: &Mutex<HashMap<String, Arc<Meter>>>, name: &str, limits: LimitsConfig| {
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(name) {
                Some(m) => {
                    m.set_limits(limits);
                    m.clone()
                }
                None => {
                    let m = Arc::new(Meter::new(limits));
                    map.insert(name.to_string(), m.clone());
                    m
                }
            }
        };
        Meters {
            tenant: get(&self.tenants, tenant, tenant_limits),
            user: get(&self.users, user, user_limits),
        }
    }

    /// Applies a tenant's new limits to its meter, if it has one.
    pub fn update_tenant(&self, tenant: &str, limits: LimitsConfig) {
        if let Some(m) = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            m.set_limits(limits);
        }
    }

    /// Records a tenant's stored bytes, as sampled from the backend.
    pub fn set_stored_bytes(&self, tenant: &str, bytes: u64) {
        if let Some(m) = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            m.stored_bytes.store(bytes, Ordering::Relaxed);
        }
    }

    /// Tenants that have a meter.
    pub fn tenant_names(&self) -> Vec<String> {
        self.tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Usage of every tenant seen since start.
    pub fn tenant_usage(&self) -> Vec<(String, Usage)> {
        let mut v: Vec<_> = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, m)| (n.clone(), m.usage()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lends_and_paces() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0);
        // The burst (10 tokens) goes at once; the 11th waits 10 ms.
        for _ in 0..10 {
            assert_eq!(b.reserve(1.0, t0), Duration::ZERO);
        }
        let w = b.reserve(1.0, t0);
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-6, "{w:?}");
        // 100 more at the same instant: the last waits ~1.01 s.
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            last = b.reserve(1.0, t0);
        }
        assert!((last.as_secs_f64() - 1.01).abs() < 1e-6, "{last:?}");
    }

    #[test]
    fn admission_counts_tenant_and_user() {
        let q = Quotas::default();
        let limits = LimitsConfig {
            max_connections: Some(2),
            ..Default::default()
        };
        let a = q.meters("acme", limits.clone(), "alice", LimitsConfig::default());
        let b = q.meters("acme", limits, "bob", LimitsConfig::default());
        assert!(a.admit(Gauge::Connections));
        assert!(b.admit(Gauge::Connections));
        assert!(!a.admit(Gauge::Connections));
        assert_eq!(
            a.user.usage().connections,
            1,
            "a refused admission gives back"
        );
        a.release(Gauge::Connections);
        assert!(b.admit(Gauge::Connections));
        assert_eq!(q.tenant_usage()[0].1.refused, 1);
    }

    #[test]
    fn an_append_counts_each_of_its_records() {
        let q = Quotas::default();
        let user = LimitsConfig {
            publish_msgs_per_sec: Some(100.0),
            ..Default::default()
        };
        let m = q.meters("acme", LimitsConfig::default(), "carol", user);
        // The burst (10 messages) and 40 more in one append: held back ~0.4 s.
        let at = m.publish_at(50, 5_000).expect("held back");
        let wait = at.saturating_duration_since(Instant::now()).as_secs_f64();
        assert!((0.3..=0.41).contains(&wait), "{wait}");
        let usage = m.user.usage();
        assert_eq!((usage.published_msgs, usage.throttled_msgs), (50, 50));
    }
}
