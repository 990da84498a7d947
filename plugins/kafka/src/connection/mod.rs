//! One Kafka client connection as a sans-IO state machine ([`KafkaConnection`]): bytes in,
//! responses and host calls out (the SDK's [`Machine`] contract).
//!
//! **One request at a time**, as a Kafka broker does (it mutes a connection's channel from
//! a request until its response is sent, `SocketServer`/`KafkaApis`): a request that waits
//! for the backend (an append, a long-polling Fetch) holds the next ones in the input, and
//! the host stops reading once the input holds more than a request. Responses therefore go
//! out in request order (Kafka protocol guide, "The server guarantees that on a single TCP
//! connection, requests will be processed in the order they are sent to it"), which clients
//! rely on, with no queue of pending answers.
//!
//! The connection authenticates through SASL (sasl.rs: SaslHandshake, SaslAuthenticate, the
//! exchange run by the host), or else as the anonymous principal before its first request
//! that touches the backend, which closes the connection when the gateway allows no
//! anonymous access; every topic it names lives in that principal's namespace.
//!
//! What closes the connection (a Kafka broker closes it too): a negative or too large size,
//! a request shorter than its fixed header, an API key or version this plugin does not
//! serve, a malformed request of a served API, and a refused authentication. ApiVersions of
//! an unserved version is answered ([`api_versions`]).
//!
//! Group APIs (groups.rs): FindCoordinator names this gateway; the coordinator's own
//! requests are posted to the group home (`crate::coordinator`) and its answer sent as
//! is; committed offsets are the connection's kv entries, written once the home agreed.

pub mod api_versions;
#[cfg(test)]
#[path = "tests/data.rs"]
mod data_tests;
mod describe;
mod fetch;
mod groups;
mod idempotence;
#[cfg(test)]
#[path = "tests/idempotence.rs"]
mod idempotence_tests;
#[cfg(test)]
#[path = "tests/legacy.rs"]
mod legacy_tests;
mod list_offsets;
mod produce;
mod produce_v0;
mod sasl;
#[cfg(test)]
#[path = "tests/sasl.rs"]
mod sasl_tests;
#[cfg(test)]
#[path = "tests/connection.rs"]
mod tests;
pub mod throttle;
mod topics;

use std::rc::Rc;

use kafka_protocol::messages::{ApiKey, RequestHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};
use magnetar_sdk::input::Input;
use magnetar_sdk::ops::Ops;
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::{Action, Credentials, ErrorKind, Event, Machine, OpError};

use crate::codec::{self, legacy, Request};
use crate::config::Config;

pub use fetch::Readers;
pub use topics::TopicCache;

/// Room above the largest request for one more socket read after the host was told to stop
/// reading (see `magnetar_sdk::input`).
const READ_SLACK: usize = 256 << 10;

/// Kafka error codes the plugin answers (Kafka's `Errors`).
pub mod error {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    pub const INVALID_REQUIRED_ACKS: i16 = 21;
    pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const INVALID_PARTITIONS: i16 = 37;
    pub const INVALID_REPLICATION_FACTOR: i16 = 38;
    pub const INVALID_REQUEST: i16 = 42;
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    pub const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const INVALID_RECORD: i16 = 87;
}

/// The Kafka error code for a failed host call on a topic.
pub fn op_error_code(e: &OpError) -> i16 {
    match e.kind {
        ErrorKind::NotFound => error::UNKNOWN_TOPIC_OR_PARTITION,
        ErrorKind::NotAuthorized => error::TOPIC_AUTHORIZATION_FAILED,
        ErrorKind::InvalidName => error::INVALID_TOPIC_EXCEPTION,
        ErrorKind::QuotaExceeded => error::REQUEST_TIMED_OUT,
        // Retriable for clients: the backend may be back on the next try.
        ErrorKind::Backend => error::KAFKA_STORAGE_ERROR,
        _ => error::UNKNOWN_SERVER_ERROR,
    }
}

/// What a long host operation was started for.
#[derive(Debug)]
enum Op {
    Auth,
    /// The current request's topics, described.
    Describe,
    /// Topic admin calls of the current request, by its topic's position in it.
    Create(usize),
    Delete(usize),
    SetPartitions(usize),
    /// An append of the current Produce: topic and partition positions.
    Append(usize, usize),
    /// A reader's positioning steps (fetch.rs).
    ReaderBounds(fetch::Tag),
    ReaderLocate(fetch::Tag),
    ReaderOpen(fetch::Tag),
    /// ListOffsets steps: topic and partition positions.
    ListBounds(usize, usize),
    ListReader(usize, usize),
    /// A post to the group coordinator (groups.rs), by the request's own numbering.
    Post(usize),
    /// A kv write of a group request.
    Kv(usize),
    /// A kv read of OffsetFetch: group and slot.
    KvGet(usize, usize),
    /// A kv scan of a group request, with its prefix.
    KvScan(usize, String),
    /// A SASL step at the host (sasl.rs).
    Sasl,
}

/// The request being served, with what it waits for.
enum Job {
    Metadata(topics::MetadataJob),
    CreateTopics(topics::CreateTopicsJob),
    DeleteTopics(topics::DeleteTopicsJob),
    CreatePartitions(topics::CreatePartitionsJob),
    Produce(produce::ProduceJob),
    Fetch(fetch::FetchJob),
    ListOffsets(list_offsets::ListOffsetsJob),
    DescribeConfigs(describe::DescribeConfigsJob),
    Group(groups::GroupJob),
}

/// The request being served: its header, its state, and the completions it has not
/// looked at yet.
struct Current {
    header: RequestHeader,
    job: Job,
    inbox: Vec<JobEvent>,
}

/// Authentication of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    No,
    Pending,
    Done,
}

/// A client connection.
pub struct KafkaConnection {
    config: Config,
    input: Input,
    out: Outbox,
    ops: Ops<Op>,
    /// Closing or closed: nothing more is read or answered.
    closed: bool,
    auth: Auth,
    /// The SASL exchange (sasl.rs).
    sasl: sasl::Sasl,
    /// The host's SASL mechanisms, best first.
    sasl_mechanisms: Rc<[String]>,
    /// Where the group coordinators are (groups.rs).
    directory: Rc<dyn crate::coordinator::directory::Directory>,
    /// What the quotas did to its publishes (throttle.rs).
    quota: Rc<dyn throttle::Quota>,
    /// A request decoded that waits for authentication.
    held: Option<Current>,
    /// The request being served.
    job: Option<Current>,
    now_ms: u64,
    topics: TopicCache,
    readers: Readers,
    /// Inside a batch of events ([`Machine::handle_all`]): entries are buffered, and the
    /// current request looks at them once the batch is in.
    batching: bool,
}

impl KafkaConnection {
    pub fn new(config: Config) -> Self {
        KafkaConnection {
            config,
            input: Input::new(config.max_request_bytes + 4 + READ_SLACK),
            out: Outbox::new(),
            ops: Ops::new(),
            closed: false,
            auth: Auth::No,
            sasl: sasl::Sasl::Idle,
            sasl_mechanisms: Rc::from(Vec::new()),
            directory: Rc::new(crate::coordinator::directory::Alone {
                host: config.advertised_host(),
                port: i32::from(config.advertised_port),
            }),
            quota: Rc::new(throttle::Unlimited),
            held: None,
            job: None,
            now_ms: 0,
            topics: TopicCache::default(),
            readers: Readers::default(),
            batching: false,
        }
    }

    /// The SASL mechanisms the host offers (`magnetar_sdk::sasl_mechanisms`), best first.
    pub fn with_sasl_mechanisms(mut self, mechanisms: Rc<[String]>) -> Self {
        self.sasl_mechanisms = mechanisms;
        self
    }

    /// Where the group coordinators are: the host's directory (default: this gateway alone).
    pub fn with_directory(
        mut self,
        directory: Rc<dyn crate::coordinator::directory::Directory>,
    ) -> Self {
        self.directory = directory;
        self
    }

    /// What the quotas did to its publishes: the host's (default: no quotas).
    pub fn with_quota(mut self, quota: Rc<dyn throttle::Quota>) -> Self {
        self.quota = quota;
        self
    }

    /// Something waits: no more requests are read until it is done.
    fn paused(&self) -> bool {
        self.job.is_some() || self.held.is_some() || matches!(self.sasl, sasl::Sasl::Waiting { .. })
    }

    /// Serves whole requests from the input, in order, until one waits.
    fn decode(&mut self) {
        let limit = self.config.max_request_bytes;
        while !self.closed && !self.paused() {
            if self.sasl.raw() {
                match self.input.next_frame(|b| sasl::raw_token(b, limit)) {
                    Ok(Some(token)) => {
                        self.sasl_raw_token(token);
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.close(e);
                        break;
                    }
                }
            }
            let request = match self.input.next_frame(|b| codec::frame(b, limit)) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(e) => {
                    self.close(e.to_string());
                    break;
                }
            };
            if let Err(reason) = self.handle(request) {
                self.close(reason);
            }
        }
        if !self.closed {
            let paused = self.paused();
            if let Err(e) = self.input.settle(paused, &mut self.out) {
                self.close(e.to_string());
            }
        }
    }

    /// Starts serving one request; an error is the reason to close the connection.
    fn handle(&mut self, request: Request) -> Result<(), String> {
        let head = request.head;
        let key = ApiKey::try_from(head.api_key)
            .map_err(|()| format!("unknown API key {}", head.api_key))?;
        if key == ApiKey::ApiVersions {
            let mut response = Vec::new();
            api_versions::answer(&request, &mut response).map_err(|e| e.to_string())?;
            self.out.send(response);
            return Ok(());
        }
        let served = api_versions::served(key)
            .is_some_and(|(min, max)| (min..=max).contains(&head.api_version));
        if !served {
            return Err(format!(
                "{key:?} v{} (correlation id {}) is not served",
                head.api_version, head.correlation_id
            ));
        }
        match key {
            ApiKey::SaslHandshake => return self.sasl_handshake(request),
            ApiKey::SaslAuthenticate => return self.sasl_authenticate(request),
            _ if self.sasl.in_progress() => {
                return Err(format!(
                    "{key:?} before SASL authentication completed (ILLEGAL_SASL_STATE)"
                ))
            }
            _ => {}
        }
        let version = head.api_version;
        let bytes = request.bytes;
        let raw = bytes.clone();
        macro_rules! decoded {
            ($t:ty) => {
                decode_request::<$t>(bytes, version)?
            };
            // An API whose old versions `codec::legacy` decodes.
            ($t:ty, $old:ident) => {
                match legacy::$old(&bytes, version) {
                    Some(decoded) => decoded.map_err(|e| e.to_string())?,
                    None => decode_request::<$t>(bytes, version)?,
                }
            };
        }
        let (header, job) = match key {
            ApiKey::Metadata => {
                let (h, r) = decoded!(kafka_protocol::messages::MetadataRequest);
                (h, self.start_metadata(version, r))
            }
            ApiKey::CreateTopics => {
                let (h, r) = decoded!(
                    kafka_protocol::messages::CreateTopicsRequest,
                    create_topics_request
                );
                (h, self.start_create_topics(version, r))
            }
            ApiKey::DeleteTopics => {
                let (h, r) = decoded!(
                    kafka_protocol::messages::DeleteTopicsRequest,
                    delete_topics_request
                );
                (h, self.start_delete_topics(version, r))
            }
            ApiKey::CreatePartitions => {
                let (h, r) = decoded!(kafka_protocol::messages::CreatePartitionsRequest);
                (h, self.start_create_partitions(version, r))
            }
            ApiKey::Produce => {
                let (h, r) = decoded!(kafka_protocol::messages::ProduceRequest, produce_request);
                (h, self.start_produce(version, r))
            }
            ApiKey::Fetch => {
                let (h, r) = decoded!(kafka_protocol::messages::FetchRequest, fetch_request);
                (h, self.start_fetch(version, r))
            }
            ApiKey::ListOffsets => {
                let (h, r) = decoded!(
                    kafka_protocol::messages::ListOffsetsRequest,
                    list_offsets_request
                );
                (h, self.start_list_offsets(version, r))
            }
            ApiKey::DescribeConfigs => {
                let (h, r) = decoded!(
                    kafka_protocol::messages::DescribeConfigsRequest,
                    describe_configs_request
                );
                (h, self.start_describe_configs(r))
            }
            ApiKey::DescribeCluster => {
                // Answered at once: this gateway is the cluster.
                let (h, r) = decoded!(kafka_protocol::messages::DescribeClusterRequest);
                return self.describe_cluster(&h, r);
            }
            ApiKey::FindCoordinator => {
                // Answered from the host's directory of coordinators, which names the
                // principal's namespace's: after authentication, as every job.
                let (h, r) = decoded!(kafka_protocol::messages::FindCoordinatorRequest);
                (h, Job::Group(groups::GroupJob::Find(Some(r))))
            }
            ApiKey::InitProducerId => {
                let (h, r) = decoded!(kafka_protocol::messages::InitProducerIdRequest);
                return self.init_producer_id(&h, r);
            }
            ApiKey::JoinGroup => {
                let (h, r) = decoded!(kafka_protocol::messages::JoinGroupRequest);
                (h, Job::Group(self.forward_job(raw, &r.group_id)))
            }
            ApiKey::SyncGroup => {
                let (h, r) = decoded!(kafka_protocol::messages::SyncGroupRequest);
                (h, Job::Group(self.forward_job(raw, &r.group_id)))
            }
            ApiKey::Heartbeat => {
                let (h, r) = decoded!(kafka_protocol::messages::HeartbeatRequest);
                (h, Job::Group(self.forward_job(raw, &r.group_id)))
            }
            ApiKey::LeaveGroup => {
                let (h, r) = decoded!(kafka_protocol::messages::LeaveGroupRequest);
                (h, Job::Group(self.forward_job(raw, &r.group_id)))
            }
            ApiKey::ListGroups => {
                let (h, r) = decoded!(kafka_protocol::messages::ListGroupsRequest);
                (h, Job::Group(Self::list_job(r)))
            }
            ApiKey::DescribeGroups => {
                // Clients ask each group's coordinator for its groups: the first one's
                // shard decides.
                let (h, r) = decoded!(kafka_protocol::messages::DescribeGroupsRequest);
                let first = r.groups.first().cloned().unwrap_or_default();
                (h, Job::Group(self.forward_job(raw, &first)))
            }
            ApiKey::OffsetCommit => {
                let (h, r) = decoded!(
                    kafka_protocol::messages::OffsetCommitRequest,
                    offset_commit_request
                );
                (h, Job::Group(Self::commit_job(r)))
            }
            ApiKey::OffsetFetch => {
                let (h, r) = decoded!(
                    kafka_protocol::messages::OffsetFetchRequest,
                    offset_fetch_request
                );
                (h, Job::Group(Self::fetch_job(version, r)))
            }
            ApiKey::OffsetDelete => {
                let (h, r) = decoded!(kafka_protocol::messages::OffsetDeleteRequest);
                (h, Job::Group(Self::offset_delete_job(r)))
            }
            ApiKey::DeleteGroups => {
                let (h, r) = decoded!(kafka_protocol::messages::DeleteGroupsRequest);
                (h, Job::Group(Self::delete_groups_job(r)))
            }
            other => return Err(format!("{other:?} is listed but has no handler")),
        };
        let current = Current {
            header,
            job,
            inbox: Vec::new(),
        };
        match self.auth {
            Auth::Done => {
                self.job = Some(current);
                self.step();
            }
            Auth::No | Auth::Pending => {
                self.held = Some(current);
                if self.auth == Auth::No {
                    self.auth = Auth::Pending;
                    let token = self.ops.start(Op::Auth);
                    self.out.push(Action::Authenticate {
                        token,
                        creds: Credentials::Anonymous,
                    });
                }
            }
        }
        Ok(())
    }

    /// Moves the current request on: each job's `step` either finishes (its response, if
    /// any, sent) or waits for an event.
    fn step(&mut self) {
        let Some(mut current) = self.job.take() else {
            return;
        };
        let inbox = std::mem::take(&mut current.inbox);
        let header = &current.header;
        let done = match &mut current.job {
            Job::Metadata(j) => self.step_metadata(header, j, inbox),
            Job::CreateTopics(j) => self.step_create_topics(header, j, inbox),
            Job::DeleteTopics(j) => self.step_delete_topics(header, j, inbox),
            Job::CreatePartitions(j) => self.step_create_partitions(header, j, inbox),
            Job::Produce(j) => self.step_produce(header, j, inbox),
            Job::Fetch(j) => self.step_fetch(header, j, inbox),
            Job::ListOffsets(j) => self.step_list_offsets(header, j, inbox),
            Job::DescribeConfigs(j) => self.step_describe_configs(header, j, inbox),
            Job::Group(j) => self.step_group(header, j, inbox),
        };
        match done {
            Ok(true) => {}
            Ok(false) => self.job = Some(current),
            Err(reason) => self.close(reason),
        }
    }

    /// Sends a response to the request of `header`.
    fn respond<B: Encodable + HeaderVersion + 'static>(
        &mut self,
        header: &RequestHeader,
        body: &B,
    ) -> Result<(), String> {
        if let Some(old) = legacy::encode_response(header, body) {
            self.out.send(old.map_err(|e| e.to_string())?);
            return Ok(());
        }
        let version = header.request_api_version;
        let mut out = Vec::new();
        codec::write_response(
            &mut out,
            header.correlation_id,
            B::header_version(version),
            body,
            version,
        )
        .map_err(|e| e.0)?;
        self.out.send(out);
        Ok(())
    }

    fn close(&mut self, reason: String) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.input.clear();
        self.held = None;
        self.job = None;
        self.out.push(Action::Close(reason));
    }

    /// One completion or delivery from the host.
    fn event(&mut self, event: Event) {
        match event {
            Event::AuthResult { token, result } => {
                if !matches!(self.ops.complete(token), Some(Op::Auth)) {
                    return;
                }
                match result {
                    Ok(_) => {
                        self.auth = Auth::Done;
                        self.job = self.held.take();
                        self.step();
                    }
                    Err(e) => self.close(format!("authentication refused: {}", e.message)),
                }
            }
            Event::SaslResult { token, result } => {
                if matches!(self.ops.complete(token), Some(Op::Sasl)) {
                    self.on_sasl_result(result);
                }
            }
            Event::AuthBusy { token } => {
                if matches!(self.ops.complete(token), Some(Op::Auth)) {
                    self.close("authentication busy".into());
                }
            }
            Event::TopicsResult { token, result } => match self.ops.complete(token) {
                Some(Op::Describe) => {
                    self.topics.update(self.now_ms, &result);
                    self.job_event(JobEvent::Described(result));
                }
                Some(Op::Create(i)) => {
                    self.topics.update(self.now_ms, &result);
                    self.job_event(JobEvent::Admin(i, result.map(|_| ())));
                }
                Some(Op::Delete(i)) => self.job_event(JobEvent::Admin(i, result.map(|_| ()))),
                Some(Op::SetPartitions(i)) => {
                    self.topics.update(self.now_ms, &result);
                    self.job_event(JobEvent::Admin(i, result.map(|_| ())));
                }
                _ => {}
            },
            Event::Appended { token, result } => {
                if let Some(Op::Append(t, p)) = self.ops.complete(token) {
                    self.job_event(JobEvent::Appended(t, p, result));
                }
            }
            Event::Bounds { token, result } => match self.ops.complete(token) {
                Some(Op::ReaderBounds(key)) => {
                    self.reader_bounds(key, result);
                    self.step();
                }
                Some(Op::ListBounds(t, p)) => self.job_event(JobEvent::Bounds(t, p, result)),
                _ => {}
            },
            Event::Position { token, result } => {
                if let Some(Op::ReaderLocate(key)) = self.ops.complete(token) {
                    self.reader_located(key, result);
                    self.step();
                }
            }
            Event::SubscribeResult { token, result } => match self.ops.complete(token) {
                Some(Op::ReaderOpen(key)) => {
                    self.reader_opened(key, result);
                    self.step();
                }
                Some(Op::ListReader(t, p)) => self.job_event(JobEvent::ListReader(t, p, result)),
                _ => {
                    // A reader opened for a request that is gone: close it.
                    if let Ok(sub) = result {
                        self.out.push(Action::Unsubscribe { sub, delete: false });
                    }
                }
            },
            Event::Entry(entry) => {
                if !self.list_entry(&entry) {
                    self.reader_entry(entry);
                }
                if !self.batching {
                    self.step();
                }
            }
            Event::Timer { token } => {
                self.job_event(JobEvent::Timer(token));
            }
            Event::HomeReply { token, result } => {
                if let Some(Op::Post(i)) = self.ops.complete(token) {
                    self.job_event(JobEvent::Posted(i, result));
                }
            }
            Event::KvResult { token, result } => match self.ops.complete(token) {
                Some(Op::Kv(i)) => self.job_event(JobEvent::Kv(i, result)),
                Some(Op::KvGet(g, slot)) => self.job_event(JobEvent::KvGot(g, slot, result)),
                _ => {}
            },
            Event::KvScanResult { token, result } => {
                if let Some(Op::KvScan(i, prefix)) = self.ops.complete(token) {
                    self.job_event(JobEvent::KvScan(i, prefix, result));
                }
            }
            _ => {}
        }
    }

    /// Hands an event to the current job, then moves it on.
    fn job_event(&mut self, e: JobEvent) {
        if let Some(current) = self.job.as_mut() {
            current.inbox.push(e);
        }
        self.step();
    }
}

/// Completions the current job receives.
#[derive(Debug)]
enum JobEvent {
    Described(Result<Vec<magnetar_sdk::TopicInfo>, OpError>),
    Admin(usize, Result<(), OpError>),
    Appended(usize, usize, Result<magnetar_sdk::Appended, OpError>),
    Bounds(usize, usize, Result<magnetar_sdk::Bounds, OpError>),
    ListReader(usize, usize, Result<magnetar_sdk::SubId, OpError>),
    ListEntry(magnetar_sdk::Entry),
    Timer(u64),
    /// The group coordinator's answer to a post.
    Posted(usize, Result<Vec<u8>, OpError>),
    /// A kv write done.
    Kv(usize, Result<Option<Vec<u8>>, OpError>),
    /// A kv read done: group, slot.
    KvGot(usize, usize, Result<Option<Vec<u8>>, OpError>),
    /// A kv scan page: request numbering, prefix.
    KvScan(usize, String, Result<Vec<magnetar_sdk::KvEntry>, OpError>),
}

/// Decodes a request's header (of the version its API and version call for) and body.
pub(crate) fn decode_request<R: Decodable + HeaderVersion>(
    mut bytes: bytes::Bytes,
    version: i16,
) -> Result<(RequestHeader, R), String> {
    let header = RequestHeader::decode(&mut bytes, R::header_version(version))
        .map_err(|e| format!("malformed request header: {e}"))?;
    let body = R::decode(&mut bytes, version).map_err(|e| {
        format!(
            "malformed {:?} v{version} request: {e}",
            ApiKey::try_from(header.request_api_key)
        )
    })?;
    Ok((header, body))
}

impl Machine for KafkaConnection {
    fn apply(&mut self, now_ms: u64, event: Event) {
        self.now_ms = now_ms;
        if self.closed {
            return;
        }
        match event {
            Event::Data(bytes) => {
                self.input.push(bytes);
                self.decode();
            }
            Event::Closed => {
                self.closed = true;
                self.input.clear();
                self.job = None;
            }
            other => {
                self.event(other);
                if self.job.is_none() && !self.closed {
                    self.decode();
                }
            }
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.out.take()
    }

    fn handle_all(&mut self, now_ms: u64, events: impl IntoIterator<Item = Event>) -> Vec<Action> {
        self.batching = true;
        for event in events {
            self.apply(now_ms, event);
        }
        self.batching = false;
        if !self.closed {
            self.step();
            if self.job.is_none() && !self.closed {
                self.decode();
            }
        }
        self.take_actions()
    }
}
