//! [`Event`]: what a plugin instance reacts to, queued to its worker thread — socket events
//! from the connection tasks, and completions of the host calls from the tasks that carry
//! them out.

use std::sync::Arc;

use bytes::Bytes;

use crate::abi::types::{ConnInfo, Delivery, KvEntry, OpError, PublishResult};
use crate::abi::v0_2::exports::magnetar::plugin::events::{Message, Receipt};
use crate::abi::v0_2::exports::magnetar::plugin::events2::{
    AppendResult, Bounds, Entry, TopicInfo,
};
use crate::conn_shared::ConnShared;
use crate::tenancy::Principal;

/// Something for a plugin instance to react to.
pub enum Event {
    Open {
        conn: u64,
        info: ConnInfo,
        shared: Arc<ConnShared>,
        /// Common name of the client certificate the TLS handshake verified (mTLS).
        client_cert: Option<String>,
        /// Bytes for the plugin right after `on-open`, one hand-off to the worker for both:
        /// a web port's request, or the client's first bytes when the stream had them at
        /// once (over TLS, a CONNECT sent with the handshake's last message). Counted as
        /// read (`ConnShared::input_read`).
        first: Option<Bytes>,
    },
    Data {
        conn: u64,
        data: Bytes,
        /// Told once the plugin had the bytes: the connection reads on only then.
        shared: Arc<ConnShared>,
    },
    Closed {
        conn: u64,
    },
    AuthResult {
        conn: u64,
        token: u64,
        outcome: Result<Principal, OpError>,
        /// The error is "server busy": too many logins being verified.
        busy: bool,
    },
    PublishResult {
        conn: u64,
        token: u64,
        outcome: Result<(), OpError>,
    },
    /// Several publish outcomes of one connection, in order (a batch of receipts).
    PublishResults {
        conn: u64,
        results: Vec<PublishResult>,
    },
    SubscribeResult {
        conn: u64,
        token: u64,
        outcome: Result<u64, OpError>,
    },
    Delivery {
        conn: u64,
        delivery: Delivery,
    },
    /// Several deliveries of one connection, in order: one queue hop for a burst.
    Deliveries {
        conn: u64,
        deliveries: Vec<Delivery>,
    },
    Timer {
        conn: u64,
        token: u64,
    },
    KvResult {
        conn: u64,
        token: u64,
        outcome: Result<Option<Vec<u8>>, OpError>,
    },
    KvScanResult {
        conn: u64,
        token: u64,
        outcome: Result<Vec<KvEntry>, OpError>,
    },
    ClaimResult {
        conn: u64,
        token: u64,
        outcome: Result<(), OpError>,
    },
    /// Another connection claimed `key`, which `conn` held.
    ClaimLost {
        conn: u64,
        key: String,
    },
    /// Outcomes of `messaging.send-message`, in order.
    Receipts {
        conn: u64,
        receipts: Vec<Receipt>,
    },
    /// Messages of `messaging` consumers, in order.
    Messages {
        conn: u64,
        messages: Vec<Message>,
    },
    /// Outcome of `messaging.seek` / `last-message-id`.
    Position {
        conn: u64,
        token: u64,
        outcome: Result<Option<Vec<u8>>, OpError>,
    },
    /// Outcomes of `indexed.append`, in the order the entries were stored.
    Appended {
        conn: u64,
        results: Vec<AppendResult>,
    },
    /// Entries of `indexed` readers, in order per reader.
    Entries {
        conn: u64,
        entries: Vec<Entry>,
    },
    /// Outcome of `indexed.bounds`.
    Bounds {
        conn: u64,
        token: u64,
        outcome: Result<Bounds, OpError>,
    },
    /// Outcome of a `topics` call.
    TopicsResult {
        conn: u64,
        token: u64,
        outcome: Result<Vec<TopicInfo>, OpError>,
    },
    /// A post for a home of this worker's instance (`homes.post`); `home` is the home's
    /// virtual connection, opened by the first post.
    HomePost {
        home: u64,
        domain: String,
        shard: u32,
        post_id: u64,
        /// The poster's `tenant/namespace`.
        namespace: String,
        payload: Vec<u8>,
    },
    /// Outcome of `homes.post`: the home's answer.
    HomeReply {
        conn: u64,
        token: u64,
        outcome: Result<Vec<u8>, OpError>,
    },
    /// A SASL step: a challenge, or success with the principal and the final data.
    SaslResult {
        conn: u64,
        token: u64,
        outcome: Result<SaslStep, OpError>,
    },
}

/// What one SASL step produced, before the principal is recorded on the connection.
#[derive(Debug)]
pub enum SaslStep {
    Challenge(Vec<u8>),
    Success(Principal, Vec<u8>),
}

impl Event {
    /// The connection the event is about.
    pub fn conn(&self) -> u64 {
        match self {
            Event::Open { conn, .. }
            | Event::Data { conn, .. }
            | Event::Closed { conn }
            | Event::AuthResult { conn, .. }
            | Event::PublishResult { conn, .. }
            | Event::PublishResults { conn, .. }
            | Event::SubscribeResult { conn, .. }
            | Event::Delivery { conn, .. }
            | Event::Deliveries { conn, .. }
            | Event::Timer { conn, .. }
            | Event::KvResult { conn, .. }
            | Event::KvScanResult { conn, .. }
            | Event::ClaimResult { conn, .. }
            | Event::ClaimLost { conn, .. }
            | Event::Receipts { conn, .. }
            | Event::Messages { conn, .. }
            | Event::Position { conn, .. }
            | Event::Appended { conn, .. }
            | Event::Entries { conn, .. }
            | Event::Bounds { conn, .. }
            | Event::TopicsResult { conn, .. }
            | Event::HomeReply { conn, .. }
            | Event::SaslResult { conn, .. } => *conn,
            Event::HomePost { home, .. } => *home,
        }
    }
}
