//! Host calls of routing (ABI 0.2.1): `open-route`, `bind`, `unbind`. Acks, deliveries and
//! `unsubscribe` are those of `pubsub`: a route is a subscription whose messages the host
//! picked by filter — a live route's from the router's reader (`router`), a durable route's
//! from its queue, which the source's feeder fills (`feeder`).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::context::{op_error, HostState};
use super::event::Event;
use super::feeder::{encode, Feeder, Feeders, Named};
use super::ops_task::Op;
use super::router::{RouteOpen, Router, Source};
use super::subscription_task::{
    run_subscription, subscribe_failed, Shape, SubTask, SubscriptionCount,
};
use crate::abi::types::{ErrorKind, OpError};
use crate::abi::v0_2::magnetar::plugin::routing::{self, Filter as AbiFilter};
use crate::backend::SubscribeOptions;
use crate::config::ActionName;
use crate::quota::Gauge;
use crate::routing::Filter;

/// The subscription through which a durable route reads its queue.
const QUEUE_SUBSCRIPTION: &str = "magnetar-queue";

/// A route of a connection.
pub(super) enum RouteRef {
    /// A live route: its source and its id there.
    Live { source: Arc<Source>, route: u64 },
    /// A durable route: its feeder, its queue (full topic) and its filters.
    Durable {
        feeder: Arc<Feeder>,
        queue: String,
        filters: Vec<Filter>,
        /// Its copies are stored one message per entry (`max-unacked` 1, see `feeder`).
        one_per_entry: bool,
    },
}

impl HostState {
    /// Stores a durable route's filters (`None`: deletes the route), in order with the
    /// connection's other backend operations.
    pub(super) fn store_route(
        &mut self,
        conn: u64,
        feeder: &Feeder,
        queue: &str,
        filters: Option<(&[Filter], bool)>,
    ) {
        let op = Op::RouteWrite {
            topic: feeder.kv_topic().to_string(),
            key: feeder.key(queue),
            value: filters.map(|(filters, one_per_entry)| encode(filters, one_per_entry)),
        };
        self.queue_op(conn, op);
    }

    /// Opens a durable route: stores its filters, gives them to the source's feeder, and
    /// reads its queue once the feeder reads the source.
    #[allow(clippy::too_many_arguments)]
    fn open_durable(
        &mut self,
        conn: u64,
        token: u64,
        source: Named<'_>,
        queue: &str,
        filters: Vec<Filter>,
        max_unacked: usize,
    ) -> Result<(), OpError> {
        let queue = self.authorized_topic(conn, queue, ActionName::Consume)?;
        let kv_topic = self.kv_topic(conn)?;
        let feeder = Feeders::get(&self.services, &self.runtime, &source, &kv_topic);
        let one_per_entry = max_unacked == 1;
        feeder.set_local(&queue, filters.clone(), one_per_entry);
        self.store_route(conn, &feeder, &queue, Some((&filters, one_per_entry)));
        if !self.conns.contains_key(&conn) {
            return Ok(());
        }
        let meters = self.admit_subscription(conn)?;
        let Some(slot) = self.conns.get(&conn) else {
            return Ok(());
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        let (cmd_tx, cmd_rx) = mpsc::channel(max_unacked + 16);
        let task = SubTask {
            conn,
            sub,
            token,
            max_unacked,
            events: self.events.clone(),
            shared: slot.shared.clone(),
            backend: self.services.backend.clone(),
            services: self.services.clone(),
            meters: meters.clone(),
            shape: Shape::Deliveries,
        };
        let opts = SubscribeOptions {
            topic: queue.clone(),
            subscription: QUEUE_SUBSCRIPTION.to_string(),
            sub_type: pulsar::SubType::Exclusive,
            durable: true,
            // The queue holds only this route's copies: all of them.
            earliest: true,
            receiver_queue: max_unacked as u32,
            start_message_id: None,
            dead_letter: None,
            consumer_name: None,
        };
        if let Some(slot) = self.conns.get_mut(&conn) {
            slot.subs.insert(sub, cmd_tx);
            let route = RouteRef::Durable {
                feeder: feeder.clone(),
                queue,
                filters,
                one_per_entry,
            };
            slot.routes.insert(sub, route);
        }
        let events = self.events.clone();
        self.runtime.spawn(async move {
            match feeder.ready().await {
                Ok(()) => run_subscription(task, opts, cmd_rx).await,
                Err(e) => {
                    // The subscription counted against the quotas ends here.
                    drop(SubscriptionCount(meters));
                    subscribe_failed(&events, conn, token, e).await;
                }
            }
        });
        Ok(())
    }

    /// A route's filters changed: a durable route's are given to its feeder and stored.
    fn route_changed(&mut self, conn: u64, route: u64) {
        let Some(RouteRef::Durable {
            feeder,
            queue,
            filters,
            one_per_entry,
        }) = self.conns.get(&conn).and_then(|s| s.routes.get(&route))
        else {
            return;
        };
        let (feeder, queue, filters) = (feeder.clone(), queue.clone(), filters.clone());
        let one_per_entry = *one_per_entry;
        feeder.set_local(&queue, filters.clone(), one_per_entry);
        self.store_route(conn, &feeder, &queue, Some((&filters, one_per_entry)));
    }
}

fn filter(f: AbiFilter) -> Filter {
    match f {
        AbiFilter::Mqtt(f) => Filter::Mqtt(f),
        AbiFilter::AmqpTopic(f) => Filter::AmqpTopic(f),
        AbiFilter::Exact(k) => Filter::Exact(k),
        AbiFilter::All => Filter::All,
        AbiFilter::Headers(h) => Filter::Headers {
            match_all: h.match_all,
            args: h.args.into_iter().map(|p| (p.key, p.value)).collect(),
        },
    }
}

fn invalid(e: impl ToString) -> OpError {
    op_error(ErrorKind::InvalidName, e.to_string())
}

impl routing::Host for HostState {
    /// `open-route`: registers the route with the router; completes with
    /// `on-subscribe-result` once its source is being read.
    fn open_route(&mut self, conn: u64, token: u64, spec: routing::RouteSpec) {
        let fail = |s: &Self, e: OpError| {
            s.complete(Event::SubscribeResult {
                conn,
                token,
                outcome: Err(e),
            })
        };
        let topic = match self.authorized_topic(conn, &spec.source, ActionName::Consume) {
            Ok(t) => t,
            Err(e) => return fail(self, e),
        };
        let filters: Vec<Filter> = spec.filters.into_iter().map(filter).collect();
        if let Some(e) = filters.iter().find_map(|f| f.validate().err()) {
            return fail(self, invalid(e));
        }
        let max_unacked = spec.max_unacked.clamp(1, 10_000) as usize;
        let max_queued = spec.max_queued.clamp(1, 1_000_000) as usize;
        if let Some(queue) = &spec.queue {
            let source = Named {
                topic,
                short: &spec.source,
                key_property: spec.key_property.as_deref(),
            };
            if let Err(e) = self.open_durable(conn, token, source, queue, filters, max_unacked) {
                fail(self, e);
            }
            return;
        }
        let sub = self.next_sub;
        self.next_sub += 1;
        if !self.conns.contains_key(&conn) {
            return;
        }
        let meters = match self.admit_subscription(conn) {
            Ok(m) => m,
            Err(e) => return fail(self, e),
        };
        let Some(slot) = self.conns.get(&conn) else {
            return;
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(max_unacked + 16);
        let open = RouteOpen {
            conn,
            sub,
            token,
            topic,
            key_property: spec.key_property,
            filters,
            max_unacked,
            max_queued,
            events: self.events.clone(),
            shared: slot.shared.clone(),
            meters,
        };
        match Router::open(&self.services, &self.runtime, open, cmd_rx) {
            Ok((source, route)) => {
                if let Some(slot) = self.conns.get_mut(&conn) {
                    slot.subs.insert(sub, cmd_tx);
                    slot.routes.insert(sub, RouteRef::Live { source, route });
                }
            }
            // Validated above; the route task never started, so the quota is released here.
            Err(e) => {
                if let Some(m) = self.conns.get(&conn).and_then(|s| s.meters.as_ref()) {
                    m.release(Gauge::Subscriptions);
                }
                fail(self, invalid(e))
            }
        }
    }

    /// `bind`: adds a filter to an open route.
    fn bind(&mut self, conn: u64, route: u64, f: AbiFilter) -> Result<(), OpError> {
        let f = filter(f);
        f.validate().map_err(invalid)?;
        match self
            .conns
            .get_mut(&conn)
            .and_then(|s| s.routes.get_mut(&route))
        {
            None => return Err(op_error(ErrorKind::NotFound, "no such route")),
            Some(RouteRef::Live { source, route }) => {
                source.bind(*route, &f).map_err(invalid)?;
                return Ok(());
            }
            Some(RouteRef::Durable { filters, .. }) => {
                if filters.contains(&f) {
                    return Ok(());
                }
                filters.push(f);
            }
        }
        self.route_changed(conn, route);
        Ok(())
    }

    /// `unbind`: removes a filter from an open route.
    fn unbind(&mut self, conn: u64, route: u64, f: AbiFilter) {
        let f = filter(f);
        match self
            .conns
            .get_mut(&conn)
            .and_then(|s| s.routes.get_mut(&route))
        {
            None => {}
            Some(RouteRef::Live { source, route }) => {
                source.unbind(*route, &f);
            }
            Some(RouteRef::Durable { filters, .. }) => {
                let before = filters.len();
                filters.retain(|x| *x != f);
                if filters.len() != before {
                    self.route_changed(conn, route);
                }
            }
        }
    }
}
