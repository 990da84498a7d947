//! `magnetar-broker`: the embedded single-node broker speaking the Apache Pulsar binary
//! protocol, with a durable log. See DESIGN.md, "Embedded broker".
#![forbid(unsafe_code)]

/// Client connections: command handling per `PulsarApi.proto`.
mod connection;
/// Persisted subscription cursors (mark-delete position + individual acks).
mod cursor;
/// The segmented, checksummed, group-committed append-only log.
pub mod log;
/// Topic names and their on-disk escaping.
pub mod naming;
/// Frame codec (size-bounded) and reply builders.
mod protocol;
/// The set of open topics.
mod registry;
/// Listener, accept loop, start and shutdown.
mod server;
/// A subscription's consumers and its dispatcher.
mod subscription;
/// The per-topic actor: storage, subscriptions, dispatch.
mod topic;

pub use server::{Broker, BrokerConfig, BrokerError, BrokerHandle};
