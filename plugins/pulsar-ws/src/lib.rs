//! Apache Pulsar's WebSocket API as a Magnetar plugin: the producer, consumer and reader
//! endpoints under `/ws/v2/` (and the old `/ws/`), so existing Pulsar WebSocket clients
//! and web pages work against the gateway unchanged.
//!
//! The reference is Pulsar's own `pulsar-websocket` module; `docs/pulsar-websocket-api.md`
//! writes down what it does (paths, query parameters, JSON frames, message ids, HTTP
//! statuses, `send-error` codes) with file:line citations, and the places where the gateway
//! differs on purpose. The module docs below cite its sections.
//!
//! The plugin runs behind the gateway's web listener in message mode
//! ([`magnetar_sdk::web`]): the host owns HTTP and RFC 6455 and hands over the upgrade
//! request, then whole text messages. Each connection is a sans-IO
//! [`connection::PulsarWsConnection`]: the request is parsed and checked as Pulsar's
//! servlets check it, the token goes to the host (`authenticate`), the tenant and namespace
//! of the path must be the principal's, and then
//! - a producer turns each JSON frame into `messaging.send-message` and each receipt into
//!   Pulsar's ack, with the stored message's id;
//! - a consumer or reader is opened with `messaging.open-consumer` (subscription type and
//!   mode, window, negative-ack delay, dead-letter policy, start position) and its
//!   deliveries become JSON messages; acks, negative acks, permits (pull mode), unsubscribe
//!   and end-of-topic questions go back to the host.
//!
//! Message ids are Pulsar's own: the host serializes `MessageIdData` as the official
//! clients do, and the plugin sends it as base64 ([`message_id`]).
//!
//! # Configuration
//!
//! `[plugins.config.pulsar-ws]`, all optional ([`config::Config`]): `max_message_size` (default
//! 1 MiB, Pulsar's `webSocketMaxTextFrameSize`), `max_pending_sends` (default 1000).
//!
//! # What differs from Pulsar
//!
//! | Pulsar | here |
//! |---|---|
//! | any tenant the role may use | the principal's tenant and namespace only (else 403) |
//! | `deliverAt` / `deliverAfterMs` delay delivery (Shared subscriptions) | accepted, no delay |
//! | `encryptionKeys`: client-side encryption | refused (400): the gateway encrypts at rest |
//! | `isEndOfTopic`: the topic was terminated and read to its end | the connection was sent the topic's last message (no termination here) |
//! | close code 3 on an unreadable command | 1007, Pulsar's reason text |
//! | `ackTimeoutMillis`: redelivered at once | nacked, so back after the negative-ack delay |
//! | `/ws/v3/consumer` (several topics) | not served (404) |
#![forbid(unsafe_code)]

/// The SDK adapter and the component export.
pub mod adapter;
/// The plugin's configuration.
pub mod config;
/// The per-connection state machine.
pub mod connection;
/// The JSON messages both ways (§5, §6).
pub mod frames;
/// Message ids: base64 of `MessageIdData` (§8).
pub mod message_id;
/// Query parameters of each endpoint (§4).
pub mod params;
/// The upgrade request: path, query, token (§1, §2).
pub mod request;
/// Pulsar's date-time format (§8).
pub mod time;
