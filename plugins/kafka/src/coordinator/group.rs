//! One consumer group: the state machine of Kafka's classic `GroupCoordinator`
//! (`kafka.coordinator.group.GroupCoordinator` / `GroupMetadata`, KIP-62, KIP-345, KIP-394).
//!
//! States: Empty → PreparingRebalance → CompletingRebalance → Stable, and back to
//! PreparingRebalance on any change of membership; a group with no members is Empty.
//! - **JoinGroup** parks each member's request until every known member has rejoined (or the
//!   rebalance timeout removes the laggards); then the generation goes up, a protocol all
//!   members support is chosen, the leader gets every member's metadata and the others none.
//!   A group that was Empty waits `initial_rebalance_delay_ms` first (extended by each new
//!   member, up to the rebalance timeout: Kafka's `InitialDelayedJoin`).
//! - **KIP-394**: a new dynamic member of JoinGroup v4+ gets `MEMBER_ID_REQUIRED` with its
//!   id, and joins with it (until then it is pending, expired after its session timeout).
//! - **SyncGroup** parks members until the leader's assignment arrives; then the group is
//!   Stable and each gets its own.
//! - **Heartbeat** keeps a member alive; `REBALANCE_IN_PROGRESS` tells it to rejoin;
//!   a member silent for its session timeout is removed (a rebalance follows).
//! - **Static members** (KIP-345, `group.instance.id`): a known instance that joins again
//!   with an empty member id takes a new member id and its old assignment, with no
//!   rebalance when the group is Stable; the old member id is fenced (`FENCED_INSTANCE_ID`).
//!
//! Cooperative rebalancing (KIP-429) is the client's protocol over the same calls: nothing
//! here knows about it. What this does not do: KIP-848's new protocol.

use std::collections::{BTreeMap, HashMap};

/// Kafka error codes of the group APIs.
pub mod error {
    pub const NONE: i16 = 0;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    pub const INVALID_GROUP_ID: i16 = 24;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const NON_EMPTY_GROUP: i16 = 68;
    pub const GROUP_ID_NOT_FOUND: i16 = 69;
    pub const GROUP_MAX_SIZE_REACHED: i16 = 81;
    pub const MEMBER_ID_REQUIRED: i16 = 79;
    pub const FENCED_INSTANCE_ID: i16 = 82;
    pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = 86;
}

/// A group's state, as DescribeGroups and ListGroups name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

/// A request parked in the group until it can be answered: the post to reply to, and the
/// request's version and correlation id to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    pub post_id: u64,
    pub version: i16,
    pub correlation_id: i32,
}

/// What a JoinGroup answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAnswer {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// The leader's view: every member with its metadata for the chosen protocol.
    pub members: Vec<(String, Option<String>, Vec<u8>)>,
    pub skip_assignment: bool,
}

impl JoinAnswer {
    pub fn error(error: i16, member_id: &str) -> JoinAnswer {
        JoinAnswer {
            error,
            generation: -1,
            protocol_type: None,
            protocol: None,
            leader: String::new(),
            member_id: member_id.to_string(),
            members: Vec::new(),
            skip_assignment: false,
        }
    }
}

/// What a SyncGroup answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncAnswer {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub assignment: Vec<u8>,
}

impl SyncAnswer {
    pub fn error(error: i16) -> SyncAnswer {
        SyncAnswer {
            error,
            protocol_type: None,
            protocol: None,
            assignment: Vec::new(),
        }
    }
}

/// Answers the group gives to parked requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Join(Parked, JoinAnswer),
    Sync(Parked, SyncAnswer),
}

/// A JoinGroup as the group sees it.
#[derive(Debug, Clone)]
pub struct Join {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Vec<u8>)>,
    /// KIP-394: a new dynamic member must first get its id (JoinGroup v4+).
    pub require_known_member_id: bool,
    pub parked: Parked,
}

/// One member of a group.
#[derive(Debug, Clone)]
pub struct Member {
    pub instance_id: Option<String>,
    pub client_id: String,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    pub protocols: Vec<(String, Vec<u8>)>,
    pub assignment: Vec<u8>,
    pub last_heartbeat_ms: u64,
    pub awaiting_join: Option<Parked>,
    pub awaiting_sync: Option<Parked>,
}

impl Member {
    /// Its metadata for `protocol`.
    fn metadata(&self, protocol: &str) -> Vec<u8> {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

/// Most members (and KIP-394 pending ids) of one group: the maps are keyed by client input
/// (Kafka's `group.max.size` is unbounded by default; a bound keeps a home's memory finite).
pub const MAX_MEMBERS: usize = 10_000;

/// Limits and delays of every group of a home.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    pub initial_rebalance_delay_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        // Kafka's defaults: group.min.session.timeout.ms, group.max.session.timeout.ms,
        // group.initial.rebalance.delay.ms.
        Timing {
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
        }
    }
}

/// One consumer group.
#[derive(Debug, Clone)]
pub struct Group {
    pub state: State,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// group.instance.id -> member id.
    pub static_members: HashMap<String, String>,
    /// KIP-394: ids handed out, not joined with yet, and when they expire.
    pub pending: HashMap<String, u64>,
    /// When the join barrier gives up on members that did not rejoin.
    rebalance_deadline_ms: u64,
    /// The initial delay of a group that was Empty: no completion before this.
    initial_until_ms: u64,
    /// When the initial delay started (it extends up to the rebalance timeout from here).
    initial_started_ms: u64,
    next_member: u64,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            static_members: HashMap::new(),
            pending: HashMap::new(),
            rebalance_deadline_ms: 0,
            initial_until_ms: 0,
            initial_started_ms: 0,
            next_member: 0,
        }
    }
}

impl Group {
    fn new_member_id(&mut self, client_id: &str, now_ms: u64) -> String {
        self.next_member += 1;
        format!("{client_id}-{now_ms:x}-{:x}", self.next_member)
    }

    /// Whether a member's protocols are compatible with the group's: same protocol type,
    /// and one protocol in common with every member.
    fn compatible(&self, protocol_type: &str, protocols: &[(String, Vec<u8>)]) -> bool {
        if protocols.is_empty() || protocol_type.is_empty() {
            return false;
        }
        if self.members.is_empty() {
            return true;
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        protocols.iter().any(|(name, _)| {
            self.members
                .values()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        })
    }

    /// The largest rebalance timeout of the members.
    fn rebalance_timeout_ms(&self) -> u64 {
        self.members
            .values()
            .map(|m| m.rebalance_timeout_ms)
            .max()
            .unwrap_or(0)
    }

    /// JoinGroup. Answers at once (errors, KIP-394, a static rejoin of a Stable group) or
    /// parks the request; `answers` gets whatever completes.
    pub fn join(&mut self, now_ms: u64, timing: &Timing, j: Join, answers: &mut Vec<Answer>) {
        let parked = j.parked;
        let reply =
            |answers: &mut Vec<Answer>, a: JoinAnswer| answers.push(Answer::Join(parked, a));
        if !(timing.min_session_timeout_ms..=timing.max_session_timeout_ms)
            .contains(&j.session_timeout_ms)
        {
            return reply(
                answers,
                JoinAnswer::error(error::INVALID_SESSION_TIMEOUT, &j.member_id),
            );
        }
        if !self.compatible(&j.protocol_type, &j.protocols) {
            return reply(
                answers,
                JoinAnswer::error(error::INCONSISTENT_GROUP_PROTOCOL, &j.member_id),
            );
        }
        if j.member_id.is_empty() {
            self.join_unknown(now_ms, timing, j, answers)
        } else {
            self.join_known(now_ms, timing, j, answers)
        }
    }

    fn join_unknown(&mut self, now_ms: u64, timing: &Timing, j: Join, answers: &mut Vec<Answer>) {
        let known_instance = j
            .instance_id
            .as_ref()
            .is_some_and(|i| self.static_members.contains_key(i));
        if !known_instance && self.members.len() + self.pending.len() >= MAX_MEMBERS {
            answers.push(Answer::Join(
                j.parked,
                JoinAnswer::error(error::GROUP_MAX_SIZE_REACHED, ""),
            ));
            return;
        }
        let member_id = self.new_member_id(&j.client_id, now_ms);
        if let Some(instance) = j.instance_id.clone() {
            if let Some(old) = self.static_members.get(&instance).cloned() {
                return self.replace_static(now_ms, timing, old, member_id, j, answers);
            }
            self.static_members.insert(instance, member_id.clone());
        } else if j.require_known_member_id {
            // KIP-394: the member joins again with this id.
            let expiry = now_ms + j.session_timeout_ms.max(0) as u64;
            self.pending.insert(member_id.clone(), expiry);
            answers.push(Answer::Join(
                j.parked,
                JoinAnswer::error(error::MEMBER_ID_REQUIRED, &member_id),
            ));
            return;
        }
        self.add_member(now_ms, timing, member_id, j, answers);
    }

    fn join_known(&mut self, now_ms: u64, timing: &Timing, j: Join, answers: &mut Vec<Answer>) {
        let parked = j.parked;
        if self.pending.remove(&j.member_id).is_some() {
            let member_id = j.member_id.clone();
            return self.add_member(now_ms, timing, member_id, j, answers);
        }
        if let Some(e) = self.check_member(&j.member_id, j.instance_id.as_deref()) {
            answers.push(Answer::Join(parked, JoinAnswer::error(e, &j.member_id)));
            return;
        }
        let changed = {
            let Some(m) = self.members.get_mut(&j.member_id) else {
                return;
            };
            let changed = m.protocols != j.protocols;
            m.protocols = j.protocols;
            m.session_timeout_ms = j.session_timeout_ms.max(0) as u64;
            m.rebalance_timeout_ms = j.rebalance_timeout_ms.max(0) as u64;
            m.last_heartbeat_ms = now_ms;
            if let Some(old) = m.awaiting_join.replace(parked) {
                // A retried join: the older request is superseded.
                answers.push(Answer::Join(
                    old,
                    JoinAnswer::error(error::UNKNOWN_MEMBER_ID, &j.member_id),
                ));
            }
            changed
        };
        match self.state {
            State::PreparingRebalance => {}
            State::CompletingRebalance | State::Stable
                if !changed && self.leader.as_deref() != Some(j.member_id.as_str()) =>
            {
                // It lost the answer (or rejoins with nothing new): the current generation.
                if let Some(m) = self.members.get_mut(&j.member_id) {
                    m.awaiting_join = None;
                }
                let answer = self.join_answer(&j.member_id, false);
                answers.push(Answer::Join(parked, answer));
                return;
            }
            _ => self.prepare_rebalance(now_ms, timing, answers),
        }
        self.try_complete_join(now_ms, answers);
    }

    /// KIP-345: a known static instance comes back with a new member id.
    fn replace_static(
        &mut self,
        now_ms: u64,
        timing: &Timing,
        old: String,
        new: String,
        j: Join,
        answers: &mut Vec<Answer>,
    ) {
        let Some(mut member) = self.members.remove(&old) else {
            // A stale mapping: join as new.
            if let Some(instance) = &j.instance_id {
                self.static_members.insert(instance.clone(), new.clone());
            }
            return self.add_member(now_ms, timing, new, j, answers);
        };
        if let Some(parked) = member.awaiting_join.take() {
            answers.push(Answer::Join(
                parked,
                JoinAnswer::error(error::FENCED_INSTANCE_ID, &old),
            ));
        }
        if let Some(parked) = member.awaiting_sync.take() {
            answers.push(Answer::Sync(
                parked,
                SyncAnswer::error(error::FENCED_INSTANCE_ID),
            ));
        }
        member.protocols = j.protocols;
        member.client_id = j.client_id;
        member.session_timeout_ms = j.session_timeout_ms.max(0) as u64;
        member.rebalance_timeout_ms = j.rebalance_timeout_ms.max(0) as u64;
        member.last_heartbeat_ms = now_ms;
        if self.leader.as_deref() == Some(old.as_str()) {
            self.leader = Some(new.clone());
        }
        if let Some(instance) = &j.instance_id {
            self.static_members.insert(instance.clone(), new.clone());
        }
        self.members.insert(new.clone(), member);
        // As Kafka (`updateStaticMemberAndRebalance`): a rebalance only if the protocol
        // the group would select changes; new metadata alone (its owned partitions) does
        // not count.
        let changed = self.select_protocol() != self.protocol;
        if self.state == State::Stable && !changed {
            // No rebalance: the member gets the current generation and, at SyncGroup, its
            // old assignment. The leader is told to skip the assignment (v9).
            let is_leader = self.leader.as_deref() == Some(new.as_str());
            let answer = self.join_answer(&new, is_leader);
            answers.push(Answer::Join(j.parked, answer));
            return;
        }
        if let Some(m) = self.members.get_mut(&new) {
            m.awaiting_join = Some(j.parked);
        }
        if self.state != State::PreparingRebalance {
            self.prepare_rebalance(now_ms, timing, answers);
        }
        self.try_complete_join(now_ms, answers);
    }

    fn add_member(
        &mut self,
        now_ms: u64,
        timing: &Timing,
        member_id: String,
        j: Join,
        answers: &mut Vec<Answer>,
    ) {
        if self.members.is_empty() {
            self.protocol_type = Some(j.protocol_type.clone());
        }
        self.members.insert(
            member_id,
            Member {
                instance_id: j.instance_id,
                client_id: j.client_id,
                session_timeout_ms: j.session_timeout_ms.max(0) as u64,
                rebalance_timeout_ms: j.rebalance_timeout_ms.max(0) as u64,
                protocols: j.protocols,
                assignment: Vec::new(),
                last_heartbeat_ms: now_ms,
                awaiting_join: Some(j.parked),
                awaiting_sync: None,
            },
        );
        if self.state == State::PreparingRebalance && self.initial_until_ms > now_ms {
            // A new member during the initial delay extends it (InitialDelayedJoin).
            let cap = self.initial_started_ms + self.rebalance_timeout_ms();
            self.initial_until_ms =
                (now_ms + timing.initial_rebalance_delay_ms).min(cap.max(now_ms));
        }
        if self.state != State::PreparingRebalance {
            self.prepare_rebalance(now_ms, timing, answers);
        }
        self.try_complete_join(now_ms, answers);
    }

    /// Whether `member_id` (with `instance_id`) may act in this group: `None`, or the error.
    pub fn check_member(&self, member_id: &str, instance_id: Option<&str>) -> Option<i16> {
        if let Some(instance) = instance_id {
            match self.static_members.get(instance) {
                Some(m) if m != member_id => return Some(error::FENCED_INSTANCE_ID),
                None if self.members.contains_key(member_id) => {
                    return Some(error::FENCED_INSTANCE_ID)
                }
                _ => {}
            }
        }
        if !self.members.contains_key(member_id) {
            return Some(error::UNKNOWN_MEMBER_ID);
        }
        None
    }

    /// Starts a rebalance: parked syncs are told to rejoin; the barrier's deadline is set.
    fn prepare_rebalance(&mut self, now_ms: u64, timing: &Timing, answers: &mut Vec<Answer>) {
        for m in self.members.values_mut() {
            if let Some(parked) = m.awaiting_sync.take() {
                answers.push(Answer::Sync(
                    parked,
                    SyncAnswer::error(error::REBALANCE_IN_PROGRESS),
                ));
            }
        }
        let was_empty = self.state == State::Empty;
        self.state = State::PreparingRebalance;
        let timeout = self.rebalance_timeout_ms();
        self.rebalance_deadline_ms = now_ms + timeout;
        if was_empty && timing.initial_rebalance_delay_ms > 0 {
            self.initial_started_ms = now_ms;
            self.initial_until_ms = now_ms + timing.initial_rebalance_delay_ms.min(timeout);
        } else {
            self.initial_until_ms = 0;
        }
    }

    /// Completes the join barrier if every member rejoined (and the initial delay is over),
    /// or if the deadline passed (the laggards are removed).
    pub fn try_complete_join(&mut self, now_ms: u64, answers: &mut Vec<Answer>) {
        if self.state != State::PreparingRebalance || now_ms < self.initial_until_ms {
            return;
        }
        let all_joined =
            self.pending.is_empty() && self.members.values().all(|m| m.awaiting_join.is_some());
        if !all_joined && now_ms < self.rebalance_deadline_ms {
            return;
        }
        // The deadline passed: whoever did not rejoin is out.
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.awaiting_join.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.remove_member(&id, answers);
        }
        self.pending.clear();
        self.generation += 1;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.protocol = None;
            self.leader = None;
            return;
        }
        self.state = State::CompletingRebalance;
        self.protocol = self.select_protocol();
        if !self
            .leader
            .as_ref()
            .is_some_and(|l| self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let is_leader = self.leader.as_deref() == Some(id.as_str());
            let answer = self.join_answer(&id, false);
            let answer = if is_leader {
                answer
            } else {
                JoinAnswer {
                    members: Vec::new(),
                    ..answer
                }
            };
            if let Some(m) = self.members.get_mut(&id) {
                m.last_heartbeat_ms = now_ms;
                if let Some(parked) = m.awaiting_join.take() {
                    answers.push(Answer::Join(parked, answer));
                }
            }
        }
    }

    /// The current generation as a JoinGroup answer for `member_id` (every member's
    /// metadata included: callers strip it for non-leaders).
    fn join_answer(&self, member_id: &str, skip_assignment: bool) -> JoinAnswer {
        let protocol = self.protocol.clone().unwrap_or_default();
        let is_leader = self.leader.as_deref() == Some(member_id);
        JoinAnswer {
            error: error::NONE,
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol: Some(protocol.clone()),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: member_id.to_string(),
            members: if is_leader {
                self.members
                    .iter()
                    .map(|(id, m)| (id.clone(), m.instance_id.clone(), m.metadata(&protocol)))
                    .collect()
            } else {
                Vec::new()
            },
            skip_assignment,
        }
    }

    /// The first protocol, in the leader's (else the first member's) order of preference,
    /// that every member supports.
    fn select_protocol(&self) -> Option<String> {
        let first = self
            .leader
            .as_ref()
            .and_then(|l| self.members.get(l))
            .or_else(|| self.members.values().next())?;
        first
            .protocols
            .iter()
            .map(|(n, _)| n)
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .cloned()
    }

    /// Removes a member; its parked requests are told it is unknown.
    fn remove_member(&mut self, member_id: &str, answers: &mut Vec<Answer>) {
        let Some(mut m) = self.members.remove(member_id) else {
            return;
        };
        if let Some(parked) = m.awaiting_join.take() {
            answers.push(Answer::Join(
                parked,
                JoinAnswer::error(error::UNKNOWN_MEMBER_ID, member_id),
            ));
        }
        if let Some(parked) = m.awaiting_sync.take() {
            answers.push(Answer::Sync(
                parked,
                SyncAnswer::error(error::UNKNOWN_MEMBER_ID),
            ));
        }
        if let Some(instance) = &m.instance_id {
            if self.static_members.get(instance).map(String::as_str) == Some(member_id) {
                self.static_members.remove(instance);
            }
        }
        if self.leader.as_deref() == Some(member_id) {
            self.leader = None;
        }
    }

    /// A member left or expired: the others rebalance.
    pub fn member_gone(
        &mut self,
        now_ms: u64,
        timing: &Timing,
        member_id: &str,
        answers: &mut Vec<Answer>,
    ) {
        self.remove_member(member_id, answers);
        match self.state {
            State::Stable | State::CompletingRebalance => {
                self.prepare_rebalance(now_ms, timing, answers)
            }
            State::PreparingRebalance | State::Empty => {}
        }
        if self.members.is_empty() && self.state == State::PreparingRebalance {
            // Nobody to wait for.
            self.rebalance_deadline_ms = now_ms;
            self.initial_until_ms = 0;
        }
        self.try_complete_join(now_ms, answers);
    }

    /// SyncGroup: answered now (errors, a Stable group) or parked until the leader's
    /// assignment arrives.
    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        assignments: Vec<(String, Vec<u8>)>,
        parked: Parked,
        answers: &mut Vec<Answer>,
    ) {
        if let Some(e) = self.check_member(member_id, instance_id) {
            answers.push(Answer::Sync(parked, SyncAnswer::error(e)));
            return;
        }
        if generation != self.generation {
            answers.push(Answer::Sync(
                parked,
                SyncAnswer::error(error::ILLEGAL_GENERATION),
            ));
            return;
        }
        match self.state {
            State::Empty => answers.push(Answer::Sync(
                parked,
                SyncAnswer::error(error::UNKNOWN_MEMBER_ID),
            )),
            State::PreparingRebalance => answers.push(Answer::Sync(
                parked,
                SyncAnswer::error(error::REBALANCE_IN_PROGRESS),
            )),
            State::Stable => {
                let answer = self.sync_answer(member_id);
                answers.push(Answer::Sync(parked, answer));
            }
            State::CompletingRebalance => {
                if let Some(m) = self.members.get_mut(member_id) {
                    if let Some(old) = m.awaiting_sync.replace(parked) {
                        answers.push(Answer::Sync(
                            old,
                            SyncAnswer::error(error::REBALANCE_IN_PROGRESS),
                        ));
                    }
                }
                if self.leader.as_deref() == Some(member_id) {
                    let mut given: HashMap<String, Vec<u8>> = assignments.into_iter().collect();
                    for (id, m) in self.members.iter_mut() {
                        m.assignment = given.remove(id).unwrap_or_default();
                    }
                    self.state = State::Stable;
                    let ids: Vec<String> = self.members.keys().cloned().collect();
                    for id in ids {
                        let answer = self.sync_answer(&id);
                        if let Some(parked) = self
                            .members
                            .get_mut(&id)
                            .and_then(|m| m.awaiting_sync.take())
                        {
                            answers.push(Answer::Sync(parked, answer));
                        }
                    }
                }
            }
        }
    }

    fn sync_answer(&self, member_id: &str) -> SyncAnswer {
        SyncAnswer {
            error: error::NONE,
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            assignment: self
                .members
                .get(member_id)
                .map(|m| m.assignment.clone())
                .unwrap_or_default(),
        }
    }

    /// Heartbeat: the error code to answer.
    pub fn heartbeat(
        &mut self,
        now_ms: u64,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> i16 {
        if let Some(e) = self.check_member(member_id, instance_id) {
            return e;
        }
        if let Some(m) = self.members.get_mut(member_id) {
            m.last_heartbeat_ms = now_ms;
        }
        if generation != self.generation {
            return error::ILLEGAL_GENERATION;
        }
        match self.state {
            State::Empty => error::UNKNOWN_MEMBER_ID,
            State::PreparingRebalance => error::REBALANCE_IN_PROGRESS,
            State::CompletingRebalance | State::Stable => error::NONE,
        }
    }

    /// Whether an OffsetCommit of this member and generation may be stored (Kafka's
    /// `handleCommitOffsets`): the error code.
    pub fn commit_check(
        &mut self,
        now_ms: u64,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> i16 {
        if generation < 0 && member_id.is_empty() {
            // A commit from outside the group protocol (a simple consumer, the admin API).
            return if self.members.is_empty() {
                error::NONE
            } else {
                error::UNKNOWN_MEMBER_ID
            };
        }
        if let Some(e) = self.check_member(member_id, instance_id) {
            return e;
        }
        if generation != self.generation {
            return error::ILLEGAL_GENERATION;
        }
        if self.state == State::CompletingRebalance {
            return error::REBALANCE_IN_PROGRESS;
        }
        if let Some(m) = self.members.get_mut(member_id) {
            m.last_heartbeat_ms = now_ms;
        }
        error::NONE
    }

    /// Removes members silent for their session timeout and expired pending ids (members
    /// waiting in a barrier are kept alive, as in Kafka), then completes a barrier whose
    /// deadline passed.
    pub fn expire(&mut self, now_ms: u64, timing: &Timing, answers: &mut Vec<Answer>) {
        self.pending.retain(|_, until| *until > now_ms);
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| {
                m.awaiting_join.is_none()
                    && m.awaiting_sync.is_none()
                    && now_ms.saturating_sub(m.last_heartbeat_ms) > m.session_timeout_ms
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.member_gone(now_ms, timing, &id, answers);
        }
        self.try_complete_join(now_ms, answers);
    }

    /// Whether the group has nothing to wait for or expire.
    pub fn is_idle(&self) -> bool {
        self.members.is_empty() && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(member_id: &str, post_id: u64) -> Join {
        Join {
            member_id: member_id.to_string(),
            instance_id: None,
            client_id: "c".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Vec::new())],
            require_known_member_id: true,
            parked: Parked {
                post_id,
                version: 5,
                correlation_id: 1,
            },
        }
    }

    #[test]
    fn a_group_holds_at_most_max_members_and_pending_ids_expire() {
        let timing = Timing::default();
        let mut g = Group::default();
        let mut answers = Vec::new();
        for i in 0..MAX_MEMBERS as u64 {
            g.join(0, &timing, join("", i), &mut answers);
        }
        assert_eq!(g.pending.len(), MAX_MEMBERS);
        answers.clear();
        g.join(0, &timing, join("", 99_999), &mut answers);
        assert!(matches!(
            &answers[..],
            [Answer::Join(_, a)] if a.error == error::GROUP_MAX_SIZE_REACHED
        ));
        // Ids handed out and never used expire with their session timeout.
        g.expire(10_001, &timing, &mut answers);
        assert!(g.pending.is_empty() && g.is_idle());
    }

    #[test]
    fn a_protocol_no_member_shares_is_refused() {
        let timing = Timing::default();
        let mut g = Group::default();
        let mut answers = Vec::new();
        let mut first = join("", 1);
        first.require_known_member_id = false;
        g.join(0, &timing, first, &mut answers);
        let mut other = join("", 2);
        other.protocols = vec![("roundrobin".into(), Vec::new())];
        answers.clear();
        g.join(0, &timing, other, &mut answers);
        assert!(matches!(
            &answers[..],
            [Answer::Join(_, a)] if a.error == error::INCONSISTENT_GROUP_PROTOCOL
        ));
        let mut bad = join("", 3);
        bad.session_timeout_ms = 10;
        answers.clear();
        g.join(0, &timing, bad, &mut answers);
        assert!(matches!(
            &answers[..],
            [Answer::Join(_, a)] if a.error == error::INVALID_SESSION_TIMEOUT
        ));
    }
}
