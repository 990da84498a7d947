//! Host calls of homes (ABI 0.2.4): `post` and `reply` — one owner per key inside this
//! gateway.
//!
//! A plugin's instances run on separate worker threads, each serving its own connections;
//! state that many connections share (a Kafka group coordinator) must live in one of them.
//! A *home* is that place: shard `s` of a domain the plugin names lives on the plugin's
//! worker `s % workers`, as a virtual connection (an id in [`HOME_CONN_BASE`]`..`, a
//! connection slot with no socket, so that `timers` work on it). `post` carries a request
//! from any connection to the home's worker (`Event::HomePost`, with the poster's namespace
//! from its principal, never from the plugin); `reply` carries the answer back to the
//! poster's worker (`Event::HomeReply`). The host never looks inside either payload.
//!
//! Guarantees: every post completes exactly once — with the home's answer, or with an
//! error when it cannot be delivered or its home's instance ended first (a trap). Bounded:
//! at most [`MAX_PENDING`] posts wait for answers in the process; more fail with
//! `quota-exceeded`. Posts in flight at the same time may arrive in any order.
//!
//! Not here: ownership across gateway processes (docs/kafka.md section 2.2: a Failover
//! subscription and a fenced producer per shard), and keeping a home's state across a trap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::context::{op_error, HostState};
use super::event::Event;
use crate::abi::types::{ErrorKind, OpError};
use crate::abi::v0_2::magnetar::plugin::homes;

/// Home connection ids start here, far above the listeners' (counted from 1), so that the
/// two never meet.
pub const HOME_CONN_BASE: u64 = 1 << 62;
/// Posts waiting for their answer, in the whole process.
pub const MAX_PENDING: usize = 65_536;
/// Longest domain name.
const MAX_DOMAIN: usize = 64;

/// A post waiting for its home's answer.
struct Pending {
    home: u64,
    /// The poster's worker queue, its connection and token.
    reply_to: mpsc::Sender<Event>,
    conn: u64,
    token: u64,
}

#[derive(Default)]
struct Inner {
    /// Each plugin's worker queues, in worker order.
    workers: HashMap<Arc<str>, Vec<mpsc::Sender<Event>>>,
    /// (plugin, domain, shard) -> the home's connection id.
    homes: HashMap<(Arc<str>, String, u32), u64>,
    pending: HashMap<u64, Pending>,
    next_post: u64,
    next_home: u64,
}

/// The homes of every plugin of this process, and the posts waiting for answers.
#[derive(Default)]
pub struct Homes {
    inner: Mutex<Inner>,
}

/// Where a post goes.
struct Route {
    post_id: u64,
    home: u64,
    to: mpsc::Sender<Event>,
}

impl Homes {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a plugin's workers (their event queues), in order: homes are placed on them.
    pub fn register(&self, plugin: &str, workers: Vec<mpsc::Sender<Event>>) {
        self.lock().workers.insert(Arc::from(plugin), workers);
    }

    /// Picks the home of (plugin, domain, shard), opening its id on first use, and records
    /// the post.
    fn route(
        &self,
        plugin: &Arc<str>,
        domain: &str,
        shard: u32,
        reply_to: mpsc::Sender<Event>,
        conn: u64,
        token: u64,
    ) -> Result<Route, OpError> {
        let mut inner = self.lock();
        if inner.pending.len() >= MAX_PENDING {
            return Err(op_error(
                ErrorKind::QuotaExceeded,
                "too many posts wait for their homes",
            ));
        }
        let to = match inner.workers.get(plugin) {
            Some(w) if !w.is_empty() => w[shard as usize % w.len()].clone(),
            _ => return Err(op_error(ErrorKind::Internal, "the plugin has no workers")),
        };
        let key = (plugin.clone(), domain.to_string(), shard);
        let home = match inner.homes.get(&key) {
            Some(h) => *h,
            None => {
                inner.next_home += 1;
                let h = HOME_CONN_BASE + inner.next_home;
                inner.homes.insert(key, h);
                h
            }
        };
        inner.next_post += 1;
        let post_id = inner.next_post;
        inner.pending.insert(
            post_id,
            Pending {
                home,
                reply_to,
                conn,
                token,
            },
        );
        Ok(Route { post_id, home, to })
    }

    /// The post `post_id` of `home`, answered (taken out of the waiting ones).
    fn answered(&self, home: u64, post_id: u64) -> Option<Pending> {
        let mut inner = self.lock();
        match inner.pending.get(&post_id) {
            Some(p) if p.home == home => inner.pending.remove(&post_id),
            _ => None,
        }
    }

    /// A home's instance ended: its posts in flight fail, and the next post opens it anew.
    /// Returns the failures to deliver.
    pub fn home_ended(&self, home: u64) -> Vec<(mpsc::Sender<Event>, Event)> {
        let mut inner = self.lock();
        inner.homes.retain(|_, h| *h != home);
        let ids: Vec<u64> = inner
            .pending
            .iter()
            .filter(|(_, p)| p.home == home)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| inner.pending.remove(&id))
            .map(|p| {
                let event = Event::HomeReply {
                    conn: p.conn,
                    token: p.token,
                    outcome: Err(op_error(
                        ErrorKind::Internal,
                        "the home ended before answering",
                    )),
                };
                (p.reply_to, event)
            })
            .collect()
    }

    /// A post its home's instance cannot take (it does not export `events3`).
    pub fn refuse(&self, home: u64, post_id: u64) -> Option<(mpsc::Sender<Event>, Event)> {
        let p = self.answered(home, post_id)?;
        let event = Event::HomeReply {
            conn: p.conn,
            token: p.token,
            outcome: Err(op_error(
                ErrorKind::Internal,
                "the plugin's instance serves no homes",
            )),
        };
        Some((p.reply_to, event))
    }
}

/// Whether a connection id is a home's.
pub fn is_home(conn: u64) -> bool {
    conn >= HOME_CONN_BASE
}

impl HostState {
    /// Queues `event` on a worker: this instance's own completions go first in line
    /// (`finish_now`); another worker's queue is tried at once and waited for on the
    /// runtime when full.
    pub(super) fn hand_to(&mut self, to: mpsc::Sender<Event>, event: Event) {
        if to.same_channel(&self.events) {
            self.finish_now(event);
            return;
        }
        match to.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.runtime.spawn(async move {
                    let _ = to.send(event).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl HostState {
    /// Fails a post that reached an instance serving no homes.
    pub fn refuse_post(&mut self, home: u64, post_id: u64) {
        if let Some((to, event)) = self.services.homes.refuse(home, post_id) {
            self.hand_to(to, event);
        }
    }
}

impl homes::Host for HostState {
    /// `post`: to the home of (`domain`, `shard`), with the poster's namespace.
    fn post(&mut self, conn: u64, token: u64, domain: String, shard: u32, payload: Vec<u8>) {
        let namespace = match self.principal(conn) {
            Ok(p) => format!("{}/{}", p.tenant, p.namespace),
            Err(e) => {
                self.finish_now(Event::HomeReply {
                    conn,
                    token,
                    outcome: Err(e),
                });
                return;
            }
        };
        if domain.is_empty() || domain.len() > MAX_DOMAIN {
            self.finish_now(Event::HomeReply {
                conn,
                token,
                outcome: Err(op_error(
                    ErrorKind::InvalidName,
                    format!("a home's domain has 1 to {MAX_DOMAIN} bytes"),
                )),
            });
            return;
        }
        let plugin = self.plugin.clone();
        let route =
            self.services
                .homes
                .route(&plugin, &domain, shard, self.events.clone(), conn, token);
        match route {
            Ok(Route { post_id, home, to }) => self.hand_to(
                to,
                Event::HomePost {
                    home,
                    domain,
                    shard,
                    post_id,
                    namespace,
                    payload,
                },
            ),
            Err(e) => self.finish_now(Event::HomeReply {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    /// `reply`: the home's answer to a post, back to the poster's worker.
    fn reply(&mut self, home: u64, post_id: u64, payload: Vec<u8>) {
        if !is_home(home) || !self.knows(home) {
            return;
        }
        let Some(p) = self.services.homes.answered(home, post_id) else {
            return;
        };
        self.hand_to(
            p.reply_to,
            Event::HomeReply {
                conn: p.conn,
                token: p.token,
                outcome: Ok(payload),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posts_reach_one_home_per_shard_and_fail_when_it_ends() {
        let homes = Homes::default();
        let (w0, _r0) = mpsc::channel(4);
        let (w1, _r1) = mpsc::channel(4);
        let (poster, _rp) = mpsc::channel(4);
        let plugin: Arc<str> = Arc::from("kafka");
        homes.register("kafka", vec![w0.clone(), w1.clone()]);
        let a = homes
            .route(&plugin, "groups", 3, poster.clone(), 7, 1)
            .unwrap();
        let b = homes
            .route(&plugin, "groups", 3, poster.clone(), 8, 2)
            .unwrap();
        let c = homes
            .route(&plugin, "groups", 4, poster.clone(), 8, 3)
            .unwrap();
        assert_eq!(a.home, b.home);
        assert_ne!(a.home, c.home);
        assert!(is_home(a.home) && !is_home(7));
        assert!(a.to.same_channel(&w1) && c.to.same_channel(&w0));
        // Answered once, by its own home only.
        assert!(homes.answered(c.home, a.post_id).is_none());
        assert_eq!(homes.answered(a.home, a.post_id).map(|p| p.token), Some(1));
        assert!(homes.answered(a.home, a.post_id).is_none());
        // The home's instance ended: its waiting post fails, the next post opens a new home.
        let failed = homes.home_ended(a.home);
        assert_eq!(failed.len(), 1);
        assert!(matches!(
            &failed[0].1,
            Event::HomeReply { conn: 8, token: 2, outcome: Err(e) } if e.kind == ErrorKind::Internal
        ));
        let d = homes
            .route(&plugin, "groups", 3, poster.clone(), 7, 4)
            .unwrap();
        assert_ne!(d.home, a.home);
        // Unknown plugin.
        assert!(homes
            .route(&Arc::from("other"), "groups", 0, poster, 1, 1)
            .is_err());
    }
}
