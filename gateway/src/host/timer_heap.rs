//! [`TimerHeap`]: the deadlines of an instance's timers, apart from the task that sleeps on
//! them (`timer_task`). One heap per instance rather than a task per timer: every MQTT
//! connection keeps a keep-alive timer.
//!
//! Timers fire in deadline order; timers due at the same instant fire in the order they were
//! armed.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use tokio::time::Instant;

/// Armed timers, soonest first.
pub(super) struct TimerHeap<T> {
    due: BinaryHeap<Reverse<Armed<T>>>,
    /// Arming order, which breaks ties between equal deadlines.
    armed: u64,
}

impl<T> Default for TimerHeap<T> {
    fn default() -> Self {
        TimerHeap {
            due: BinaryHeap::new(),
            armed: 0,
        }
    }
}

impl<T> TimerHeap<T> {
    /// Arms a timer due at `at`.
    pub(super) fn arm(&mut self, at: Instant, item: T) {
        self.armed += 1;
        self.due.push(Reverse(Armed {
            at,
            seq: self.armed,
            item,
        }));
    }

    /// When the soonest timer is due, if any is armed.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.due.peek().map(|t| t.0.at)
    }

    /// The soonest timer, if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_deadline()? > now {
            return None;
        }
        self.due.pop().map(|t| t.0.item)
    }
}

/// A timer in the heap, ordered by (deadline, arming order) only.
struct Armed<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> Armed<T> {
    fn key(&self) -> (Instant, u64) {
        (self.at, self.seq)
    }
}

impl<T> PartialEq for Armed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl<T> Eq for Armed<T> {}

impl<T> PartialOrd for Armed<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Armed<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn drain(heap: &mut TimerHeap<&'static str>, now: Instant) -> Vec<&'static str> {
        std::iter::from_fn(|| heap.pop_due(now)).collect()
    }

    #[test]
    fn timers_fire_in_deadline_order_and_not_before() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut heap = TimerHeap::default();
        assert_eq!(heap.next_deadline(), None);
        heap.arm(t0 + ms(30), "c");
        heap.arm(t0 + ms(10), "a");
        heap.arm(t0 + ms(20), "b");
        assert_eq!(heap.next_deadline(), Some(t0 + ms(10)));
        assert_eq!(drain(&mut heap, t0 + ms(5)), Vec::<&str>::new());
        assert_eq!(drain(&mut heap, t0 + ms(20)), ["a", "b"]);
        assert_eq!(heap.next_deadline(), Some(t0 + ms(30)));
        assert_eq!(drain(&mut heap, t0 + ms(100)), ["c"]);
        assert_eq!(heap.next_deadline(), None);
    }

    #[test]
    fn equal_deadlines_fire_in_arming_order() {
        let at = Instant::now();
        let mut heap = TimerHeap::default();
        for name in ["first", "second", "third", "fourth"] {
            heap.arm(at, name);
        }
        assert_eq!(drain(&mut heap, at), ["first", "second", "third", "fourth"]);
    }
}
