//! Messages to the client (§3.3–§3.7, §4.3): matching, flow control (MQTT 5.0 §4.9),
//! expiry, Topic Aliases out, and the client's acknowledgements.

use super::*;

impl MqttConnection {
    // ---- deliveries to the client (§3.3–§3.7, §4.3) ------------------------------------------

    pub(super) fn on_delivery(&mut self, mut d: Delivery) {
        let from = d.subscription;
        let shared_filter = if self.backend == Backend::Open(from) {
            None
        } else {
            match self.shared.iter().find(|(_, b)| **b == Backend::Open(from)) {
                Some((f, _)) => Some(f.clone()),
                // E.g. the earlier session's subscription, opened only to be deleted.
                None => return,
            }
        };
        let ack = Action::Ack {
            sub: from,
            delivery_id: d.delivery_id,
        };
        let Some(m) = message::from_delivery(&mut d) else {
            self.out.push(ack);
            return;
        };
        // The subscriptions this message goes out for: a share group's one filter, or every
        // matching non-shared filter (one PUBLISH at the highest QoS, all identifiers).
        // Folded as they are found: no list per delivery.
        let mut granted: Option<u8> = None;
        let mut retain_as_published = false;
        let mut sub_ids = Vec::new();
        let mut take = |s: &Subscription| {
            granted = Some(granted.map_or(s.qos, |g| g.max(s.qos)));
            retain_as_published |= s.options.retain_as_published;
            sub_ids.extend(s.id);
        };
        match &shared_filter {
            Some(f) => {
                if let (Some(Ok((_, inner))), Some(sub)) = (parse_shared(f), self.filters.get(f)) {
                    if topic::matches(inner, &m.topic) {
                        take(sub);
                    }
                }
            }
            None => {
                for (f, s) in &self.filters {
                    if parse_shared(f).is_none()
                        && topic::matches(f, &m.topic)
                        && !(s.options.no_local && m.sender.as_deref() == Some(&self.client_id))
                    {
                        take(s);
                    }
                }
            }
        }
        let Some(granted) = granted else {
            self.out.push(ack);
            return;
        };
        let out = Outgoing {
            topic: m.topic,
            payload: d.payload,
            qos: granted.min(m.qos),
            retain: m.retain && retain_as_published,
            properties: m.properties,
            published_ms: d.publish_time_ms,
            sub_ids,
            backend: Some((from, d.delivery_id)),
        };
        // Each backend subscription hands out at most `max_unacked` unacked deliveries.
        let bound = self.max_unacked() as usize * (1 + self.shared.len()) + retained::PAGE as usize;
        if out.qos > 0 && self.waiting_out.len() >= bound {
            self.disconnect(
                reason::IMPLEMENTATION_SPECIFIC_ERROR,
                "backend delivered more messages than max-unacked allows",
            );
            return;
        }
        self.send_outgoing(out);
    }

    /// Sends a message to the client now, or queues it until a Packet Identifier is free
    /// (and the client's Receive Maximum allows). An expired message, or one larger than the
    /// client's Maximum Packet Size, is dropped as if delivered (MQTT 5.0 §3.3.2.3.3,
    /// §3.1.2.11.4).
    pub(super) fn send_outgoing(&mut self, out: Outgoing) {
        let interval = out.properties.message_expiry_interval;
        let Some(remaining) = remaining_expiry(interval, out.published_ms, self.now_ms) else {
            if let Some((sub, delivery_id)) = out.backend {
                self.out.push(Action::Ack { sub, delivery_id });
            }
            return;
        };
        if out.qos > 0 && self.inflight_out.len() >= self.send_quota() {
            self.waiting_out.push_back(out);
            return;
        }
        let packet_id = if out.qos > 0 {
            match self.allocate_packet_id() {
                Some(id) => id,
                None => {
                    self.disconnect(reason::UNSPECIFIED_ERROR, "no free Packet Identifier");
                    return;
                }
            }
        } else {
            0
        };
        let flags = PublishFlags {
            qos: out.qos,
            packet_id,
            retain: out.retain,
            dup: false,
        };
        let topic = out.topic;
        let sent = if self.v5 {
            self.publish_v5(
                &topic,
                flags,
                out.properties,
                remaining,
                out.sub_ids,
                &out.payload,
            )
        } else {
            let mut valid = false;
            let fits = self.queue_packet(|b| {
                valid = codec::publish_into(b, &topic, flags, &out.payload);
            });
            valid && fits
        };
        if sent {
            if out.qos > 0 {
                self.inflight_out.insert(
                    packet_id,
                    Inflight {
                        qos: out.qos,
                        backend: out.backend,
                        released: false,
                    },
                );
                return;
            }
        } else {
            self.log(
                LogLevel::Warn,
                format!("dropping a message for topic {topic:?}: invalid, or over the client's Maximum Packet Size"),
            );
        }
        if let Some((sub, delivery_id)) = out.backend {
            self.out.push(Action::Ack { sub, delivery_id });
        }
    }

    /// Queues an MQTT 5.0 PUBLISH to the client, with a Topic Alias where the client allows
    /// them (the first [`TOPIC_ALIAS_MAX`] topics get one, kept for the connection); `false`
    /// when the topic is invalid or the packet exceeds the client's Maximum Packet Size.
    pub(super) fn publish_v5(
        &mut self,
        topic: &str,
        flags: PublishFlags,
        mut props: Properties,
        remaining_expiry: Option<u32>,
        sub_ids: Vec<u32>,
        payload: &[u8],
    ) -> bool {
        if topic::validate_name(topic).is_err() {
            return false;
        }
        props.message_expiry_interval = remaining_expiry;
        props.subscription_identifiers = sub_ids;
        let known = self.aliases_out.get(topic).copied();
        let new_alias = match known {
            None if self.aliases_out.len() < usize::from(self.limits.topic_alias_maximum) => {
                u16::try_from(self.aliases_out.len() + 1).ok()
            }
            _ => None,
        };
        props.topic_alias = known.or(new_alias);
        let name = if known.is_some() { "" } else { topic };
        if !self.queue_packet(|b| v5::publish_into(b, name, flags, Some(&props), payload)) {
            return false;
        }
        if let Some(alias) = new_alias {
            self.aliases_out.insert(topic.to_string(), alias);
        }
        true
    }

    /// A Packet Identifier became free: send what waits for one, then read on.
    pub(super) fn pump_outgoing(&mut self) {
        while self.inflight_out.len() < self.send_quota() {
            let Some(out) = self.waiting_out.pop_front() else {
                break;
            };
            self.send_outgoing(out);
            if self.phase == Phase::Closed {
                return;
            }
        }
        self.next_scan();
    }

    /// The next Packet Identifier not in use (§2.3.1: non-zero, unique among in-flight).
    pub(super) fn allocate_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight_out.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    pub(super) fn on_puback(&mut self, packet_id: u16) {
        match self.inflight_out.get(&packet_id) {
            Some(Inflight { qos: 1, .. }) => {}
            _ => {
                self.log(
                    LogLevel::Debug,
                    format!("PUBACK for unknown Packet Identifier {packet_id}"),
                );
                return;
            }
        }
        if let Some(Inflight {
            backend: Some((sub, delivery_id)),
            ..
        }) = self.inflight_out.remove(&packet_id)
        {
            self.out.push(Action::Ack { sub, delivery_id });
        }
        self.pump_outgoing();
    }

    /// PUBREC (§3.5, §4.3.3): the client has the message; it is acked to the backend now, and
    /// the PUBREL owed for it is remembered (in a persistent session, across reconnects). A
    /// 5.0 PUBREC with a failure Reason Code ends the exchange without PUBREL.
    pub(super) fn on_pubrec(&mut self, packet_id: u16, code: u8) {
        let Some(entry) = self.inflight_out.get_mut(&packet_id).filter(|e| e.qos == 2) else {
            self.log(
                LogLevel::Debug,
                format!("PUBREC for unknown Packet Identifier {packet_id}"),
            );
            return;
        };
        if code >= 0x80 {
            if let Some(Inflight {
                backend: Some((sub, delivery_id)),
                released: false,
                ..
            }) = self.inflight_out.remove(&packet_id)
            {
                self.out.push(Action::Ack { sub, delivery_id });
            }
            self.pump_outgoing();
            return;
        }
        if !entry.released {
            entry.released = true;
            if let Some((sub, delivery_id)) = entry.backend.take() {
                self.out.push(Action::Ack { sub, delivery_id });
            }
            self.qos2_released.insert(packet_id);
            self.qos2_changed();
        }
        self.send(self.pubrel_packet(packet_id));
    }

    pub(super) fn on_pubcomp(&mut self, packet_id: u16) {
        if !self
            .inflight_out
            .get(&packet_id)
            .is_some_and(|e| e.qos == 2 && e.released)
        {
            self.log(
                LogLevel::Debug,
                format!("PUBCOMP for unknown Packet Identifier {packet_id}"),
            );
            return;
        }
        self.inflight_out.remove(&packet_id);
        if self.qos2_released.remove(&packet_id) {
            self.qos2_changed();
        }
        self.pump_outgoing();
    }
}
