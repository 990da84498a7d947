//! Host calls of connection I/O: `send`, `close`, `set-reading`. They act at once on the
//! state the connection's socket task shares
//! ([`ConnShared`](crate::conn_shared::ConnShared)); none waits.

use bytes::Bytes;

use super::context::HostState;
use crate::abi::v0_2::magnetar::plugin::conn;

impl conn::Host for HostState {
    /// `send`: queues bytes for the socket.
    fn send(&mut self, conn: u64, data: Vec<u8>) {
        if let Some(slot) = self.conns.get(&conn) {
            slot.shared.send(Bytes::from(data));
        }
    }

    /// `set-reading`: whether the socket is read for the plugin.
    fn set_reading(&mut self, conn: u64, reading: bool) {
        if let Some(slot) = self.conns.get(&conn) {
            slot.shared.set_reading(reading);
        }
    }

    /// `close`: flushes what was sent, then closes.
    fn close(&mut self, conn: u64, reason: String) {
        if let Some(slot) = self.conns.get(&conn) {
            tracing::info!(plugin = %self.plugin, conn, %reason, "plugin closed the connection");
            slot.shared.close();
        }
    }
}
