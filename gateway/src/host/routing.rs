//! Host calls of routing (ABI 0.2.1): `open-route`, `bind`, `unbind`. Acks, deliveries and
//! `unsubscribe` are those of `pubsub`: a route is a subscription whose messages the host's
//! router (`router`) picked by filter.

use tokio::sync::mpsc;

use super::context::{op_error, HostState};
use super::event::Event;
use super::router::{RouteOpen, Router};
use crate::abi::types::{ErrorKind, OpError};
use crate::abi::v0_2::magnetar::plugin::routing::{self, Filter as AbiFilter};
use crate::config::ActionName;
use crate::quota::Gauge;
use crate::routing::Filter;

/// A route of a connection: its source and its id there.
pub(super) struct RouteRef {
    pub(super) source: std::sync::Arc<super::router::Source>,
    pub(super) route: u64,
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
        let sub = self.next_sub;
        self.next_sub += 1;
        let max_unacked = spec.max_unacked.clamp(1, 10_000) as usize;
        let max_queued = spec.max_queued.clamp(1, 1_000_000) as usize;
        let Some(slot) = self.conns.get(&conn) else {
            return;
        };
        let meters = slot.meters.clone();
        if meters
            .as_ref()
            .is_some_and(|m| !m.admit(Gauge::Subscriptions))
        {
            let e = op_error(
                ErrorKind::QuotaExceeded,
                "too many subscriptions for this tenant or user",
            );
            return fail(self, e);
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(max_unacked + 16);
        let open = RouteOpen {
            conn,
            sub,
            token,
            topic,
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
                    slot.routes.insert(sub, RouteRef { source, route });
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
        let r = self
            .conns
            .get(&conn)
            .and_then(|s| s.routes.get(&route))
            .ok_or_else(|| op_error(ErrorKind::NotFound, "no such route"))?;
        r.source.bind(r.route, &filter(f)).map_err(invalid)?;
        Ok(())
    }

    /// `unbind`: removes a filter from an open route.
    fn unbind(&mut self, conn: u64, route: u64, f: AbiFilter) {
        if let Some(r) = self.conns.get(&conn).and_then(|s| s.routes.get(&route)) {
            r.source.unbind(r.route, &filter(f));
        }
    }
}
