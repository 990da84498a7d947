//! Host calls of the namespace kv: `kv-get`, `kv-put`, `kv-scan`. Each is an operation of the
//! connection's ordered queue (`ops_task`), so a plugin's kv writes and publishes reach the
//! backend in the order it made them. Keys are the plugin's own: the host prefixes them with
//! the plugin's name, and strips the prefix from what a scan finds.

use super::context::HostState;
use super::event::Event;
use super::ops_task::Op;
use crate::abi::v0_2::magnetar::plugin::kv;

/// Most entries one `kv-scan` returns.
const KV_SCAN_MAX: u32 = 1000;

impl kv::Host for HostState {
    /// `kv-get`: completes with `on-kv-result`.
    fn kv_get(&mut self, conn: u64, token: u64, key: String) {
        match self.kv_topic(conn) {
            Ok(topic) => {
                let key = self.kv_key(&key);
                // The connection has queued no operation yet (nothing of it can be in flight
                // or on its way back, so the answer cannot overtake another), and the
                // namespace is loaded: read now, no operations task (the MQTT plugin's look
                // for an earlier session at each connect).
                let first = self.conns.get(&conn).is_some_and(|s| s.ops.is_none());
                if let Some(value) = first
                    .then(|| self.services.kv.get_now(&topic, &key))
                    .flatten()
                {
                    return self.finish_now(Event::KvResult {
                        conn,
                        token,
                        outcome: Ok(value),
                    });
                }
                self.queue_op(conn, Op::KvGet { token, topic, key })
            }
            Err(e) => self.complete(Event::KvResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    /// `kv-put`: writes (`Some`) or deletes (`None`); completes with `on-kv-result`.
    fn kv_put(&mut self, conn: u64, token: u64, key: String, value: Option<Vec<u8>>) {
        match self.kv_topic(conn) {
            Ok(topic) => {
                let key = self.kv_key(&key);
                self.queue_op(
                    conn,
                    Op::KvPut {
                        token,
                        topic,
                        key,
                        value,
                    },
                )
            }
            Err(e) => self.complete(Event::KvResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    /// `kv-scan`: completes with `on-kv-scan-result`.
    fn kv_scan(
        &mut self,
        conn: u64,
        token: u64,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) {
        match self.kv_topic(conn) {
            Ok(topic) => {
                let plugin_prefix = self.kv_key("");
                let op = Op::KvScan {
                    token,
                    topic,
                    prefix: format!("{plugin_prefix}{prefix}"),
                    start_after: start_after.map(|a| format!("{plugin_prefix}{a}")),
                    plugin_prefix,
                    limit: limit.clamp(1, KV_SCAN_MAX) as usize,
                };
                self.queue_op(conn, op)
            }
            Err(e) => self.complete(Event::KvScanResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }
}
