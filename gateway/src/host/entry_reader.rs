//! Readers of indexed topics (`indexed.open-reader`): a non-durable consumer whose messages
//! are handed to the plugin as whole entries, each with the index of its first message
//! (from the broker-entry metadata the backend connection asked for), never more than the
//! reader's window of unacknowledged entries. Acks, seeks, last-id queries and closing reach
//! it through the same commands as a subscription's task (`SubCmd`), so `pubsub.ack`,
//! `messaging.seek` and `pubsub.unsubscribe` work on it.

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine as _;
use futures::{FutureExt, StreamExt};
use pulsar::proto::MessageIdData;
use tokio::sync::mpsc;

use super::context::op_error;
use super::event::Event;
use super::services::Services;
use super::subscription_task::{
    subscribe_failed, subscribed, SeekTarget, SubCmd, SubscriptionCount,
};
use crate::abi::types::{self, ErrorKind};
use crate::abi::v0_2::exports::magnetar::plugin::events2::{Entry, EntryMessage};
use crate::backend::SubscribeOptions;
use crate::conn_shared::ConnShared;
use crate::message_id;
use crate::quota::Meters;

/// Most entries handed to the worker in one event.
const MAX_ENTRY_BATCH: usize = 64;

/// What a reader's task needs.
pub(super) struct ReaderTask {
    pub(super) conn: u64,
    pub(super) sub: u64,
    pub(super) token: u64,
    /// Most unacknowledged entries.
    pub(super) window: usize,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) shared: Arc<ConnShared>,
    pub(super) services: Arc<Services>,
    pub(super) meters: Option<Meters>,
    /// Entries before this one (and it, unless inclusive) are skipped: the backend starts a
    /// reader at a message id's whole entry.
    pub(super) skip: Option<(MessageIdData, bool)>,
    /// A start by time: a seek right after opening.
    pub(super) seek_time: Option<u64>,
}

/// The messages of an entry read so far.
struct Partial {
    at: (u64, u64),
    expected: usize,
    /// Messages received, those that did not decrypt included.
    seen: usize,
    first: pulsar::consumer::Message<Vec<u8>>,
    messages: Vec<EntryMessage>,
}

/// Opens the reader, reports the outcome, then hands over entries until it or its
/// connection closes.
pub(super) async fn run_reader(
    t: ReaderTask,
    opts: SubscribeOptions,
    mut cmds: mpsc::Receiver<SubCmd>,
) {
    let ReaderTask {
        conn,
        sub,
        token,
        window,
        events,
        shared,
        services,
        meters,
        mut skip,
        seek_time,
    } = t;
    let _counted = SubscriptionCount(meters.clone());
    let backend = services.backend.clone();
    let mut consumer = match backend.subscribe(&opts).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(conn, error = %e, "opening a reader failed");
            subscribe_failed(&events, conn, token, e.to_string()).await;
            return;
        }
    };
    if let Some(t) = seek_time {
        if let Err(e) = seek(&mut consumer, &services, &SeekTarget::PublishTime(t)).await {
            subscribe_failed(&events, conn, token, format!("seek on {}: {e}", opts.topic)).await;
            let _ = consumer.close().await;
            return;
        }
    }
    if !subscribed(&events, conn, token, sub).await {
        return;
    }
    let mut unacked: HashSet<u64> = HashSet::new();
    let mut next_delivery: u64 = 1;
    let mut partial: Option<Partial> = None;
    loop {
        let room = window.saturating_sub(unacked.len());
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                let mut stop = cmd.is_none();
                let mut next = cmd;
                while let Some(c) = next.take() {
                    match c {
                        SubCmd::Ack(id) => { unacked.remove(&id); }
                        SubCmd::AckMany(ids) => ids.iter().for_each(|id| { unacked.remove(id); }),
                        SubCmd::Close { .. } => { stop = true; break; }
                        // Entries are not given back: a reader seeks instead.
                        SubCmd::Nack(_) => {}
                        // For `messaging` consumers of queues only (dropped: no count).
                        SubCmd::Drain | SubCmd::Backlog(_) => {}
                        SubCmd::Seek { token, target } => {
                            let outcome = seek(&mut consumer, &services, &target).await;
                            if outcome.is_ok() {
                                unacked.clear();
                                partial = None;
                                skip = match target {
                                    SeekTarget::MessageId(id, inclusive) if !message_id::is_sentinel(&id) => Some((id, inclusive)),
                                    _ => None,
                                };
                            }
                            let outcome = outcome.map(|()| None).map_err(|e| op_error(ErrorKind::Backend, format!("seek on {}: {e}", opts.topic)));
                            if events.send(Event::Position { conn, token, outcome }).await.is_err() {
                                stop = true;
                            }
                        }
                        SubCmd::LastId { token } => {
                            let outcome = match consumer.get_last_message_id().await {
                                Ok(ids) => Ok(ids.first().filter(|id| id.entry_id != u64::MAX && id.ledger_id != u64::MAX).map(|id| message_id::encode(&entry_id(id)))),
                                Err(e) => Err(op_error(ErrorKind::Backend, format!("last message id of {}: {e}", opts.topic))),
                            };
                            if events.send(Event::Position { conn, token, outcome }).await.is_err() {
                                stop = true;
                            }
                        }
                    }
                    next = cmds.try_recv().ok();
                }
                if stop {
                    break;
                }
            },
            _ = shared.closed() => break,
            msg = consumer.next(), if room > 0 => {
                let mut entries = Vec::new();
                let mut next = Some(msg);
                let mut ended = false;
                while let Some(msg) = next.take() {
                    let m = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => { tracing::warn!(conn, error = %e, "reader failed"); ended = true; break; }
                        None => { ended = true; break; }
                    };
                    let id = &m.message_id.id;
                    let at = (id.ledger_id, id.entry_id);
                    let skipped = skip.as_ref().is_some_and(|(from, inclusive)| {
                        let from = (from.ledger_id, from.entry_id);
                        at < from || (at == from && !inclusive)
                    });
                    if !skipped {
                        skip = None;
                        if let Some(done) = add(&mut partial, m, &services, &opts.topic, meters.as_ref()) {
                            let delivery_id = next_delivery;
                            next_delivery += 1;
                            unacked.insert(delivery_id);
                            entries.push(entry(sub, delivery_id, done));
                        }
                    }
                    if entries.len() < room.min(MAX_ENTRY_BATCH) {
                        next = consumer.next().now_or_never();
                    }
                }
                if !entries.is_empty() {
                    shared.output_relieved().await;
                    if events.send(Event::Entries { conn, entries }).await.is_err() {
                        break;
                    }
                }
                if ended {
                    break;
                }
            }
        }
    }
    let _ = consumer.close().await;
}

/// An entry's id: its message id without batch fields.
fn entry_id(id: &MessageIdData) -> MessageIdData {
    MessageIdData {
        ledger_id: id.ledger_id,
        entry_id: id.entry_id,
        partition: id.partition,
        ..Default::default()
    }
}

/// One message as the plugin gets it (its payload opened if sealed at rest); `None` if it
/// cannot be opened (shredded or damaged: nobody can ever read it).
fn entry_message(
    m: &mut pulsar::consumer::Message<Vec<u8>>,
    services: &Services,
    topic: &str,
    meters: Option<&Meters>,
) -> Option<EntryMessage> {
    let meta = &mut m.payload.metadata;
    let mut properties: Vec<types::Property> = std::mem::take(&mut meta.properties)
        .into_iter()
        .map(|kv| types::Property {
            key: kv.key,
            value: kv.value,
        })
        .collect();
    let key = meta.partition_key.take().map(|k| {
        if meta.partition_key_b64_encoded == Some(true) {
            base64::engine::general_purpose::STANDARD
                .decode(&k)
                .unwrap_or_else(|_| k.into_bytes())
        } else {
            k.into_bytes()
        }
    });
    let null = meta.null_value == Some(true);
    let e2e = Some((
        meta.encryption_keys.as_slice(),
        meta.encryption_param.as_deref().unwrap_or_default(),
    ));
    let event_time_ms = meta.event_time;
    let data = std::mem::take(&mut m.payload.data);
    let payload = match services.unseal(topic, &mut properties, e2e, data) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(topic, error = %e, "skipping a message that does not decrypt");
            return None;
        }
    };
    if let Some(m) = meters {
        m.delivered(payload.len());
    }
    Some(EntryMessage {
        key,
        value: (!null).then_some(payload),
        properties,
        event_time_ms,
    })
}

/// Adds a message to the entry being read; the entry once it is whole.
fn add(
    partial: &mut Option<Partial>,
    mut m: pulsar::consumer::Message<Vec<u8>>,
    services: &Services,
    topic: &str,
    meters: Option<&Meters>,
) -> Option<Partial> {
    let id = &m.message_id.id;
    let at = (id.ledger_id, id.entry_id);
    let expected =
        usize::try_from(m.payload.metadata.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1);
    let message = entry_message(&mut m, services, topic, meters);
    // A new entry (a partial one of a reader moved elsewhere is dropped).
    if partial.as_ref().is_none_or(|p| p.at != at) {
        *partial = Some(Partial {
            at,
            expected,
            seen: 0,
            first: m,
            messages: Vec::with_capacity(expected),
        });
    }
    let p = partial.as_mut()?;
    p.messages.extend(message);
    p.seen += 1;
    if p.seen >= p.expected {
        partial.take()
    } else {
        None
    }
}

fn entry(reader: u64, delivery_id: u64, p: Partial) -> Entry {
    let meta = &p.first.payload.metadata;
    let broker = p.first.payload.broker_entry.as_ref();
    let count = u64::try_from(meta.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1);
    Entry {
        reader,
        delivery_id,
        id: message_id::encode(&entry_id(&p.first.message_id.id)),
        first_index: broker
            .and_then(|b| b.index)
            .map(|i| (i + 1).saturating_sub(count)),
        broker_time_ms: broker.and_then(|b| b.broker_timestamp),
        publish_time_ms: meta.publish_time,
        producer: meta.producer_name.clone(),
        sequence_id: meta.sequence_id,
        messages: p.messages,
    }
}

/// Moves the reader (the backend recreates it at the new position).
async fn seek(
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
    services: &Services,
    target: &SeekTarget,
) -> Result<(), pulsar::Error> {
    let client = services.backend.client().clone();
    match target {
        SeekTarget::MessageId(id, _) => consumer.seek(None, Some(id.clone()), None, client).await,
        SeekTarget::PublishTime(t) => consumer.seek(None, None, Some(*t), client).await,
    }
}
