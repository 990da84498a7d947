//! Host calls of topics (ABI 0.2.3): `create`, `delete`, `set-partitions`, `describe` —
//! partitioned topics of the connection's namespace through the backend's admin API.
//!
//! Not carried out yet: every call completes with an `internal` error saying so.

use super::context::{op_error, HostState};
use super::event::Event;
use crate::abi::types::ErrorKind;
use crate::abi::v0_2::magnetar::plugin::topics;

const NOT_YET: &str = "topics are not served by this gateway yet";

impl HostState {
    fn topics_not_yet(&self, conn: u64, token: u64) {
        self.complete(Event::TopicsResult {
            conn,
            token,
            outcome: Err(op_error(ErrorKind::Internal, NOT_YET)),
        });
    }
}

impl topics::Host for HostState {
    fn create(&mut self, conn: u64, token: u64, _topic: String, _partitions: u32) {
        self.topics_not_yet(conn, token);
    }

    fn delete(&mut self, conn: u64, token: u64, _topic: String) {
        self.topics_not_yet(conn, token);
    }

    fn set_partitions(&mut self, conn: u64, token: u64, _topic: String, _partitions: u32) {
        self.topics_not_yet(conn, token);
    }

    fn describe(&mut self, conn: u64, token: u64, _names: Vec<String>) {
        self.topics_not_yet(conn, token);
    }
}
