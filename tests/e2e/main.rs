//! End-to-end tests: the real `magnetar` binary, the real embedded broker, real sockets and
//! real third-party clients. One test crate, one module per area.

mod amqp;
mod broker;
mod fleet;
mod harness;
mod indexed;
mod mqtt;
mod plugins;
mod storm;
mod tenancy;
