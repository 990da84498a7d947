//! The group APIs on a client connection: FindCoordinator (the gateway holding the group's
//! shard, from the host's directory), the requests the group coordinator answers whole
//! (JoinGroup, SyncGroup, Heartbeat, LeaveGroup, DescribeGroups: posted to the home of the
//! group's shard, `crate::coordinator`; `NOT_COORDINATOR` when another gateway holds it),
//! ListGroups (asked of every shard this gateway holds: Kafka's AdminClient asks every
//! broker), and committed offsets (OffsetCommit, OffsetFetch, OffsetDelete, DeleteGroups),
//! which the connection stores itself in its namespace's kv once the coordinator said the
//! member may.
//!
//! **Committed offsets** are kv entries `offsets/<group>/<topic>/<partition>` (group and
//! topic percent-encoded, so that `/` separates): an `i64` offset, an `i32` leader epoch and
//! the metadata string. The kv is per namespace (the principal's: no client can read or
//! write another tenant's offsets), durable in the backend (a put completes once stored)
//! and loaded by every gateway of the backend, so offsets survive a gateway restart and
//! are the same on every gateway. docs/kafka.md section 3.1 says why this and not the
//! group-state topic yet.

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    ApiKey, BrokerId, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId,
    HeartbeatResponse, JoinGroupResponse, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest,
    OffsetDeleteResponse, OffsetFetchRequest, OffsetFetchResponse, RequestHeader,
    SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use magnetar_sdk::{Action, KvEntry, OpError};

use super::{JobEvent, KafkaConnection, Op};
use crate::coordinator::directory::Broker;
use crate::coordinator::{
    self, group::error as gerror, CommitCheck, DELETE_GROUP, DOMAIN, FORWARD, LIST,
    OFFSET_DELETE_CHECK,
};

/// Kafka's `offset.metadata.max.bytes`.
const MAX_METADATA: usize = 4096;
/// `OFFSET_METADATA_TOO_LARGE`.
const OFFSET_METADATA_TOO_LARGE: i16 = 12;
/// Page size of kv scans.
const SCAN_PAGE: u32 = 1000;

/// A group request being served.
pub(super) enum GroupJob {
    /// FindCoordinator, answered at its first step (taken then).
    Find(Option<FindCoordinatorRequest>),
    /// A request the coordinator answers whole: posted once, its answer sent as is.
    Forward {
        raw: Bytes,
        shard: u32,
        posted: bool,
    },
    List(ListJob),
    Commit(CommitJob),
    Fetch(FetchJob),
    DeleteGroups(DeleteJob),
    OffsetDelete(OffsetDeleteJob),
}

pub(super) struct ListJob {
    req: ListGroupsRequest,
    started: bool,
    left: usize,
    /// (group, protocol type, state) from every shard that answered.
    found: Vec<(String, String, String)>,
}

pub(super) struct CommitJob {
    req: OffsetCommitRequest,
    /// (topic, partition) positions, and each one's error so far.
    parts: Vec<(usize, usize, i16)>,
    started: bool,
    writes_left: Option<usize>,
}

pub(super) struct FetchJob {
    /// Each group: its name, the partitions asked (None: all committed), what was found.
    groups: Vec<FetchGroup>,
    started: bool,
    left: usize,
}

struct FetchGroup {
    name: String,
    asked: Option<Vec<(String, Vec<i32>)>>,
    /// (topic, partition, value) in the order found.
    found: Vec<(String, i32, Option<Vec<u8>>)>,
    error: i16,
}

pub(super) struct DeleteJob {
    /// Each group: its name, its error, whether it existed, and whether it is done.
    groups: Vec<(String, i16, bool, bool)>,
    started: bool,
    /// Deletes in flight per group.
    deleting: Vec<usize>,
}

pub(super) struct OffsetDeleteJob {
    req: OffsetDeleteRequest,
    started: bool,
    code: Option<i16>,
    writes_left: Option<usize>,
    top: i16,
}

/// Percent-encodes what is not `[A-Za-z0-9._-]`, so that `/` separates key levels.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn dec(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The kv prefix of a group's committed offsets.
pub fn group_prefix(group: &str) -> String {
    format!("offsets/{}/", enc(group))
}

/// The kv key of one committed offset.
pub fn offset_key(group: &str, topic: &str, partition: i32) -> String {
    format!("{}{}/{partition}", group_prefix(group), enc(topic))
}

/// (topic, partition) from a key's part after the group prefix.
fn parse_suffix(suffix: &str) -> Option<(String, i32)> {
    let (topic, partition) = suffix.rsplit_once('/')?;
    Some((dec(topic)?, partition.parse().ok()?))
}

/// A committed offset as stored: offset, leader epoch, metadata.
pub fn encode_offset(offset: i64, leader_epoch: i32, metadata: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&leader_epoch.to_be_bytes());
    match metadata {
        None => out.extend_from_slice(&u16::MAX.to_be_bytes()),
        Some(m) => {
            let m = &m.as_bytes()[..m.len().min(MAX_METADATA)];
            out.extend_from_slice(&(m.len() as u16).to_be_bytes());
            out.extend_from_slice(m);
        }
    }
    out
}

/// A stored committed offset; `None` if it is not one.
pub fn decode_offset(v: &[u8]) -> Option<(i64, i32, Option<String>)> {
    let offset = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let epoch = i32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
    let len = u16::from_be_bytes(v.get(12..14)?.try_into().ok()?);
    let metadata = if len == u16::MAX {
        None
    } else {
        Some(String::from_utf8(v.get(14..14 + len as usize)?.to_vec()).ok()?)
    };
    Some((offset, epoch, metadata))
}

/// A committed offset as OffsetFetch answers it: partition, offset, leader epoch, metadata.
type Committed = (i32, i64, i32, Option<String>);

/// The error code of a failed kv or post: retriable for the client.
/// The Kafka error for a failed post or kv operation: `NOT_COORDINATOR` when the host says
/// another gateway holds the group's shard (the client asks FindCoordinator again).
fn backend_code(e: &OpError) -> i16 {
    if e.message.starts_with("not-owner") {
        gerror::NOT_COORDINATOR
    } else {
        gerror::COORDINATOR_NOT_AVAILABLE
    }
}

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

impl KafkaConnection {
    /// The shard of a group's coordinator.
    fn shard(&self, group: &str) -> u32 {
        coordinator::shard_of(group, self.config.coordinator_shards)
    }

    pub(super) fn start_find_coordinator(
        &mut self,
        header: &RequestHeader,
        r: FindCoordinatorRequest,
    ) -> Result<(), String> {
        let version = header.request_api_version;
        // Only groups (key type 0) have a coordinator here: no transactions.
        let find = |this: &Self, key: &str| -> (i16, Option<Broker>) {
            if r.key_type != 0 {
                return (gerror::COORDINATOR_NOT_AVAILABLE, None);
            }
            match this.directory.owner(this.shard(key)) {
                Some(b) => (gerror::NONE, Some(b)),
                None => (gerror::COORDINATOR_NOT_AVAILABLE, None),
            }
        };
        let body = if version >= 4 {
            let coordinators = r
                .coordinator_keys
                .iter()
                .map(|key| {
                    let (code, b) = find(self, key.as_str());
                    let b = b.unwrap_or(Broker {
                        node_id: -1,
                        host: String::new(),
                        port: -1,
                        local: false,
                    });
                    Coordinator::default()
                        .with_key(key.clone())
                        .with_node_id(BrokerId(b.node_id))
                        .with_host(s(b.host))
                        .with_port(b.port)
                        .with_error_code(code)
                })
                .collect();
            FindCoordinatorResponse::default().with_coordinators(coordinators)
        } else {
            let (code, b) = find(self, r.key.as_str());
            let b = b.unwrap_or(Broker {
                node_id: -1,
                host: String::new(),
                port: -1,
                local: false,
            });
            FindCoordinatorResponse::default()
                .with_error_code(code)
                .with_node_id(BrokerId(b.node_id))
                .with_host(s(b.host))
                .with_port(b.port)
        };
        self.respond(header, &body)
    }

    pub(super) fn forward_job(&self, raw: Bytes, group: &GroupId) -> GroupJob {
        GroupJob::Forward {
            raw,
            shard: self.shard(group.as_str()),
            posted: false,
        }
    }

    pub(super) fn list_job(req: ListGroupsRequest) -> GroupJob {
        GroupJob::List(ListJob {
            req,
            started: false,
            left: 0,
            found: Vec::new(),
        })
    }

    pub(super) fn commit_job(req: OffsetCommitRequest) -> GroupJob {
        let parts = req
            .topics
            .iter()
            .enumerate()
            .flat_map(|(t, topic)| (0..topic.partitions.len()).map(move |p| (t, p, gerror::NONE)))
            .collect();
        GroupJob::Commit(CommitJob {
            req,
            parts,
            started: false,
            writes_left: None,
        })
    }

    pub(super) fn fetch_job(version: i16, req: OffsetFetchRequest) -> GroupJob {
        let groups = if version >= 8 {
            req.groups
                .into_iter()
                .map(|g| FetchGroup {
                    name: g.group_id.0.to_string(),
                    asked: g.topics.map(|ts| {
                        ts.into_iter()
                            .map(|t| (t.name.0.to_string(), t.partition_indexes))
                            .collect()
                    }),
                    found: Vec::new(),
                    error: gerror::NONE,
                })
                .collect()
        } else {
            vec![FetchGroup {
                name: req.group_id.0.to_string(),
                asked: req.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name.0.to_string(), t.partition_indexes))
                        .collect()
                }),
                found: Vec::new(),
                error: gerror::NONE,
            }]
        };
        GroupJob::Fetch(FetchJob {
            groups,
            started: false,
            left: 0,
        })
    }

    pub(super) fn delete_groups_job(req: DeleteGroupsRequest) -> GroupJob {
        let n = req.groups_names.len();
        GroupJob::DeleteGroups(DeleteJob {
            groups: req
                .groups_names
                .into_iter()
                .map(|g| (g.0.to_string(), gerror::NONE, false, false))
                .collect(),
            started: false,
            deleting: vec![0; n],
        })
    }

    pub(super) fn offset_delete_job(req: OffsetDeleteRequest) -> GroupJob {
        GroupJob::OffsetDelete(OffsetDeleteJob {
            req,
            started: false,
            code: None,
            writes_left: None,
            top: gerror::NONE,
        })
    }

    fn post(&mut self, index: usize, shard: u32, payload: Vec<u8>) {
        let token = self.ops.start(Op::Post(index));
        self.out.push(Action::PostHome {
            token,
            domain: DOMAIN.to_string(),
            shard,
            payload,
        });
    }

    fn kv_put(&mut self, index: usize, key: String, value: Option<Vec<u8>>) {
        let token = self.ops.start(Op::Kv(index));
        self.out.push(Action::KvPut { token, key, value });
    }

    fn kv_scan(&mut self, index: usize, prefix: String, start_after: Option<String>) {
        let token = self.ops.start(Op::KvScan(index, prefix.clone()));
        self.out.push(Action::KvScan {
            token,
            prefix,
            start_after,
            limit: SCAN_PAGE,
        });
    }

    /// Moves a group request on; `Ok(true)` once answered.
    pub(super) fn step_group(
        &mut self,
        header: &RequestHeader,
        job: &mut GroupJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        match job {
            GroupJob::Forward { raw, shard, posted } => {
                if !*posted {
                    *posted = true;
                    let mut payload = Vec::with_capacity(raw.len() + 1);
                    payload.push(FORWARD);
                    payload.extend_from_slice(raw);
                    let shard = *shard;
                    self.post(0, shard, payload);
                }
                for e in inbox {
                    if let JobEvent::Posted(_, result) = e {
                        return match result {
                            Ok(frame) if !frame.is_empty() => {
                                self.out.send(frame);
                                Ok(true)
                            }
                            Ok(_) => Err("the group coordinator refused the request".into()),
                            Err(e) => {
                                let code = backend_code(&e);
                                self.coordinator_error(header, raw.clone(), code)?;
                                Ok(true)
                            }
                        };
                    }
                }
                Ok(false)
            }
            GroupJob::List(j) => self.step_list(header, j, inbox),
            GroupJob::Find(r) => {
                if let Some(r) = r.take() {
                    self.start_find_coordinator(header, r)?;
                }
                Ok(true)
            }
            GroupJob::Commit(j) => self.step_commit(header, j, inbox),
            GroupJob::Fetch(j) => self.step_fetch_offsets(header, j, inbox),
            GroupJob::DeleteGroups(j) => self.step_delete_groups(header, j, inbox),
            GroupJob::OffsetDelete(j) => self.step_offset_delete(header, j, inbox),
        }
    }

    /// A group request the coordinator could not answer: the API's own response with
    /// `code` (`NOT_COORDINATOR`: the client asks FindCoordinator again).
    fn coordinator_error(
        &mut self,
        header: &RequestHeader,
        raw: Bytes,
        code: i16,
    ) -> Result<(), String> {
        let version = header.request_api_version;
        match ApiKey::try_from(header.request_api_key) {
            Ok(ApiKey::JoinGroup) => self.respond(
                header,
                &JoinGroupResponse::default()
                    .with_error_code(code)
                    .with_generation_id(-1)
                    .with_protocol_name((version < 7).then(StrBytes::default)),
            ),
            Ok(ApiKey::SyncGroup) => {
                self.respond(header, &SyncGroupResponse::default().with_error_code(code))
            }
            Ok(ApiKey::Heartbeat) => {
                self.respond(header, &HeartbeatResponse::default().with_error_code(code))
            }
            Ok(ApiKey::LeaveGroup) => {
                self.respond(header, &LeaveGroupResponse::default().with_error_code(code))
            }
            Ok(ApiKey::DescribeGroups) => {
                let (_, r) = super::decode_request::<DescribeGroupsRequest>(raw, version)?;
                let groups = r
                    .groups
                    .into_iter()
                    .map(|g| {
                        DescribedGroup::default()
                            .with_group_id(g)
                            .with_error_code(code)
                            .with_authorized_operations(i32::MIN)
                    })
                    .collect();
                self.respond(
                    header,
                    &DescribeGroupsResponse::default().with_groups(groups),
                )
            }
            _ => Err("not a group request".into()),
        }
    }

    /// ListGroups: the groups of every shard this gateway holds, filtered by state (v4)
    /// and type (v5).
    fn step_list(
        &mut self,
        header: &RequestHeader,
        j: &mut ListJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        if !j.started {
            j.started = true;
            for shard in 0..self.config.coordinator_shards {
                if self.directory.owner(shard).is_some_and(|b| b.local) {
                    self.post(shard as usize, shard, vec![LIST]);
                    j.left += 1;
                }
            }
        }
        for e in inbox {
            if let JobEvent::Posted(_, result) = e {
                j.left = j.left.saturating_sub(1);
                // A shard lost or not held after all: its groups are another gateway's.
                if let Some(found) = result.ok().and_then(|a| coordinator::decode_list(&a)) {
                    j.found.extend(found);
                }
            }
        }
        if j.left > 0 {
            return Ok(false);
        }
        let states: Vec<String> = j
            .req
            .states_filter
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let types: Vec<String> = j
            .req
            .types_filter
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let mut found = std::mem::take(&mut j.found);
        found.sort();
        let groups = found
            .into_iter()
            .filter(|(_, t, st)| {
                (states.is_empty() || states.contains(&st.to_ascii_lowercase()))
                    && (types.is_empty() || types.contains(&t.to_ascii_lowercase()))
            })
            .map(|(g, t, st)| {
                ListedGroup::default()
                    .with_group_id(GroupId(s(g)))
                    .with_protocol_type(s(t))
                    .with_group_state(s(st))
            })
            .collect();
        self.respond(header, &ListGroupsResponse::default().with_groups(groups))?;
        Ok(true)
    }

    fn step_commit(
        &mut self,
        header: &RequestHeader,
        j: &mut CommitJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        let group = j.req.group_id.0.to_string();
        if !j.started {
            j.started = true;
            if group.is_empty() {
                return self.commit_answer(header, j, Some(gerror::INVALID_GROUP_ID));
            }
            let check = CommitCheck {
                group: group.clone(),
                member_id: j.req.member_id.to_string(),
                instance_id: j.req.group_instance_id.as_ref().map(|s| s.to_string()),
                generation: j.req.generation_id_or_member_epoch,
            };
            let shard = self.shard(&group);
            self.post(0, shard, check.encode());
            return Ok(false);
        }
        for e in inbox {
            match e {
                JobEvent::Posted(_, result) => {
                    let code = match result {
                        Ok(a) if a.len() == 2 => i16::from_be_bytes([a[0], a[1]]),
                        Ok(_) => return Err("the group coordinator refused the request".into()),
                        Err(e) => backend_code(&e),
                    };
                    if code != gerror::NONE {
                        return self.commit_answer(header, j, Some(code));
                    }
                    let mut writes = 0;
                    for i in 0..j.parts.len() {
                        let (t, p, _) = j.parts[i];
                        let Some(topic) = j.req.topics.get(t) else {
                            continue;
                        };
                        let Some(part) = topic.partitions.get(p) else {
                            continue;
                        };
                        let metadata = part.committed_metadata.as_ref().map(|m| m.as_str());
                        if metadata.is_some_and(|m| m.len() > MAX_METADATA) {
                            j.parts[i].2 = OFFSET_METADATA_TOO_LARGE;
                            continue;
                        }
                        let key = offset_key(&group, topic.name.0.as_str(), part.partition_index);
                        let value = encode_offset(
                            part.committed_offset,
                            part.committed_leader_epoch,
                            metadata,
                        );
                        self.kv_put(i, key, Some(value));
                        writes += 1;
                    }
                    j.writes_left = Some(writes);
                }
                JobEvent::Kv(i, result) => {
                    if let (Err(e), Some(part)) = (result, j.parts.get_mut(i)) {
                        part.2 = backend_code(&e);
                    }
                    if let Some(left) = j.writes_left.as_mut() {
                        *left = left.saturating_sub(1);
                    }
                }
                _ => {}
            }
        }
        if j.writes_left == Some(0) {
            return self.commit_answer(header, j, None);
        }
        Ok(false)
    }

    fn commit_answer(
        &mut self,
        header: &RequestHeader,
        j: &CommitJob,
        all: Option<i16>,
    ) -> Result<bool, String> {
        let topics = j
            .req
            .topics
            .iter()
            .enumerate()
            .map(|(t, topic)| {
                OffsetCommitResponseTopic::default()
                    .with_name(topic.name.clone())
                    .with_partitions(
                        topic
                            .partitions
                            .iter()
                            .enumerate()
                            .map(|(p, part)| {
                                let code = all.unwrap_or_else(|| {
                                    j.parts
                                        .iter()
                                        .find(|(a, b, _)| *a == t && *b == p)
                                        .map(|x| x.2)
                                        .unwrap_or(gerror::NONE)
                                });
                                OffsetCommitResponsePartition::default()
                                    .with_partition_index(part.partition_index)
                                    .with_error_code(code)
                            })
                            .collect(),
                    )
            })
            .collect();
        self.respond(header, &OffsetCommitResponse::default().with_topics(topics))?;
        Ok(true)
    }

    fn step_fetch_offsets(
        &mut self,
        header: &RequestHeader,
        j: &mut FetchJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        if !j.started {
            j.started = true;
            for g in 0..j.groups.len() {
                let name = j.groups[g].name.clone();
                match j.groups[g].asked.clone() {
                    None => {
                        self.kv_scan(g, group_prefix(&name), None);
                        j.left += 1;
                    }
                    Some(topics) => {
                        for (topic, parts) in topics {
                            for p in parts {
                                // A kv read per partition; the found slot is filled below.
                                let slot = j.groups[g].found.len();
                                j.groups[g].found.push((topic.clone(), p, None));
                                let token = self.ops.start(Op::KvGet(g, slot));
                                self.out.push(Action::KvGet {
                                    token,
                                    key: offset_key(&name, &topic, p),
                                });
                                j.left += 1;
                            }
                        }
                    }
                }
            }
        }
        for e in inbox {
            match e {
                JobEvent::KvGot(g, slot, result) => {
                    j.left = j.left.saturating_sub(1);
                    let Some(group) = j.groups.get_mut(g) else {
                        continue;
                    };
                    match result {
                        Ok(v) => {
                            if let Some(f) = group.found.get_mut(slot) {
                                f.2 = v;
                            }
                        }
                        Err(e) => group.error = backend_code(&e),
                    }
                }
                JobEvent::KvScan(g, prefix, result) => {
                    let Some(group) = j.groups.get_mut(g) else {
                        j.left = j.left.saturating_sub(1);
                        continue;
                    };
                    match result {
                        Ok(entries) => {
                            let full = entries.len() as u32 >= SCAN_PAGE;
                            let last = entries.last().map(|e| e.key.clone());
                            for KvEntry { key, value } in entries {
                                if let Some((t, p)) =
                                    key.strip_prefix(&prefix).and_then(parse_suffix)
                                {
                                    group.found.push((t, p, Some(value)));
                                }
                            }
                            if full {
                                self.kv_scan(g, prefix, last);
                            } else {
                                j.left = j.left.saturating_sub(1);
                            }
                        }
                        Err(e) => {
                            group.error = backend_code(&e);
                            j.left = j.left.saturating_sub(1);
                        }
                    }
                }
                _ => {}
            }
        }
        if j.left > 0 {
            return Ok(false);
        }
        let version = header.request_api_version;
        // Per group: topics in first-seen order, each with its partitions.
        let mut per_group = Vec::new();
        for g in &j.groups {
            let mut topics: Vec<(String, Vec<Committed>)> = Vec::new();
            for (t, p, v) in &g.found {
                let (offset, epoch, md) =
                    v.as_deref()
                        .and_then(decode_offset)
                        .unwrap_or((-1, -1, Some(String::new())));
                match topics.iter_mut().find(|(n, _)| n == t) {
                    Some((_, ps)) => ps.push((*p, offset, epoch, md)),
                    None => topics.push((t.clone(), vec![(*p, offset, epoch, md)])),
                }
            }
            per_group.push((g.name.clone(), g.error, topics));
        }
        let body = if version >= 8 {
            OffsetFetchResponse::default().with_groups(
                per_group
                    .into_iter()
                    .map(|(name, error, topics)| {
                        OffsetFetchResponseGroup::default()
                            .with_group_id(GroupId(s(name)))
                            .with_error_code(error)
                            .with_topics(
                                topics
                                    .into_iter()
                                    .map(|(t, ps)| {
                                        OffsetFetchResponseTopics::default()
                                            .with_name(TopicName(s(t)))
                                            .with_partitions(
                                                ps.into_iter()
                                                    .map(|(p, o, e, md)| {
                                                        OffsetFetchResponsePartitions::default()
                                                            .with_partition_index(p)
                                                            .with_committed_offset(o)
                                                            .with_committed_leader_epoch(e)
                                                            .with_metadata(md.map(s))
                                                    })
                                                    .collect(),
                                            )
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            )
        } else {
            let (_, error, topics) =
                per_group
                    .into_iter()
                    .next()
                    .unwrap_or((String::new(), gerror::NONE, Vec::new()));
            OffsetFetchResponse::default()
                .with_error_code(error)
                .with_topics(
                    topics
                        .into_iter()
                        .map(|(t, ps)| {
                            OffsetFetchResponseTopic::default()
                                .with_name(TopicName(s(t)))
                                .with_partitions(
                                    ps.into_iter()
                                        .map(|(p, o, e, md)| {
                                            OffsetFetchResponsePartition::default()
                                                .with_partition_index(p)
                                                .with_committed_offset(o)
                                                .with_committed_leader_epoch(e)
                                                .with_metadata(md.map(s))
                                                .with_error_code(error)
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                )
        };
        self.respond(header, &body)?;
        Ok(true)
    }

    fn step_delete_groups(
        &mut self,
        header: &RequestHeader,
        j: &mut DeleteJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        if !j.started {
            j.started = true;
            for i in 0..j.groups.len() {
                let payload = coordinator::group_post(DELETE_GROUP, &j.groups[i].0);
                let shard = self.shard(&j.groups[i].0);
                self.post(i, shard, payload);
            }
        }
        for e in inbox {
            match e {
                JobEvent::Posted(i, result) => {
                    let Some(g) = j.groups.get_mut(i) else {
                        continue;
                    };
                    match result {
                        Ok(a) if a.len() == 3 => {
                            g.1 = i16::from_be_bytes([a[0], a[1]]);
                            g.2 = a[2] == 1;
                            if g.1 == gerror::NONE {
                                let prefix = group_prefix(&g.0);
                                self.kv_scan(i, prefix, None);
                            } else {
                                g.3 = true;
                            }
                        }
                        Ok(_) => return Err("the group coordinator refused the request".into()),
                        Err(e) => {
                            g.1 = backend_code(&e);
                            g.3 = true;
                        }
                    }
                }
                JobEvent::KvScan(i, prefix, result) => {
                    let Some(g) = j.groups.get_mut(i) else {
                        continue;
                    };
                    match result {
                        Ok(entries) => {
                            g.2 |= !entries.is_empty();
                            let full = entries.len() as u32 >= SCAN_PAGE;
                            let last = entries.last().map(|e| e.key.clone());
                            for e in entries {
                                j.deleting[i] += 1;
                                self.kv_put(i, e.key, None);
                            }
                            if full {
                                self.kv_scan(i, prefix, last);
                            } else if j.deleting[i] == 0 {
                                g.3 = true;
                            }
                            // Else done when the last delete completes.
                            if !full && j.deleting[i] > 0 {
                                g.3 = false;
                            }
                        }
                        Err(e) => {
                            g.1 = backend_code(&e);
                            g.3 = true;
                        }
                    }
                }
                JobEvent::Kv(i, result) => {
                    if let Some(n) = j.deleting.get_mut(i) {
                        *n = n.saturating_sub(1);
                        if let Some(g) = j.groups.get_mut(i) {
                            if let Err(e) = result {
                                g.1 = backend_code(&e);
                            }
                            if *n == 0 {
                                g.3 = true;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if !j.groups.iter().all(|g| g.3) {
            return Ok(false);
        }
        let results = j
            .groups
            .iter()
            .map(|(name, code, existed, _)| {
                let code = if *code == gerror::NONE && !existed {
                    gerror::GROUP_ID_NOT_FOUND
                } else {
                    *code
                };
                DeletableGroupResult::default()
                    .with_group_id(GroupId(s(name.clone())))
                    .with_error_code(code)
            })
            .collect();
        self.respond(
            header,
            &DeleteGroupsResponse::default().with_results(results),
        )?;
        Ok(true)
    }

    fn step_offset_delete(
        &mut self,
        header: &RequestHeader,
        j: &mut OffsetDeleteJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        let group = j.req.group_id.0.to_string();
        if !j.started {
            j.started = true;
            if group.is_empty() {
                j.top = gerror::INVALID_GROUP_ID;
                j.code = Some(gerror::NONE);
                j.writes_left = Some(0);
            } else {
                let shard = self.shard(&group);
                self.post(
                    0,
                    shard,
                    coordinator::group_post(OFFSET_DELETE_CHECK, &group),
                );
                return Ok(false);
            }
        }
        for e in inbox {
            match e {
                JobEvent::Posted(_, result) => {
                    let code = match result {
                        Ok(a) if a.len() == 2 => i16::from_be_bytes([a[0], a[1]]),
                        Ok(_) => return Err("the group coordinator refused the request".into()),
                        Err(e) => {
                            j.top = backend_code(&e);
                            gerror::NONE
                        }
                    };
                    j.code = Some(code);
                    let mut writes = 0;
                    if code == gerror::NONE && j.top == gerror::NONE {
                        let keys: Vec<String> = j
                            .req
                            .topics
                            .iter()
                            .flat_map(|t| {
                                let g = group.clone();
                                t.partitions.iter().map(move |p| {
                                    offset_key(&g, t.name.0.as_str(), p.partition_index)
                                })
                            })
                            .collect();
                        for key in keys {
                            self.kv_put(0, key, None);
                            writes += 1;
                        }
                    }
                    j.writes_left = Some(writes);
                }
                JobEvent::Kv(_, result) => {
                    if let Err(e) = result {
                        j.top = backend_code(&e);
                    }
                    if let Some(left) = j.writes_left.as_mut() {
                        *left = left.saturating_sub(1);
                    }
                }
                _ => {}
            }
        }
        if j.writes_left != Some(0) {
            return Ok(false);
        }
        let code = j.code.unwrap_or(gerror::NONE);
        let topics = j
            .req
            .topics
            .iter()
            .map(|t| {
                OffsetDeleteResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                OffsetDeleteResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(code)
                            })
                            .collect(),
                    )
            })
            .collect();
        let body = OffsetDeleteResponse::default()
            .with_error_code(j.top)
            .with_topics(topics);
        self.respond(header, &body)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip() {
        let key = offset_key("my/group é", "t.1", 3);
        assert_eq!(key, "offsets/my%2Fgroup%20%C3%A9/t.1/3");
        let prefix = group_prefix("my/group é");
        assert_eq!(
            key.strip_prefix(&prefix).and_then(parse_suffix),
            Some(("t.1".to_string(), 3))
        );
        let v = encode_offset(42, 7, Some("meta"));
        assert_eq!(decode_offset(&v), Some((42, 7, Some("meta".into()))));
        assert_eq!(
            decode_offset(&encode_offset(-1, -1, None)),
            Some((-1, -1, None))
        );
        assert_eq!(decode_offset(&v[..5]), None);
        assert_eq!(dec("%zz"), None);
    }
}
