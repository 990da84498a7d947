//! `magnetar-broker`: the embedded single-node broker speaking the Apache Pulsar binary
//! protocol, with a durable log. See DESIGN.md, "Embedded broker".
#![forbid(unsafe_code)]

/// Admin REST API (Pulsar admin v2 paths): tenants, namespaces, topics, partitions.
mod admin;
/// Token (JWT) authentication and the authorization hook.
pub mod auth;
/// Client connections: command handling per `PulsarApi.proto`.
mod connection;
/// Persisted subscription cursors (mark-delete position + individual acks).
mod cursor;
/// Sequence-id de-duplication per producer name.
mod dedup;
/// The stored entry: log record format, broker-entry metadata (timestamp, index).
mod entry;
/// The segmented, checksummed, group-committed append-only log.
pub mod log;
/// Topic names and their on-disk escaping.
pub mod naming;
/// Non-persistent topics: messages passed on to connected consumers, never stored.
mod non_persistent;
/// Frame codec (size-bounded) and reply builders.
mod protocol;
/// Builds a command-only Pulsar frame: for raw-socket clients such as the bench's load
/// generator and the bad-input tests.
pub use protocol::command;
/// The set of open topics.
mod registry;
/// A topic's schema registry (versions of the schemas producers declare).
mod schema;
/// Listener, accept loop, start and shutdown.
mod server;
/// Process-wide latency histograms (log fsync, send receipt) for `/metrics` and benches.
pub mod stats;
/// A subscription's consumers and its dispatcher.
mod subscription;
/// The per-topic actor: storage, subscriptions, dispatch.
mod topic;

pub use server::{Broker, BrokerConfig, BrokerError, BrokerHandle, InProcess, StorageProbe};
pub use topic::Retention;
