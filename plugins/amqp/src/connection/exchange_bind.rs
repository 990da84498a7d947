//! `exchange.bind` / `exchange.unbind` (RabbitMQ's exchange-to-exchange bindings, class 40
//! methods 30 and 40), and the queue bindings that follow them (`crate::exchange_graph`).
//!
//! An edge is stored in its destination exchange's record (the predeclared `amq.*`
//! exchanges get a record for it). Then every queue's bindings through edges are derived
//! again from the graph of all edges (one kv scan of the exchanges, one of the queues), and
//! each queue whose bindings changed is written and its route opened with its new filters,
//! before `bind-ok` / `unbind-ok`. A `queue.bind` or `queue.unbind` on an exchange that has
//! sources (or of a queue that has derived bindings) derives that queue's bindings the same
//! way. Errors as RabbitMQ: the default exchange is 403, a missing source or destination 404.
//! `exchange.delete` is a propagation too: the deleted exchange's edges (as source and as
//! destination) and the queues' own bindings on it go, then every queue is derived again.

use std::collections::HashMap;

use magnetar_sdk::KvEntry;

use super::channel::{Outcome, Task};
use super::*;
use crate::exchange_graph::{derive, Edge};
use crate::topology::{self, Exchange, ExchangeType, Queue};

/// Records read per kv scan.
const SCAN_LIMIT: u32 = 1000;

/// An `exchange.bind` or `exchange.unbind` on its way.
#[derive(Debug, Clone)]
pub(crate) struct XBind {
    channel: u16,
    destination: String,
    edge: Edge,
    bind: bool,
    no_wait: bool,
    /// The source's type, once read.
    source_read: bool,
}

/// Queue bindings being derived again and stored, then the reply.
#[derive(Debug, Clone)]
pub(crate) struct Propagation {
    channel: u16,
    reply: Option<Box<Method>>,
    /// One queue (a `queue.bind` / `unbind`), or every queue (`None`).
    only: Option<(String, Queue)>,
    /// Each destination exchange's edges, as scanned so far.
    graph: HashMap<String, Vec<Edge>>,
    stage: Stage,
    /// The queues whose bindings changed, to write.
    changed: Vec<(String, Queue)>,
    /// An `exchange.delete`: the exchange's bindings go with it.
    deleting: Option<Deleting>,
}

/// An `exchange.delete` on its way (a [`Propagation`] of every queue).
#[derive(Debug, Clone)]
struct Deleting {
    name: String,
    if_unused: bool,
    /// The exchange is the source of a binding (to a queue or an exchange).
    in_use: bool,
    /// Exchange records to write before the queues (`None`: delete), the deleted one first.
    records: Vec<(String, Option<Exchange>)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    Exchanges,
    Queues,
    /// The last of `Deleting::records` was written.
    ExchangeRecord,
    /// The record of the last queue of `changed` was written: its route next.
    Record,
    /// Its route was opened with the new filters.
    Route,
}

impl AmqpConnection {
    /// `exchange.bind` (`bind`) or `exchange.unbind`.
    pub(super) fn exchange_bind(&mut self, channel: u16, m: Method) {
        let (destination, source, routing_key, arguments, no_wait, bind) = match &m {
            Method::ExchangeBind(b) => (
                b.destination.clone(),
                b.source.clone(),
                b.routing_key.clone(),
                b.arguments.clone(),
                b.no_wait,
                true,
            ),
            Method::ExchangeUnbind(b) => (
                b.destination.clone(),
                b.source.clone(),
                b.routing_key.clone(),
                b.arguments.clone(),
                b.no_wait,
                false,
            ),
            _ => return,
        };
        if source.is_empty() || destination.is_empty() {
            let e = ConnError::new(
                ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            );
            return self.close_channel(channel, e.caused_by(&m));
        }
        let x = XBind {
            channel,
            destination,
            edge: Edge {
                source,
                kind: ExchangeType::Direct,
                routing_key,
                arguments,
            },
            bind,
            no_wait,
            source_read: false,
        };
        match topology::predeclared(&x.edge.source) {
            Some(p) => self.source_known(x, p.kind),
            None => {
                let key = topology::exchange_key(&x.edge.source);
                self.wait_kv_get(key, Task::XBind(Box::new(x)));
            }
        }
    }

    fn source_known(&mut self, mut x: XBind, kind: ExchangeType) {
        x.edge.kind = kind;
        x.source_read = true;
        let key = topology::exchange_key(&x.destination);
        self.wait_kv_get(key, Task::XBind(Box::new(x)));
    }

    fn xbind_cause(x: &XBind) -> Method {
        if x.bind {
            Method::ExchangeBind(ExchangeBind::default())
        } else {
            Method::ExchangeUnbind(ExchangeUnbind::default())
        }
    }

    fn xbind_missing(&mut self, x: &XBind, name: &str) {
        let e = ConnError::new(NOT_FOUND, format!("no exchange '{name}' in vhost '/'"));
        self.close_channel(x.channel, e.caused_by(&Self::xbind_cause(x)));
    }

    /// The source's record (its type), then the destination's (the edge goes there).
    pub(super) fn on_xbind(&mut self, x: XBind, outcome: Outcome) {
        let Outcome::Kv(r) = outcome else {
            return;
        };
        let record = match r {
            Ok(v) => v.as_deref().and_then(Exchange::decode),
            Err(e) => {
                let err = ConnError::new(INTERNAL_ERROR, e.message);
                return self.close_channel(x.channel, err);
            }
        };
        if !x.source_read {
            return match record {
                Some(s) => self.source_known(x, s.kind),
                None => {
                    let name = x.edge.source.clone();
                    self.xbind_missing(&x, &name)
                }
            };
        }
        let Some(mut dest) = record.or_else(|| topology::predeclared(&x.destination)) else {
            let name = x.destination.clone();
            return self.xbind_missing(&x, &name);
        };
        dest.sources.retain(|e| !e.same(&x.edge));
        if x.bind {
            dest.sources.push(x.edge.clone());
        }
        let reply = match (x.bind, x.no_wait) {
            (_, true) => None,
            (true, false) => Some(Box::new(Method::ExchangeBindOk(ExchangeBindOk {}))),
            (false, false) => Some(Box::new(Method::ExchangeUnbindOk(ExchangeUnbindOk {}))),
        };
        let p = Propagation {
            channel: x.channel,
            reply,
            only: None,
            graph: HashMap::new(),
            stage: Stage::Exchanges,
            changed: Vec::new(),
            deleting: None,
        };
        // Written, then the graph is scanned (`on_propagation` with the put's outcome).
        self.wait_kv_put(
            topology::exchange_key(&x.destination),
            Some(dest.encode()),
            Task::Propagate(Box::new(p)),
        );
    }

    /// `exchange.delete`: as RabbitMQ, the exchange goes with every binding it is the
    /// source or the destination of (queue bindings derived through it too), unless
    /// `if_unused` and it is the source of one (406); deleting one that does not exist is
    /// `delete-ok`. One kv scan of the exchanges and one of the queues, as `exchange.bind`.
    pub(super) fn exchange_delete(
        &mut self,
        channel: u16,
        name: String,
        if_unused: bool,
        no_wait: bool,
    ) {
        let p = Propagation {
            channel,
            reply: (!no_wait).then(|| Box::new(Method::ExchangeDeleteOk(ExchangeDeleteOk {}))),
            only: None,
            graph: HashMap::new(),
            stage: Stage::Exchanges,
            changed: Vec::new(),
            deleting: Some(Deleting {
                records: vec![(name.clone(), None)],
                name,
                if_unused,
                in_use: false,
            }),
        };
        self.scan(p, None);
    }

    /// A `queue.bind` / `unbind` whose queue's bindings may follow edges: they are derived
    /// from the graph before the queue is written.
    pub(super) fn rebind_queue(
        &mut self,
        channel: u16,
        name: String,
        queue: Queue,
        reply: Option<Box<Method>>,
    ) {
        let p = Propagation {
            channel,
            reply,
            only: Some((name, queue)),
            graph: HashMap::new(),
            stage: Stage::Exchanges,
            changed: Vec::new(),
            deleting: None,
        };
        self.scan(p, None);
    }

    fn scan(&mut self, p: Propagation, start_after: Option<String>) {
        let prefix = match p.stage {
            Stage::Exchanges => "amqp/x/",
            _ => "amqp/q/",
        };
        let token = self.ops.start(Op::Task(Task::Propagate(Box::new(p))));
        self.out.push(Action::KvScan {
            token,
            prefix: prefix.into(),
            start_after,
            limit: SCAN_LIMIT,
        });
        self.busy = true;
    }

    /// The next step of a propagation.
    pub(super) fn on_propagation(&mut self, mut p: Propagation, outcome: Outcome) {
        let fail = |s: &mut Self, channel: u16, e: OpError| {
            let err = ConnError::new(INTERNAL_ERROR, e.message);
            s.close_channel(channel, err);
        };
        match (p.stage.clone(), outcome) {
            // The edge is stored (or a scan goes on).
            (Stage::Exchanges, Outcome::Kv(r)) => match r {
                Ok(_) => self.scan(p, None),
                Err(e) => fail(self, p.channel, e),
            },
            (Stage::Exchanges, Outcome::Scan(r)) => {
                let entries = match r {
                    Ok(entries) => entries,
                    Err(e) => return fail(self, p.channel, e),
                };
                for entry in &entries {
                    let (Some(name), Some(mut x)) = (
                        entry.key.strip_prefix("amqp/x/"),
                        Exchange::decode(&entry.value),
                    ) else {
                        continue;
                    };
                    if let Some(d) = p.deleting.as_mut() {
                        if name == d.name {
                            // Its sources' edges end with it.
                            continue;
                        }
                        let before = x.sources.len();
                        x.sources.retain(|e| e.source != d.name);
                        if x.sources.len() != before {
                            d.in_use = true;
                            d.records.push((name.to_string(), Some(x.clone())));
                        }
                    }
                    if !x.sources.is_empty() {
                        p.graph.insert(name.to_string(), x.sources);
                    }
                }
                if let Some(last) = next_page(&entries) {
                    return self.scan(p, Some(last));
                }
                match p.only.take() {
                    Some((name, mut queue)) => {
                        rederive(&mut queue, &p.graph);
                        p.changed.push((name, queue));
                        self.rewrite(p);
                    }
                    None => {
                        p.stage = Stage::Queues;
                        self.scan(p, None);
                    }
                }
            }
            (Stage::Queues, Outcome::Scan(r)) => {
                let entries = match r {
                    Ok(entries) => entries,
                    Err(e) => return fail(self, p.channel, e),
                };
                for entry in &entries {
                    let (Some(name), Some(mut queue)) = (
                        entry.key.strip_prefix("amqp/q/"),
                        Queue::decode(&entry.value),
                    ) else {
                        continue;
                    };
                    let before = queue.bindings.clone();
                    if let Some(d) = p.deleting.as_mut() {
                        let own = |b: &topology::Binding| b.via.is_empty() && b.exchange == d.name;
                        if queue.bindings.iter().any(own) {
                            d.in_use = true;
                            queue.bindings.retain(|b| !own(b));
                        }
                    }
                    rederive(&mut queue, &p.graph);
                    if queue.bindings != before {
                        p.changed.push((name.to_string(), queue));
                    }
                }
                if let Some(last) = next_page(&entries) {
                    return self.scan(p, Some(last));
                }
                match p.deleting.take() {
                    Some(d) if d.if_unused && d.in_use => {
                        let e = ConnError::new(
                            PRECONDITION_FAILED,
                            format!("exchange '{}' in vhost '/' in use", d.name),
                        );
                        let cause = Method::ExchangeDelete(ExchangeDelete::default());
                        self.close_channel(p.channel, e.caused_by(&cause));
                    }
                    Some(d) => {
                        p.deleting = Some(d);
                        self.write_exchanges(p);
                    }
                    None => self.rewrite(p),
                }
            }
            (Stage::ExchangeRecord, Outcome::Kv(r)) => match r {
                Ok(_) => {
                    if let Some(d) = p.deleting.as_mut() {
                        d.records.pop();
                    }
                    self.write_exchanges(p);
                }
                Err(e) => fail(self, p.channel, e),
            },
            (Stage::Record, Outcome::Kv(r)) => match r {
                Ok(_) => {
                    let Some((name, queue)) = p.changed.last().cloned() else {
                        return self.rewrite(p);
                    };
                    p.stage = Stage::Route;
                    self.store_route(&name, &queue, Task::Propagate(Box::new(p)));
                }
                Err(e) => fail(self, p.channel, e),
            },
            (Stage::Route, Outcome::Kv(r)) => {
                if let Err(e) = r {
                    return fail(self, p.channel, e);
                }
                p.changed.pop();
                self.rewrite(p);
            }
            (stage, _) => self.log(
                LogLevel::Warn,
                format!("unexpected outcome for a propagation at {stage:?}"),
            ),
        }
    }

    /// Writes the next exchange record an `exchange.delete` changes (the deleted one last
    /// of them, so that a failure leaves it to be deleted again), then the queues.
    fn write_exchanges(&mut self, mut p: Propagation) {
        let Some((name, record)) = p.deleting.as_ref().and_then(|d| d.records.last()) else {
            return self.rewrite(p);
        };
        let (key, value) = (
            topology::exchange_key(name),
            record.as_ref().map(Exchange::encode),
        );
        p.stage = Stage::ExchangeRecord;
        self.wait_kv_put(key, value, Task::Propagate(Box::new(p)));
    }

    /// Writes the next changed queue (its record, then its route), or replies.
    fn rewrite(&mut self, mut p: Propagation) {
        let Some((name, queue)) = p.changed.last() else {
            let (channel, reply) = (p.channel, p.reply.take());
            return self.reply(channel, reply);
        };
        let (key, value) = (topology::queue_key(name), queue.encode());
        p.stage = Stage::Record;
        self.wait_kv_put(key, Some(value), Task::Propagate(Box::new(p)));
    }
}

/// The key to scan on from, if the page was full.
fn next_page(entries: &[KvEntry]) -> Option<String> {
    (entries.len() >= SCAN_LIMIT as usize)
        .then(|| entries.last().map(|e| e.key.clone()))
        .flatten()
}

/// The queue's bindings: its own, and those derived from them through `graph`.
fn rederive(queue: &mut Queue, graph: &HashMap<String, Vec<Edge>>) {
    queue.bindings.retain(|b| b.via.is_empty());
    let derived = derive(&queue.bindings, graph);
    queue.bindings.extend(derived);
}
