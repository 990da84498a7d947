//! The MQTT 3.1.1 and 5.0 protocol plugin of Magnetar ([OASIS MQTT 3.1.1], [OASIS MQTT 5.0]).
//! The CONNECT's Protocol Level picks the version per connection; one state machine serves
//! both, with 5.0 additions (properties, reason codes, flow control) where 5.0 has them.
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
//! - the QoS it was published with in the property `mqtt.qos` (`1` or `2`; absent for 0);
//! - `mqtt.retain = 1` when it was published with RETAIN; `mqtt.sender`, the publishing
//!   Client Identifier, while the publisher's session has a No Local subscription;
//! - the MQTT 5.0 PUBLISH properties as `mqtt.*` properties, User Properties also as plain
//!   Pulsar properties ([`message`] has the exact mapping);
//! - the MQTT payload unchanged.
//!
//! Why: a wildcard subscriber can never miss a message on a topic that did not exist when it
//! subscribed (a regex consumer over many Pulsar topics has a topic-discovery race); the order
//! of one publisher's messages is kept (§4.6); and MQTT topics cost nothing, so millions of
//! them need no Pulsar topic creation.
//!
//! Each connection has one main backend subscription on `mqtt` (plus one per share group it
//! joined, see [`subscription`]):
//! - Clean Session 1 / Session Expiry Interval 0: a route of the host (`routing` in the
//!   ABI) on `mqtt` with the session's non-shared filters, bound and unbound as the client
//!   subscribes and unsubscribes (before the SUBACK / UNSUBACK): the host matches topics
//!   and hands the connection only the messages of its filters; it ends with the connection.
//!   (A 5.0 Clean Start 0 that resumes a stored session with Session Expiry Interval 0 uses
//!   the session's durable subscription instead, see "Session expiry".) The plugin still
//!   matches each delivery against its filters ([`topic::matches`]) for the granted QoS and
//!   Subscription Identifiers.
//! - Clean Session 0 / Session Expiry Interval > 0 (persistent session, §3.1.2.4): the
//!   durable route with the queue `mqtt-session-<escaped client id>` (a 5.0 Clean Start
//!   that replaces an earlier session gets `...-<nonce>`, named in the stored session), which
//!   queues QoS 1 and 2 messages while the client is away. It is a durable route: the host
//!   copies the messages its filters match into the queue topic of that name, and the
//!   connection reads the queue.
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
//! # Session expiry (MQTT 5.0 §3.1.2.11.2, §4.1)
//!
//! The stored session holds its Session Expiry Interval and, when the plugin saw the
//! connection end (DISCONNECT, keep-alive timeout), the time it ended. A CONNECT with Clean
//! Start 0 finds an expired session gone (Session Present 0, its backlog deleted). A session
//! whose connection vanished without the plugin seeing it (peer reset, gateway crash) has no
//! end time and so does not expire until it is next used: the plugin cannot write after
//! `on-closed`, and a periodic kv write per idle connection would cost more than the
//! backlog.
//!
//! A 5.0 CONNECT with Clean Start 0 resumes an existing, unexpired session whatever its own
//! Session Expiry Interval ([MQTT-3.1.2-5], [MQTT-3.2.2-3]: Session Present 1, the filters
//! restored, the durable subscription reopened so the QoS 1 and 2 messages queued meanwhile
//! are delivered), as Mosquitto does. With an absent or 0 interval the session then ends
//! when this connection closes (§3.1.2.11.2); a DISCONNECT that sets an interval > 0 is a
//! Protocol Error (§3.14.2.2.2: DISCONNECT 0x82) and the session still ends. Subscription
//! changes meanwhile are not stored: they end with the session. Because the plugin cannot
//! act once the host reports the connection gone (peer reset, gateway crash), the stored
//! record is rewritten at the resume as ended then, with expiry 0: the next CONNECT of the
//! Client Identifier finds it expired (Session Present 0) and deletes its records and its
//! durable subscription with the backlog. When the plugin does see the end (DISCONNECT,
//! keep-alive timeout, a protocol error) it deletes them at once, unless the durable
//! subscription is still opening (the marked record then stays for the next CONNECT). A
//! takeover leaves them to the new connection, which finds the record ended, rather than
//! deleting them under its CONNECT. The one
//! difference from Mosquitto, which frees the session the moment the socket closes: after
//! an end the plugin did not see, the durable subscription keeps collecting messages until
//! that next CONNECT deletes it (the same bound as any session whose connection vanished).
//!
//! # QoS 2 (§4.3.3)
//!
//! From the client, "Method B" of the spec's figure 4.3: the message goes to the backend when
//! the PUBLISH arrives; once stored, its Packet Identifier is recorded and PUBREC sent. A
//! resent PUBLISH with a recorded identifier gets PUBREC again and is not stored again;
//! PUBREL forgets the identifier, then PUBCOMP. In a persistent session the recorded
//! identifiers are written to the host kv (`mqtt/qos2/<client id>`, [`session_store::Qos2State`])
//! *before* the PUBREC and PUBCOMP they guard, so a resend after a reconnect or a gateway
//! `kill -9` is still recognised. The one window left: a crash after the backend stored the
//! message and before the kv write (about one kv round trip) makes the client's resend a
//! duplicate — never a loss. Pulsar cannot write two topics atomically without transactions.
//!
//! To the client: PUBLISH QoS 2, and on PUBREC the backend delivery is acked and PUBREL sent;
//! the owed PUBREL is recorded (kv, persistent sessions) and resent with its identifier after
//! a reconnect (§4.4). A PUBLISH the client had not PUBRECed when the connection dropped is
//! redelivered by the backend with a new Packet Identifier, so a client that had received it
//! may see it twice (the plugin gets no stable message id to reuse the old identifier).
//!
//! # Retained messages, wills, takeover
//!
//! Retained messages are kv entries `mqtt/retained/<topic>` ([`retained`]), written before the
//! PUBACK; an empty retained payload deletes the entry (and is still delivered to current
//! subscribers, §3.3.1.3). After each SUBACK the plugin scans the keys under the filter's
//! literal first levels, page by page while the client keeps up, and sends matches with
//! RETAIN 1 at min(stored QoS, granted QoS). Live messages go to established subscriptions
//! with RETAIN 0.
//!
//! The Will Message is handed to the host with `set-will` after the CONNACK; the host publishes
//! it (with its retained write if Will Retain) whenever the connection ends without a
//! DISCONNECT (or with a 5.0 DISCONNECT 0x04): peer gone, keep-alive timeout, protocol error,
//! takeover, instance trap. The 5.0 Will Delay Interval becomes the will's `delay-ms`
//! (at most the Session Expiry Interval, §3.1.3.2.2); the host drops a delayed will when the
//! session is resumed (`claim`). Will Properties travel like PUBLISH properties.
//!
//! # MQTT 5.0 enhanced authentication (§4.12)
//!
//! A CONNECT with an Authentication Method the host offers (`sasl-mechanisms`:
//! SCRAM-SHA-256/512, PLAIN) runs `authenticate-sasl`: each challenge goes to the client in
//! AUTH 0x18, each AUTH 0x18 answer back to the host; success gives the CONNACK the method
//! and the final data (SCRAM's `v=`). Another method gets CONNACK 0x8C. Re-authentication
//! (AUTH 0x19) runs the same exchange and must yield the same principal, else DISCONNECT
//! 0x87.
//!
//! The Client Identifier is claimed through the host (`claim`) before the session is read; the
//! connection that held it is closed (§3.1.4), as Mosquitto does, and its will published.
//!
//! # Credentials
//!
//! No User Name → `Credentials::Anonymous`. User Name empty or `token` with a Password that
//! looks like a JWT (three base64url parts, first starting `eyJ`) → `Credentials::Token`, as
//! Pulsar token authentication issues them. Otherwise `Credentials::Password`.
//! NotAuthorized → CONNACK 0x05 (5.0: 0x87); QuotaExceeded, e.g. the tenant's connection
//! limit → 0x03 (5.0: 0x97 Quota exceeded); any other host failure → 0x03 (5.0: 0x88); then
//! close.
//!
//! # Codec
//!
//! 3.1.1: `mqtt-codec-kit` 1.0 (feature `v4`; maintained, builds for wasm32-wasip2) decodes
//! and encodes the packets. Framing is ours, so the packet size limit is checked on the fixed
//! header before a body is buffered, and the crate only ever sees one complete frame (its
//! length arithmetic is unchecked and sound only then). CONNECT's protocol level and all of
//! SUBSCRIBE are parsed here, see [`codec`]. One limit of the crate: it decodes the 3.1.1
//! CONNECT Password as UTF-8, so a binary password makes the CONNECT malformed.
//!
//! 5.0: `codec::v5`, our own, because the crate's `v5` module cannot carry an empty Topic
//! Name (Topic Aliases) nor several Subscription Identifiers, reads DUP from the wrong bit and
//! does not check property rules; the crate's v5 packets serve as the test oracle.
//!
//! # Configuration
//!
//! `[plugins.mqtt]` in the gateway config, all optional ([`config::Config`]):
//! `max_packet_size` (bytes, default 1 MiB, checked on the fixed header), `max_inflight`
//! (default 64: QoS 1 deliveries awaiting PUBACK, and the 5.0 CONNACK Receive Maximum),
//! `max_pending_publishes` (default 1024: client publishes of any QoS awaiting the backend;
//! beyond it the connection is not read), `delivery_window` (default 1024: the backend
//! subscription's `max-unacked`), `max_subscriptions` (default 1000 filters per session),
//! `connect_timeout_ms` (default 10 s).
//!
//! # Features (3.1.1 and 5.0)
//!
//! | feature | status |
//! |---|---|
//! | CONNECT / CONNACK, 3.1.1 return codes 0x00–0x05 (§3.1, §3.2) | done |
//! | MQTT 5.0 CONNECT / CONNACK: Receive Maximum, Maximum Packet Size, Topic Alias Maximum, Assigned Client Identifier; reason strings on refusals | done |
//! | 5.0 Server Keep Alive | not sent: the client's Keep Alive is never clamped |
//! | 5.0 Request Response Information / Response Information | accepted; no Response Information is sent (optional, §3.1.2.11.6) |
//! | 5.0 Request Problem Information | done: 0 suppresses reason strings on acks (CONNACK and DISCONNECT keep them) |
//! | username/password, anonymous, JWT token authentication | done |
//! | transports: TCP (1883), TLS (8883), WebSocket `ws://` (9001) and `wss://` with subprotocol `mqtt` / `mqttv3.1` — the host's listener transports, so the plugin sees one byte stream | done |
//! | client-certificate (mTLS) login: the host maps a verified certificate to its user when CONNECT has no username | done |
//! | 5.0 enhanced authentication, AUTH (§4.12), SCRAM-SHA-256/512 and PLAIN through the host; re-authentication | done |
//! | Keep Alive, 1.5 × interval (§3.1.2.10) and a CONNECT timeout; 5.0: DISCONNECT 0x8D | done |
//! | PUBLISH QoS 0 / 1 / 2 both ways, PUBACK / PUBREC after the backend stored the message (§3.3–§3.7, §4.3) | done |
//! | QoS 2 state in the kv across reconnects and `kill -9` (§4.3.3, §4.4) | done (one crash window, see above; unPUBRECed messages get a new id after a reconnect) |
//! | 5.0 reason codes on PUBACK / PUBREC (0x87, 0x90, 0x97, 0x80), PUBREL / PUBCOMP; negative PUBREC from the client ends the flow | done |
//! | 5.0 reason codes on SUBACK (granted QoS, 0x80, 0x87, 0x8F, 0x97) and UNSUBACK (0x00, 0x11) | done |
//! | 5.0 PUBLISH properties end to end through Pulsar: User Properties, Content Type, Response Topic, Correlation Data, Payload Format Indicator, Message Expiry Interval | done |
//! | 5.0 Message Expiry: expired messages are not delivered (queued, retained), the remaining interval is sent | done (a retained Will Message does not expire: its store time is unknown) |
//! | 5.0 Payload Format Indicator 1: payload checked as UTF-8, else PUBACK/PUBREC 0x99 and dropped (as Mosquitto) | done (Will payloads are not checked) |
//! | 5.0 Topic Aliases from the client (Topic Alias Maximum 32, 0x94 on a bad one) and to the client (first 32 topics, when it allows) | done |
//! | 5.0 Receive Maximum: never more unacked QoS 1/2 PUBLISHes than the client allows (§4.9) | done; the server's own Receive Maximum is enforced by not reading the socket (no 0x93) |
//! | 5.0 Maximum Packet Size: larger packets are not sent to the client, a message is dropped as if delivered; inbound ones get 0x95 | done |
//! | 5.0 Subscription Options: No Local, Retain As Published, Retain Handling 0/1/2 | done |
//! | 5.0 Subscription Identifiers, all matching ones on each PUBLISH | done |
//! | 5.0 Clean Start + Session Expiry Interval (0 = ends at disconnect), DISCONNECT changing it; Clean Start 0 resumes a session whatever the interval | done (see "Session expiry" for the limits) |
//! | 5.0 server DISCONNECT with reason: 0x8E takeover, 0x8D keep alive, 0x81 malformed, 0x82 protocol error, 0x95 too large, 0x94 topic alias, 0x90 topic name | done |
//! | 5.0 DISCONNECT 0x04 (with Will Message), Will Delay Interval, Will Properties | done |
//! | SUBSCRIBE / SUBACK with `+` and `#` (§3.8, §3.9, §4.7), UNSUBSCRIBE, PINGREQ, DISCONNECT | done |
//! | persistent sessions: filters (with options and identifiers) and queued QoS 1/2 messages | done |
//! | Retained messages: stored in the kv (Pulsar), sent after SUBACK with RETAIN 1, cleared by an empty payload, RETAIN 0 to established subscriptions (§3.3.1.3) | done |
//! | Will Message, Will QoS, Will Retain (§3.1.2.5–§3.1.2.7) | done |
//! | Session takeover by a second connection with the same Client Identifier (§3.1.4) | done within one gateway process; across gateways the durable subscription is exclusive, the newcomer retries 5 s |
//! | Shared subscriptions `$share/group/filter` (5.0 §4.8.2), for 3.1.1 and 5.0 clients: a durable Pulsar Shared subscription per group and filter | done (no retained messages on them; messages wait while a group has no member) |
//! | `$`-topics: not matched by leading wildcards (§4.7.2); clients may not publish to `$SYS` (PUBACK/PUBREC, 5.0 with 0x87, message dropped) | done |
//! | Fuzzing of the decoders and the state machine | done: `cargo fuzz` (libFuzzer) targets in `plugins/mqtt/fuzz`, 25 s each in CI (`scripts/fuzz`, on stable with `RUSTC_BOOTSTRAP=1`): the 3.1.1 and 5.0 decoders (never panic, framing exact, decode → encode → decode is the identity) and connected 3.1.1 and 5.0 state machines fed client bytes, backend deliveries with arbitrary `mqtt.*` properties, timers and failing host calls (never panic, every send one whole packet, silent after close); proptests in the unit tests check the same quickly |
//!
//! Where the specification leaves room, Mosquitto's behaviour is followed: the old connection
//! is closed on takeover and its will published; a retained message with QoS 2 is delivered
//! at the subscription's granted QoS; a PUBREL for an unknown identifier gets PUBCOMP; a
//! PUBLISH to `$SYS/...` is acknowledged and dropped (5.0: reason 0x87); authentication
//! failures get 0x87 Not authorized; shared subscriptions are accepted from 3.1.1 clients.
//!
//! [OASIS MQTT 3.1.1]: https://docs.oasis-open.org/mqtt/mqtt/v3.1.1/os/mqtt-v3.1.1-os.html
//! [OASIS MQTT 5.0]: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html
#![forbid(unsafe_code)]

/// The SDK adapter and the component export.
pub mod adapter;
/// MQTT framing, packet decoding and encoding (§2, §3): 3.1.1, and 5.0 in `codec::v5`.
pub mod codec;
/// The plugin's configuration.
pub mod config;
/// The per-connection protocol state machine.
pub mod connection;
/// An MQTT message as a Pulsar message: topic, QoS, MQTT 5.0 properties.
pub mod message;
/// Retained messages: kv keys and stored form (§3.3.1.3).
pub mod retained;
/// Persistent-session names and their stored form (§3.1.2.4).
pub mod session_store;
/// Subscriptions and their options; shared subscriptions (MQTT 5.0 §4.8.2).
pub mod subscription;
/// Topic Name and Topic Filter rules and matching (§4.7).
pub mod topic;
