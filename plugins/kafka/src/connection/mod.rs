//! One Kafka client connection as a sans-IO state machine ([`KafkaConnection`]): bytes in,
//! responses and host calls out (the SDK's [`Machine`] contract).
//!
//! Requests are taken from the input in order and answered in order: Kafka clients pipeline
//! requests and expect the responses in the order of the requests on one connection (Kafka
//! protocol guide, "The server guarantees that on a single TCP connection, requests will be
//! processed in the order they are sent to it"). Every request served today is answered at
//! once; when answers start to wait for the backend, a queue of pending answers keeps that
//! order.
//!
//! What closes the connection (a Kafka broker closes it too): a negative or too large size,
//! a request shorter than its fixed header, an API key this plugin does not serve, and a
//! malformed request of a served API. ApiVersions of an unserved version is answered
//! ([`api_versions`]).

pub mod api_versions;
#[cfg(test)]
mod tests;

use kafka_protocol::messages::ApiKey;
use magnetar_sdk::input::Input;
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::{Action, Event, Machine};

use crate::codec::{self, Request};
use crate::config::Config;

/// Room above the largest request for one more socket read after the host was told to stop
/// reading (see `magnetar_sdk::input`).
const READ_SLACK: usize = 256 << 10;

/// A client connection.
pub struct KafkaConnection {
    config: Config,
    input: Input,
    out: Outbox,
    /// Closing or closed: nothing more is read or answered.
    closed: bool,
}

impl KafkaConnection {
    pub fn new(config: Config) -> Self {
        KafkaConnection {
            config,
            input: Input::new(config.max_request_bytes + 4 + READ_SLACK),
            out: Outbox::new(),
            closed: false,
        }
    }

    /// Answers every whole request in the input, in order.
    fn decode(&mut self) {
        let limit = self.config.max_request_bytes;
        while !self.closed {
            match self.input.next_frame(|b| codec::frame(b, limit)) {
                Ok(Some(request)) => {
                    if let Err(reason) = self.handle(&request) {
                        self.close(reason);
                    }
                }
                Ok(None) => break,
                Err(e) => self.close(e.to_string()),
            }
        }
        if !self.closed {
            if let Err(e) = self.input.settle(false, &mut self.out) {
                self.close(e.to_string());
            }
        }
    }

    /// Answers one request; an error is the reason to close the connection.
    fn handle(&mut self, request: &Request) -> Result<(), String> {
        let head = request.head;
        match ApiKey::try_from(head.api_key) {
            Ok(ApiKey::ApiVersions) => {
                let mut response = Vec::new();
                api_versions::answer(request, &mut response).map_err(|e| e.to_string())?;
                self.out.send(response);
                Ok(())
            }
            Ok(key) => Err(format!(
                "{key:?} v{} (correlation id {}) is not served",
                head.api_version, head.correlation_id
            )),
            Err(()) => Err(format!("unknown API key {}", head.api_key)),
        }
    }

    fn close(&mut self, reason: String) {
        self.closed = true;
        self.input.clear();
        self.out.push(Action::Close(reason));
    }
}

impl Machine for KafkaConnection {
    fn apply(&mut self, _now_ms: u64, event: Event) {
        match event {
            Event::Data(bytes) if !self.closed => {
                self.input.push(bytes);
                self.decode();
            }
            Event::Closed => {
                self.closed = true;
                self.input.clear();
            }
            // No host operation is started yet, so no other event concerns this machine.
            _ => {}
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.out.take()
    }
}
