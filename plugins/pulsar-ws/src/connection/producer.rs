//! The producer endpoint (docs/pulsar-websocket-api.md §5): each text message is a
//! `ProducerMessage`, sent with `messaging.send-message`; its receipt becomes the
//! `ProducerAck` that echoes the message's `context`. A frame Pulsar refuses is answered
//! with its `send-error` at once and the session goes on.

use magnetar_sdk::ops::Ops;
use magnetar_sdk::{Action, LogLevel, MessageOut, OpError, Property, TopicRef};

use super::{Phase, PulsarWsConnection};
use crate::frames::{self, ProducerAck, WsError};
use crate::params::ProducerParams;

/// A producer session.
#[derive(Debug)]
pub(super) struct Producer {
    topic: TopicRef,
    /// Publishes in flight: token → the `context` to echo.
    sends: Ops<Option<String>>,
    /// For the log only: the host has no producer names.
    name: Option<String>,
}

impl Producer {
    pub(super) fn new(topic: TopicRef, params: ProducerParams) -> Self {
        Producer {
            topic,
            sends: Ops::new(),
            name: params.producer_name,
        }
    }

    /// Publishes awaiting their receipts.
    pub(super) fn in_flight(&self) -> usize {
        self.sends.len()
    }
}

impl PulsarWsConnection {
    pub(super) fn on_publish(&mut self, text: String) {
        let Phase::Producing(producer) = &mut self.phase else {
            return;
        };
        match frames::parse_producer_message(&text) {
            Ok(m) => {
                let token = producer.sends.start(m.context);
                let msg = MessageOut {
                    topic: producer.topic.clone(),
                    key: m.key,
                    payload: m.payload,
                    properties: m
                        .properties
                        .into_iter()
                        .map(|(key, value)| Property { key, value })
                        .collect(),
                    event_time_ms: m.event_time_ms,
                };
                self.out.push(Action::SendMessage { token, msg });
            }
            Err(refused) => {
                let ack = refused.ack();
                self.send_text(&ack);
            }
        }
    }

    pub(super) fn on_receipt(&mut self, token: u64, result: Result<Vec<u8>, OpError>) {
        let Phase::Producing(producer) = &mut self.phase else {
            return;
        };
        let Some(context) = producer.sends.complete(token) else {
            return;
        };
        let ack = match &result {
            Ok(id) => ProducerAck::ok(id, context.as_deref()),
            Err(e) => ProducerAck::error(WsError::UnknownError, &e.message, context.as_deref()),
        };
        if let Err(e) = &result {
            let name = producer.name.clone().unwrap_or_default();
            self.log(
                LogLevel::Warn,
                format!("producer {name:?}: a send failed: {}", e.message),
            );
        }
        self.send_text_with(|out| ack.write_json(out));
    }
}
