//! The Kafka protocol plugin of Magnetar (skeleton).
//!
//! A sans-IO state machine ([`connection::KafkaConnection`]) reads Kafka requests
//! (`[int32 size][request header][body]`, Kafka protocol guide, "Common Request and Response
//! Structure") and answers them; a thin adapter ([`adapter`]) drives it from the SDK's
//! callbacks. Request and response types come from the `kafka-protocol` crate.
//!
//! What it serves today: ApiVersions v0-v3, with KIP-511's fallback (a version it does not
//! know is answered with a v0 response carrying `UNSUPPORTED_VERSION` and the supported
//! ranges). Any other request closes the connection, as a Kafka broker does for an API key
//! it does not know. The design of the rest (offsets, groups, ownership across gateways,
//! the ABI it needs) is `docs/kafka.md`.
//!
//! Guarantees: nothing a client sends panics the plugin; a request larger than
//! `max_request_bytes` or with a negative size closes only its connection; responses go out
//! in request order (Kafka clients match them by order as well as by correlation id).
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
/// Kafka records as Pulsar messages and back.
pub mod message;
