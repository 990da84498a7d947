//! Magnetar: a multi-protocol messaging edge.
//!
//! One process terminates TCP and TLS, hands the bytes of each connection to a protocol plugin
//! (a WebAssembly component, see `sdk/wit/plugin.wit`), and carries out what the plugin asks
//! for — authentication, publishing, subscribing — against an Apache Pulsar backend: the
//! embedded broker (`magnetar-broker`) or a Pulsar cluster, through the same client code.
#![forbid(unsafe_code)]

/// The admin HTTP API: tenants, users, keys, usage, metrics.
pub mod admin;
/// The Pulsar backend: producers, consumers, one code path for embedded and cluster.
pub mod backend;
/// The configuration file and its defaults.
pub mod config;
/// One client connection: socket tasks, output buffer, backpressure.
pub mod connection;
/// Encryption at rest: tenants' data keys and sealed payloads.
pub mod crypto;
/// The host calls a plugin makes, carried out for one plugin instance.
pub mod host_api;
/// A small key-value store per namespace, kept in a Pulsar topic.
pub mod kv;
/// TCP listeners, TLS handshakes and the hand-off of connections to plugin workers.
pub mod listener;
/// Loading plugins, worker threads, instance lifecycle and fault containment.
pub mod plugin_host;
/// Quotas and usage per tenant and user.
pub mod quota;
/// SASL PLAIN and SCRAM, run by the host for plugins.
pub mod sasl;
/// The running gateway: wires config, broker, backend, plugins and listeners together.
pub mod server;
/// Principals, credentials and who may use which names.
pub mod tenancy;
/// Server certificates: from files, or generated at start.
pub mod tls;
/// WebSocket as a listener transport: the Upgrade handshake, binary messages as a byte stream.
pub mod websocket;

/// Plugins embedded in the binary at build time (see `build.rs`).
pub mod builtin {
    include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));
}
