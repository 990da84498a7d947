//! Operation tokens: the table that matches a long host operation with its completion.
//!
//! Every long host call (`publish`, `subscribe`, `kv-get`, `claim`, ...) carries a token the
//! plugin chooses, and its outcome comes back later with that token. [`Ops`] allocates the
//! tokens and remembers, per token, what the plugin was doing, typed by the plugin's own op
//! enum; the completion event looks the token up and takes the op back. Plugin-chosen tokens
//! keep the machine pure: no host-assigned id has to be waited for, and a completion with a
//! token the table does not know (late, duplicated, forged by a bug) is simply `None`.
//!
//! Guarantees: a token is never handed out twice while its op is in flight (allocation skips
//! tokens still in the table, and never yields 0, which plugins may use for one-off calls);
//! a completed token is forgotten at once. Bounded by the plugin: the table holds exactly the
//! ops it started and has not completed.

use std::collections::HashMap;

/// Tokens of the long host operations in flight, each with what it was for (`O`, the
/// plugin's op enum).
///
/// ```
/// use magnetar_sdk::ops::Ops;
///
/// #[derive(Debug, PartialEq)]
/// enum Op { Publish { packet_id: u16 }, LoadSession }
///
/// let mut ops = Ops::new();
/// let publish = ops.start(Op::Publish { packet_id: 7 });
/// let load = ops.start(Op::LoadSession);
/// assert_ne!(publish, load);
/// assert_eq!(ops.get(load), Some(&Op::LoadSession));
/// // The completion event carries the token back.
/// assert_eq!(ops.complete(publish), Some(Op::Publish { packet_id: 7 }));
/// assert_eq!(ops.complete(publish), None, "completed once only");
/// ```
#[derive(Debug, Clone)]
pub struct Ops<O> {
    next: u64,
    in_flight: HashMap<u64, O>,
}

impl<O> Default for Ops<O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<O> Ops<O> {
    /// An empty table; the first token is 1.
    pub fn new() -> Self {
        Ops {
            next: 1,
            in_flight: HashMap::new(),
        }
    }

    /// A fresh token not tied to an op, e.g. for a timer whose identity the plugin keeps
    /// itself. It is never one of the tokens in flight.
    ///
    /// ```
    /// let mut ops = magnetar_sdk::ops::Ops::<()>::new();
    /// let timer = ops.token();
    /// assert_ne!(ops.start(()), timer);
    /// ```
    pub fn token(&mut self) -> u64 {
        loop {
            let t = self.next;
            self.next = self.next.wrapping_add(1);
            if t != 0 && !self.in_flight.contains_key(&t) {
                return t;
            }
        }
    }

    /// Starts an op: its token, to pass to the host call.
    pub fn start(&mut self, op: O) -> u64 {
        let t = self.token();
        self.in_flight.insert(t, op);
        t
    }

    /// The op of a token still in flight.
    ///
    /// ```
    /// let mut ops = magnetar_sdk::ops::Ops::new();
    /// let t = ops.start("kv-get");
    /// assert_eq!(ops.get(t), Some(&"kv-get"));
    /// assert_eq!(ops.get(t + 1), None);
    /// ```
    pub fn get(&self, token: u64) -> Option<&O> {
        self.in_flight.get(&token)
    }

    /// Completes a token: its op, which the table forgets; `None` for a token not in flight.
    pub fn complete(&mut self, token: u64) -> Option<O> {
        self.in_flight.remove(&token)
    }

    /// Completes a token only if its op satisfies `pred` (e.g. is of the expected kind), so
    /// that a completion arriving for the wrong kind of op leaves the table as it was.
    ///
    /// ```
    /// let mut ops = magnetar_sdk::ops::Ops::new();
    /// let t = ops.start("publish");
    /// assert_eq!(ops.complete_if(t, |op| *op == "auth"), None);
    /// assert_eq!(ops.complete_if(t, |op| *op == "publish"), Some("publish"));
    /// ```
    pub fn complete_if(&mut self, token: u64, pred: impl FnOnce(&O) -> bool) -> Option<O> {
        if self.in_flight.get(&token).is_some_and(pred) {
            self.in_flight.remove(&token)
        } else {
            None
        }
    }

    /// Ops in flight.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether no op is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Frees the table's memory once it is empty again, so that an idle connection holds no
    /// spare slots (10,000 idle connections are the norm for an IoT fleet).
    ///
    /// ```
    /// let mut ops = magnetar_sdk::ops::Ops::new();
    /// let t = ops.start(());
    /// ops.complete(t);
    /// ops.release_idle_capacity();
    /// assert!(ops.is_empty());
    /// ```
    pub fn release_idle_capacity(&mut self) {
        if self.in_flight.is_empty() && self.in_flight.capacity() > 0 {
            self.in_flight = HashMap::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_start_at_one_and_are_distinct() {
        let mut ops = Ops::new();
        let tokens: Vec<u64> = (0..100).map(|i| ops.start(i)).collect();
        assert_eq!(tokens.first(), Some(&1));
        let mut sorted = tokens.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 100);
        assert_eq!(ops.len(), 100);
    }

    #[test]
    fn lookup_then_complete_once() {
        let mut ops = Ops::new();
        let a = ops.start('a');
        let b = ops.start('b');
        assert_eq!(ops.get(a), Some(&'a'));
        assert_eq!(ops.complete(b), Some('b'));
        assert_eq!(ops.get(b), None);
        assert_eq!(ops.complete(b), None, "a second completion is unknown");
        assert_eq!(ops.complete(12345), None, "a token never issued is unknown");
        assert_eq!(ops.complete(a), Some('a'));
        assert!(ops.is_empty());
    }

    #[test]
    fn a_wrong_kind_of_completion_keeps_the_op() {
        let mut ops = Ops::new();
        let t = ops.start(1u8);
        assert_eq!(ops.complete_if(t, |op| *op == 2), None);
        assert_eq!(ops.get(t), Some(&1));
        assert_eq!(ops.complete_if(t, |op| *op == 1), Some(1));
    }

    #[test]
    fn tokens_are_not_reused_while_in_flight_even_after_wrapping() {
        let mut ops = Ops::new();
        let first = ops.start("long");
        ops.next = u64::MAX;
        assert_eq!(ops.start("x"), u64::MAX);
        // Wraps: skips 0 (reserved) and the token still in flight.
        let t = ops.start("y");
        assert_ne!(t, 0);
        assert_ne!(t, first);
        assert_eq!(ops.get(first), Some(&"long"));
        // Once completed, a token may come round again.
        ops.complete(first);
        ops.next = first;
        assert_eq!(ops.token(), first);
    }

    #[test]
    fn bare_tokens_do_not_collide_with_ops() {
        let mut ops = Ops::new();
        let op = ops.start(());
        let timer = ops.token();
        assert_ne!(op, timer);
        assert_eq!(ops.get(timer), None);
    }

    #[test]
    fn idle_capacity_is_released() {
        let mut ops = Ops::new();
        let tokens: Vec<u64> = (0..64).map(|_| ops.start(())).collect();
        ops.release_idle_capacity();
        assert!(
            ops.in_flight.capacity() >= 64,
            "kept while ops are in flight"
        );
        for t in tokens {
            ops.complete(t);
        }
        ops.release_idle_capacity();
        assert_eq!(ops.in_flight.capacity(), 0);
    }
}
