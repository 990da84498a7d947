//! Host calls of sessions: `claim` (a key held by one connection at a time, e.g. an MQTT
//! Client Identifier: a new holder takes it over from the old) and `set-will` (a last will
//! published when a connection ends), and what happens when a connection ends: its claims
//! are released and its will published, now or after its delay unless a new connection
//! claims one of its keys first (the session was resumed).
//!
//! Claims are of this gateway process, across all instances ([`Claims`], in `Services`);
//! they are not coordinated across gateway processes, and a crash loses pending wills.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::context::{ConnSlot, HostState};
use super::event::Event;
use super::pubsub::backend_message;
use super::services::Services;
use crate::abi::types::{self, OpError};
use crate::abi::v0_2::magnetar::plugin::session;
use crate::backend::OutMessage;
use crate::config::ActionName;
use crate::conn_shared::ConnShared;
use crate::quota::Gauge;

impl HostState {
    /// A connection is gone: its claims are released and its will, if any, is published.
    pub(super) fn ended(&self, conn: u64, slot: ConnSlot) {
        if let Some(m) = &slot.meters {
            m.release(Gauge::Connections);
        }
        let services = &self.services;
        let mut claims = services.claims.lock();
        // Taken over: another connection holds one of this one's keys, so its session lives on.
        let mut resumed = false;
        for key in &slot.claims {
            match claims.holders.get(key) {
                Some(h) if h.conn == conn => {
                    claims.holders.remove(key);
                }
                Some(_) => resumed = true,
                None => {}
            }
        }
        let Some(will) = slot.will else { return };
        if will.delay_ms == 0 {
            self.runtime
                .spawn(publish_will(services.clone(), will, None));
        } else if !resumed {
            claims.next_will += 1;
            let serial = claims.next_will;
            let keys = slot.claims.clone();
            let task = self.runtime.spawn(publish_will(
                services.clone(),
                will,
                Some((serial, keys.clone())),
            ));
            for key in keys {
                claims
                    .delayed_wills
                    .insert(key, (serial, task.abort_handle()));
            }
        }
    }

    /// A will resolved against the connection's principal, names checked.
    fn pending_will(&self, conn: u64, w: types::Will) -> Result<PendingWill, OpError> {
        // Checked and sealed now, like a `publish`: the same rules whenever it goes out.
        let topic = self.authorized_topic(conn, &w.msg.topic, ActionName::Produce)?;
        let kv = match w.kv {
            Some(write) => Some((self.kv_topic(conn)?, self.kv_key(&write.key), write.value)),
            None => None,
        };
        let mut msg = backend_message(w.msg);
        self.services.seal(&topic, &mut msg)?;
        Ok(PendingWill {
            topic,
            msg,
            kv,
            delay_ms: w.delay_ms,
        })
    }
}

/// How long an earlier holder of a claimed key has to close before the host closes it.
const CLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A will, resolved: full topic URLs and the host's kv key.
pub(super) struct PendingWill {
    topic: String,
    msg: OutMessage,
    /// (kv topic, kv key, value) written before the publish.
    kv: Option<(String, String, Option<Vec<u8>>)>,
    delay_ms: u64,
}

/// Who holds a claimed key.
struct ClaimHolder {
    conn: u64,
    events: mpsc::Sender<Event>,
    shared: Arc<ConnShared>,
}

/// The keys connections of this process claimed (`claim`), and the delayed wills a new claim
/// cancels. Keys are `<plugin>\0<tenant>/<namespace>\0<key>`. One lock, never held across an
/// `.await`.
#[derive(Default)]
pub struct Claims {
    inner: std::sync::Mutex<ClaimsInner>,
}

#[derive(Default)]
struct ClaimsInner {
    holders: HashMap<String, ClaimHolder>,
    /// Delayed wills of ended connections by claim key: (serial, task).
    delayed_wills: HashMap<String, (u64, tokio::task::AbortHandle)>,
    next_will: u64,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Publishes a will (after its delay): the kv write first, then the message. `delayed`
/// names the entries to remove from `Claims::delayed_wills` once it ran.
async fn publish_will(
    services: Arc<Services>,
    will: PendingWill,
    delayed: Option<(u64, Vec<String>)>,
) {
    if will.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(will.delay_ms)).await;
    }
    if let Some((serial, keys)) = delayed {
        let mut claims = services.claims.lock();
        for key in keys {
            if claims
                .delayed_wills
                .get(&key)
                .is_some_and(|(s, _)| *s == serial)
            {
                claims.delayed_wills.remove(&key);
            }
        }
    }
    if let Some((topic, key, value)) = will.kv {
        if let Err(e) = services.kv.put(&topic, &key, value).await {
            tracing::warn!(error = %e, "will: kv write failed");
        }
    }
    // Sealed already, when it was set (`set_will`).
    let stored = match services.backend.enqueue(&will.topic, will.msg).await {
        Ok(receipt) => receipt.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(()) => tracing::debug!(topic = %will.topic, "will published"),
        Err(e) => tracing::warn!(topic = %will.topic, error = %e, "will not published"),
    }
}

impl session::Host for HostState {
    /// `set-will`: registers or clears the connection's last will.
    fn set_will(&mut self, conn: u64, will: Option<types::Will>) {
        let will = match will {
            None => None,
            Some(w) => match self.pending_will(conn, w) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(plugin = %self.plugin, conn, error = %e.message, "will refused");
                    None
                }
            },
        };
        if let Some(slot) = self.conns.get_mut(&conn) {
            slot.will = will;
        }
    }

    /// `claim`: takes `key` for this connection; completes with `on-claim-result`.
    fn claim(&mut self, conn: u64, token: u64, key: String) {
        let full = match self.principal(conn) {
            Ok(p) => format!("{}\0{}/{}\0{key}", self.plugin, p.tenant, p.namespace),
            Err(e) => {
                return self.finish_now(Event::ClaimResult {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        if !slot.claims.contains(&full) {
            slot.claims.push(full.clone());
        }
        let holder = ClaimHolder {
            conn,
            events: self.events.clone(),
            shared: slot.shared.clone(),
        };
        let previous = {
            let mut claims = self.services.claims.lock();
            if let Some((_, delayed)) = claims.delayed_wills.remove(&full) {
                delayed.abort();
            }
            claims.holders.insert(full, holder)
        };
        match previous {
            Some(prev) if prev.conn != conn && !prev.shared.is_closing() => {
                let events = self.events.clone();
                self.runtime.spawn(async move {
                    let _ = prev
                        .events
                        .send(Event::ClaimLost {
                            conn: prev.conn,
                            key,
                        })
                        .await;
                    if tokio::time::timeout(CLAIM_GRACE, prev.shared.closed())
                        .await
                        .is_err()
                    {
                        prev.shared.close();
                    }
                    let outcome = Ok(());
                    let _ = events
                        .send(Event::ClaimResult {
                            conn,
                            token,
                            outcome,
                        })
                        .await;
                });
            }
            // Nobody else held it: done now, delivered right after this call.
            _ => self.finish_now(Event::ClaimResult {
                conn,
                token,
                outcome: Ok(()),
            }),
        }
    }
}
