//! The `host` interface of the ABI, one line per call, into the family that carries it out.

use super::context::HostState;
use crate::abi::magnetar::plugin::{host, types};

impl host::Host for HostState {
    fn send(&mut self, conn: u64, data: Vec<u8>) {
        HostState::send(self, conn, data)
    }

    fn close(&mut self, conn: u64, reason: String) {
        HostState::close(self, conn, reason)
    }

    fn set_reading(&mut self, conn: u64, reading: bool) {
        HostState::set_reading(self, conn, reading)
    }

    fn authenticate(&mut self, conn: u64, token: u64, creds: types::Credentials) {
        HostState::authenticate(self, conn, token, creds)
    }

    fn sasl_mechanisms(&mut self) -> Vec<String> {
        HostState::sasl_mechanisms(self)
    }

    fn authenticate_sasl(&mut self, conn: u64, token: u64, mechanism: String, response: Vec<u8>) {
        HostState::authenticate_sasl(self, conn, token, mechanism, response)
    }

    fn publish(&mut self, conn: u64, token: u64, msg: types::OutboundMessage) {
        HostState::publish(self, conn, token, msg)
    }

    fn subscribe(&mut self, conn: u64, token: u64, spec: types::SubscriptionSpec) {
        HostState::subscribe(self, conn, token, spec)
    }

    fn unsubscribe(&mut self, conn: u64, sub: u64, delete: bool) {
        HostState::unsubscribe(self, conn, sub, delete)
    }

    fn ack(&mut self, conn: u64, sub: u64, delivery_id: u64) {
        HostState::ack(self, conn, sub, delivery_id)
    }

    fn ack_many(&mut self, conn: u64, sub: u64, delivery_ids: Vec<u64>) {
        HostState::ack_many(self, conn, sub, delivery_ids)
    }

    fn kv_get(&mut self, conn: u64, token: u64, key: String) {
        HostState::kv_get(self, conn, token, key)
    }

    fn kv_put(&mut self, conn: u64, token: u64, key: String, value: Option<Vec<u8>>) {
        HostState::kv_put(self, conn, token, key, value)
    }

    fn kv_scan(
        &mut self,
        conn: u64,
        token: u64,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) {
        HostState::kv_scan(self, conn, token, prefix, start_after, limit)
    }

    fn set_will(&mut self, conn: u64, will: Option<types::Will>) {
        HostState::set_will(self, conn, will)
    }

    fn claim(&mut self, conn: u64, token: u64, key: String) {
        HostState::claim(self, conn, token, key)
    }

    fn set_timer(&mut self, conn: u64, token: u64, delay_ms: u64) {
        HostState::set_timer(self, conn, token, delay_ms)
    }

    fn now_ms(&mut self) -> u64 {
        HostState::now_ms(self)
    }

    fn log(&mut self, level: types::LogLevel, message: String) {
        HostState::log(self, level, message)
    }
}
