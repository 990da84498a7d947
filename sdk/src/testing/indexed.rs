//! The simulated host's indexed topics (ABI 0.2.3 `indexed` and `topics`): per topic, a log
//! of entries whose messages take consecutive indexes from 0, readers of whole entries, and
//! the namespace's topics with their partition counts.

use std::collections::BTreeMap;

use crate::{
    Appended, Bounds, DedupSpec, Entry, EntryAt, EntryMessage, ErrorKind, OpError, Position,
    ReaderSpec, RecordOut, SubId, TopicInfo,
};

/// The embedded broker's limit on a topic's partitions, kept here so that a plugin's tests
/// meet the refusal the gateway would give.
const MAX_PARTITIONS: u32 = 1_000;
const TOO_MANY_PARTITIONS: &str = "partitions must be 1..=1000";

/// One stored entry.
#[derive(Debug, Clone)]
pub(super) struct SimEntry {
    /// Its number among every entry stored: its id is `message_id` of it.
    pub(super) number: u64,
    /// Index of its first message.
    pub(super) first_index: u64,
    pub(super) time_ms: u64,
    pub(super) producer: String,
    pub(super) sequence_id: u64,
    pub(super) messages: Vec<EntryMessage>,
}

/// A reader of one topic's entries.
#[derive(Debug)]
pub(super) struct SimReader {
    topic: String,
    /// Place in the topic's log of the next entry to hand out.
    next: usize,
    window: usize,
    /// Handed out, not acked: delivery id → place in the log.
    unacked: BTreeMap<u64, usize>,
    pub(super) acked: Vec<u64>,
}

/// Indexed topics, readers and the topic list.
#[derive(Debug, Default)]
pub(super) struct Indexed {
    pub(super) logs: BTreeMap<String, Vec<SimEntry>>,
    /// Next index per topic (indexes never go back, even after a topic's entries go).
    next_index: BTreeMap<String, u64>,
    next_entry: u64,
    /// Per (topic, producer name): the next sequence id expected and the last five
    /// appends stored (first and last sequence id, the answer), as the host keeps them.
    dedup: BTreeMap<(String, String), ProducerSequences>,
    pub(super) readers: BTreeMap<SubId, SimReader>,
    pub(super) topics: BTreeMap<String, u32>,
}

/// A de-duplicating producer's next sequence id and its last appends (first and last
/// sequence id, the answer).
type ProducerSequences = (u64, Vec<(u64, u64, Appended)>);

/// The simulated id of entry `number` (the same shape as [`super::message_id`]).
fn entry_id(number: u64) -> Vec<u8> {
    super::message_id(number)
}

fn error(kind: ErrorKind, message: &str) -> OpError {
    OpError {
        kind,
        message: message.into(),
    }
}

impl Indexed {
    /// Stores one entry; `None` if it is a duplicate of what `dedup`'s producer stored.
    pub(super) fn append(
        &mut self,
        now_ms: u64,
        topic: &str,
        records: Vec<RecordOut>,
        dedup: Option<DedupSpec>,
    ) -> Result<Appended, OpError> {
        if records.is_empty() {
            return Err(error(ErrorKind::InvalidName, "an entry needs a record"));
        }
        let n = records.len() as u64;
        let wrap = 1u64 << 31;
        let (producer, sequence_id, dedup_key) = match dedup {
            Some(d) => {
                let key = (topic.to_string(), d.name.clone());
                let last = (d.first_sequence + n - 1) % wrap;
                if let Some((next, recent)) = self.dedup.get(&key) {
                    if d.first_sequence != *next {
                        return match recent
                            .iter()
                            .find(|(f, l, _)| *f == d.first_sequence && *l == last)
                        {
                            Some((_, _, a)) => Ok(Appended {
                                duplicate: true,
                                ..a.clone()
                            }),
                            None => Err(error(
                                ErrorKind::InvalidName,
                                &format!(
                                    "out-of-order sequence: {} expected {next}, got {}",
                                    d.name, d.first_sequence
                                ),
                            )),
                        };
                    }
                }
                (
                    d.name,
                    d.first_sequence,
                    Some((key, d.first_sequence, last)),
                )
            }
            None => ("sim".to_string(), self.next_entry, None),
        };
        let messages = records
            .into_iter()
            .map(|r| EntryMessage {
                key: r.key,
                value: r.value,
                properties: r.properties,
                event_time_ms: r.event_time_ms,
            })
            .collect();
        let entry = self.push(now_ms, topic, producer, sequence_id, messages);
        let appended = Appended {
            id: entry_id(entry.number),
            first_index: entry.first_index,
            broker_time_ms: entry.time_ms,
            duplicate: false,
        };
        if let Some((key, first, last)) = dedup_key {
            let (next, recent) = self.dedup.entry(key).or_default();
            *next = (last + 1) % wrap;
            if recent.len() == 5 {
                recent.remove(0);
            }
            recent.push((first, last, appended.clone()));
        }
        Ok(appended)
    }

    /// Stores an entry of `messages` (at least one) at the end of `topic`'s log.
    pub(super) fn push(
        &mut self,
        now_ms: u64,
        topic: &str,
        producer: String,
        sequence_id: u64,
        messages: Vec<EntryMessage>,
    ) -> SimEntry {
        let next = self.next_index.entry(topic.to_string()).or_default();
        let entry = SimEntry {
            number: self.next_entry,
            first_index: *next,
            time_ms: now_ms,
            producer,
            sequence_id,
            messages,
        };
        *next += entry.messages.len() as u64;
        self.next_entry += 1;
        self.logs
            .entry(topic.to_string())
            .or_default()
            .push(entry.clone());
        entry
    }

    /// Where in `topic`'s log a reader at `position` starts.
    fn place(&self, topic: &str, position: &Position) -> usize {
        let log = self.logs.get(topic).map_or(&[][..], Vec::as_slice);
        match position {
            Position::Earliest => 0,
            Position::Latest => log.len(),
            Position::MessageId(at) => {
                let number = super::seq_of(&at.id).unwrap_or(0);
                log.iter()
                    .position(|e| e.number > number || (at.inclusive && e.number == number))
                    .unwrap_or(log.len())
            }
            Position::PublishTime(t) => log
                .iter()
                .position(|e| e.time_ms >= *t)
                .unwrap_or(log.len()),
        }
    }

    pub(super) fn open_reader(&mut self, id: SubId, spec: ReaderSpec) {
        let next = self.place(&spec.topic, &spec.start);
        self.readers.insert(
            id,
            SimReader {
                topic: spec.topic,
                next,
                window: usize::try_from(spec.max_unacked_entries.max(1)).unwrap_or(usize::MAX),
                unacked: BTreeMap::new(),
                acked: Vec::new(),
            },
        );
    }

    /// Moves a reader; `false` if there is no such reader.
    pub(super) fn seek(&mut self, id: SubId, position: &Position) -> bool {
        let Some(topic) = self.readers.get(&id).map(|r| r.topic.clone()) else {
            return false;
        };
        let next = self.place(&topic, position);
        if let Some(r) = self.readers.get_mut(&id) {
            r.next = next;
            r.unacked.clear();
        }
        true
    }

    /// The id of a reader's topic's last entry; `None` if there is no such reader.
    pub(super) fn last_id(&self, id: SubId) -> Option<Option<Vec<u8>>> {
        let r = self.readers.get(&id)?;
        Some(
            self.logs
                .get(&r.topic)
                .and_then(|log| log.last())
                .map(|e| entry_id(e.number)),
        )
    }

    /// Acks a reader's entry; `false` if there is no such reader.
    pub(super) fn ack(&mut self, id: SubId, delivery_id: u64) -> bool {
        let Some(r) = self.readers.get_mut(&id) else {
            return false;
        };
        if r.unacked.remove(&delivery_id).is_some() {
            r.acked.push(delivery_id);
        }
        true
    }

    /// The entries each reader's window lets out now, by reader; `next_delivery` numbers them.
    pub(super) fn deliver(&mut self, next_delivery: &mut u64) -> Vec<Vec<Entry>> {
        let mut batches = Vec::new();
        for (&id, r) in self.readers.iter_mut() {
            let log = self.logs.get(&r.topic).map_or(&[][..], Vec::as_slice);
            let mut batch = Vec::new();
            while r.unacked.len() < r.window && r.next < log.len() {
                let e = &log[r.next];
                let delivery_id = *next_delivery;
                *next_delivery += 1;
                r.unacked.insert(delivery_id, r.next);
                r.next += 1;
                batch.push(Entry {
                    reader: id,
                    delivery_id,
                    id: entry_id(e.number),
                    first_index: Some(e.first_index),
                    broker_time_ms: Some(e.time_ms),
                    publish_time_ms: e.time_ms,
                    producer: e.producer.clone(),
                    sequence_id: e.sequence_id,
                    messages: e.messages.clone(),
                });
            }
            if !batch.is_empty() {
                batches.push(batch);
            }
        }
        batches
    }

    /// The id of the entry holding message `index` of `topic`.
    pub(super) fn locate(&self, topic: &str, index: u64) -> Option<Vec<u8>> {
        self.logs
            .get(topic)?
            .iter()
            .find(|e| index >= e.first_index && index < e.first_index + e.messages.len() as u64)
            .map(|e| entry_id(e.number))
    }

    pub(super) fn bounds(&self, topic: &str) -> Bounds {
        let log = self.logs.get(topic).map_or(&[][..], Vec::as_slice);
        Bounds {
            first: log.first().map(|e| EntryAt {
                id: entry_id(e.number),
                index: e.first_index,
            }),
            last: log.last().map(|e| EntryAt {
                id: entry_id(e.number),
                index: e.first_index + e.messages.len() as u64 - 1,
            }),
        }
    }

    pub(super) fn create(
        &mut self,
        topic: String,
        partitions: u32,
    ) -> Result<Vec<TopicInfo>, OpError> {
        if self.topics.contains_key(&topic) {
            return Err(error(ErrorKind::InvalidName, "the topic exists"));
        }
        if partitions > MAX_PARTITIONS {
            return Err(error(ErrorKind::Backend, TOO_MANY_PARTITIONS));
        }
        self.topics.insert(topic.clone(), partitions);
        Ok(vec![TopicInfo {
            name: topic,
            partitions,
        }])
    }

    pub(super) fn delete(&mut self, topic: &str) -> Result<Vec<TopicInfo>, OpError> {
        self.topics
            .remove(topic)
            .ok_or_else(|| error(ErrorKind::NotFound, "no such topic"))?;
        let partition = format!("{topic}-partition-");
        self.logs
            .retain(|t, _| t != topic && !t.starts_with(&partition));
        Ok(Vec::new())
    }

    pub(super) fn set_partitions(
        &mut self,
        topic: String,
        partitions: u32,
    ) -> Result<Vec<TopicInfo>, OpError> {
        let Some(now) = self.topics.get_mut(&topic) else {
            return Err(error(ErrorKind::NotFound, "no such topic"));
        };
        if partitions > MAX_PARTITIONS {
            return Err(error(ErrorKind::Backend, TOO_MANY_PARTITIONS));
        }
        if *now == 0 || partitions < *now {
            return Err(error(
                ErrorKind::InvalidName,
                "only a partitioned topic's partitions can be added to",
            ));
        }
        *now = partitions;
        Ok(vec![TopicInfo {
            name: topic,
            partitions,
        }])
    }

    pub(super) fn describe(&self, names: &[String]) -> Vec<TopicInfo> {
        self.topics
            .iter()
            .filter(|(name, _)| names.is_empty() || names.contains(name))
            .map(|(name, &partitions)| TopicInfo {
                name: name.clone(),
                partitions,
            })
            .collect()
    }
}

/// The entries of a log as plain values, for assertions.
pub(super) fn entries_of(log: &[SimEntry]) -> Vec<(u64, Vec<EntryMessage>)> {
    log.iter()
        .map(|e| (e.first_index, e.messages.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::machine::{Action, Event, Machine};
    use crate::outbox::Outbox;
    use crate::testing::SimHost;
    use crate::{
        DedupSpec, ErrorKind, MessageIdAt, OutboundMessage, Position, ReaderSpec, RecordOut,
    };

    /// Queues whatever actions the test pushes; records every event.
    #[derive(Default)]
    struct Rec {
        out: Outbox,
        events: Vec<Event>,
    }

    impl Machine for Rec {
        fn apply(&mut self, _now_ms: u64, event: Event) {
            self.events.push(event);
        }
        fn take_actions(&mut self) -> Vec<Action> {
            self.out.take()
        }
    }

    fn host() -> SimHost<Rec> {
        SimHost::new(1_000, Rec::default())
    }

    fn act(host: &mut SimHost<Rec>, action: Action) {
        host.machine_mut().out.push(action);
        // Any event makes the machine hand over its queued actions.
        host.feed(Event::Data(Vec::new()));
        host.run();
    }

    fn records(values: &[&str]) -> Vec<RecordOut> {
        values
            .iter()
            .map(|v| RecordOut {
                key: Some(b"k".to_vec()),
                value: Some(v.as_bytes().to_vec()),
                properties: Vec::new(),
                event_time_ms: None,
            })
            .collect()
    }

    fn append(host: &mut SimHost<Rec>, token: u64, topic: &str, values: &[&str]) {
        act(
            host,
            Action::Append {
                token,
                topic: topic.into(),
                records: records(values),
                dedup: None,
            },
        );
    }

    fn appended(host: &SimHost<Rec>) -> Vec<(u64, u64)> {
        host.machine()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Appended {
                    token,
                    result: Ok(a),
                } => Some((*token, a.first_index)),
                _ => None,
            })
            .collect()
    }

    fn entries(host: &SimHost<Rec>) -> Vec<(u64, Option<u64>, usize)> {
        host.machine()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Entry(e) => Some((e.delivery_id, e.first_index, e.messages.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn appends_take_consecutive_indexes_per_topic() {
        let mut host = host();
        append(&mut host, 1, "t-partition-0", &["a", "b", "c"]);
        append(&mut host, 2, "t-partition-1", &["x"]);
        append(&mut host, 3, "t-partition-0", &["d", "e"]);
        assert_eq!(appended(&host), vec![(1, 0), (2, 0), (3, 3)]);
        let stored = host.entries("t-partition-0");
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[1].0, 3);
        assert_eq!(stored[1].1[1].value.as_deref(), Some(&b"e"[..]));
        // A publish of another protocol is an entry of the same log.
        host.produce(OutboundMessage {
            topic: "t-partition-0".into(),
            key: None,
            payload: b"mqtt".to_vec(),
            properties: Vec::new(),
        });
        assert_eq!(host.entries("t-partition-0")[2].0, 5);
        assert_eq!(host.append("t-partition-0", records(&["f"])), 6);
    }

    #[test]
    fn a_repeated_dedup_append_is_a_duplicate() {
        let mut host = host();
        let dedup = DedupSpec {
            name: "kafka-7-0".into(),
            first_sequence: 0,
        };
        for token in [1, 2] {
            act(
                &mut host,
                Action::Append {
                    token,
                    topic: "t".into(),
                    records: records(&["a", "b"]),
                    dedup: Some(dedup.clone()),
                },
            );
        }
        let dups: Vec<bool> = host
            .machine()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Appended { result: Ok(a), .. } => Some(a.duplicate),
                _ => None,
            })
            .collect();
        assert_eq!(dups, vec![false, true]);
        assert_eq!(host.entries("t").len(), 1);
        // The next batch is stored; the first, repeated, gets its original offsets; a gap
        // is out of order.
        for (token, first) in [(3, 2), (4, 0), (5, 9)] {
            act(
                &mut host,
                Action::Append {
                    token,
                    topic: "t".into(),
                    records: records(&["c", "d"]),
                    dedup: Some(DedupSpec {
                        name: "kafka-7-0".into(),
                        first_sequence: first,
                    }),
                },
            );
        }
        let results: Vec<Result<(u64, bool), String>> = host
            .machine()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Appended { result, .. } => Some(
                    result
                        .as_ref()
                        .map(|a| (a.first_index, a.duplicate))
                        .map_err(|e| e.message.clone()),
                ),
                _ => None,
            })
            .collect();
        assert_eq!(results[2], Ok((2, false)));
        assert_eq!(results[3], Ok((0, true)));
        assert!(
            results[4]
                .as_ref()
                .is_err_and(|m| m.starts_with("out-of-order sequence")),
            "{results:?}"
        );
        assert_eq!(host.entries("t").len(), 2);
    }

    #[test]
    fn readers_hand_out_whole_entries_within_their_window_and_seek() {
        let mut host = host();
        append(&mut host, 1, "t", &["a", "b"]);
        append(&mut host, 2, "t", &["c"]);
        append(&mut host, 3, "t", &["d", "e", "f"]);
        let spec = ReaderSpec {
            topic: "t".into(),
            start: Position::Earliest,
            max_unacked_entries: 2,
        };
        act(&mut host, Action::OpenReader { token: 9, spec });
        let reader = host.readers()[0];
        assert_eq!(
            entries(&host).iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![Some(0), Some(2)],
            "the window holds two entries"
        );
        let first = entries(&host)[0].0;
        act(
            &mut host,
            Action::Ack {
                sub: reader,
                delivery_id: first,
            },
        );
        assert_eq!(
            entries(&host).last().map(|e| (e.1, e.2)),
            Some((Some(3), 3))
        );
        assert_eq!(host.acked(reader), &[first]);

        // Locate the entry of index 4, seek there (inclusive): it comes again.
        act(
            &mut host,
            Action::Locate {
                token: 10,
                topic: "t".into(),
                index: 4,
            },
        );
        let id = host.machine().events.iter().rev().find_map(|e| match e {
            Event::Position {
                token: 10,
                result: Ok(Some(id)),
            } => Some(id.clone()),
            _ => None,
        });
        let id = id.expect("located");
        host.machine_mut().events.clear();
        act(
            &mut host,
            Action::Seek {
                token: 11,
                sub: reader,
                position: Position::MessageId(MessageIdAt {
                    id,
                    inclusive: true,
                }),
            },
        );
        assert_eq!(
            entries(&host).iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![Some(3)]
        );
    }

    #[test]
    fn bounds_and_seek_by_time() {
        let mut host = host();
        act(
            &mut host,
            Action::Bounds {
                token: 1,
                topic: "t".into(),
            },
        );
        append(&mut host, 2, "t", &["a", "b"]);
        host.advance(500);
        append(&mut host, 3, "t", &["c"]);
        act(
            &mut host,
            Action::Bounds {
                token: 4,
                topic: "t".into(),
            },
        );
        let bounds: Vec<_> = host
            .machine()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Bounds { result: Ok(b), .. } => Some((
                    b.first.as_ref().map(|f| f.index),
                    b.last.as_ref().map(|l| l.index),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(bounds, vec![(None, None), (Some(0), Some(2))]);
        let spec = ReaderSpec {
            topic: "t".into(),
            start: Position::PublishTime(1_200),
            max_unacked_entries: 10,
        };
        act(&mut host, Action::OpenReader { token: 5, spec });
        assert_eq!(
            entries(&host).iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![Some(2)]
        );
    }

    #[test]
    fn topics_are_created_described_grown_and_deleted() {
        let mut host = host();
        let result = |host: &SimHost<Rec>, t: u64| {
            host.machine().events.iter().find_map(|e| match e {
                Event::TopicsResult { token, result } if *token == t => Some(
                    result
                        .as_ref()
                        .map(|v| {
                            v.iter()
                                .map(|i| (i.name.clone(), i.partitions))
                                .collect::<Vec<_>>()
                        })
                        .map_err(|e| e.kind),
                ),
                _ => None,
            })
        };
        let create = |token, topic: &str, partitions| Action::CreateTopic {
            token,
            topic: topic.into(),
            partitions,
        };
        act(&mut host, create(1, "a", 3));
        act(&mut host, create(2, "b", 0));
        act(&mut host, create(3, "a", 1));
        assert_eq!(result(&host, 1), Some(Ok(vec![("a".into(), 3)])));
        assert_eq!(result(&host, 3), Some(Err(ErrorKind::InvalidName)));
        act(
            &mut host,
            Action::SetPartitions {
                token: 4,
                topic: "a".into(),
                partitions: 5,
            },
        );
        act(
            &mut host,
            Action::SetPartitions {
                token: 5,
                topic: "b".into(),
                partitions: 5,
            },
        );
        assert_eq!(result(&host, 4), Some(Ok(vec![("a".into(), 5)])));
        assert_eq!(result(&host, 5), Some(Err(ErrorKind::InvalidName)));
        act(
            &mut host,
            Action::DescribeTopics {
                token: 6,
                names: Vec::new(),
            },
        );
        assert_eq!(
            result(&host, 6),
            Some(Ok(vec![("a".into(), 5), ("b".into(), 0)]))
        );
        act(
            &mut host,
            Action::DeleteTopic {
                token: 7,
                topic: "a".into(),
            },
        );
        act(
            &mut host,
            Action::DescribeTopics {
                token: 8,
                names: vec!["a".into(), "b".into()],
            },
        );
        assert_eq!(result(&host, 8), Some(Ok(vec![("b".into(), 0)])));
    }
}
