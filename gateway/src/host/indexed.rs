//! Host calls of indexed topics (ABI 0.2.3): `append`, `open-reader`, `locate`, `bounds` —
//! Pulsar's broker-entry index for plugins that number messages (Kafka's offsets).
//!
//! Every topic is a persistent topic of the connection's namespace, checked, sealed at rest
//! and metered as pubsub's. An append is one Pulsar entry, stored by its topic's append task
//! (`appender`), which reads it back to learn its index; a reader is a task of its own
//! (`entry_reader`) handing over whole entries; `bounds` reads the first and the last entry.

use base64::Engine as _;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::appender::{DedupKey, Job, Records, MAX_APPEND_BYTES, MAX_APPEND_RECORDS};
use super::context::{op_error, HostState};
use super::entry_reader::{run_reader, ReaderTask};
use super::event::Event;
use super::pubsub::MAX_UNACKED;
use super::services::Services;
use crate::abi::types::{ErrorKind, OpError};
use crate::abi::v0_2::exports::magnetar::plugin::events2::{AppendResult, Bounds, EntryAt};
use crate::abi::v0_2::magnetar::plugin::indexed::{self, DedupSpec, ReaderSpec, RecordOut};
use crate::abi::v0_2::magnetar::plugin::messaging::Position;
use crate::backend::{OutMessage, SubscribeOptions};
use crate::config::ActionName;
use crate::crypto::KEY_PROPERTY;
use crate::message_id;

/// How long `bounds` waits for the first or last entry it knows is there.
const BOUNDS_READ: std::time::Duration = std::time::Duration::from_secs(5);

/// A record as the backend takes it, and whether its key is base64 of raw bytes (Pulsar's
/// `partition_key_b64_encoded`, for keys that are not UTF-8).
fn backend_record(r: RecordOut) -> (OutMessage, bool) {
    let (key, b64) = match r.key {
        None => (None, false),
        Some(bytes) => match String::from_utf8(bytes) {
            Ok(text) => (Some(text), false),
            Err(e) => (
                Some(base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
                true,
            ),
        },
    };
    let msg = OutMessage {
        key,
        payload: r.value.unwrap_or_default(),
        properties: r
            .properties
            .into_iter()
            .filter(|p| p.key != KEY_PROPERTY)
            .map(|p| (p.key, p.value))
            .collect(),
        encryption: None,
        event_time: r.event_time_ms,
    };
    (msg, b64)
}

impl HostState {
    /// Checks and seals an append; the backend topic, the records, and their bytes.
    fn check_append(
        &self,
        conn: u64,
        topic: &str,
        records: Vec<RecordOut>,
        dedup: Option<DedupSpec>,
    ) -> Result<(String, Records, usize, Option<DedupKey>), OpError> {
        let dedup = match dedup {
            Some(d) if d.name.is_empty() || d.name.len() > 256 => {
                return Err(op_error(
                    ErrorKind::InvalidName,
                    "a de-duplicating producer's name has 1 to 256 bytes",
                ))
            }
            Some(d) => Some(DedupKey {
                name: d.name,
                first_sequence: d.first_sequence,
            }),
            None => None,
        };
        if records.is_empty() || records.len() > MAX_APPEND_RECORDS {
            return Err(op_error(
                ErrorKind::InvalidName,
                format!("an append holds 1 to {MAX_APPEND_RECORDS} records"),
            ));
        }
        if records.iter().any(|r| r.value.is_none()) {
            return Err(op_error(
                ErrorKind::InvalidName,
                "null values are not stored by this gateway yet",
            ));
        }
        let url = self.authorized_topic(conn, topic, ActionName::Produce)?;
        let meters = self.conns.get(&conn).and_then(|s| s.meters.as_ref());
        if meters.is_some_and(|m| m.tenant.storage_full()) {
            return Err(op_error(
                ErrorKind::QuotaExceeded,
                "the tenant's storage quota is used up",
            ));
        }
        let mut bytes = 0;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let (mut msg, b64) = backend_record(r);
            self.services.seal(&url, &mut msg)?;
            if msg.encryption.is_some() {
                // Pulsar's end-to-end format encrypts per entry, not per message of a batch.
                return Err(op_error(
                    ErrorKind::Internal,
                    "indexed appends are not served for tenants sealing in Pulsar's end-to-end format",
                ));
            }
            bytes += msg.payload.len();
            out.push((msg, b64));
        }
        if bytes > MAX_APPEND_BYTES {
            return Err(op_error(
                ErrorKind::InvalidName,
                format!("an append holds at most {MAX_APPEND_BYTES} bytes"),
            ));
        }
        Ok((url, out, bytes, dedup))
    }

    fn append_failed(&self, conn: u64, token: u64, e: OpError) {
        self.complete(Event::Appended {
            conn,
            results: vec![AppendResult {
                token,
                outcome: Err(e),
            }],
        });
    }
}

impl indexed::Host for HostState {
    /// `append`: one entry; completes with `events2.on-appended`.
    fn append(
        &mut self,
        conn: u64,
        token: u64,
        topic: String,
        records: Vec<RecordOut>,
        dedup: Option<DedupSpec>,
    ) {
        let (url, messages, bytes, dedup) = match self.check_append(conn, &topic, records, dedup) {
            Ok(c) => c,
            Err(e) => return self.append_failed(conn, token, e),
        };
        let not_before = self.hold_back(conn, messages.len(), bytes);
        let job = Job {
            conn,
            token,
            messages,
            dedup,
            not_before,
            events: self.events.clone(),
            state: None,
        };
        let queued =
            self.services
                .appenders
                .append(&self.runtime, &self.services.backend, &url, job);
        if let Err(e) = queued {
            self.append_failed(conn, token, e);
        }
    }

    /// `open-reader`: completes with `on-subscribe-result`, then `events2.on-entries`.
    fn open_reader(&mut self, conn: u64, token: u64, spec: ReaderSpec) {
        let checked = (|| {
            let topic = self.authorized_topic(conn, &spec.topic, ActionName::Consume)?;
            let (earliest, start_message_id, skip, seek_time) = match spec.start {
                Position::Earliest => (true, None, None, None),
                Position::Latest => (false, None, None, None),
                Position::MessageId(at) => {
                    let id = message_id::decode(&at.id)
                        .map_err(|e| op_error(ErrorKind::InvalidName, e.to_string()))?;
                    if message_id::is_sentinel(&id) {
                        (id == message_id::earliest(), None, None, None)
                    } else {
                        (false, Some(id.clone()), Some((id, at.inclusive)), None)
                    }
                }
                Position::PublishTime(t) => (true, None, None, Some(t)),
            };
            let opts = SubscribeOptions {
                subscription: format!("reader-{conn}-{}", self.next_sub),
                topic,
                sub_type: pulsar::SubType::Exclusive,
                durable: false,
                earliest,
                receiver_queue: MAX_UNACKED.min(1000),
                start_message_id,
                dead_letter: None,
                consumer_name: None,
            };
            let meters = self.admit_subscription(conn)?;
            Ok((opts, skip, seek_time, meters))
        })();
        let (opts, skip, seek_time, meters) = match checked {
            Ok(c) => c,
            Err(e) => {
                return self.complete(Event::SubscribeResult {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        let window = spec.max_unacked_entries.clamp(1, MAX_UNACKED) as usize;
        let (cmd_tx, cmd_rx) = mpsc::channel(window + 16);
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        slot.subs.insert(sub, cmd_tx);
        let task = run_reader(
            ReaderTask {
                conn,
                sub,
                token,
                window,
                events: self.events.clone(),
                shared: slot.shared.clone(),
                services: self.services.clone(),
                meters,
                skip,
                seek_time,
            },
            opts,
            cmd_rx,
        );
        self.runtime.spawn(task);
    }

    /// `locate`: this gateway keeps no index of entries yet, and asks no backend lookup:
    /// always `none` (the plugin seeks and reads instead).
    fn locate(&mut self, conn: u64, token: u64, topic: String, _index: u64) {
        let outcome = self
            .authorized_topic(conn, &topic, ActionName::Consume)
            .map(|_| None);
        self.complete(Event::Position {
            conn,
            token,
            outcome,
        });
    }

    /// `bounds`: completes with `events2.on-bounds`.
    fn bounds(&mut self, conn: u64, token: u64, topic: String) {
        let url = match self.authorized_topic(conn, &topic, ActionName::Consume) {
            Ok(u) => u,
            Err(e) => {
                return self.complete(Event::Bounds {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        let services = self.services.clone();
        let events = self.events.clone();
        self.runtime.spawn(async move {
            let outcome = Box::pin(bounds_of(&services, &url, conn)).await;
            let _ = events
                .send(Event::Bounds {
                    conn,
                    token,
                    outcome,
                })
                .await;
        });
    }
}

/// The first message of a reader of `topic` opened at `start` (`None`: earliest): its
/// entry's id, index of its first message and index of its last.
async fn first_entry(
    services: &Services,
    topic: &str,
    name: String,
    start: Option<pulsar::proto::MessageIdData>,
) -> Result<(Vec<u8>, u64, u64), OpError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        op_error(ErrorKind::Backend, format!("{what} of {topic}: {e}"))
    };
    let mut reader = services
        .backend
        .subscribe(&SubscribeOptions {
            topic: topic.to_string(),
            subscription: name,
            sub_type: pulsar::SubType::Exclusive,
            durable: false,
            earliest: true,
            receiver_queue: 1,
            start_message_id: start,
            dead_letter: None,
            consumer_name: None,
        })
        .await
        .map_err(|e| failed("reading the bounds", &e))?;
    let got = tokio::time::timeout(BOUNDS_READ, reader.next()).await;
    let _ = reader.close().await;
    let m = match got {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => return Err(failed("reading the bounds", &e)),
        Ok(None) | Err(_) => {
            return Err(failed("reading the bounds", &"no entry came back in time"))
        }
    };
    let index = m
        .payload
        .broker_entry
        .as_ref()
        .and_then(|b| b.index)
        .ok_or_else(|| {
            failed(
                "bounds",
                &"the entry has no index (broker-entry metadata is off)",
            )
        })?;
    let count =
        u64::try_from(m.payload.metadata.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1);
    let id = &m.message_id.id;
    let id = pulsar::proto::MessageIdData {
        ledger_id: id.ledger_id,
        entry_id: id.entry_id,
        partition: id.partition,
        ..Default::default()
    };
    Ok((
        message_id::encode(&id),
        (index + 1).saturating_sub(count),
        index,
    ))
}

/// The first and last stored entries of `topic`.
async fn bounds_of(services: &Services, topic: &str, conn: u64) -> Result<Bounds, OpError> {
    let name = |what: &str| format!("bounds-{what}-{conn}-{:08x}", rand::random::<u32>());
    // The last entry's id first: none means an empty topic.
    let mut probe = services
        .backend
        .subscribe(&SubscribeOptions {
            topic: topic.to_string(),
            subscription: name("last"),
            sub_type: pulsar::SubType::Exclusive,
            durable: false,
            earliest: false,
            receiver_queue: 1,
            start_message_id: None,
            dead_letter: None,
            consumer_name: None,
        })
        .await
        .map_err(|e| op_error(ErrorKind::Backend, format!("bounds of {topic}: {e}")))?;
    let last = probe.get_last_message_id().await;
    let _ = probe.close().await;
    let last = last
        .map_err(|e| op_error(ErrorKind::Backend, format!("bounds of {topic}: {e}")))?
        .into_iter()
        .next()
        .filter(|id| id.entry_id != u64::MAX && id.ledger_id != u64::MAX);
    let Some(last) = last else {
        return Ok(Bounds {
            first: None,
            last: None,
        });
    };
    let last_at = pulsar::proto::MessageIdData {
        ledger_id: last.ledger_id,
        entry_id: last.entry_id,
        partition: last.partition,
        ..Default::default()
    };
    let (first_id, first_index, _) = first_entry(services, topic, name("first"), None).await?;
    let (last_id, _, last_index) = first_entry(services, topic, name("end"), Some(last_at)).await?;
    Ok(Bounds {
        first: Some(EntryAt {
            id: first_id,
            index: first_index,
        }),
        last: Some(EntryAt {
            id: last_id,
            index: last_index,
        }),
    })
}
