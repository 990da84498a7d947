//! [`OpQueue`]: the order of a connection's backend operations, apart from the task that runs
//! them (`ops_task`).
//!
//! Operations leave in the order the plugin issued them; the queue is bounded (a full queue
//! hands the operation back, for the plugin to be told at once); at most one task runs a
//! queue, started by the operation that finds none running and stopped only when nothing is
//! queued, so that an operation never waits for a task that has already decided to stop.

use std::collections::VecDeque;

/// A connection's operations waiting to run, in issue order, and whether a task runs them.
pub(super) struct OpQueue<T> {
    ops: VecDeque<T>,
    /// A task is running the operations (there is never more than one).
    running: bool,
}

impl<T> Default for OpQueue<T> {
    fn default() -> Self {
        OpQueue {
            ops: VecDeque::new(),
            running: false,
        }
    }
}

/// What became of an operation offered to the queue.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Queued<T> {
    /// Queued, and no task runs the queue: the caller starts one.
    StartTask,
    /// Queued behind others; the running task takes it (the caller wakes it).
    WakeTask,
    /// The queue holds `limit` operations already: handed back.
    Refused(T),
}

impl<T> OpQueue<T> {
    /// Queues `op` behind the operations already queued, unless `limit` are.
    pub(super) fn push(&mut self, op: T, limit: usize) -> Queued<T> {
        if self.ops.len() >= limit {
            return Queued::Refused(op);
        }
        self.ops.push_back(op);
        if std::mem::replace(&mut self.running, true) {
            Queued::WakeTask
        } else {
            Queued::StartTask
        }
    }

    /// The oldest operation queued.
    pub(super) fn pop(&mut self) -> Option<T> {
        self.ops.pop_front()
    }

    /// Whether the running task may stop: only with nothing queued. Then the queue counts as
    /// stopped (the next `push` starts a task) and gives back its memory.
    pub(super) fn stop_if_idle(&mut self) -> bool {
        if !self.ops.is_empty() {
            return false;
        }
        self.running = false;
        self.ops = VecDeque::new();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_leave_in_issue_order() {
        let mut q = OpQueue::default();
        for op in 1..=5 {
            q.push(op, 10);
        }
        let out: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(out, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_first_operation_starts_the_one_task() {
        let mut q = OpQueue::default();
        assert_eq!(q.push(1, 10), Queued::StartTask);
        assert_eq!(q.push(2, 10), Queued::WakeTask);
        // Taken by the task, which keeps running until it finds the queue empty.
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.push(3, 10), Queued::WakeTask);
    }

    #[test]
    fn a_full_queue_hands_the_operation_back() {
        let mut q = OpQueue::default();
        assert_eq!(q.push("a", 2), Queued::StartTask);
        assert_eq!(q.push("b", 2), Queued::WakeTask);
        assert_eq!(q.push("c", 2), Queued::Refused("c"));
        assert_eq!(q.pop(), Some("a"));
        assert_eq!(q.push("d", 2), Queued::WakeTask);
        assert_eq!(q.pop(), Some("b"));
        assert_eq!(q.pop(), Some("d"));
    }

    #[test]
    fn the_task_stops_only_when_nothing_is_queued() {
        let mut q = OpQueue::default();
        q.push(1, 10);
        assert!(!q.stop_if_idle(), "stopped with an operation queued");
        assert_eq!(q.pop(), Some(1));
        assert!(q.stop_if_idle());
        // Stopped: the next operation starts a new task.
        assert_eq!(q.push(2, 10), Queued::StartTask);
    }
}
