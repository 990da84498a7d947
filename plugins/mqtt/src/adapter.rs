//! The thin driver between the SDK and the state machine: each SDK callback becomes an
//! [`Event`] stamped with the host's clock, and each resulting [`Action`] becomes one host
//! call. No protocol decision is made here.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;

use magnetar_sdk::{
    Conn, ConnInfo, Connection, Delivery, KvEntry, OpError, Plugin, Principal, PublishResult,
    SaslOutcome, SubId,
};

use crate::config::Config;
use crate::connection::{Action, Event, MqttConnection};

/// The plugin instance: the parsed config, shared by all its connections.
pub struct MqttPlugin {
    config: Config,
    /// The host's SASL mechanisms (MQTT 5.0 enhanced authentication), asked once.
    sasl_mechanisms: Option<Rc<[String]>>,
}

/// One client connection: the state machine, driven through the host. Boxed: the SDK keeps
/// connections in a hash table, whose spare slots would otherwise each be a whole machine.
pub struct MqttConn {
    machine: Box<MqttConnection>,
}

impl Plugin for MqttPlugin {
    type Connection = MqttConn;

    fn new(config: &str) -> Result<Self, String> {
        Ok(MqttPlugin {
            config: Config::parse(config)?,
            sasl_mechanisms: None,
        })
    }

    fn open(&mut self, conn: Conn, info: ConnInfo) -> MqttConn {
        // Random per process (std seeds it from WASI randomness): keeps the names of
        // non-durable subscriptions unique across gateway instances sharing one backend.
        let nonce = RandomState::new().hash_one(conn.id());
        let mechanisms = self
            .sasl_mechanisms
            .get_or_insert_with(|| Rc::from(magnetar_sdk::sasl_mechanisms()))
            .clone();
        let mut machine =
            MqttConnection::new(conn.id(), self.config, nonce, magnetar_sdk::now_ms())
                .with_sasl_mechanisms(mechanisms);
        magnetar_sdk::log(
            magnetar_sdk::LogLevel::Debug,
            &format!("mqtt conn {}: open from {}", conn.id(), info.peer_addr),
        );
        execute(conn, machine.take_actions());
        MqttConn {
            machine: Box::new(machine),
        }
    }
}

impl MqttConn {
    fn feed(&mut self, conn: Conn, event: Event) {
        let actions = self.machine.handle(magnetar_sdk::now_ms(), event);
        execute(conn, actions);
    }

    /// Events that arrived together: their actions are carried out together, so that the
    /// packets they send leave in one host call.
    fn feed_all(&mut self, conn: Conn, events: impl Iterator<Item = Event>) {
        let actions = self.machine.handle_all(magnetar_sdk::now_ms(), events);
        execute(conn, actions);
    }
}

/// Carries out actions in order, except that acks wait, gathered per subscription, until an
/// action that is neither a send nor an ack (e.g. an unsubscribe) or the end: sends and acks
/// commute, since an ack a moment later than its send changes nothing a client can see. A
/// batch of QoS 0 deliveries (which the machine already encodes into one `Send`) thus costs
/// one `send` and one `ack-many`.
fn execute(conn: Conn, actions: Vec<Action>) {
    let mut acks: Vec<(SubId, Vec<u64>)> = Vec::new();
    for action in actions {
        match action {
            Action::Send(bytes) => conn.send(&bytes),
            Action::Ack { sub, delivery_id } => match acks.iter_mut().find(|(s, _)| *s == sub) {
                Some((_, ids)) => ids.push(delivery_id),
                None => acks.push((sub, vec![delivery_id])),
            },
            other => {
                flush_acks(conn, &mut acks);
                call(conn, other);
            }
        }
    }
    flush_acks(conn, &mut acks);
}

/// Sends the gathered acks.
fn flush_acks(conn: Conn, acks: &mut Vec<(SubId, Vec<u64>)>) {
    for (sub, ids) in acks.drain(..) {
        match ids.as_slice() {
            [one] => conn.ack(sub, *one),
            _ => conn.ack_many(sub, &ids),
        }
    }
}

/// The host call of one action.
fn call(conn: Conn, action: Action) {
    match action {
        Action::Send(bytes) => conn.send(&bytes),
        Action::Close(reason) => conn.close(&reason),
        Action::SetReading(reading) => conn.set_reading(reading),
        Action::Authenticate { token, creds } => conn.authenticate(token, &creds),
        Action::AuthenticateSasl {
            token,
            mechanism,
            response,
        } => conn.authenticate_sasl(token, &mechanism, &response),
        Action::Publish { token, msg } => conn.publish(token, &msg),
        Action::Subscribe { token, spec } => conn.subscribe(token, &spec),
        Action::Unsubscribe { sub, delete } => conn.unsubscribe(sub, delete),
        Action::Ack { sub, delivery_id } => conn.ack(sub, delivery_id),
        Action::SetTimer { token, delay_ms } => conn.set_timer(token, delay_ms),
        Action::KvGet { token, key } => conn.kv_get(token, &key),
        Action::KvPut { token, key, value } => conn.kv_put(token, &key, value.as_deref()),
        Action::KvScan {
            token,
            prefix,
            start_after,
            limit,
        } => conn.kv_scan(token, &prefix, start_after.as_deref(), limit),
        Action::SetWill(will) => conn.set_will(will.as_ref()),
        Action::Claim { token, key } => conn.claim(token, &key),
        Action::Log { level, message } => magnetar_sdk::log(level, &message),
    }
}

impl Connection for MqttConn {
    fn on_data(&mut self, conn: Conn, data: Vec<u8>) {
        self.feed(conn, Event::Data(data));
    }

    fn on_closed(&mut self, conn: Conn) {
        // No host call is valid now; the machine emits none after `Closed`.
        let _ = self.machine.handle(0, Event::Closed);
        let _ = conn;
    }

    fn on_auth_result(&mut self, conn: Conn, token: u64, result: Result<Principal, OpError>) {
        self.feed(conn, Event::AuthResult { token, result });
    }

    fn on_sasl_result(&mut self, conn: Conn, token: u64, result: Result<SaslOutcome, OpError>) {
        self.feed(conn, Event::SaslResult { token, result });
    }

    fn on_publish_result(&mut self, conn: Conn, token: u64, result: Result<(), OpError>) {
        self.feed(conn, Event::PublishResult { token, result });
    }

    fn on_subscribe_result(&mut self, conn: Conn, token: u64, result: Result<SubId, OpError>) {
        self.feed(conn, Event::SubscribeResult { token, result });
    }

    fn on_delivery(&mut self, conn: Conn, delivery: Delivery) {
        self.feed(conn, Event::Delivery(delivery));
    }

    fn on_deliveries(&mut self, conn: Conn, deliveries: Vec<Delivery>) {
        self.feed_all(conn, deliveries.into_iter().map(Event::Delivery));
    }

    fn on_publish_results(&mut self, conn: Conn, results: Vec<PublishResult>) {
        let events = results.into_iter().map(|r| Event::PublishResult {
            token: r.token,
            result: r.outcome,
        });
        self.feed_all(conn, events);
    }

    fn on_timer(&mut self, conn: Conn, token: u64) {
        self.feed(conn, Event::Timer { token });
    }

    fn on_kv_result(&mut self, conn: Conn, token: u64, result: Result<Option<Vec<u8>>, OpError>) {
        self.feed(conn, Event::KvResult { token, result });
    }

    fn on_kv_scan_result(&mut self, conn: Conn, token: u64, result: Result<Vec<KvEntry>, OpError>) {
        self.feed(conn, Event::KvScanResult { token, result });
    }

    fn on_claim_result(&mut self, conn: Conn, token: u64, result: Result<(), OpError>) {
        self.feed(conn, Event::ClaimResult { token, result });
    }

    fn on_claim_lost(&mut self, conn: Conn, _key: String) {
        self.feed(conn, Event::ClaimLost);
    }
}

// The macro exports only on Wasm: native builds of this crate exist for the unit tests.
magnetar_sdk::export_plugin!(MqttPlugin);
