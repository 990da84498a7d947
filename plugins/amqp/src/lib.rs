//! The AMQP 0-9-1 protocol plugin of Magnetar, in RabbitMQ's dialect (its extensions and its
//! reply codes), so that RabbitMQ applications change only their URL. docs/amqp.md has the
//! mapping onto the gateway and what is done.
//!
//! A sans-IO state machine ([`connection::AmqpConnection`]) turns frames into host calls; a
//! thin adapter ([`adapter`]) drives it from the SDK's callbacks.
#![forbid(unsafe_code)]

/// The plugin instance and the component export.
pub mod adapter;
/// The wire format: frames, methods, field tables, properties.
pub mod codec;
/// `[plugins.amqp]` settings.
pub mod config;
/// The connection state machine.
pub mod connection;
/// Exchange-to-exchange bindings, followed into the bindings of queues.
pub mod exchange_graph;
/// Queue arguments that act on messages: expiry and dead-lettering.
pub mod queue_policy;
/// Exchanges, queues and bindings, and their mapping onto topics, routes and the kv.
pub mod topology;
