//! The Kafka protocol plugin of Magnetar.
//!
//! A sans-IO state machine ([`connection::KafkaConnection`]) reads Kafka requests
//! (`[int32 size][request header][body]`, Kafka protocol guide, "Common Request and Response
//! Structure") and answers them, one at a time, with the host calls of ABI 0.2.4
//! (`indexed`, `topics`, `homes`, `kv`); a thin adapter ([`adapter`]) drives it from the
//! SDK's callbacks. Request and response types come from the `kafka-protocol` crate; record
//! batches, old message sets and compression are the plugin's own ([`codec`]).
//!
//! What it serves (docs/kafka.md section 8, increment 1): ApiVersions v0-v3 with KIP-511's
//! fallback, Metadata v0-v12 (this gateway leads every partition; auto-creation),
//! CreateTopics v2-v7, DeleteTopics v1-v5, CreatePartitions v0-v3, Produce v3-v9 (one
//! backend entry per partition batch, the entry's index as base offset), Fetch v4-v12
//! (readers kept across requests, long polling), ListOffsets v1-v6 (earliest, latest, by
//! timestamp), and the group APIs: FindCoordinator v0-v4, JoinGroup v0-v9, SyncGroup v0-v5,
//! Heartbeat v0-v4, LeaveGroup v0-v5, ListGroups v0-v4, DescribeGroups v0-v5, DeleteGroups
//! v0-v2, OffsetCommit v2-v8, OffsetFetch v1-v8, OffsetDelete v0 (increment 2: the
//! coordinator is a home of ABI 0.2.4, [`coordinator`]); and the versions of those APIs
//! that 0.10-era clients send and Kafka 4.0 removed (Produce v0-2 with message sets,
//! Fetch v0-3 down-converted, ListOffsets v0, OffsetCommit v0-1, OffsetFetch v0,
//! CreateTopics v0-1, DeleteTopics v0: [`codec::legacy`]); DescribeConfigs v0-v4 and
//! DescribeCluster v0-v1 (this gateway as the one broker). Any other request closes the
//! connection, as a Kafka broker does for an API it does not know. The design of the rest (groups, SASL, old clients, several gateways) is
//! `docs/kafka.md`.
//!
//! Guarantees: nothing a client sends panics the plugin or makes it allocate past its
//! limits (`max_request_bytes`, `max_uncompressed_bytes`; array lengths are bounded by the
//! request, `third_party/kafka-protocol`); a bad frame closes only its connection; responses
//! go out in request order; an offset is always the backend's index, never a count.
#![forbid(unsafe_code)]

/// The plugin instance and the component export.
pub mod adapter;
/// The wire: request framing, the request header, record batches, message sets and
/// compression.
pub mod codec;
/// Plugin configuration (`[plugins.kafka]`).
pub mod config;
/// One client connection as a state machine.
pub mod connection;
/// The group coordinator, in its home (one instance of the gateway).
pub mod coordinator;
/// Kafka records as Pulsar messages and back.
pub mod message;
#[cfg(test)]
#[path = "tests/wire.rs"]
mod test_wire;
