//! The group coordinator: the homes (ABI 0.2.4 `homes`) that own the consumer groups, as a
//! sans-IO machine ([`GroupHome`]).
//!
//! Client connections live on every worker's instance, and on every gateway of the
//! backend; a group's members may be on several. So the connection does not answer the
//! group APIs itself: it posts the request to the home of domain [`DOMAIN`], shard
//! [`shard_of`]`(group)`, which the host opens on the one gateway holding that shard
//! (docs/kafka.md section 2.2) and on one fixed instance there. A home keeps the groups of
//! its shard in one namespace (the host names the poster's namespace, so a client can never
//! reach another tenant's group). The home answers with the whole Kafka response, which the
//! connection sends as is; a post to a shard held elsewhere fails, and the connection
//! answers `NOT_COORDINATOR` (the client asks FindCoordinator again).
//!
//! Posts ([`post`]) are one kind byte and a body:
//! - [`FORWARD`]: a Kafka request (header and body, as the client sent it) of JoinGroup,
//!   SyncGroup, Heartbeat, LeaveGroup or DescribeGroups; the answer is the response frame
//!   (size included); empty if the request cannot be decoded.
//! - [`COMMIT_CHECK`]: may this member of this generation commit offsets? The answer is
//!   an `i16` error code (the offsets themselves are stored by the connection, in the
//!   namespace kv).
//! - [`DELETE_GROUP`]: DeleteGroups of one group: removed if it has no members; the answer
//!   is an `i16` error code and a byte, 1 if the group existed.
//! - [`OFFSET_DELETE_CHECK`]: may a group's offsets be deleted (OffsetDelete)? `i16`.
//! - [`LIST`]: the home's groups (ListGroups asks every shard this gateway holds): for each,
//!   its name, protocol type and state ([`decode_list`]).
//!
//! Timers: one tick every [`TICK_MS`] while any group has members, which expires sessions,
//! pending member ids and join barriers.
//!
//! What is not here: the groups' state does not survive the gateway nor a move of the
//! shard to another gateway (members rejoin, as after a coordinator move in Kafka;
//! committed offsets do survive, in the kv).

pub mod directory;
pub mod group;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    ApiKey, DescribeGroupsRequest, DescribeGroupsResponse, GroupId, HeartbeatRequest,
    HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsRequest, ListGroupsResponse, RequestHeader, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::{Encodable, HeaderVersion, StrBytes};
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::{Action, Event, HomePost, Machine};

use crate::codec;
use group::{error, Answer, Group, Join, JoinAnswer, Parked, State, SyncAnswer, Timing};

/// The homes' domain of the group coordinator.
pub const DOMAIN: &str = "kafka-groups";
/// Post kinds.
pub const FORWARD: u8 = 0;
pub const COMMIT_CHECK: u8 = 1;
pub const DELETE_GROUP: u8 = 2;
pub const OFFSET_DELETE_CHECK: u8 = 3;
pub const LIST: u8 = 4;
/// How often sessions and barriers are looked at.
pub const TICK_MS: u64 = 200;
/// The tick's timer token.
const TICK: u64 = 1;
/// Most groups one home keeps (all namespaces together); a JoinGroup for one more is
/// answered `COORDINATOR_NOT_AVAILABLE`.
const MAX_GROUPS: usize = 100_000;

/// The home of the consumer groups.
pub struct GroupHome {
    timing: Timing,
    groups: HashMap<(String, String), Group>,
    out: Outbox,
    ticking: bool,
    now_ms: u64,
}

impl GroupHome {
    pub fn new(timing: Timing) -> Self {
        GroupHome {
            timing,
            groups: HashMap::new(),
            out: Outbox::new(),
            ticking: false,
            now_ms: 0,
        }
    }

    fn reply(&mut self, post_id: u64, payload: Vec<u8>) {
        self.out.push(Action::ReplyHome { post_id, payload });
    }

    fn post(&mut self, post: HomePost) {
        let HomePost {
            post_id,
            namespace,
            payload,
            ..
        } = post;
        let Some((&kind, body)) = payload.split_first() else {
            return self.reply(post_id, Vec::new());
        };
        let answer = match kind {
            FORWARD => self.forward(post_id, &namespace, Bytes::copy_from_slice(body)),
            COMMIT_CHECK => match CommitCheck::decode(body) {
                Some(c) => {
                    let now = self.now_ms;
                    let code = match self.groups.get_mut(&(namespace, c.group)) {
                        Some(g) => g.commit_check(
                            now,
                            &c.member_id,
                            c.instance_id.as_deref(),
                            c.generation,
                        ),
                        None if c.generation < 0 => error::NONE,
                        None => error::UNKNOWN_MEMBER_ID,
                    };
                    Some(code.to_be_bytes().to_vec())
                }
                None => Some(Vec::new()),
            },
            LIST => {
                let mut out = Vec::new();
                let mut listed: Vec<_> = self
                    .groups
                    .iter()
                    .filter(|((ns, _), _)| *ns == namespace)
                    .collect();
                listed.sort_by(|a, b| a.0 .1.cmp(&b.0 .1));
                for ((_, id), g) in listed {
                    put_str(&mut out, Some(id));
                    put_str(
                        &mut out,
                        Some(g.protocol_type.as_deref().unwrap_or_default()),
                    );
                    put_str(&mut out, Some(g.state.name()));
                }
                Some(out)
            }
            DELETE_GROUP | OFFSET_DELETE_CHECK => match read_str(&mut &body[..]) {
                Some(group) => {
                    let key = (namespace, group);
                    let busy = self
                        .groups
                        .get(&key)
                        .is_some_and(|g| g.state != State::Empty || !g.members.is_empty());
                    if kind == DELETE_GROUP {
                        let (code, existed) = if busy {
                            (error::NON_EMPTY_GROUP, true)
                        } else {
                            (error::NONE, self.groups.remove(&key).is_some())
                        };
                        let mut a = code.to_be_bytes().to_vec();
                        a.push(existed as u8);
                        Some(a)
                    } else {
                        let code = if busy {
                            error::GROUP_SUBSCRIBED_TO_TOPIC
                        } else {
                            error::NONE
                        };
                        Some(code.to_be_bytes().to_vec())
                    }
                }
                None => Some(Vec::new()),
            },
            _ => Some(Vec::new()),
        };
        if let Some(a) = answer {
            self.reply(post_id, a);
        }
        self.arm_tick();
    }

    /// A forwarded Kafka request: the response frame now, or `None` if it was parked.
    fn forward(&mut self, post_id: u64, namespace: &str, bytes: Bytes) -> Option<Vec<u8>> {
        let Some(head) = codec::frame_head(&bytes) else {
            return Some(Vec::new());
        };
        let version = head.api_version;
        let r = match ApiKey::try_from(head.api_key) {
            Ok(ApiKey::JoinGroup) => {
                crate::connection::decode_request::<JoinGroupRequest>(bytes, version)
                    .map(|(h, r)| self.join(post_id, namespace, h, r))
            }
            Ok(ApiKey::SyncGroup) => {
                crate::connection::decode_request::<SyncGroupRequest>(bytes, version)
                    .map(|(h, r)| self.sync(post_id, namespace, h, r))
            }
            Ok(ApiKey::Heartbeat) => {
                crate::connection::decode_request::<HeartbeatRequest>(bytes, version)
                    .map(|(h, r)| Some(self.heartbeat(namespace, h, r)))
            }
            Ok(ApiKey::LeaveGroup) => {
                crate::connection::decode_request::<LeaveGroupRequest>(bytes, version)
                    .map(|(h, r)| Some(self.leave(namespace, h, r)))
            }
            Ok(ApiKey::ListGroups) => {
                crate::connection::decode_request::<ListGroupsRequest>(bytes, version)
                    .map(|(h, r)| Some(self.list(namespace, h, r)))
            }
            Ok(ApiKey::DescribeGroups) => {
                crate::connection::decode_request::<DescribeGroupsRequest>(bytes, version)
                    .map(|(h, r)| Some(self.describe(namespace, h, r)))
            }
            _ => Err("not a group request".to_string()),
        };
        r.unwrap_or_else(|_| Some(Vec::new()))
    }

    fn join(
        &mut self,
        post_id: u64,
        namespace: &str,
        header: RequestHeader,
        r: JoinGroupRequest,
    ) -> Option<Vec<u8>> {
        let version = header.request_api_version;
        let parked = Parked {
            post_id,
            version,
            correlation_id: header.correlation_id,
        };
        let group_id = r.group_id.0.to_string();
        if group_id.is_empty() {
            return Some(join_frame(
                parked,
                &JoinAnswer::error(error::INVALID_GROUP_ID, &r.member_id),
            ));
        }
        let key = (namespace.to_string(), group_id);
        if !self.groups.contains_key(&key) && self.groups.len() >= MAX_GROUPS {
            return Some(join_frame(
                parked,
                &JoinAnswer::error(error::COORDINATOR_NOT_AVAILABLE, &r.member_id),
            ));
        }
        let join = Join {
            member_id: r.member_id.to_string(),
            instance_id: r.group_instance_id.map(|s| s.to_string()),
            client_id: header.client_id.map(|s| s.to_string()).unwrap_or_default(),
            session_timeout_ms: r.session_timeout_ms,
            // v0 has no rebalance timeout: the session timeout serves (Kafka does the same).
            rebalance_timeout_ms: if version >= 1 {
                r.rebalance_timeout_ms
            } else {
                r.session_timeout_ms
            },
            protocol_type: r.protocol_type.to_string(),
            protocols: r
                .protocols
                .into_iter()
                .map(|p| (p.name.to_string(), p.metadata.to_vec()))
                .collect(),
            require_known_member_id: version >= 4,
            parked,
        };
        let mut answers = Vec::new();
        let now = self.now_ms;
        let timing = self.timing;
        self.groups
            .entry(key)
            .or_default()
            .join(now, &timing, join, &mut answers);
        self.answer_all(answers);
        None
    }

    fn sync(
        &mut self,
        post_id: u64,
        namespace: &str,
        header: RequestHeader,
        r: SyncGroupRequest,
    ) -> Option<Vec<u8>> {
        let parked = Parked {
            post_id,
            version: header.request_api_version,
            correlation_id: header.correlation_id,
        };
        let key = (namespace.to_string(), r.group_id.0.to_string());
        let Some(group) = self.groups.get_mut(&key) else {
            return Some(sync_frame(
                parked,
                &SyncAnswer::error(error::UNKNOWN_MEMBER_ID),
            ));
        };
        // v5: the protocol named must be the group's.
        let mismatch = |given: &Option<StrBytes>, have: &Option<String>| {
            given
                .as_ref()
                .is_some_and(|g| have.as_deref().is_some_and(|h| h != g.as_str()))
        };
        if mismatch(&r.protocol_type, &group.protocol_type)
            || mismatch(&r.protocol_name, &group.protocol)
        {
            return Some(sync_frame(
                parked,
                &SyncAnswer::error(error::INCONSISTENT_GROUP_PROTOCOL),
            ));
        }
        let mut answers = Vec::new();
        group.sync(
            &r.member_id,
            r.group_instance_id.as_ref().map(|s| s.as_str()),
            r.generation_id,
            r.assignments
                .into_iter()
                .map(|a| (a.member_id.to_string(), a.assignment.to_vec()))
                .collect(),
            parked,
            &mut answers,
        );
        self.answer_all(answers);
        None
    }

    fn heartbeat(
        &mut self,
        namespace: &str,
        header: RequestHeader,
        r: HeartbeatRequest,
    ) -> Vec<u8> {
        let key = (namespace.to_string(), r.group_id.0.to_string());
        let now = self.now_ms;
        let code = match self.groups.get_mut(&key) {
            Some(g) => g.heartbeat(
                now,
                &r.member_id,
                r.group_instance_id.as_ref().map(|s| s.as_str()),
                r.generation_id,
            ),
            None => error::UNKNOWN_MEMBER_ID,
        };
        frame(&header, &HeartbeatResponse::default().with_error_code(code))
    }

    fn leave(&mut self, namespace: &str, header: RequestHeader, r: LeaveGroupRequest) -> Vec<u8> {
        let version = header.request_api_version;
        let key = (namespace.to_string(), r.group_id.0.to_string());
        // v0-v2: one member id; v3+ (KIP-345): a batch, by member id or instance id.
        let leaving: Vec<(String, Option<String>)> = if version >= 3 {
            r.members
                .iter()
                .map(|m| {
                    (
                        m.member_id.to_string(),
                        m.group_instance_id.as_ref().map(|s| s.to_string()),
                    )
                })
                .collect()
        } else {
            vec![(r.member_id.to_string(), None)]
        };
        let now = self.now_ms;
        let timing = self.timing;
        let mut answers = Vec::new();
        let mut results = Vec::new();
        let top = match self.groups.get_mut(&key) {
            None => {
                results = leaving
                    .iter()
                    .map(|l| (l.clone(), error::UNKNOWN_MEMBER_ID))
                    .collect();
                error::UNKNOWN_MEMBER_ID
            }
            Some(g) => {
                for (member_id, instance) in &leaving {
                    // By instance id alone (the admin API): whoever holds it.
                    let member = match (member_id.is_empty(), instance) {
                        (true, Some(i)) => g.static_members.get(i).cloned(),
                        _ => Some(member_id.clone()),
                    };
                    let code = match member {
                        None => error::UNKNOWN_MEMBER_ID,
                        Some(m) => match g.check_member(&m, instance.as_deref()) {
                            Some(e) => e,
                            None => {
                                g.member_gone(now, &timing, &m, &mut answers);
                                error::NONE
                            }
                        },
                    };
                    results.push(((member_id.clone(), instance.clone()), code));
                }
                if version < 3 {
                    results.first().map(|(_, c)| *c).unwrap_or(error::NONE)
                } else {
                    error::NONE
                }
            }
        };
        self.answer_all(answers);
        let body = LeaveGroupResponse::default()
            .with_error_code(top)
            .with_members(if version >= 3 {
                results
                    .into_iter()
                    .map(|((m, i), code)| {
                        MemberResponse::default()
                            .with_member_id(StrBytes::from_string(m))
                            .with_group_instance_id(i.map(StrBytes::from_string))
                            .with_error_code(code)
                    })
                    .collect()
            } else {
                Vec::new()
            });
        frame(&header, &body)
    }

    fn list(&mut self, namespace: &str, header: RequestHeader, r: ListGroupsRequest) -> Vec<u8> {
        let states: Vec<String> = r
            .states_filter
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let mut groups: Vec<ListedGroup> = self
            .groups
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .filter(|(_, g)| {
                states.is_empty() || states.contains(&g.state.name().to_ascii_lowercase())
            })
            .map(|((_, id), g)| {
                ListedGroup::default()
                    .with_group_id(GroupId(StrBytes::from_string(id.clone())))
                    .with_protocol_type(StrBytes::from_string(
                        g.protocol_type.clone().unwrap_or_default(),
                    ))
                    .with_group_state(StrBytes::from_static_str(g.state.name()))
            })
            .collect();
        groups.sort_by(|a, b| a.group_id.0.cmp(&b.group_id.0));
        frame(&header, &ListGroupsResponse::default().with_groups(groups))
    }

    fn describe(
        &mut self,
        namespace: &str,
        header: RequestHeader,
        r: DescribeGroupsRequest,
    ) -> Vec<u8> {
        let groups = r
            .groups
            .into_iter()
            .map(|id| {
                let key = (namespace.to_string(), id.0.to_string());
                let described = DescribedGroup::default()
                    .with_group_id(id)
                    .with_authorized_operations(i32::MIN);
                match self.groups.get(&key) {
                    // Kafka describes a group it does not know as Dead.
                    None => described.with_group_state(StrBytes::from_static_str("Dead")),
                    Some(g) => {
                        let protocol = g.protocol.clone().unwrap_or_default();
                        let members = g
                            .members
                            .iter()
                            .map(|(id, m)| {
                                DescribedGroupMember::default()
                                    .with_member_id(StrBytes::from_string(id.clone()))
                                    .with_group_instance_id(
                                        m.instance_id.clone().map(StrBytes::from_string),
                                    )
                                    .with_client_id(StrBytes::from_string(m.client_id.clone()))
                                    .with_client_host(StrBytes::from_static_str("/127.0.0.1"))
                                    .with_member_metadata(Bytes::from(
                                        m.protocols
                                            .iter()
                                            .find(|(n, _)| *n == protocol)
                                            .map(|(_, md)| md.clone())
                                            .unwrap_or_default(),
                                    ))
                                    .with_member_assignment(Bytes::from(m.assignment.clone()))
                            })
                            .collect();
                        described
                            .with_group_state(StrBytes::from_static_str(g.state.name()))
                            .with_protocol_type(StrBytes::from_string(
                                g.protocol_type.clone().unwrap_or_default(),
                            ))
                            .with_protocol_data(StrBytes::from_string(
                                if g.state == State::Stable || g.state == State::CompletingRebalance
                                {
                                    protocol
                                } else {
                                    String::new()
                                },
                            ))
                            .with_members(members)
                    }
                }
            })
            .collect();
        frame(
            &header,
            &DescribeGroupsResponse::default().with_groups(groups),
        )
    }

    /// Sends the answers of parked requests.
    fn answer_all(&mut self, answers: Vec<Answer>) {
        for a in answers {
            match a {
                Answer::Join(p, j) => {
                    let f = join_frame(p, &j);
                    self.reply(p.post_id, f);
                }
                Answer::Sync(p, s) => {
                    let f = sync_frame(p, &s);
                    self.reply(p.post_id, f);
                }
            }
        }
    }

    fn arm_tick(&mut self) {
        if !self.ticking && self.groups.values().any(|g| !g.is_idle()) {
            self.ticking = true;
            self.out.push(Action::SetTimer {
                token: TICK,
                delay_ms: TICK_MS,
            });
        }
    }

    fn tick(&mut self) {
        self.ticking = false;
        let now = self.now_ms;
        let timing = self.timing;
        let mut answers = Vec::new();
        for g in self.groups.values_mut() {
            g.expire(now, &timing, &mut answers);
        }
        self.answer_all(answers);
        self.arm_tick();
    }
}

impl Machine for GroupHome {
    fn apply(&mut self, now_ms: u64, event: Event) {
        self.now_ms = now_ms;
        match event {
            Event::HomePost(post) => self.post(post),
            Event::Timer { token: TICK } => self.tick(),
            _ => {}
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.out.take()
    }
}

/// A response frame to the request of `header`; empty if it cannot be encoded (the
/// connection then closes).
fn frame<B: Encodable + HeaderVersion>(header: &RequestHeader, body: &B) -> Vec<u8> {
    encode(header.correlation_id, header.request_api_version, body)
}

fn encode<B: Encodable + HeaderVersion>(correlation_id: i32, version: i16, body: &B) -> Vec<u8> {
    let mut out = Vec::new();
    match codec::write_response(
        &mut out,
        correlation_id,
        B::header_version(version),
        body,
        version,
    ) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

fn join_frame(p: Parked, a: &JoinAnswer) -> Vec<u8> {
    // Before v7 the protocol name is not nullable.
    let protocol = match (&a.protocol, p.version >= 7) {
        (Some(n), _) => Some(StrBytes::from_string(n.clone())),
        (None, true) => None,
        (None, false) => Some(StrBytes::default()),
    };
    let body = JoinGroupResponse::default()
        .with_error_code(a.error)
        .with_generation_id(a.generation)
        .with_protocol_type(a.protocol_type.clone().map(StrBytes::from_string))
        .with_protocol_name(protocol)
        .with_leader(StrBytes::from_string(a.leader.clone()))
        .with_skip_assignment(a.skip_assignment && p.version >= 9)
        .with_member_id(StrBytes::from_string(a.member_id.clone()))
        .with_members(
            a.members
                .iter()
                .map(|(id, instance, md)| {
                    JoinGroupResponseMember::default()
                        .with_member_id(StrBytes::from_string(id.clone()))
                        .with_group_instance_id(instance.clone().map(StrBytes::from_string))
                        .with_metadata(Bytes::from(md.clone()))
                })
                .collect(),
        );
    encode(p.correlation_id, p.version, &body)
}

fn sync_frame(p: Parked, a: &SyncAnswer) -> Vec<u8> {
    let body = SyncGroupResponse::default()
        .with_error_code(a.error)
        .with_protocol_type(a.protocol_type.clone().map(StrBytes::from_string))
        .with_protocol_name(a.protocol.clone().map(StrBytes::from_string))
        .with_assignment(Bytes::from(a.assignment.clone()));
    encode(p.correlation_id, p.version, &body)
}

/// An OffsetCommit's claim to membership ([`COMMIT_CHECK`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitCheck {
    pub group: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub generation: i32,
}

impl CommitCheck {
    /// The post's payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![COMMIT_CHECK];
        out.extend_from_slice(&self.generation.to_be_bytes());
        put_str(&mut out, Some(&self.group));
        put_str(&mut out, Some(&self.member_id));
        put_str(&mut out, self.instance_id.as_deref());
        out
    }

    fn decode(mut body: &[u8]) -> Option<CommitCheck> {
        let generation = body.get(..4)?;
        let generation =
            i32::from_be_bytes([generation[0], generation[1], generation[2], generation[3]]);
        body = &body[4..];
        let group = read_str(&mut body)?;
        let member_id = read_str(&mut body)?;
        let instance_id = read_opt_str(&mut body)?;
        Some(CommitCheck {
            group,
            member_id,
            instance_id,
            generation,
        })
    }
}

/// The shard of a group: Kafka's own `partitionFor` (`abs(groupId.hashCode) % shards`,
/// `hashCode` being Java's `String.hashCode` over UTF-16 units), so that operators who know
/// Kafka can tell which gateway coordinates a group.
pub fn shard_of(group: &str, shards: u32) -> u32 {
    let hash = group
        .encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)));
    (hash & 0x7fff_ffff) as u32 % shards.max(1)
}

/// A [`LIST`] answer: (group, protocol type, state) of each group.
pub fn decode_list(mut body: &[u8]) -> Option<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let group = read_str(&mut body)?;
        let protocol_type = read_str(&mut body)?;
        let state = read_str(&mut body)?;
        out.push((group, protocol_type, state));
    }
    Some(out)
}

/// The payload of a [`DELETE_GROUP`] or [`OFFSET_DELETE_CHECK`] post.
pub fn group_post(kind: u8, group: &str) -> Vec<u8> {
    let mut out = vec![kind];
    put_str(&mut out, Some(group));
    out
}

/// A string as a 2-byte length (`0xffff`: none) and its bytes (at most 65,534 of them;
/// Kafka's strings are int16-sized too).
fn put_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(&u16::MAX.to_be_bytes()),
        Some(s) => {
            let b = &s.as_bytes()[..s.len().min(u16::MAX as usize - 1)];
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
}

fn read_opt_str(body: &mut &[u8]) -> Option<Option<String>> {
    let len = body.get(..2)?;
    let len = u16::from_be_bytes([len[0], len[1]]);
    *body = &body[2..];
    if len == u16::MAX {
        return Some(None);
    }
    let s = body.get(..len as usize)?;
    let s = String::from_utf8(s.to_vec()).ok()?;
    *body = &body[len as usize..];
    Some(Some(s))
}

fn read_str(body: &mut &[u8]) -> Option<String> {
    read_opt_str(body)?
}
