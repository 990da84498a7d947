//! Transactions (§1.9, the `tx` class) as RabbitMQ 3.x runs them (`rabbit_channel`):
//! after `tx.select`, the channel's publishes and acknowledgements (`basic.ack`, `nack`,
//! `reject`) wait; `tx.commit` carries them out and answers `commit-ok` once every message
//! is stored; `tx.rollback` drops the publishes and gives the acknowledged deliveries back
//! to the channel, unacknowledged. A channel is either transactional or in confirm mode:
//! asking for the other is 406 PRECONDITION_FAILED, as is `commit`/`rollback` on a channel
//! that never selected `tx`.
//!
//! Differences from RabbitMQ: a `mandatory` message that no queue takes comes back
//! (`basic.return`) when it is published, not at the commit (the gateway decides
//! routability when it receives a message); a commit's messages are each stored
//! atomically, not all or none (a crash during a commit may keep some of them — RabbitMQ's
//! transactions are not atomic across queues either).

use super::*;

/// Deliveries settled together, by delivery tag.
type Settled = Vec<(u64, Unacked)>;

/// A transactional channel's pending work.
#[derive(Debug, Default)]
pub(crate) struct Tx {
    /// Messages published since the last commit or rollback, in order.
    publishes: Vec<(ContentDone, ExchangeType)>,
    /// Deliveries acknowledged (`None`), or rejected (`Some(requeue)`), in order.
    settles: Vec<(Settled, Option<bool>)>,
    /// Messages of the commit being stored.
    storing: usize,
}

impl AmqpConnection {
    pub(in crate::connection) fn tx_method(&mut self, channel: u16, m: Method) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let refuse = |s: &mut Self, text: &str, m: &Method| {
            let e = ConnError::new(PRECONDITION_FAILED, text);
            s.close_channel(channel, e.caused_by(m));
        };
        match &m {
            Method::TxSelect(_) if state.confirm => {
                refuse(self, "cannot switch from confirm to tx mode", &m)
            }
            Method::TxSelect(_) => {
                state.tx.get_or_insert_with(Box::default);
                self.send_method(channel, Method::TxSelectOk(TxSelectOk {}));
            }
            Method::TxCommit(_) | Method::TxRollback(_) if state.tx.is_none() => {
                refuse(self, "channel is not transactional", &m)
            }
            Method::TxRollback(_) => {
                if let Some(tx) = state.tx.as_mut() {
                    tx.publishes.clear();
                    for (settled, _) in tx.settles.drain(..) {
                        state.unacked.extend(settled);
                    }
                }
                self.send_method(channel, Method::TxRollbackOk(TxRollbackOk {}));
            }
            Method::TxCommit(_) => self.tx_commit(channel),
            _ => {}
        }
    }

    /// Whether `channel` is transactional: its publish waits for the commit.
    pub(super) fn tx_holds_publish(
        &mut self,
        channel: u16,
        content: ContentDone,
        kind: ExchangeType,
    ) -> Option<(ContentDone, ExchangeType)> {
        match self.channels.get_mut(&channel).and_then(|s| s.tx.as_mut()) {
            Some(tx) => {
                tx.publishes.push((content, kind));
                None
            }
            None => Some((content, kind)),
        }
    }

    /// Whether `channel` is transactional: its acknowledgements wait for the commit.
    pub(super) fn tx_holds_settle(
        &mut self,
        channel: u16,
        settled: Settled,
        requeue: Option<bool>,
    ) -> Option<Settled> {
        match self.channels.get_mut(&channel).and_then(|s| s.tx.as_mut()) {
            Some(tx) => {
                tx.settles.push((settled, requeue));
                None
            }
            None => Some(settled),
        }
    }

    fn tx_commit(&mut self, channel: u16) {
        let Some(tx) = self.channels.get_mut(&channel).and_then(|s| s.tx.as_mut()) else {
            return;
        };
        let publishes = std::mem::take(&mut tx.publishes);
        let settles = std::mem::take(&mut tx.settles);
        tx.storing = publishes.len();
        for (settled, requeue) in settles {
            self.apply_settle(settled.into_iter().map(|(_, u)| u), requeue);
        }
        if publishes.is_empty() {
            return self.send_method(channel, Method::TxCommitOk(TxCommitOk {}));
        }
        for (content, kind) in publishes {
            let properties = message_properties(&content, kind);
            let token = self.ops.start(Op::TxPublish { channel });
            self.publish_issued();
            self.out.push(Action::PublishCapped {
                token,
                msg: OutboundMessage {
                    topic: topology::SOURCE.into(),
                    key: None,
                    payload: content.body,
                    properties,
                },
            });
        }
        // `commit-ok` once they are stored; later methods wait behind it.
        self.busy = true;
    }

    /// A message of a commit is stored (or not).
    pub(in crate::connection) fn on_tx_published(
        &mut self,
        channel: u16,
        result: Result<(), OpError>,
    ) {
        self.publish_completed();
        let Some(tx) = self
            .channels
            .get_mut(&channel)
            .filter(|s| !s.closing)
            .and_then(|s| s.tx.as_mut())
        else {
            self.busy = false;
            return;
        };
        if tx.storing == 0 {
            return;
        }
        match result {
            Ok(()) => {
                tx.storing -= 1;
                if tx.storing == 0 {
                    self.busy = false;
                    self.send_method(channel, Method::TxCommitOk(TxCommitOk {}));
                }
            }
            Err(e) => {
                tx.storing = 0;
                self.busy = false;
                let err = ConnError::new(INTERNAL_ERROR, format!("commit: {}", e.message));
                self.close_channel(channel, err.caused_by(&Method::TxCommit(TxCommit {})));
            }
        }
    }
}
