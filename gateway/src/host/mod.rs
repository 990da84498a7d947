//! The host calls of the plugin ABI, carried out for one plugin instance.
//!
//! Host calls run on the instance's worker thread and never block it: `send` queues bytes on
//! the connection; long operations (authenticate, publish, subscribe, kv) are handed to
//! tasks on the async runtime, whose completions come back to the worker as [`Event`]s
//! carrying the plugin's token. A connection's publishes and kv operations go through one
//! ordered task per connection, so they reach Pulsar in the order the plugin issued them,
//! while many are in flight. Deliveries come from one task per subscription, which never
//! hands the plugin more than `max-unacked` unacknowledged messages and waits while the
//! connection's output is congested: backpressure from the client's socket reaches the
//! broker's flow permits.
//!
//! Nothing before a successful `authenticate` reaches the backend, and every name the plugin
//! uses is placed in the principal's namespace (see `tenancy`).
//!
//! Layout: one context type, [`HostState`] (the store data of an instance, in `context`),
//! and one file per family of host calls over it — `conn`, `auth`, `pubsub`, `kv`, `session`
//! (claims and wills), `timers` (and the clock and log), `routing`, `quota`, each implementing the
//! interface of the same name of the current ABI (0.2.1); `v0_1` maps ABI 0.1.0's one `host`
//! interface onto them. Routes are matched by the process-wide `router` (one reader per
//! source topic, the pure index in `crate::routing`). The async plumbing has files of its own (`ops_task`, `subscription_task`,
//! `timer_task`), and their pure logic is apart and unit-tested: the order of a connection's
//! operations (`op_queue`), ack tracking (`acks`), the timer heap (`timer_heap`).

mod acks;
mod appender;
mod auth;
mod caps;
mod conn;
mod context;
mod entry_reader;
mod event;
mod feeder;
mod homes;
mod indexed;
mod kv;
mod messaging;
mod op_queue;
mod ops_task;
mod ownership;
mod pubsub;
mod quota;
mod router;
mod routing;
mod services;
mod session;
mod subscription_task;
mod timer_heap;
mod timer_task;
mod timers;
mod topics;
mod v0_1;

pub use caps::Caps;
pub use context::HostState;
pub use event::{Event, SaslStep};
pub use feeder::Feeders;
pub use homes::Homes;
pub use ownership::{Endpoint, Identity, Ownership};
pub use router::{Router, RouterStats};
pub use services::Services;
pub use session::Claims;
pub use topics::TopicAdmin;
