//! The group coordinator with client connections on the SDK's simulated host: each client
//! is a `KafkaConnection` on its own `SimHost` (as on separate instances), the home a
//! `GroupHome` on another; the test carries posts and replies between them, as the host's
//! `homes` does. Requests are encoded and responses decoded by `kafka-protocol`'s client
//! side.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use magnetar_sdk::testing::SimHost;
use magnetar_sdk::{ErrorKind, Event, OpError};

use super::directory::{Broker, Directory};
use super::group::{error, Timing};
use super::GroupHome;
use crate::config::Config;
use crate::connection::KafkaConnection;
use crate::test_wire;

/// One gateway: its homes (one per shard, opened by the first post, as the host's
/// `homes` does) and client connections, each with its namespace.
struct Gw {
    timing: Timing,
    homes: BTreeMap<u32, SimHost<GroupHome>>,
    clients: Vec<(SimHost<KafkaConnection>, String)>,
    /// (shard, post id) -> (client, token).
    routes: HashMap<(u32, u64), (usize, u64)>,
    next_corr: i32,
    /// The shards this gateway holds (`None`: all); posts to others fail `not-owner`.
    held: Option<Vec<u32>>,
}

/// A directory of two gateways: this one (node 1) holds `held`, node 2 the rest.
struct Split {
    held: Vec<u32>,
}

impl Split {
    fn broker(node_id: i32) -> Broker {
        Broker {
            node_id,
            host: "127.0.0.1".into(),
            port: 9090 + node_id,
            local: node_id == 1,
        }
    }
}

impl Directory for Split {
    fn owner(&self, shard: u32) -> Option<Broker> {
        Some(Split::broker(if self.held.contains(&shard) {
            1
        } else {
            2
        }))
    }

    fn brokers(&self) -> Vec<Broker> {
        vec![Split::broker(1), Split::broker(2)]
    }
}

fn timing() -> Timing {
    Timing {
        initial_rebalance_delay_ms: 0,
        ..Timing::default()
    }
}

impl Gw {
    fn new(timing: Timing) -> Gw {
        Gw {
            timing,
            homes: BTreeMap::new(),
            clients: Vec::new(),
            routes: HashMap::new(),
            next_corr: 1,
            held: None,
        }
    }

    /// A gateway holding only `held` of the shards; another (node 2) holds the rest.
    fn holding(timing: Timing, held: Vec<u32>) -> Gw {
        Gw {
            held: Some(held),
            ..Gw::new(timing)
        }
    }

    fn client(&mut self, namespace: &str) -> usize {
        let config = Config::default();
        let mut machine = KafkaConnection::new(config);
        if let Some(held) = &self.held {
            machine = machine.with_directory(Rc::new(Split { held: held.clone() }));
        }
        self.clients
            .push((SimHost::new(1_000, machine), namespace.to_string()));
        self.clients.len() - 1
    }

    /// Carries posts to the home and replies back until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for (i, (c, ns)) in self.clients.iter_mut().enumerate() {
                c.run();
                for (token, domain, shard, payload) in c.take_posts() {
                    moved = true;
                    if self.held.as_ref().is_some_and(|h| !h.contains(&shard)) {
                        c.feed(Event::HomeReply {
                            token,
                            result: Err(OpError {
                                kind: ErrorKind::NotFound,
                                message: "not-owner: the shard is held by node 2".into(),
                            }),
                        });
                        continue;
                    }
                    let timing = self.timing;
                    let home = self
                        .homes
                        .entry(shard)
                        .or_insert_with(|| SimHost::new(1_000, GroupHome::new(timing)));
                    let id = home.post(&domain, shard, ns, payload);
                    self.routes.insert((shard, id), (i, token));
                }
            }
            for (shard, home) in self.homes.iter_mut() {
                for (id, payload) in home.take_replies() {
                    if let Some((i, token)) = self.routes.remove(&(*shard, id)) {
                        self.clients[i].0.feed(Event::HomeReply {
                            token,
                            result: Ok(payload),
                        });
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Moves every clock on by `ms`, in ticks, carrying what happens.
    fn advance(&mut self, ms: u64) {
        let mut left = ms;
        while left > 0 {
            let step = left.min(super::TICK_MS);
            for home in self.homes.values_mut() {
                home.advance(step);
            }
            for (c, _) in self.clients.iter_mut() {
                c.advance(step);
            }
            self.pump();
            left -= step;
        }
    }

    /// Sends a request; its correlation id.
    fn send<Q: Encodable + HeaderVersion>(
        &mut self,
        client: usize,
        key: ApiKey,
        version: i16,
        body: &Q,
    ) -> i32 {
        self.next_corr += 1;
        let corr = self.next_corr;
        let out = test_wire::request(key, version, corr, "client", body);
        self.clients[client].0.data(&out);
        self.pump();
        corr
    }

    /// The response the client sent, if any yet.
    fn receive<R: Decodable + HeaderVersion>(
        &mut self,
        client: usize,
        version: i16,
        corr: i32,
    ) -> Option<R> {
        test_wire::response(&self.clients[client].0.take_sent(), version, corr)
    }

    fn call<Q: Encodable + HeaderVersion, R: Decodable + HeaderVersion>(
        &mut self,
        client: usize,
        key: ApiKey,
        version: i16,
        body: &Q,
    ) -> R {
        let corr = self.send(client, key, version, body);
        self.receive(client, version, corr).unwrap_or_else(|| {
            panic!(
                "no {key:?} answer (closed: {:?})",
                self.clients[client].0.closed()
            )
        })
    }
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn join_req(member: &str, instance: Option<&str>, meta: &[u8]) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(5_000)
        .with_member_id(s(member))
        .with_group_instance_id(instance.map(s))
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::copy_from_slice(meta))])
}

/// A member joined dynamically (KIP-394 round trip included): its member id.
fn join_new(gw: &mut Gw, c: usize) -> i32 {
    let r: JoinGroupResponse = gw.call(c, ApiKey::JoinGroup, 5, &join_req("", None, b"m"));
    assert_eq!(r.error_code, error::MEMBER_ID_REQUIRED);
    assert!(!r.member_id.is_empty());
    gw.send(c, ApiKey::JoinGroup, 5, &join_req(&r.member_id, None, b"m"))
}

fn heartbeat(gw: &mut Gw, c: usize, member: &str, generation: i32) -> i16 {
    let r: HeartbeatResponse = gw.call(
        c,
        ApiKey::Heartbeat,
        4,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_member_id(s(member))
            .with_generation_id(generation),
    );
    r.error_code
}

fn sync(gw: &mut Gw, c: usize, member: &str, generation: i32, assign: Vec<(&str, &[u8])>) -> i32 {
    gw.send(
        c,
        ApiKey::SyncGroup,
        5,
        &SyncGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_member_id(s(member))
            .with_generation_id(generation)
            .with_protocol_type(Some(s("consumer")))
            .with_protocol_name(Some(s("range")))
            .with_assignments(
                assign
                    .into_iter()
                    .map(|(m, a)| {
                        SyncGroupRequestAssignment::default()
                            .with_member_id(s(m))
                            .with_assignment(Bytes::copy_from_slice(a))
                    })
                    .collect(),
            ),
    )
}

#[test]
fn two_members_rebalance_through_join_sync_and_heartbeat() {
    let mut gw = Gw::new(timing());
    let (a, b) = (gw.client("t/ns"), gw.client("t/ns"));

    // A alone: generation 1, leader, its own metadata.
    let corr = join_new(&mut gw, a);
    let ja: JoinGroupResponse = gw
        .receive(a, 5, corr)
        .expect("the barrier completes at once");
    assert_eq!((ja.error_code, ja.generation_id), (0, 1));
    assert_eq!(ja.leader, ja.member_id);
    assert_eq!(ja.members.len(), 1);
    let ma = ja.member_id.to_string();
    let corr = sync(&mut gw, a, &ma, 1, vec![(&ma, b"all")]);
    let sa: SyncGroupResponse = gw.receive(a, 5, corr).unwrap();
    assert_eq!((sa.error_code, &sa.assignment[..]), (0, &b"all"[..]));
    assert_eq!(heartbeat(&mut gw, a, &ma, 1), error::NONE);

    // B joins: it waits until A, told by its heartbeat, rejoins.
    let corr_b = join_new(&mut gw, b);
    assert!(
        gw.receive::<JoinGroupResponse>(b, 5, corr_b).is_none(),
        "B waits for A"
    );
    assert_eq!(heartbeat(&mut gw, a, &ma, 1), error::REBALANCE_IN_PROGRESS);
    let corr_a = gw.send(a, ApiKey::JoinGroup, 5, &join_req(&ma, None, b"m"));
    let ja: JoinGroupResponse = gw.receive(a, 5, corr_a).unwrap();
    let jb: JoinGroupResponse = gw.receive(b, 5, corr_b).unwrap();
    assert_eq!((ja.generation_id, jb.generation_id), (2, 2));
    assert_eq!(ja.leader.as_str(), ma, "the leader stays");
    assert_eq!(ja.members.len(), 2, "the leader sees every member");
    assert!(jb.members.is_empty());
    let mb = jb.member_id.to_string();

    // B syncs first and waits for the leader's assignment.
    let corr_b = sync(&mut gw, b, &mb, 2, vec![]);
    assert!(gw.receive::<SyncGroupResponse>(b, 5, corr_b).is_none());
    let corr_a = sync(&mut gw, a, &ma, 2, vec![(&ma, b"p0"), (&mb, b"p1")]);
    let sa: SyncGroupResponse = gw.receive(a, 5, corr_a).unwrap();
    let sb: SyncGroupResponse = gw.receive(b, 5, corr_b).unwrap();
    assert_eq!(
        (&sa.assignment[..], &sb.assignment[..]),
        (&b"p0"[..], &b"p1"[..])
    );

    // Bad input gets Kafka's codes.
    assert_eq!(heartbeat(&mut gw, a, &ma, 1), error::ILLEGAL_GENERATION);
    assert_eq!(heartbeat(&mut gw, a, "nobody", 2), error::UNKNOWN_MEMBER_ID);
    let corr = sync(&mut gw, a, &ma, 7, vec![]);
    let bad: SyncGroupResponse = gw.receive(a, 5, corr).unwrap();
    assert_eq!(bad.error_code, error::ILLEGAL_GENERATION);

    // B goes silent: after its session timeout A is told to rejoin, and is alone.
    for _ in 0..12 {
        gw.advance(1_000);
        if heartbeat(&mut gw, a, &ma, 2) != error::NONE {
            break;
        }
    }
    assert_eq!(heartbeat(&mut gw, a, &ma, 2), error::REBALANCE_IN_PROGRESS);
    let corr = gw.send(a, ApiKey::JoinGroup, 5, &join_req(&ma, None, b"m"));
    let ja: JoinGroupResponse = gw.receive(a, 5, corr).unwrap();
    assert_eq!((ja.generation_id, ja.members.len()), (3, 1));
    assert_eq!(heartbeat(&mut gw, b, &mb, 2), error::UNKNOWN_MEMBER_ID);
}

#[test]
fn initial_delay_and_rebalance_timeout_bound_the_barrier() {
    let mut gw = Gw::new(Timing {
        initial_rebalance_delay_ms: 1_000,
        ..Timing::default()
    });
    let a = gw.client("t/ns");
    let corr = join_new(&mut gw, a);
    assert!(
        gw.receive::<JoinGroupResponse>(a, 5, corr).is_none(),
        "the initial delay"
    );
    gw.advance(1_200);
    let ja: JoinGroupResponse = gw.receive(a, 5, corr).unwrap();
    assert_eq!(ja.generation_id, 1);
    let ma = ja.member_id.to_string();
    let corr = sync(&mut gw, a, &ma, 1, vec![(&ma, b"x")]);
    assert!(gw.receive::<SyncGroupResponse>(a, 5, corr).is_some());

    // B joins; A never rejoins: after the rebalance timeout (5 s) B is alone.
    let b = gw.client("t/ns");
    let corr_b = join_new(&mut gw, b);
    gw.advance(4_000);
    assert!(gw.receive::<JoinGroupResponse>(b, 5, corr_b).is_none());
    gw.advance(1_400);
    let jb: JoinGroupResponse = gw.receive(b, 5, corr_b).unwrap();
    assert_eq!((jb.generation_id, jb.members.len()), (2, 1));
    assert_eq!(jb.leader, jb.member_id);
}

#[test]
fn a_static_member_rejoins_without_a_rebalance_and_fences_its_old_id() {
    let mut gw = Gw::new(timing());
    let (a, b) = (gw.client("t/ns"), gw.client("t/ns"));
    // Static members need no KIP-394 round trip.
    let corr = gw.send(a, ApiKey::JoinGroup, 5, &join_req("", Some("i-a"), b"m"));
    let ja: JoinGroupResponse = gw.receive(a, 5, corr).unwrap();
    assert_eq!((ja.error_code, ja.generation_id), (0, 1));
    let old = ja.member_id.to_string();
    let corr = sync(&mut gw, a, &old, 1, vec![(&old, b"mine")]);
    assert!(gw.receive::<SyncGroupResponse>(a, 5, corr).is_some());

    // The same instance restarts (new connection, empty member id): same generation.
    let corr = gw.send(b, ApiKey::JoinGroup, 5, &join_req("", Some("i-a"), b"m"));
    let jb: JoinGroupResponse = gw.receive(b, 5, corr).unwrap();
    assert_eq!((jb.error_code, jb.generation_id), (0, 1), "no rebalance");
    let new = jb.member_id.to_string();
    assert_ne!(new, old);
    let corr = sync(&mut gw, b, &new, 1, vec![]);
    let sb: SyncGroupResponse = gw.receive(b, 5, corr).unwrap();
    assert_eq!(&sb.assignment[..], b"mine", "its old assignment");
    let hb: HeartbeatResponse = gw.call(
        a,
        ApiKey::Heartbeat,
        4,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_member_id(s(&old))
            .with_group_instance_id(Some(s("i-a")))
            .with_generation_id(1),
    );
    assert_eq!(hb.error_code, error::FENCED_INSTANCE_ID);
    assert_eq!(heartbeat(&mut gw, b, &new, 1), error::NONE);

    // LeaveGroup v3+ by instance id: the group empties.
    let r: LeaveGroupResponse = gw.call(
        b,
        ApiKey::LeaveGroup,
        4,
        &LeaveGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_members(vec![
                MemberIdentity::default()
                    .with_member_id(s(&new))
                    .with_group_instance_id(Some(s("i-a"))),
                MemberIdentity::default().with_member_id(s("ghost")),
            ]),
    );
    assert_eq!(r.error_code, 0);
    let codes: Vec<i16> = r.members.iter().map(|m| m.error_code).collect();
    assert_eq!(codes, vec![error::NONE, error::UNKNOWN_MEMBER_ID]);
}

fn commit(gw: &mut Gw, c: usize, member: &str, generation: i32, offset: i64) -> i16 {
    let r: OffsetCommitResponse = gw.call(
        c,
        ApiKey::OffsetCommit,
        8,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_member_id(s(member))
            .with_generation_id_or_member_epoch(generation)
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(s("t")))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(1)
                    .with_committed_offset(offset)
                    .with_committed_metadata(Some(s("md")))])]),
    );
    r.topics[0].partitions[0].error_code
}

fn fetch(gw: &mut Gw, c: usize, version: i16) -> Vec<(String, i32, i64)> {
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(TopicName(s("t")))
            .with_partition_indexes(vec![0, 1])]));
    let r: OffsetFetchResponse = gw.call(c, ApiKey::OffsetFetch, version, &req);
    assert_eq!(r.error_code, 0);
    r.topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (t.name.0.to_string(), p.partition_index, p.committed_offset))
        })
        .collect()
}

#[test]
fn offsets_are_committed_by_members_of_the_generation_only() {
    let mut gw = Gw::new(timing());
    let a = gw.client("t/ns");
    let corr = join_new(&mut gw, a);
    let ja: JoinGroupResponse = gw.receive(a, 5, corr).unwrap();
    let ma = ja.member_id.to_string();
    let corr = sync(&mut gw, a, &ma, 1, vec![(&ma, b"x")]);
    assert!(gw.receive::<SyncGroupResponse>(a, 5, corr).is_some());

    assert_eq!(commit(&mut gw, a, &ma, 9, 5), error::ILLEGAL_GENERATION);
    assert_eq!(
        commit(&mut gw, a, "stranger", 1, 5),
        error::UNKNOWN_MEMBER_ID
    );
    assert_eq!(
        commit(&mut gw, a, "", -1, 5),
        error::UNKNOWN_MEMBER_ID,
        "outside commits only to an empty group"
    );
    assert_eq!(
        fetch(&mut gw, a, 7),
        vec![("t".into(), 0, -1), ("t".into(), 1, -1)]
    );
    assert_eq!(commit(&mut gw, a, &ma, 1, 42), error::NONE);
    assert_eq!(
        fetch(&mut gw, a, 7),
        vec![("t".into(), 0, -1), ("t".into(), 1, 42)]
    );
    assert_eq!(
        fetch(&mut gw, a, 1),
        vec![("t".into(), 0, -1), ("t".into(), 1, 42)]
    );

    // All committed partitions of the group (topics null).
    let r: OffsetFetchResponse = gw.call(
        a,
        ApiKey::OffsetFetch,
        7,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_topics(None),
    );
    assert_eq!(r.topics.len(), 1);
    assert_eq!(r.topics[0].partitions[0].committed_offset, 42);
    assert_eq!(r.topics[0].partitions[0].metadata.as_deref(), Some("md"));
}

#[test]
fn groups_are_listed_described_and_deleted_per_namespace() {
    let mut gw = Gw::new(timing());
    let (a, other) = (gw.client("t/ns"), gw.client("u/ns"));
    let corr = join_new(&mut gw, a);
    let ja: JoinGroupResponse = gw.receive(a, 5, corr).unwrap();
    let ma = ja.member_id.to_string();
    let corr = sync(&mut gw, a, &ma, 1, vec![(&ma, b"x")]);
    assert!(gw.receive::<SyncGroupResponse>(a, 5, corr).is_some());
    assert_eq!(commit(&mut gw, a, &ma, 1, 3), error::NONE);

    let list = |gw: &mut Gw, c| -> Vec<(String, String)> {
        let r: ListGroupsResponse =
            gw.call(c, ApiKey::ListGroups, 4, &ListGroupsRequest::default());
        r.groups
            .iter()
            .map(|g| (g.group_id.0.to_string(), g.group_state.to_string()))
            .collect()
    };
    assert_eq!(list(&mut gw, a), vec![("g".into(), "Stable".into())]);
    assert_eq!(list(&mut gw, other), vec![], "another tenant sees nothing");

    let d: DescribeGroupsResponse = gw.call(
        other,
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
    );
    assert_eq!(d.groups[0].group_state.as_str(), "Dead");
    let d: DescribeGroupsResponse = gw.call(
        a,
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
    );
    let g = &d.groups[0];
    assert_eq!(
        (g.group_state.as_str(), g.protocol_data.as_str()),
        ("Stable", "range")
    );
    assert_eq!(g.members.len(), 1);
    assert_eq!(&g.members[0].member_assignment[..], b"x");

    let delete = |gw: &mut Gw, c| -> i16 {
        let r: DeleteGroupsResponse = gw.call(
            c,
            ApiKey::DeleteGroups,
            2,
            &DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s("g"))]),
        );
        r.results[0].error_code
    };
    assert_eq!(delete(&mut gw, a), error::NON_EMPTY_GROUP);
    let r: LeaveGroupResponse = gw.call(
        a,
        ApiKey::LeaveGroup,
        1,
        &LeaveGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_member_id(s(&ma)),
    );
    assert_eq!(r.error_code, 0);
    assert_eq!(list(&mut gw, a), vec![("g".into(), "Empty".into())]);
    assert_eq!(delete(&mut gw, a), error::NONE);
    assert_eq!(
        fetch(&mut gw, a, 7),
        vec![("t".into(), 0, -1), ("t".into(), 1, -1)]
    );
    assert_eq!(delete(&mut gw, a), error::GROUP_ID_NOT_FOUND);
    assert_eq!(list(&mut gw, a), vec![]);
}

#[test]
fn find_coordinator_names_this_gateway() {
    let mut gw = Gw::new(timing());
    let a = gw.client("t/ns");
    let r: FindCoordinatorResponse = gw.call(
        a,
        ApiKey::FindCoordinator,
        2,
        &FindCoordinatorRequest::default().with_key(s("g")),
    );
    assert_eq!((r.error_code, r.node_id.0, r.port), (0, 1, 9092));
    let r: FindCoordinatorResponse = gw.call(
        a,
        ApiKey::FindCoordinator,
        4,
        &FindCoordinatorRequest::default().with_coordinator_keys(vec![s("g"), s("h")]),
    );
    assert_eq!(r.coordinators.len(), 2);
    assert_eq!(r.coordinators[1].key.as_str(), "h");
}

#[test]
fn the_shard_of_a_group_is_kafkas_partition_for() {
    // Kafka: abs("g".hashCode) % 50 = 103 % 50; Java's "Aa" and "BB" both hash to 2112
    // (h = 31 * h + c over UTF-16 units).
    assert_eq!(super::shard_of("g", 50), 3);
    assert_eq!(super::shard_of("Aa", 1 << 30), 2112);
    assert_eq!(super::shard_of("BB", 1 << 30), 2112);
    // Negative hashes count by their low 31 bits: "polygenelubricants" hashes to
    // i32::MIN.
    assert_eq!(super::shard_of("polygenelubricants", 16), 0);
    assert_eq!(super::shard_of("anything", 1), 0);
}

#[test]
fn find_coordinator_names_the_holder_and_other_shards_answer_not_coordinator() {
    let g_shard = super::shard_of("g", Config::default().coordinator_shards);
    // This gateway holds every shard but the group's.
    let held: Vec<u32> = (0..16).filter(|s| *s != g_shard).collect();
    let mut gw = Gw::holding(timing(), held.clone());
    let a = gw.client("t/ns");
    let r: FindCoordinatorResponse = gw.call(
        a,
        ApiKey::FindCoordinator,
        3,
        &FindCoordinatorRequest::default().with_key(s("g")),
    );
    assert_eq!(r.error_code, error::NONE);
    assert_eq!((r.node_id.0, r.port), (2, 9092));
    // v4: one answer per key; a group of a held shard is this gateway's.
    let mine = (0..1000)
        .map(|i| format!("h{i}"))
        .find(|k| super::shard_of(k, 16) != g_shard)
        .unwrap();
    let r: FindCoordinatorResponse = gw.call(
        a,
        ApiKey::FindCoordinator,
        4,
        &FindCoordinatorRequest::default().with_coordinator_keys(vec![s("g"), s(&mine)]),
    );
    let nodes: Vec<i32> = r.coordinators.iter().map(|c| c.node_id.0).collect();
    assert_eq!(nodes, [2, 1]);

    // Asked anyway, the coordinator's requests answer NOT_COORDINATOR (the host refused
    // the post), and the connection goes on.
    let j: JoinGroupResponse = gw.call(a, ApiKey::JoinGroup, 5, &join_req("", None, b"m"));
    assert_eq!(j.error_code, error::NOT_COORDINATOR);
    let h: HeartbeatResponse = gw.call(
        a,
        ApiKey::Heartbeat,
        4,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_member_id(s("m"))
            .with_generation_id(1),
    );
    assert_eq!(h.error_code, error::NOT_COORDINATOR);
    assert_eq!(commit(&mut gw, a, "m", 1, 3), error::NOT_COORDINATOR);
    let d: DescribeGroupsResponse = gw.call(
        a,
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
    );
    assert_eq!(d.groups[0].error_code, error::NOT_COORDINATOR);
    assert!(gw.clients[a].0.closed().is_none());
}

#[test]
fn list_groups_covers_every_shard_this_gateway_holds_and_no_other() {
    // Groups on two different shards, both held here: both listed.
    let shards = Config::default().coordinator_shards;
    let names: Vec<String> = (0..1000).map(|i| format!("grp{i}")).collect();
    let first = names[0].clone();
    let second = names
        .iter()
        .find(|n| super::shard_of(n, shards) != super::shard_of(&first, shards))
        .unwrap()
        .clone();
    let mut gw = Gw::new(timing());
    let a = gw.client("t/ns");
    for g in [&first, &second] {
        let r: JoinGroupResponse = gw.call(
            a,
            ApiKey::JoinGroup,
            5,
            &join_req("", None, b"m").with_group_id(GroupId(s(g))),
        );
        assert_eq!(r.error_code, error::MEMBER_ID_REQUIRED);
        let joined: JoinGroupResponse = gw.call(
            a,
            ApiKey::JoinGroup,
            5,
            &join_req(&r.member_id, None, b"m").with_group_id(GroupId(s(g))),
        );
        assert_eq!(joined.error_code, error::NONE);
    }
    let listed = |gw: &mut Gw, c| -> Vec<String> {
        let r: ListGroupsResponse =
            gw.call(c, ApiKey::ListGroups, 4, &ListGroupsRequest::default());
        r.groups.iter().map(|g| g.group_id.0.to_string()).collect()
    };
    let mut both = vec![first.clone(), second.clone()];
    both.sort();
    assert_eq!(listed(&mut gw, a), both);
    // The state filter (v4) applies across shards.
    let r: ListGroupsResponse = gw.call(
        a,
        ApiKey::ListGroups,
        4,
        &ListGroupsRequest::default().with_states_filter(vec![s("Empty")]),
    );
    assert!(r.groups.is_empty(), "{:?}", r.groups);

    // A gateway that holds only the first group's shard lists only it.
    let mut half = Gw::holding(timing(), vec![super::shard_of(&first, shards)]);
    half.homes = std::mem::take(&mut gw.homes);
    let b = half.client("t/ns");
    assert_eq!(listed(&mut half, b), vec![first]);
}
