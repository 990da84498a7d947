//! SUBSCRIBE and UNSUBSCRIBE (§3.8–§3.11): the session's filters, its backend
//! subscriptions (the main one and one per share group), and the retained messages a new
//! subscription gets (§3.3.1.3).

use super::*;

impl MqttConnection {
    // ---- SUBSCRIBE / UNSUBSCRIBE (§3.8–§3.11) -------------------------------------------------

    pub(super) fn on_subscribe(
        &mut self,
        packet_id: u16,
        entries: Vec<SubscribeEntry>,
        subscription_id: Option<u32>,
    ) {
        let failure = |v5: bool, code: u8| if v5 { code } else { SUBACK_FAILURE };
        let mut codes = Vec::with_capacity(entries.len());
        let mut added = Vec::new();
        let mut waits = Vec::new();
        for (index, e) in entries.into_iter().enumerate() {
            let shared = parse_shared(&e.filter).is_some();
            if !subscription::is_valid(&e.filter) {
                codes.push(failure(self.v5, reason::TOPIC_FILTER_INVALID));
                continue;
            }
            if shared && e.options.no_local {
                self.disconnect(
                    reason::PROTOCOL_ERROR,
                    "No Local on a shared subscription (§3.8.3.1)",
                );
                return;
            }
            let existed = self.filters.contains_key(&e.filter);
            if !existed && self.filters.len() >= self.config.max_subscriptions {
                codes.push(failure(self.v5, reason::QUOTA_EXCEEDED));
                continue;
            }
            let granted = e.qos.min(2);
            codes.push(granted);
            let sub = Subscription {
                qos: granted,
                options: e.options,
                id: subscription_id,
            };
            self.filters.insert(e.filter.clone(), sub);
            let scan = !shared
                && match e.options.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if shared {
                if !self.shared.contains_key(&e.filter) {
                    self.open_shared(e.filter.clone(), false);
                }
                if !matches!(self.shared.get(&e.filter), Some(Backend::Open(_))) {
                    waits.push(Some(e.filter.clone()));
                }
            } else {
                if self.backend == Backend::Closed {
                    self.open_backend(false);
                }
                if !matches!(self.backend, Backend::Open(_)) {
                    waits.push(None);
                }
            }
            added.push(Added {
                filter: e.filter,
                index,
                scan,
            });
        }
        if !added.is_empty() {
            self.changed_filters();
            self.sync_route();
        }
        self.replies.push_back(PendingReply {
            kind: Reply::Suback {
                packet_id,
                codes,
                added,
            },
            waits,
            waits_generation: self.generation,
        });
        self.flush_replies();
    }

    pub(super) fn on_unsubscribe(&mut self, packet_id: u16, filters: Vec<String>) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut changed = false;
        for f in filters {
            let removed = self.filters.remove(&f).is_some();
            changed |= removed;
            codes.push(if removed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
            if removed && parse_shared(&f).is_some() {
                // The group goes on without this member.
                if let Some(Backend::Open(sub)) = self.shared.remove(&f) {
                    self.out.push(Action::Unsubscribe { sub, delete: false });
                }
            }
        }
        if changed {
            self.changed_filters();
            self.sync_route();
        }
        self.replies.push_back(PendingReply {
            kind: Reply::Unsuback { packet_id, codes },
            waits: Vec::new(),
            waits_generation: self.generation,
        });
        self.flush_replies();
    }

    /// The filter set changed: a persistent session must be saved before the reply.
    pub(super) fn changed_filters(&mut self) {
        if self.persistent() {
            self.generation += 1;
            self.save_session();
        }
    }

    /// Writes the session if it changed since the last save; one save in flight at a time,
    /// so saves cannot land out of order.
    pub(super) fn save_session(&mut self) {
        if !self.persistent() || self.save_in_flight || self.saved_generation >= self.generation {
            return;
        }
        self.save_in_flight = true;
        let generation = self.generation;
        let key = session_store::kv_key(&self.client_id);
        let value = Some(session_store::encode(&self.stored_session(false)));
        let token = self.ops.start(Op::SaveSession { generation });
        self.out.push(Action::KvPut { token, key, value });
    }

    pub(super) fn is_open(&self, key: &Option<String>) -> bool {
        match key {
            None => matches!(self.backend, Backend::Open(_)),
            Some(f) => matches!(self.shared.get(f), Some(Backend::Open(_))),
        }
    }

    /// Sends the SUBACKs/UNSUBACKs whose conditions hold, in packet order; after a SUBACK,
    /// the retained messages of its filters follow (§3.3.1.3).
    pub(super) fn flush_replies(&mut self) {
        while let Some(front) = self.replies.front() {
            if front.waits.iter().any(|k| !self.is_open(k))
                || (self.persistent() && front.waits_generation > self.saved_generation)
            {
                break;
            }
            let Some(reply) = self.replies.pop_front() else {
                break;
            };
            match reply.kind {
                Reply::Suback {
                    packet_id,
                    codes,
                    added,
                } => {
                    let bytes = if self.v5 {
                        v5::suback(0x90, packet_id, &codes, &Properties::default())
                    } else {
                        codec::suback(packet_id, &codes)
                    };
                    self.send(bytes);
                    for a in added.into_iter().filter(|a| a.scan) {
                        if let Some(sub) = self.filters.get(&a.filter) {
                            self.scans.push_back(ScanJob {
                                granted: sub.qos,
                                sub_id: sub.id,
                                filter: a.filter,
                                start_after: None,
                            });
                        }
                    }
                }
                Reply::Unsuback { packet_id, codes } => {
                    let bytes = if self.v5 {
                        v5::suback(0xb0, packet_id, &codes, &Properties::default())
                    } else {
                        codec::unsuback(packet_id)
                    };
                    self.send(bytes);
                }
            }
        }
        self.next_scan();
    }

    /// A persistent session's queue: its durable route's topic (see the crate docs).
    pub(super) fn session_queue(&self) -> String {
        self.session_name
            .clone()
            .unwrap_or_else(|| session_store::durable_subscription(&self.client_id))
    }

    /// The spec of a route on `mqtt` with `filters`; durable with a `queue`.
    pub(super) fn route_spec(
        &self,
        filters: &BTreeSet<String>,
        queue: Option<String>,
    ) -> RouteSpec {
        RouteSpec {
            source: PULSAR_TOPIC.to_string(),
            filters: filters.iter().cloned().map(Filter::Mqtt).collect(),
            max_unacked: self.max_unacked(),
            max_queued: u32::try_from(self.config.max_queued).unwrap_or(u32::MAX),
            queue,
            // Native Pulsar producers name the MQTT topic in this property, not in the key.
            key_property: Some(PROP_TOPIC.to_string()),
        }
    }

    pub(super) fn max_unacked(&self) -> u32 {
        let window = self.config.delivery_window.max(self.config.max_inflight);
        u32::try_from(window).unwrap_or(u32::MAX)
    }

    /// Opens the session's route on `mqtt` with its non-shared filters (shared ones have
    /// their own subscriptions): the host picks the messages, so that a message costs in
    /// proportion to the sessions it reaches. A persistent session's route is durable: its
    /// queue keeps QoS 1 and 2 messages while the client is away.
    pub(super) fn open_backend(&mut self, restore: bool) {
        self.backend = Backend::Opening;
        let token = self.ops.start(Op::OpenBackend { restore });
        self.routed = self.route_filters();
        let queue = self.durable_backend().then(|| self.session_queue());
        let spec = self.route_spec(&self.routed, queue);
        self.out.push(Action::OpenRoute { token, spec });
    }

    /// The filters the session's route takes: the non-shared ones.
    fn route_filters(&self) -> BTreeSet<String> {
        self.filters
            .keys()
            .filter(|f| parse_shared(f).is_none())
            .cloned()
            .collect()
    }

    /// Binds and unbinds the route's filters to match the session's (once the route is
    /// open). Before the SUBACK that adds a filter, so that every message stored after the
    /// SUBACK is matched against it.
    pub(super) fn sync_route(&mut self) {
        let Backend::Open(route) = self.backend else {
            return;
        };
        let wanted = self.route_filters();
        for f in self.routed.difference(&wanted) {
            self.out.push(Action::Unbind {
                route,
                filter: Filter::Mqtt(f.clone()),
            });
        }
        for f in wanted.difference(&self.routed) {
            self.out.push(Action::Bind {
                route,
                filter: Filter::Mqtt(f.clone()),
            });
        }
        self.routed = wanted;
    }

    /// Joins the share group of a `$share/...` filter: its durable Shared subscription.
    pub(super) fn open_shared(&mut self, filter: String, restore: bool) {
        let Some(Ok((group, inner))) = parse_shared(&filter) else {
            return;
        };
        let spec = SubscriptionSpec {
            topic: PULSAR_TOPIC.to_string(),
            name: subscription::shared_subscription_name(group, inner),
            mode: SubMode::Shared,
            durable: true,
            initial_position: InitialPosition::Latest,
            max_unacked: self.max_unacked(),
        };
        self.shared.insert(filter.clone(), Backend::Opening);
        let token = self.ops.start(Op::OpenShared { filter, restore });
        self.out.push(Action::Subscribe { token, spec });
    }

    pub(super) fn on_subscribe_result(&mut self, token: u64, result: Result<SubId, OpError>) {
        match (self.ops.complete(token), result) {
            (Some(Op::OpenBackend { .. }), Ok(sub)) => {
                self.backend = Backend::Open(sub);
                // Filters added or removed while the route opened.
                self.sync_route();
                self.flush_replies();
            }
            (Some(Op::OpenBackend { restore }), Err(e))
                if self.durable_backend() && self.backend_retries < BACKEND_RETRIES =>
            {
                // The durable subscription may still be held by the connection this one took
                // over, while the backend closes its consumer: try again shortly.
                self.backend_retries += 1;
                self.log(
                    LogLevel::Debug,
                    format!("durable subscription busy, retrying: {}", e.message),
                );
                let token = self.ops.token();
                self.retry_timer = Some((token, restore));
                self.out.push(Action::SetTimer {
                    token,
                    delay_ms: BACKEND_RETRY_MS,
                });
            }
            (Some(Op::OpenBackend { restore: true }), Err(e)) => {
                let reason = format!("could not reopen the session's subscription: {}", e.message);
                self.disconnect(reason::UNSPECIFIED_ERROR, reason);
            }
            (Some(Op::OpenBackend { restore: false }), Err(e)) => {
                self.backend = Backend::Closed;
                self.backend_failed(None, e);
            }
            (Some(Op::OpenShared { filter, .. }), Ok(sub)) => {
                if self.filters.contains_key(&filter) && self.shared.contains_key(&filter) {
                    self.shared.insert(filter, Backend::Open(sub));
                    self.flush_replies();
                } else {
                    // Unsubscribed while it opened.
                    self.out.push(Action::Unsubscribe { sub, delete: false });
                }
            }
            (Some(Op::OpenShared { filter, restore }), Err(e)) => {
                self.shared.remove(&filter);
                if restore {
                    let reason = format!("could not rejoin share group {filter:?}: {}", e.message);
                    self.disconnect(reason::UNSPECIFIED_ERROR, reason);
                } else {
                    self.backend_failed(Some(filter), e);
                }
            }
            (Some(Op::OpenOldSubscription), Ok(sub)) => {
                self.out.push(Action::Unsubscribe { sub, delete: true });
            }
            (Some(Op::OpenOldSubscription), Err(e)) => {
                self.log(
                    LogLevel::Warn,
                    format!(
                        "could not delete the earlier session's subscription: {}",
                        e.message
                    ),
                );
            }
            _ => {}
        }
    }

    /// A backend subscription a SUBSCRIBE waits for could not be opened: its filters are
    /// refused in their SUBACKs (0x80, or 5.0's 0x87 / 0x97 by cause) and removed.
    pub(super) fn backend_failed(&mut self, key: Option<String>, e: OpError) {
        self.log(
            LogLevel::Warn,
            format!("backend subscription failed: {}", e.message),
        );
        let code = match (self.v5, e.kind) {
            (false, _) => SUBACK_FAILURE,
            (true, ErrorKind::NotAuthorized) => reason::NOT_AUTHORIZED,
            (true, ErrorKind::QuotaExceeded) => reason::QUOTA_EXCEEDED,
            (true, _) => reason::UNSPECIFIED_ERROR,
        };
        let key_of = |f: &str| parse_shared(f).map(|_| f.to_string());
        let mut removed = Vec::new();
        for reply in self.replies.iter_mut() {
            let before = reply.waits.len();
            reply.waits.retain(|k| *k != key);
            if reply.waits.len() == before {
                continue;
            }
            if let Reply::Suback { codes, added, .. } = &mut reply.kind {
                added.retain(|a| {
                    if key_of(&a.filter) != key {
                        return true;
                    }
                    if let Some(c) = codes.get_mut(a.index) {
                        *c = code;
                    }
                    removed.push(a.filter.clone());
                    false
                });
            }
        }
        for f in removed {
            self.filters.remove(&f);
        }
        self.changed_filters();
        self.flush_replies();
    }

    // ---- retained messages for a new subscription (§3.3.1.3) ---------------------------------

    /// Starts reading the next page of retained messages, one page at a time and only while
    /// the client keeps up, so a large retained set never piles up in memory.
    pub(super) fn next_scan(&mut self) {
        if self.scan_in_flight || self.waiting_out.len() >= self.config.max_inflight {
            return;
        }
        let Some(job) = self.scans.pop_front() else {
            return;
        };
        self.scan_in_flight = true;
        let prefix = retained::scan_prefix(&job.filter);
        let start_after = job.start_after.clone();
        let token = self.ops.start(Op::ScanRetained(job));
        self.out.push(Action::KvScan {
            token,
            prefix,
            start_after,
            limit: retained::PAGE,
        });
    }

    pub(super) fn on_scan_result(&mut self, token: u64, result: Result<Vec<KvEntry>, OpError>) {
        let Some(Op::ScanRetained(job)) = self.ops.complete(token) else {
            return;
        };
        self.scan_in_flight = false;
        match result {
            Ok(entries) => {
                if entries.len() >= retained::PAGE as usize {
                    if let Some(last) = entries.last() {
                        self.scans.push_front(ScanJob {
                            start_after: Some(last.key.clone()),
                            ..job.clone()
                        });
                    }
                }
                for e in entries {
                    let Some(topic) = retained::topic_of(&e.key) else {
                        continue;
                    };
                    if !topic::matches(&job.filter, topic) {
                        continue;
                    }
                    let Some(r) = retained::decode(&e.value) else {
                        continue;
                    };
                    let out = Outgoing {
                        topic: topic.to_string(),
                        payload: r.payload.to_vec(),
                        qos: r.qos.min(job.granted),
                        retain: true,
                        properties: r.properties,
                        published_ms: r.stored_ms,
                        sub_ids: job.sub_id.into_iter().collect(),
                        backend: None,
                    };
                    self.send_outgoing(out);
                }
            }
            Err(e) => self.log(
                LogLevel::Warn,
                format!("retained messages unavailable: {}", e.message),
            ),
        }
        self.next_scan();
    }
}
