//! Magnetar: a multi-protocol messaging edge.
//!
//! One process terminates TCP and TLS, hands the bytes of each connection to a protocol plugin
//! (a WebAssembly component, see `sdk/wit/plugin.wit`), and carries out what the plugin asks
//! for — authentication, publishing, subscribing — against an Apache Pulsar backend: the
//! embedded broker (`magnetar-broker`) or a Pulsar cluster, through the same client code.
//!
//! The modules form layers; a module uses only modules of the layers below its own (and
//! within a layer, those listed before it), never one above:
//! 1. leaves: `names`, `clock`, `secret`, `config`, `abi`, `conn_shared`, `routing`, `builtin`;
//! 2. services: `sasl`, `login_cache`, `tenancy`, `crypto`, `quota`, `backend`, `kv`, `tls`;
//! 3. the host: `host` (the host calls), `plugin_host` (workers and instances), `connection`
//!    (socket tasks);
//! 4. the top: `websocket`, `message_mode`, `web_admin`, `web`, `listener`, `admin`, `server`
//!    (and the binary, `main.rs`).
#![forbid(unsafe_code)]

// 1. Leaves.
/// The plugin ABI, generated from the WIT.
pub mod abi;
/// The wall clock in milliseconds since the Unix epoch.
pub mod clock;
/// The configuration file and its defaults.
pub mod config;
/// What a connection's socket task and its plugin worker share: output, backpressure, closing.
pub mod conn_shared;
/// Pulsar message ids as plugins see them: serialized as the official clients do.
pub mod message_id;
/// Tenant, namespace and topic names, checked.
pub mod names;
/// The routing index: which routes a message reaches, by filter.
pub mod routing;
/// Secret files and constant-time comparison.
pub mod secret;

// 2. Services.
/// The Pulsar backend: producers, consumers, one code path for embedded and cluster.
pub mod backend;
/// Encryption at rest: tenants' data keys and sealed payloads.
pub mod crypto;
/// A small key-value store per namespace, kept in a Pulsar topic.
pub mod kv;
/// Recently verified password logins, so that a reconnecting fleet skips argon2.
pub mod login_cache;
/// Stored password hashes (argon2id, Mosquitto's sha512-pbkdf2) and their checks.
pub mod password;
/// Quotas and usage per tenant and user.
pub mod quota;
/// SASL PLAIN and SCRAM, run by the host for plugins.
pub mod sasl;
/// Principals, credentials and who may use which names.
pub mod tenancy;
/// Server certificates: from files, or generated at start.
pub mod tls;

// 3. The host.
/// One client connection: its socket task.
pub mod connection;
/// The host calls a plugin makes, carried out for one plugin instance.
pub mod host;
/// Loading plugins, worker threads, instance lifecycle and fault containment.
pub mod plugin_host;

// 4. The top.
/// The admin HTTP API: tenants, users, keys, usage, metrics.
pub mod admin;
/// TCP listeners, TLS handshakes and the hand-off of connections to plugin workers.
pub mod listener;
/// A web port's WebSocket as envelope frames: the plugin answers the upgrade, then messages.
pub mod message_mode;
/// The running gateway: wires config, broker, backend, plugins and listeners together.
pub mod server;
/// The web port: HTTP/1.1 routing to WebSocket endpoints, the admin REST API, the demo page.
pub mod web;
/// Pulsar's admin REST API on the web port, under the gateway's tenancy.
pub mod web_admin;
/// WebSocket as a listener transport: the Upgrade handshake, binary messages as a byte stream.
pub mod websocket;

/// Plugins embedded in the binary at build time (see `build.rs`).
pub mod builtin {
    include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));
}
