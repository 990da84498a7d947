//! PUBLISH, PUBREL and their acknowledgements from the client (§3.3–§3.7, §4.3): the
//! message to the backend, the reply once it is stored, QoS 2 state, Topic Aliases in.

use super::*;

impl MqttConnection {
    // ---- PUBLISH / PUBREL from the client (§3.3–§3.7, §4.3) -----------------------------------

    pub(super) fn on_publish(&mut self, mut p: Publish) {
        if self.v5 && !self.resolve_topic_alias(&mut p) {
            return;
        }
        if let Err(e) = topic::validate_name(&p.topic) {
            match (self.v5, p.packet_id) {
                (true, Some(id)) => {
                    let reply = if p.qos == 2 {
                        AckReply::Pubrec(id)
                    } else {
                        AckReply::Puback(id)
                    };
                    let code = reason::TOPIC_NAME_INVALID;
                    self.acks.push_back(PendingAck::reply(p.qos, reply, code));
                    self.flush_acks();
                }
                (true, None) => {
                    self.disconnect(reason::TOPIC_NAME_INVALID, format!("PUBLISH refused: {e}"))
                }
                (false, _) => self.close(format!("PUBLISH refused: {e}")),
            }
            return;
        }
        // As Mosquitto: `$SYS` is the server's, so a client's PUBLISH there is acknowledged
        // (5.0: with 0x87 Not authorized) and dropped; a 5.0 payload marked UTF-8 that is
        // not gets 0x99 Payload format invalid (§3.3.2.3.2) and is dropped.
        let refused = if topic::is_server_topic(&p.topic) {
            Some(reason::NOT_AUTHORIZED)
        } else if self.v5
            && p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            Some(reason::PAYLOAD_FORMAT_INVALID)
        } else {
            None
        };
        if let Some(code) = refused {
            let topic = &p.topic;
            self.log(
                LogLevel::Debug,
                format!("dropping a PUBLISH to {topic:?} ({code:#04x})"),
            );
            let reply = match (p.qos, p.packet_id) {
                (1, Some(id)) => AckReply::Puback(id),
                (2, Some(id)) => AckReply::Pubrec(id),
                _ => return,
            };
            let code = if self.v5 { code } else { 0 };
            self.acks.push_back(PendingAck::reply(p.qos, reply, code));
            self.flush_acks();
            return;
        }
        if p.qos == 2 {
            let id = p.packet_id.unwrap_or_default();
            if self.qos2_in.contains(&id) {
                // Stored before (§4.3.3): PUBREC again, do not store twice.
                self.acks
                    .push_back(PendingAck::reply(2, AckReply::Pubrec(id), 0));
                self.flush_acks();
                return;
            }
            if self.acks.iter().any(|a| a.qos2_id == Some(id)) {
                // A resend while the first is still being stored: its PUBREC answers both.
                return;
            }
        }
        let props = application_properties(&p.properties);
        let mut tokens = Vec::with_capacity(2);
        if p.retain {
            // §3.3.1.3: store (or, with an empty payload, remove) the retained message.
            let token = self.ops.start(Op::StoreRetained);
            let value = (!p.payload.is_empty())
                .then(|| retained::encode(p.qos, self.now_ms, &props, &p.payload));
            let key = retained::key(&p.topic);
            self.out.push(Action::KvPut { token, key, value });
            tokens.push(token);
        }
        // Only this session's own No Local subscriptions look at the sender (§3.8.3.1).
        let no_local = self.filters.values().any(|s| s.options.no_local);
        let msg = message::to_pulsar(
            p.topic,
            p.qos,
            p.retain,
            no_local.then_some(self.client_id.as_str()),
            &props,
            p.payload,
        );
        let token = self.ops.start(Op::Publish);
        tokens.push(token);
        let (reply, qos2_id) = match (p.qos, p.packet_id) {
            (1, Some(id)) => (AckReply::Puback(id), None),
            (2, Some(id)) => (AckReply::Pubrec(id), Some(id)),
            _ => (AckReply::None, None),
        };
        self.acks.push_back(PendingAck {
            tokens,
            qos: p.qos,
            reply,
            reason: 0,
            qos2_id,
            waits_qos2: 0,
        });
        self.out.push(Action::Publish { token, msg });
    }

    /// MQTT 5.0 Topic Alias from the client (§3.3.2.3.4): an alias with a Topic Name sets it,
    /// an alias with an empty Topic Name uses it. `false`: the connection was closed.
    pub(super) fn resolve_topic_alias(&mut self, p: &mut Publish) -> bool {
        let Some(alias) = p.properties.topic_alias else {
            if p.topic.is_empty() {
                self.disconnect(
                    reason::PROTOCOL_ERROR,
                    "empty Topic Name without a Topic Alias",
                );
                return false;
            }
            return true;
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            self.disconnect(
                reason::TOPIC_ALIAS_INVALID,
                format!("Topic Alias {alias} outside 1..={TOPIC_ALIAS_MAX}"),
            );
            return false;
        }
        if p.topic.is_empty() {
            match self.aliases_in.get(&alias) {
                Some(t) => p.topic = t.clone(),
                None => {
                    self.disconnect(
                        reason::PROTOCOL_ERROR,
                        format!("unknown Topic Alias {alias}"),
                    );
                    return false;
                }
            }
        } else if topic::validate_name(&p.topic).is_ok() {
            self.aliases_in.insert(alias, p.topic.clone());
        }
        true
    }

    pub(super) fn on_publish_result(&mut self, token: u64, result: Result<(), OpError>) {
        if self.ops.complete(token) != Some(Op::Publish) {
            return;
        }
        self.backend_op_done(token, result);
    }

    /// A publish or retained write of a client PUBLISH finished.
    pub(super) fn backend_op_done(&mut self, token: u64, result: Result<(), OpError>) {
        let Some(index) = self.acks.iter().position(|a| a.tokens.contains(&token)) else {
            return;
        };
        let v5 = self.v5;
        let Some(entry) = self.acks.get_mut(index) else {
            return;
        };
        entry.tokens.retain(|t| *t != token);
        let qos = entry.qos;
        let done = entry.tokens.is_empty();
        if let Err(e) = result {
            if qos > 0 && v5 {
                // MQTT 5.0: a negative PUBACK / PUBREC ends the exchange (§4.3.3).
                entry.reason = match e.kind {
                    ErrorKind::NotAuthorized => reason::NOT_AUTHORIZED,
                    ErrorKind::QuotaExceeded => reason::QUOTA_EXCEEDED,
                    ErrorKind::InvalidName => reason::TOPIC_NAME_INVALID,
                    _ => reason::UNSPECIFIED_ERROR,
                };
                entry.qos2_id = None;
            } else if qos > 0 {
                // 3.1.1 has no negative acknowledgement: closing makes the client resend.
                self.close(format!("QoS {qos} publish failed: {}", e.message));
                return;
            }
            self.log(
                LogLevel::Warn,
                format!("QoS {qos} publish failed: {}", e.message),
            );
        }
        if done {
            if let Some(id) = self.acks.get_mut(index).and_then(|e| e.qos2_id.take()) {
                // Stored: from now on a resend of this Packet Identifier is a duplicate,
                // also after a reconnect or a gateway restart, so the state is saved first.
                self.qos2_in.insert(id);
                let waits = self.qos2_changed();
                if let Some(entry) = self.acks.get_mut(index) {
                    entry.waits_qos2 = waits;
                }
            }
        }
        self.flush_acks();
    }

    pub(super) fn on_pubrel(&mut self, id: u16) {
        let waits = if self.qos2_in.remove(&id) {
            self.qos2_changed()
        } else {
            0
        };
        // §4.3.3: PUBCOMP also for an identifier we do not know (already completed).
        let mut ack = PendingAck::reply(2, AckReply::Pubcomp(id), 0);
        ack.waits_qos2 = waits;
        self.acks.push_back(ack);
        self.flush_acks();
    }

    /// Sends the acknowledgements whose conditions hold, in arrival order.
    pub(super) fn flush_acks(&mut self) {
        while let Some(front) = self.acks.front() {
            if !front.tokens.is_empty() || front.waits_qos2 > self.qos2_saved {
                break;
            }
            let Some(entry) = self.acks.pop_front() else {
                break;
            };
            let (first, id) = match entry.reply {
                AckReply::None => continue,
                AckReply::Puback(id) => (0x40, id),
                AckReply::Pubrec(id) => (0x50, id),
                AckReply::Pubcomp(id) => (0x70, id),
            };
            let bytes = if self.v5 {
                // Request Problem Information 0: no reason string on acks (§3.1.2.11.7).
                let props = Properties {
                    reason_string: (entry.reason >= 0x80 && self.limits.problem_information)
                        .then(|| ack_reason_string(entry.reason).to_string()),
                    ..Properties::default()
                };
                v5::ack(first, id, entry.reason, &props)
            } else {
                match entry.reply {
                    AckReply::Puback(_) => codec::puback(id),
                    AckReply::Pubrec(_) => codec::pubrec(id),
                    _ => codec::pubcomp(id),
                }
            };
            self.send(bytes);
        }
    }

    pub(super) fn pubrel_packet(&self, id: u16) -> Vec<u8> {
        if self.v5 {
            v5::ack(0x62, id, reason::SUCCESS, &Properties::default())
        } else {
            codec::pubrel(id)
        }
    }

    /// The QoS 2 state changed; returns the generation whose save a reply must wait for
    /// (0 when the session is not persistent: nothing is saved).
    pub(super) fn qos2_changed(&mut self) -> u64 {
        if !self.persistent() {
            return 0;
        }
        self.qos2_generation += 1;
        self.save_qos2();
        self.qos2_generation
    }

    /// Writes the QoS 2 state if it changed since the last save; one save in flight.
    pub(super) fn save_qos2(&mut self) {
        if !self.persistent() || self.qos2_save_in_flight || self.qos2_saved >= self.qos2_generation
        {
            return;
        }
        self.qos2_save_in_flight = true;
        let generation = self.qos2_generation;
        let state = Qos2State {
            inbound: self.qos2_in.clone(),
            released: self.qos2_released.clone(),
        };
        let key = session_store::qos2_key(&self.client_id);
        let value = Some(state.encode());
        let token = self.ops.start(Op::SaveQos2 { generation });
        self.out.push(Action::KvPut { token, key, value });
    }
}
