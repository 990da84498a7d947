//! Host calls of homes (ABI 0.2.4): `post`, `reply`, `owner`, `holders` — one owner per
//! key, inside this gateway and across the gateways of one backend.
//!
//! A plugin's instances run on separate worker threads, each serving its own connections;
//! state that many connections share (a Kafka group coordinator) must live in one of them.
//! A *home* is that place: shard `s` of a domain the plugin names, in the poster's namespace,
//! lives on the plugin's worker `s % workers`, as a virtual connection (an id in
//! [`HOME_CONN_BASE`]`..`, a connection slot with no socket, so that `timers` work on it).
//! `post` carries a request from any connection to the home's worker (`Event::HomePost`,
//! with the poster's namespace from its principal, never from the plugin); `reply` carries
//! the answer back to the poster's worker (`Event::HomeReply`). The host never looks inside
//! either payload.
//!
//! Across gateways (`super::ownership`): a shard's home opens only on the gateway that
//! holds the shard through the backend. A post for a shard another gateway holds fails at
//! once with `not-found` (message `not-owner: node N`); `owner` and `holders` tell the
//! plugin where to send its client instead. A home is tied to the epoch of the holding it
//! was opened under: when the shard is lost and held again, the next post closes the old
//! home (its `on-closed`, its posts in flight fail) and opens a new, empty one. Every answer
//! is fenced before it leaves ([`super::ownership::Ownership::fence`]): an answer made by a
//! home whose gateway lost the shard meanwhile fails `not-found` instead.
//!
//! Guarantees: every post completes exactly once — with the home's answer, or with an
//! error when it cannot be delivered, its home's instance ended first (a trap), or the
//! shard is not (or no longer) this gateway's. Bounded: at most [`MAX_PENDING`] posts wait
//! for answers in the process; more fail with `quota-exceeded`. Posts in flight at the same
//! time may arrive in any order.
//!
//! Not here: keeping a home's state across a trap or an ownership move (the plugin rebuilds
//! it: Kafka's members rejoin).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;

use super::context::{op_error, HostState};
use super::event::Event;
use super::ownership::{Epoch, Owner, Ownership, ShardKey};
use crate::abi::types::{ErrorKind, OpError};
use crate::abi::v0_2::magnetar::plugin::homes;

/// Home connection ids start here, far above the listeners' (counted from 1), so that the
/// two never meet.
pub const HOME_CONN_BASE: u64 = 1 << 62;
/// Posts waiting for their answer, in the whole process.
pub const MAX_PENDING: usize = 65_536;
/// Longest domain name.
const MAX_DOMAIN: usize = 64;
/// How long a post waits for this gateway to get a shard nobody else holds.
const ACQUIRE_WAIT: Duration = Duration::from_secs(5);

/// A post waiting for its home's answer.
struct Pending {
    home: u64,
    /// The poster's worker queue, its connection and token.
    reply_to: mpsc::Sender<Event>,
    conn: u64,
    token: u64,
}

/// An open home: its connection id, the holding it serves under, and its worker.
struct Open {
    id: u64,
    epoch: Option<Epoch>,
    worker: mpsc::Sender<Event>,
}

#[derive(Default)]
struct Inner {
    /// Each plugin's worker queues, in worker order.
    workers: HashMap<Arc<str>, Vec<mpsc::Sender<Event>>>,
    /// The open homes, by shard.
    homes: HashMap<ShardKey, Open>,
    /// A home's shard and epoch, by its connection id.
    by_id: HashMap<u64, (ShardKey, Option<Epoch>)>,
    pending: HashMap<u64, Pending>,
    next_post: u64,
    next_home: u64,
}

impl Inner {
    /// Forgets a home; its posts in flight fail. Returns the failures to deliver.
    fn end(&mut self, home: u64) -> Vec<(mpsc::Sender<Event>, Event)> {
        if let Some((key, _)) = self.by_id.remove(&home) {
            if self.homes.get(&key).is_some_and(|o| o.id == home) {
                self.homes.remove(&key);
            }
        }
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.home == home)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.pending.remove(&id))
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
}

/// The homes of every plugin of this process, and the posts waiting for answers.
#[derive(Default)]
pub struct Homes {
    inner: Mutex<Inner>,
    /// Which shards this gateway holds through the backend; unset (tests of one process):
    /// every shard is this gateway's.
    ownership: OnceLock<Arc<Ownership>>,
}

/// Events to hand to workers: a post to its home, failures, a retired home's close.
type Deliveries = Vec<(mpsc::Sender<Event>, Event)>;

/// The error of a post or answer for a shard this gateway does not hold.
fn not_owner(holder: Option<i32>) -> OpError {
    match holder {
        Some(node) => op_error(
            ErrorKind::NotFound,
            format!("not-owner: the shard is held by node {node}"),
        ),
        None => op_error(
            ErrorKind::NotFound,
            "not-owner: this gateway does not hold the shard",
        ),
    }
}

impl Homes {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a plugin's workers (their event queues), in order: homes are placed on them.
    pub fn register(&self, plugin: &str, workers: Vec<mpsc::Sender<Event>>) {
        self.lock().workers.insert(Arc::from(plugin), workers);
    }

    /// Decides shards through the backend from now on (set once, at start).
    pub fn set_ownership(&self, ownership: Arc<Ownership>) {
        let _ = self.ownership.set(ownership);
    }

    pub fn ownership(&self) -> Option<&Arc<Ownership>> {
        self.ownership.get()
    }

    /// Routes a post to the home of `key` held under `epoch`, opening it (and retiring a
    /// home of an earlier epoch) if needed. Returns what to deliver.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        key: ShardKey,
        epoch: Option<Epoch>,
        reply_to: mpsc::Sender<Event>,
        conn: u64,
        token: u64,
        payload: Vec<u8>,
    ) -> Deliveries {
        let mut inner = self.lock();
        let fail = |reply_to: mpsc::Sender<Event>, e: OpError| {
            vec![(
                reply_to,
                Event::HomeReply {
                    conn,
                    token,
                    outcome: Err(e),
                },
            )]
        };
        if inner.pending.len() >= MAX_PENDING {
            let e = op_error(
                ErrorKind::QuotaExceeded,
                "too many posts wait for their homes",
            );
            return fail(reply_to, e);
        }
        let to = match inner.workers.get(&key.plugin) {
            Some(w) if !w.is_empty() => w[key.shard as usize % w.len()].clone(),
            _ => {
                let e = op_error(ErrorKind::Internal, "the plugin has no workers");
                return fail(reply_to, e);
            }
        };
        let mut out = Vec::new();
        let stale = inner
            .homes
            .get(&key)
            .filter(|o| o.epoch != epoch)
            .map(|o| (o.id, o.worker.clone()));
        if let Some((old, worker)) = stale {
            out.extend(inner.end(old));
            out.push((worker, Event::Closed { conn: old }));
        }
        let home = match inner.homes.get(&key) {
            Some(o) => o.id,
            None => {
                inner.next_home += 1;
                let id = HOME_CONN_BASE + inner.next_home;
                inner.by_id.insert(id, (key.clone(), epoch));
                inner.homes.insert(
                    key.clone(),
                    Open {
                        id,
                        epoch,
                        worker: to.clone(),
                    },
                );
                id
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
        out.push((
            to,
            Event::HomePost {
                home,
                domain: key.domain,
                shard: key.shard,
                post_id,
                namespace: key.namespace,
                payload,
            },
        ));
        out
    }

    /// The post `post_id` of `home`, answered (taken out of the waiting ones), with the
    /// home's shard and epoch.
    fn answered(&self, home: u64, post_id: u64) -> Option<(Pending, Option<(ShardKey, Epoch)>)> {
        let mut inner = self.lock();
        match inner.pending.get(&post_id) {
            Some(p) if p.home == home => {
                let p = inner.pending.remove(&post_id)?;
                let held = match inner.by_id.get(&home) {
                    Some((key, Some(epoch))) => Some((key.clone(), *epoch)),
                    _ => None,
                };
                Some((p, held))
            }
            _ => None,
        }
    }

    /// A home's instance ended: its posts in flight fail, and the next post opens it anew.
    /// Returns the failures to deliver.
    pub fn home_ended(&self, home: u64) -> Vec<(mpsc::Sender<Event>, Event)> {
        self.lock().end(home)
    }

    /// A post its home's instance cannot take (it does not export `events3`).
    pub fn refuse(&self, home: u64, post_id: u64) -> Option<(mpsc::Sender<Event>, Event)> {
        let (p, _) = self.answered(home, post_id)?;
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

/// Hands events to workers from a task of the runtime.
async fn deliver(out: Deliveries) {
    for (to, event) in out {
        let _ = to.send(event).await;
    }
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

    /// Fails a post that reached an instance serving no homes.
    pub fn refuse_post(&mut self, home: u64, post_id: u64) {
        if let Some((to, event)) = self.services.homes.refuse(home, post_id) {
            self.hand_to(to, event);
        }
    }

    /// The shard of `domain` in the connection's namespace.
    fn shard_key(&self, conn: u64, domain: &str, shard: u32) -> Result<ShardKey, OpError> {
        let p = self.principal(conn)?;
        if domain.is_empty() || domain.len() > MAX_DOMAIN {
            return Err(op_error(
                ErrorKind::InvalidName,
                format!("a home's domain has 1 to {MAX_DOMAIN} bytes"),
            ));
        }
        Ok(ShardKey {
            namespace: format!("{}/{}", p.tenant, p.namespace),
            plugin: self.plugin.clone(),
            domain: domain.to_string(),
            shard,
        })
    }
}

/// A holder as the plugin sees it.
fn holder_of(
    identity: &super::ownership::Identity,
    me: &super::ownership::Identity,
) -> homes::Holder {
    homes::Holder {
        node_id: identity.node_id,
        local: identity.gateway == me.gateway,
        endpoints: identity
            .endpoints
            .iter()
            .map(|e| homes::Endpoint {
                listener: e.listener.clone(),
                host: e.host.clone(),
                port: e.port,
            })
            .collect(),
    }
}

impl homes::Host for HostState {
    /// `post`: to the home of (`domain`, `shard`) in the poster's namespace, if this gateway
    /// holds the shard.
    fn post(&mut self, conn: u64, token: u64, domain: String, shard: u32, payload: Vec<u8>) {
        let key = match self.shard_key(conn, &domain, shard) {
            Ok(k) => k,
            Err(e) => {
                self.finish_now(Event::HomeReply {
                    conn,
                    token,
                    outcome: Err(e),
                });
                return;
            }
        };
        let reply_to = self.events.clone();
        let Some(ownership) = self.services.homes.ownership().cloned() else {
            let out = self
                .services
                .homes
                .route(key, None, reply_to, conn, token, payload);
            for (to, event) in out {
                self.hand_to(to, event);
            }
            return;
        };
        match ownership.owner(&key) {
            Owner::Me(Some(epoch)) => {
                let out =
                    self.services
                        .homes
                        .route(key, Some(epoch), reply_to, conn, token, payload);
                for (to, event) in out {
                    self.hand_to(to, event);
                }
            }
            Owner::Other(h) => self.finish_now(Event::HomeReply {
                conn,
                token,
                outcome: Err(not_owner(Some(h.identity.node_id))),
            }),
            // Nobody else holds it: this gateway is asking for it, wait a little.
            Owner::Me(None) => {
                let services = self.services.clone();
                self.runtime.spawn(async move {
                    let out = match ownership.acquired(&key, ACQUIRE_WAIT).await {
                        Some(epoch) => {
                            services
                                .homes
                                .route(key, Some(epoch), reply_to, conn, token, payload)
                        }
                        None => vec![(
                            reply_to,
                            Event::HomeReply {
                                conn,
                                token,
                                outcome: Err(not_owner(None)),
                            },
                        )],
                    };
                    deliver(out).await;
                });
            }
        }
    }

    /// `reply`: the home's answer to a post, back to the poster's worker once fenced.
    fn reply(&mut self, home: u64, post_id: u64, payload: Vec<u8>) {
        if !is_home(home) || !self.knows(home) {
            return;
        }
        let Some((p, held)) = self.services.homes.answered(home, post_id) else {
            return;
        };
        let ownership = self.services.homes.ownership().cloned();
        match (ownership, held) {
            (Some(ownership), Some((key, epoch))) => {
                self.runtime.spawn(async move {
                    let outcome = if ownership.fence(&key, epoch).await {
                        Ok(payload)
                    } else {
                        Err(not_owner(None))
                    };
                    let event = Event::HomeReply {
                        conn: p.conn,
                        token: p.token,
                        outcome,
                    };
                    let _ = p.reply_to.send(event).await;
                });
            }
            _ => self.hand_to(
                p.reply_to,
                Event::HomeReply {
                    conn: p.conn,
                    token: p.token,
                    outcome: Ok(payload),
                },
            ),
        }
    }

    /// `owner`: who answers for (`domain`, `shard`) of the connection's namespace.
    fn owner(&mut self, conn: u64, domain: String, shard: u32) -> Option<homes::Holder> {
        let key = self.shard_key(conn, &domain, shard).ok()?;
        let Some(ownership) = self.services.homes.ownership().cloned() else {
            return Some(homes::Holder {
                node_id: 1,
                local: true,
                endpoints: Vec::new(),
            });
        };
        let me = ownership.identity();
        match ownership.owner(&key) {
            Owner::Me(_) => Some(holder_of(me, me)),
            Owner::Other(h) => Some(holder_of(&h.identity, me)),
        }
    }

    /// `holders`: the gateways holding shards of `domain` in the connection's namespace, and
    /// this one.
    fn holders(&mut self, conn: u64, domain: String) -> Vec<homes::Holder> {
        let Ok(key) = self.shard_key(conn, &domain, 0) else {
            return Vec::new();
        };
        let Some(ownership) = self.services.homes.ownership().cloned() else {
            return Vec::new();
        };
        let me = ownership.identity();
        ownership
            .holders(&key.namespace, &key.plugin, &key.domain)
            .iter()
            .map(|i| holder_of(i, me))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(shard: u32) -> ShardKey {
        ShardKey {
            namespace: "t/n".into(),
            plugin: Arc::from("kafka"),
            domain: "groups".into(),
            shard,
        }
    }

    /// The home and post id of the post among `out` (the last delivery).
    fn posted(out: &Deliveries) -> (u64, u64, mpsc::Sender<Event>) {
        match out.last() {
            Some((to, Event::HomePost { home, post_id, .. })) => (*home, *post_id, to.clone()),
            _ => panic!("not posted"),
        }
    }

    #[test]
    fn posts_reach_one_home_per_shard_and_fail_when_it_ends() {
        let homes = Homes::default();
        let (w0, _r0) = mpsc::channel(4);
        let (w1, _r1) = mpsc::channel(4);
        let (poster, _rp) = mpsc::channel(4);
        homes.register("kafka", vec![w0.clone(), w1.clone()]);
        let a = posted(&homes.route(key(3), None, poster.clone(), 7, 1, vec![]));
        let b = posted(&homes.route(key(3), None, poster.clone(), 8, 2, vec![]));
        let c = posted(&homes.route(key(4), None, poster.clone(), 8, 3, vec![]));
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, c.0);
        assert!(is_home(a.0) && !is_home(7));
        assert!(a.2.same_channel(&w1) && c.2.same_channel(&w0));
        // Another namespace's shard 3 is another home.
        let other = ShardKey {
            namespace: "t/other".into(),
            ..key(3)
        };
        assert_ne!(
            posted(&homes.route(other, None, poster.clone(), 9, 9, vec![])).0,
            a.0
        );
        // Answered once, by its own home only.
        assert!(homes.answered(c.0, a.1).is_none());
        assert_eq!(homes.answered(a.0, a.1).map(|(p, _)| p.token), Some(1));
        assert!(homes.answered(a.0, a.1).is_none());
        // The home's instance ended: its waiting post fails, the next post opens a new home.
        let failed = homes.home_ended(a.0);
        assert_eq!(failed.len(), 1);
        assert!(matches!(
            &failed[0].1,
            Event::HomeReply { conn: 8, token: 2, outcome: Err(e) } if e.kind == ErrorKind::Internal
        ));
        let d = posted(&homes.route(key(3), None, poster.clone(), 7, 4, vec![]));
        assert_ne!(d.0, a.0);
        // Unknown plugin.
        let unknown = ShardKey {
            plugin: Arc::from("other"),
            ..key(0)
        };
        assert!(matches!(
            homes.route(unknown, None, poster, 1, 1, vec![]).as_slice(),
            [(
                _,
                Event::HomeReply {
                    outcome: Err(_),
                    ..
                }
            )]
        ));
    }

    #[test]
    fn a_home_of_an_earlier_holding_is_closed_by_the_next_post() {
        let homes = Homes::default();
        let (w0, _r0) = mpsc::channel(4);
        let (poster, _rp) = mpsc::channel(4);
        homes.register("kafka", vec![w0.clone()]);
        let first = posted(&homes.route(key(0), Some((1, 1)), poster.clone(), 7, 1, vec![]));
        // Same epoch: same home, and the answer carries the shard and epoch to fence.
        let again = posted(&homes.route(key(0), Some((1, 1)), poster.clone(), 7, 2, vec![]));
        assert_eq!(first.0, again.0);
        let (_, held) = homes.answered(again.0, again.1).unwrap();
        assert_eq!(held, Some((key(0), (1, 1))));
        // Held again under a newer epoch: the old home is closed, its post fails, a new one
        // opens.
        let out = homes.route(key(0), Some((1, 9)), poster.clone(), 7, 3, vec![]);
        assert!(out.iter().any(|(_, e)| matches!(
            e,
            Event::HomeReply {
                token: 1,
                outcome: Err(_),
                ..
            }
        )));
        assert!(out
            .iter()
            .any(|(_, e)| matches!(e, Event::Closed { conn } if *conn == first.0)));
        let newer = posted(&out);
        assert_ne!(newer.0, first.0);
        // The old home's late answer finds nothing to answer.
        assert!(homes.answered(first.0, first.1).is_none());
    }
}
