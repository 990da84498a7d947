//! The MQTT 3.1.1 protocol plugin of Magnetar ([OASIS MQTT 3.1.1]).
//!
//! A sans-IO state machine ([`connection::MqttConnection`]) turns MQTT Control Packets into
//! host calls (authenticate, publish, subscribe, ack, kv, timers); a thin adapter
//! ([`adapter`]) drives it from the SDK's callbacks. It compiles to a `wasm32-wasip2`
//! component and is loaded by the gateway like any third-party plugin.
//!
//! # Topic mapping
//!
//! All MQTT topics of a namespace map onto **one** Pulsar topic, short name `mqtt` (the host
//! places it at `persistent://<tenant>/<namespace>/mqtt`). Each message carries:
//! - the full MQTT Topic Name in the property `mqtt.topic`, and as the Pulsar message key;
//! - the QoS it was published with in the property `mqtt.qos` (`0` or `1`);
//! - the MQTT payload unchanged.
//!
//! Why: a wildcard subscriber can never miss a message on a topic that did not exist when it
//! subscribed (a regex consumer over many Pulsar topics has a topic-discovery race); the order
//! of one publisher's messages is kept (§4.6); and MQTT topics cost nothing, so millions of
//! them need no Pulsar topic creation. The cost: every subscription of the namespace reads
//! every message of the namespace and filters it here ([`topic::matches`]). The scale-out
//! path is to shard by the first topic level into a fixed set of Pulsar topics (`mqtt-<n>`);
//! a filter whose first level is a wildcard then reads all shards.
//!
//! Each connection has at most one backend subscription on `mqtt`:
//! - Clean Session 1: a non-durable, exclusive subscription `mqtt-tmp-<conn id>-<nonce>`
//!   starting at the latest message; the host drops it when the connection closes.
//! - Clean Session 0 (persistent session, §3.1.2.4): the durable, exclusive subscription
//!   `mqtt-session-<escaped client id>`, which queues QoS 1 messages while the client is away.
//!   The session's Topic Filters are stored in the host kv under
//!   `mqtt/session/<escaped client id>` ([`session_store`]), written on every SUBSCRIBE and
//!   UNSUBSCRIBE before the SUBACK/UNSUBACK, so they survive the client being away and a
//!   gateway restart. On reconnect the filters are read back (CONNACK Session Present = 1)
//!   and the durable subscription reopened, so queued messages are delivered.
//! - A Clean Session 1 CONNECT discards an earlier persistent session of the same Client
//!   Identifier: the kv entry is deleted, and its durable subscription is opened only to be
//!   unsubscribed with `delete = true` (the ABI has no delete-by-name). This runs after the
//!   CONNACK, in the background.
//!
//! # Credentials
//!
//! No User Name → `Credentials::Anonymous`. User Name empty or `token` with a Password that
//! looks like a JWT (three base64url parts, first starting `eyJ`) → `Credentials::Token`, as
//! Pulsar token authentication issues them. Otherwise `Credentials::Password`.
//! NotAuthorized → CONNACK 0x05; any other host failure → CONNACK 0x03; then close.
//!
//! # Codec
//!
//! `mqtt-codec-kit` 1.0 (feature `v4`; maintained, builds for wasm32-wasip2) decodes and
//! encodes the packets. Framing is ours, so the packet size limit is checked on the fixed
//! header before a body is buffered, and the crate only ever sees one complete frame (its
//! length arithmetic is unchecked and sound only then). CONNECT's protocol level and all of
//! SUBSCRIBE are parsed here, see [`codec`]. One limit of the crate: it decodes the CONNECT
//! Password as UTF-8, so a binary password makes the CONNECT malformed.
//!
//! # Configuration
//!
//! `[plugins.mqtt]` in the gateway config, all optional ([`config::Config`]):
//! `max_packet_size` (bytes, default 1 MiB, checked on the fixed header), `max_inflight`
//! (default 64: QoS 1 deliveries awaiting PUBACK, which is also the backend subscription's
//! `max-unacked`, and client publishes awaiting the backend), `max_subscriptions` (default
//! 1000 filters per session), `connect_timeout_ms` (default 10 s).
//!
//! # MQTT 3.1.1 features
//!
//! | feature | status |
//! |---|---|
//! | CONNECT / CONNACK, return codes 0x00, 0x01, 0x02, 0x03, 0x05 (§3.1, §3.2) | done |
//! | username/password, anonymous, JWT token authentication | done |
//! | Keep Alive, 1.5 × interval (§3.1.2.10) and a CONNECT timeout | done |
//! | PUBLISH QoS 0 and QoS 1 from the client, PUBACK after the backend stored it (§3.3, §3.4) | done |
//! | PUBLISH QoS 0 and QoS 1 to the client, backend ack on PUBACK (§4.3) | done |
//! | SUBSCRIBE / SUBACK with `+` and `#` (§3.8, §3.9, §4.7), granted QoS ≤ 1 | done |
//! | UNSUBSCRIBE / UNSUBACK (§3.10, §3.11), PINGREQ / PINGRESP, DISCONNECT | done |
//! | persistent sessions (Clean Session 0): filters and queued QoS 1 messages | done |
//! | `$`-topics not matched by leading wildcards (§4.7.2) | done |
//! | QoS 2 (PUBREC / PUBREL / PUBCOMP) | not yet: closes the connection |
//! | Retained messages (§3.3.1.3) | not yet: RETAIN is ignored, the message is published |
//! | Will Message (§3.1.2.5) | not yet: accepted and ignored |
//! | Session takeover by a second connection with the same Client Identifier (§3.1.4) | not yet |
//! | MQTT 5.0 | not yet: CONNACK 0x01 |
//!
//! [OASIS MQTT 3.1.1]: https://docs.oasis-open.org/mqtt/mqtt/v3.1.1/os/mqtt-v3.1.1-os.html
#![forbid(unsafe_code)]

/// The SDK adapter and the component export.
pub mod adapter;
/// MQTT 3.1.1 framing, packet decoding and encoding (§2, §3).
pub mod codec;
/// The plugin's configuration.
pub mod config;
/// The per-connection protocol state machine.
pub mod connection;
/// Persistent-session names and their stored form (§3.1.2.4).
pub mod session_store;
/// Topic Name and Topic Filter rules and matching (§4.7).
pub mod topic;
