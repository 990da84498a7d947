//! ABI 0.1.0's single `host` interface, call by call onto the 0.2.0 interfaces that split it
//! (same functions, same types): a plugin built against 0.1.0 gets exactly what a 0.2.0 one
//! does.

use super::context::HostState;
use crate::abi::types;
use crate::abi::v0_1::magnetar::plugin::host;
use crate::abi::v0_2::magnetar::plugin::{auth, conn, kv, log, pubsub, session, timers};

impl host::Host for HostState {
    fn send(&mut self, conn: u64, data: Vec<u8>) {
        conn::Host::send(self, conn, data)
    }

    fn close(&mut self, conn: u64, reason: String) {
        conn::Host::close(self, conn, reason)
    }

    fn set_reading(&mut self, conn: u64, reading: bool) {
        conn::Host::set_reading(self, conn, reading)
    }

    fn authenticate(&mut self, conn: u64, token: u64, creds: types::Credentials) {
        auth::Host::authenticate(self, conn, token, creds)
    }

    fn sasl_mechanisms(&mut self) -> Vec<String> {
        auth::Host::sasl_mechanisms(self)
    }

    fn authenticate_sasl(&mut self, conn: u64, token: u64, mechanism: String, response: Vec<u8>) {
        auth::Host::authenticate_sasl(self, conn, token, mechanism, response)
    }

    fn publish(&mut self, conn: u64, token: u64, msg: types::OutboundMessage) {
        pubsub::Host::publish(self, conn, token, msg)
    }

    fn subscribe(&mut self, conn: u64, token: u64, spec: types::SubscriptionSpec) {
        pubsub::Host::subscribe(self, conn, token, spec)
    }

    fn unsubscribe(&mut self, conn: u64, sub: u64, delete: bool) {
        pubsub::Host::unsubscribe(self, conn, sub, delete)
    }

    fn ack(&mut self, conn: u64, sub: u64, delivery_id: u64) {
        pubsub::Host::ack(self, conn, sub, delivery_id)
    }

    fn ack_many(&mut self, conn: u64, sub: u64, delivery_ids: Vec<u64>) {
        pubsub::Host::ack_many(self, conn, sub, delivery_ids)
    }

    fn kv_get(&mut self, conn: u64, token: u64, key: String) {
        kv::Host::kv_get(self, conn, token, key)
    }

    fn kv_put(&mut self, conn: u64, token: u64, key: String, value: Option<Vec<u8>>) {
        kv::Host::kv_put(self, conn, token, key, value)
    }

    fn kv_scan(
        &mut self,
        conn: u64,
        token: u64,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) {
        kv::Host::kv_scan(self, conn, token, prefix, start_after, limit)
    }

    fn set_will(&mut self, conn: u64, will: Option<types::Will>) {
        session::Host::set_will(self, conn, will)
    }

    fn claim(&mut self, conn: u64, token: u64, key: String) {
        session::Host::claim(self, conn, token, key)
    }

    fn set_timer(&mut self, conn: u64, token: u64, delay_ms: u64) {
        timers::Host::set_timer(self, conn, token, delay_ms)
    }

    fn now_ms(&mut self) -> u64 {
        timers::Host::now_ms(self)
    }

    fn log(&mut self, level: types::LogLevel, message: String) {
        log::Host::log(self, level, message)
    }
}
