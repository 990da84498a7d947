//! Host calls of indexed topics (ABI 0.2.3): `append`, `open-reader`, `locate`, `bounds` —
//! Pulsar's broker-entry index for plugins that number messages (Kafka's offsets).
//!
//! Not carried out yet: every call completes with an `internal` error saying so.

use super::context::{op_error, HostState};
use super::event::Event;
use crate::abi::types::ErrorKind;
use crate::abi::v0_2::exports::magnetar::plugin::events2::AppendResult;
use crate::abi::v0_2::magnetar::plugin::indexed::{self, DedupSpec, ReaderSpec, RecordOut};

const NOT_YET: &str = "indexed topics are not served by this gateway yet";

impl indexed::Host for HostState {
    fn append(
        &mut self,
        conn: u64,
        token: u64,
        _topic: String,
        _records: Vec<RecordOut>,
        _dedup: Option<DedupSpec>,
    ) {
        self.complete(Event::Appended {
            conn,
            results: vec![AppendResult {
                token,
                outcome: Err(op_error(ErrorKind::Internal, NOT_YET)),
            }],
        });
    }

    fn open_reader(&mut self, conn: u64, token: u64, _spec: ReaderSpec) {
        self.complete(Event::SubscribeResult {
            conn,
            token,
            outcome: Err(op_error(ErrorKind::Internal, NOT_YET)),
        });
    }

    fn locate(&mut self, conn: u64, token: u64, _topic: String, _index: u64) {
        self.complete(Event::Position {
            conn,
            token,
            outcome: Ok(None),
        });
    }

    fn bounds(&mut self, conn: u64, token: u64, _topic: String) {
        self.complete(Event::Bounds {
            conn,
            token,
            outcome: Err(op_error(ErrorKind::Internal, NOT_YET)),
        });
    }
}
