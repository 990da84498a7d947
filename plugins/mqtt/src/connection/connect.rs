//! CONNECT and CONNACK (§3.1, §3.2), MQTT 5.0 enhanced authentication (§4.12), and the
//! session a connection opens, resumes or ends (§3.1.2.4, MQTT 5.0 §4.1).

use super::*;

impl MqttConnection {
    // ---- CONNECT / CONNACK (§3.1, §3.2), enhanced authentication (§4.12) ----------------

    pub(super) fn on_connect(&mut self, c: Connect) {
        self.phase = Phase::Connecting;
        self.v5 = c.protocol == v5::PROTOCOL_LEVEL_5;
        self.clean_start = c.clean_session;
        let p = &c.properties;
        if self.v5 {
            self.session_expiry = p.session_expiry_interval.unwrap_or(0);
            self.limits = ClientLimits {
                receive_maximum: usize::from(p.receive_maximum.unwrap_or(u16::MAX)),
                maximum_packet_size: p
                    .maximum_packet_size
                    .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX)),
                topic_alias_maximum: p.topic_alias_maximum.unwrap_or(0).min(TOPIC_ALIAS_MAX),
                problem_information: p.request_problem_information != Some(0),
            };
        } else {
            self.session_expiry = if c.clean_session { 0 } else { u32::MAX };
        }
        if c.client_id.is_empty() {
            if !self.v5 && !c.clean_session {
                self.refuse(
                    Some(return_code::IDENTIFIER_REJECTED),
                    reason::CLIENT_IDENTIFIER_NOT_VALID,
                    "empty Client Identifier with Clean Session 0 (§3.1.3.1)",
                );
                return;
            }
            self.client_id = format!("auto-{:x}-{:x}", self.conn_id, self.nonce);
            self.assigned_id = true;
            if self.v5 {
                // §3.2.2.3.7
                self.connack_props().assigned_client_identifier = Some(self.client_id.clone());
            }
        } else {
            self.client_id = c.client_id;
        }
        if let Some(w) = &c.will {
            if let Err(e) = topic::validate_name(&w.topic) {
                self.refuse(
                    None,
                    reason::TOPIC_NAME_INVALID,
                    format!("Will Topic refused: {e}"),
                );
                return;
            }
        }
        self.will = c.will.map(Box::new);
        self.keep_alive_ms = u64::from(c.keep_alive) * 1500;
        if self.keep_alive_ms > 0 {
            self.arm_timer(TimerKind::KeepAlive, self.keep_alive_ms);
        } else {
            self.timer = None;
        }
        if let Some(method) = c.properties.authentication_method {
            if !self.sasl_mechanisms.contains(&method) {
                self.refuse(
                    None,
                    reason::BAD_AUTHENTICATION_METHOD,
                    format!("authentication method {method:?} is not offered"),
                );
                return;
            }
            self.phase = Phase::Authenticating;
            let response = c.properties.authentication_data.unwrap_or_default();
            self.auth_method = Some(method.clone());
            self.sasl_step(method, response);
            return;
        }
        let creds = credentials(c.username, c.password);
        let token = self.ops.start(Op::Auth);
        self.out.push(Action::Authenticate { token, creds });
    }

    pub(super) fn sasl_step(&mut self, mechanism: String, response: Vec<u8>) {
        self.sasl_pending = true;
        let token = self.ops.start(Op::Sasl);
        self.out.push(Action::AuthenticateSasl {
            token,
            mechanism,
            response,
        });
    }

    /// AUTH from the client (§3.15, §4.12): the response to our challenge (0x18), or the
    /// start of a re-authentication once connected (0x19).
    pub(super) fn on_auth_packet(&mut self, code: u8, properties: Properties) {
        let Some(method) = self.auth_method.clone() else {
            self.disconnect(
                reason::PROTOCOL_ERROR,
                "AUTH without enhanced authentication",
            );
            return;
        };
        if properties.authentication_method.as_deref() != Some(method.as_str()) {
            self.disconnect(
                reason::PROTOCOL_ERROR,
                "AUTH with another Authentication Method (§4.12)",
            );
            return;
        }
        let expected = match (self.phase, code) {
            (Phase::Authenticating, reason::CONTINUE_AUTHENTICATION) => true,
            (Phase::Connected, reason::CONTINUE_AUTHENTICATION) => self.reauth,
            (Phase::Connected, reason::RE_AUTHENTICATE) => !self.reauth,
            _ => false,
        };
        if !expected || self.sasl_pending {
            self.disconnect(
                reason::PROTOCOL_ERROR,
                format!("unexpected AUTH {code:#04x}"),
            );
            return;
        }
        if code == reason::RE_AUTHENTICATE {
            self.reauth = true;
        }
        let data = properties.authentication_data.unwrap_or_default();
        self.sasl_step(method, data);
    }

    pub(super) fn on_sasl_result(&mut self, token: u64, result: Result<SaslOutcome, OpError>) {
        if self.ops.complete(token) != Some(Op::Sasl) {
            return;
        }
        self.sasl_pending = false;
        let method = self.auth_method.clone();
        match result {
            Ok(SaslOutcome::Challenge(data)) => {
                let props = Properties {
                    authentication_method: method,
                    authentication_data: Some(data),
                    ..Properties::default()
                };
                self.send(v5::auth(reason::CONTINUE_AUTHENTICATION, &props));
            }
            Ok(SaslOutcome::Success(s)) => {
                let data = (!s.final_data.is_empty()).then_some(s.final_data);
                if self.reauth {
                    self.reauth = false;
                    let same = self.principal.as_ref().is_some_and(|p| {
                        (&p.user, &p.tenant, &p.namespace)
                            == (
                                &s.principal.user,
                                &s.principal.tenant,
                                &s.principal.namespace,
                            )
                    });
                    if !same {
                        self.disconnect(
                            reason::NOT_AUTHORIZED,
                            "re-authentication as another principal",
                        );
                        return;
                    }
                    let props = Properties {
                        authentication_method: method,
                        authentication_data: data,
                        ..Properties::default()
                    };
                    self.send(v5::auth(reason::SUCCESS, &props));
                } else {
                    let props = self.connack_props();
                    props.authentication_method = method;
                    props.authentication_data = data;
                    self.phase = Phase::Connecting;
                    self.authenticated(s.principal);
                }
            }
            Err(e) if self.reauth => {
                self.disconnect(
                    reason::NOT_AUTHORIZED,
                    format!("re-authentication failed: {}", e.message),
                );
            }
            Err(e) => self.refuse_auth(e),
        }
    }

    pub(super) fn on_auth_result(&mut self, token: u64, result: Result<Principal, OpError>) {
        if self.ops.complete(token) != Some(Op::Auth) {
            return;
        }
        match result {
            Ok(principal) => self.authenticated(principal),
            Err(e) => self.refuse_auth(e),
        }
    }

    /// The host could not check the credentials now (a reconnect storm): CONNACK 3.1.1 0x03
    /// (server unavailable), 5.0 0x89 (Server busy, §3.2.2.2: "try again later").
    pub(super) fn on_auth_busy(&mut self, token: u64) {
        if self.ops.complete(token) != Some(Op::Auth) {
            return;
        }
        self.refuse(
            Some(return_code::SERVER_UNAVAILABLE),
            reason::SERVER_BUSY,
            "server busy: too many logins being verified".to_string(),
        );
    }

    /// CONNACK for a failed authentication: 3.1.1 0x05 (not authorized) or 0x03; 5.0 0x87,
    /// 0x97 (a quota, e.g. the tenant's connection limit) or 0x88.
    pub(super) fn refuse_auth(&mut self, e: OpError) {
        let (v3, v5_code) = match e.kind {
            ErrorKind::NotAuthorized => (return_code::NOT_AUTHORIZED, reason::NOT_AUTHORIZED),
            ErrorKind::QuotaExceeded => (return_code::SERVER_UNAVAILABLE, reason::QUOTA_EXCEEDED),
            _ => (return_code::SERVER_UNAVAILABLE, reason::SERVER_UNAVAILABLE),
        };
        self.refuse(
            Some(v3),
            v5_code,
            format!("authentication failed: {}", e.message),
        );
    }

    pub(super) fn authenticated(&mut self, principal: Principal) {
        self.principal = Some(principal);
        if self.assigned_id {
            // Assigned by us: nobody else can hold it.
            self.open_session();
        } else {
            // §3.1.4: a second connection with this Client Identifier takes over.
            let token = self.ops.start(Op::Claim);
            let key = self.client_id.clone();
            self.out.push(Action::Claim { token, key });
        }
    }

    pub(super) fn on_claim_result(&mut self, token: u64, result: Result<(), OpError>) {
        if self.ops.complete(token) != Some(Op::Claim) {
            return;
        }
        match result {
            Ok(()) => self.open_session(),
            Err(e) => self.refuse(
                Some(return_code::SERVER_UNAVAILABLE),
                reason::SERVER_UNAVAILABLE,
                format!("could not claim the Client Identifier: {}", e.message),
            ),
        }
    }

    /// The Client Identifier is ours: resume its session, or start a new one and discard
    /// whatever session the Client Identifier had (§3.1.2.4).
    ///
    /// Clean Start 0 resumes an existing session whatever this connection's Session Expiry
    /// Interval ([MQTT-3.1.2-5]); with 0 the session then ends with this connection
    /// (MQTT 5.0 §3.1.2.11.2), as Mosquitto does.
    pub(super) fn open_session(&mut self) {
        if !self.clean_start {
            let token = self.ops.start(Op::LoadSession);
            let key = session_store::kv_key(&self.client_id);
            self.out.push(Action::KvGet { token, key });
            let token = self.ops.start(Op::LoadQos2);
            let key = session_store::qos2_key(&self.client_id);
            self.out.push(Action::KvGet { token, key });
            return;
        }
        if self.persistent() {
            // A new persistent session (MQTT 5.0 Clean Start 1): a fresh durable
            // subscription, so that deleting the earlier one cannot race with it.
            self.new_session_name();
        }
        self.accept(false);
        if !self.assigned_id {
            let token = self.ops.start(Op::ProbeOldSession);
            let key = session_store::kv_key(&self.client_id);
            self.out.push(Action::KvGet { token, key });
        }
    }

    /// A durable subscription name no earlier session of this Client Identifier used; its
    /// QoS 2 state starts empty and the session record is written at once.
    pub(super) fn new_session_name(&mut self) {
        self.session_name = Some(format!(
            "{}-{:x}",
            session_store::durable_subscription(&self.client_id),
            self.nonce ^ self.conn_id
        ));
        let token = self.ops.start(Op::DropOldSession);
        let key = session_store::qos2_key(&self.client_id);
        let value = Some(Qos2State::default().encode());
        self.out.push(Action::KvPut { token, key, value });
        self.changed_filters();
    }

    /// Sends CONNACK 0, registers the Will Message with the host and starts processing what
    /// the client sent after CONNECT.
    pub(super) fn accept(&mut self, session_present: bool) {
        if self.v5 {
            let mut props = self
                .connack_props
                .take()
                .map_or_else(Properties::default, |p| *p);
            props.receive_maximum = u16::try_from(self.config.max_inflight).ok();
            props.maximum_packet_size = u32::try_from(self.config.max_packet_size).ok();
            props.topic_alias_maximum = Some(TOPIC_ALIAS_MAX);
            self.send(v5::connack(session_present, reason::SUCCESS, &props));
        } else {
            self.send(codec::connack(session_present, return_code::ACCEPTED));
        }
        self.phase = Phase::Connected;
        if let Some(w) = self.will.take() {
            let will = self.will_for_host(*w);
            self.out.push(Action::SetWill(Some(will)));
        }
    }

    /// The Will Message as the host publishes it: a PUBLISH like any other (§3.1.2.5), with
    /// its retained-message write when Will Retain is set (§3.1.2.7), after the Will Delay
    /// Interval or when the session ends, whichever is first (MQTT 5.0 §3.1.3.2.2).
    pub(super) fn will_for_host(&self, w: codec::Will) -> Will {
        let props = application_properties(&w.properties);
        let kv = w.retain.then(|| KvWrite {
            key: retained::key(&w.topic),
            // Stored time unknown (0): the retained copy does not expire.
            value: (!w.payload.is_empty()).then(|| retained::encode(w.qos, 0, &props, &w.payload)),
        });
        let delay_s = w
            .properties
            .will_delay_interval
            .unwrap_or(0)
            .min(self.session_expiry);
        Will {
            // With the sender: the session's No Local subscriptions may come after this.
            msg: message::to_pulsar(
                w.topic,
                w.qos,
                w.retain,
                Some(&self.client_id),
                &props,
                w.payload,
            ),
            kv,
            delay_ms: u64::from(delay_s) * 1000,
        }
    }

    /// The stored session as of now (`ended`: the connection is ending).
    pub(super) fn stored_session(&self, ended: bool) -> StoredSession {
        StoredSession {
            filters: self.filters.clone(),
            expiry: self.session_expiry,
            ended_ms: ended.then_some(self.now_ms),
            backend_name: self.session_name.clone(),
        }
    }

    /// The connection ends while we still can write: the session's expiry counts from now.
    pub(super) fn record_session_end(&mut self) {
        if self.phase != Phase::Connected || !self.persistent() || self.session_expiry == u32::MAX {
            return;
        }
        let token = self.ops.start(Op::DropOldSession);
        let key = session_store::kv_key(&self.client_id);
        let value = Some(session_store::encode(&self.stored_session(true)));
        self.out.push(Action::KvPut { token, key, value });
    }

    /// Deletes the kv records of the Client Identifier's session (filters, QoS 2 state).
    pub(super) fn delete_session_records(&mut self) {
        for key in [
            session_store::kv_key(&self.client_id),
            session_store::qos2_key(&self.client_id),
        ] {
            let token = self.ops.start(Op::DropOldSession);
            self.out.push(Action::KvPut {
                token,
                key,
                value: None,
            });
        }
    }

    /// The session ends with this connection (a DISCONNECT set its expiry to 0, or it was
    /// resumed with expiry 0): its records and durable subscription go.
    pub(super) fn drop_session(&mut self) {
        if std::mem::take(&mut self.ends_with_connection) && self.backend == Backend::Opening {
            // Its subscription is not ours to delete yet: the record, marked ended at the
            // resume, stays so that the next CONNECT deletes the subscription it names.
            return;
        }
        self.delete_session_records();
        if let Backend::Open(sub) = self.backend {
            self.out.push(Action::Unsubscribe { sub, delete: true });
            self.backend = Backend::Closed;
        }
    }

    /// The connection closes: a session it resumed with Session Expiry Interval 0 ends now
    /// (§3.1.2.11.2). If the plugin never sees the end (peer reset, gateway crash), the
    /// record marked ended at the resume makes the next CONNECT delete it.
    pub(super) fn end_resumed_session(&mut self) {
        if self.ends_with_connection && self.phase == Phase::Connected {
            self.drop_session();
        }
    }

    /// Marks the stored session as ending with this connection (expiry 0, ended now): the
    /// plugin cannot act after the connection vanished, so a CONNECT that finds this record
    /// finds it expired, and deletes its backlog, as if the plugin had seen the end.
    fn mark_session_ending(&mut self) {
        let token = self.ops.start(Op::DropOldSession);
        let key = session_store::kv_key(&self.client_id);
        let value = Some(session_store::encode(&self.stored_session(true)));
        self.out.push(Action::KvPut { token, key, value });
    }

    /// Both halves of a stored session are read: CONNACK, then resume it (§4.4), unless
    /// it expired. With Session Expiry Interval 0 a resumed session ends with this
    /// connection, and its record says so at once (see the crate docs, "Session expiry").
    pub(super) fn finish_load(&mut self) {
        if self.loading.filters.is_none() || self.loading.qos2.is_none() {
            return;
        }
        let loading = std::mem::take(&mut self.loading);
        let (Some(filters), Some(qos2)) = (loading.filters, loading.qos2) else {
            return;
        };
        let mut session = match filters.as_deref().map(session_store::decode) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                let e = format!("stored session unreadable, starting a new one: {e}");
                self.log(LogLevel::Warn, e);
                None
            }
            None => None,
        };
        let mut qos2 = match qos2.as_deref().map(Qos2State::decode) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                self.log(
                    LogLevel::Warn,
                    format!("stored QoS 2 state unreadable: {e}"),
                );
                Qos2State::default()
            }
            None => Qos2State::default(),
        };
        if let Some(old) = session.take_if(|s| s.expired(self.now_ms)) {
            // MQTT 5.0 §4.1: an expired session is gone; its backlog is deleted.
            self.delete_subscription(old.backend_name);
            if self.persistent() {
                self.new_session_name();
            } else {
                self.delete_session_records();
            }
            qos2 = Qos2State::default();
        }
        let present = session.is_some() || !qos2.is_empty();
        // Resumed with Session Expiry Interval 0: the session ends with this connection.
        self.ends_with_connection = present && !self.persistent();
        self.accept(present);
        self.qos2_in = qos2.inbound;
        // §4.4: PUBREL again, with the original Packet Identifiers.
        for id in &qos2.released {
            self.inflight_out.insert(
                *id,
                Inflight {
                    qos: 2,
                    backend: None,
                    released: true,
                },
            );
            self.send(self.pubrel_packet(*id));
        }
        self.qos2_released = qos2.released;
        if let Some(s) = session {
            self.filters = s.filters;
            self.session_name = s.backend_name;
            // Rewritten now: the expiry may differ, and an end recorded before must go.
            self.changed_filters();
            self.open_backend(true);
            let shared: Vec<String> = self
                .filters
                .keys()
                .filter(|f| parse_shared(f).is_some())
                .cloned()
                .collect();
            for f in shared {
                self.open_shared(f, true);
            }
        }
        if self.ends_with_connection {
            self.mark_session_ending();
        }
    }

    /// Opens an earlier session's durable route only to delete it with its queue (the ABI
    /// has no delete-by-name).
    pub(super) fn delete_subscription(&mut self, name: Option<String>) {
        let name = name.unwrap_or_else(|| session_store::durable_subscription(&self.client_id));
        if Some(&name) == self.session_name.as_ref() {
            return;
        }
        let spec = self.route_spec(&BTreeSet::new(), Some(name));
        let token = self.ops.start(Op::OpenOldSubscription);
        self.out.push(Action::OpenRoute { token, spec });
    }

    pub(super) fn on_kv_result(&mut self, token: u64, result: Result<Option<Vec<u8>>, OpError>) {
        let Some(op) = self.ops.complete(token) else {
            return;
        };
        match (op, result) {
            (Op::LoadSession | Op::LoadQos2, Err(e)) => {
                self.refuse(
                    Some(return_code::SERVER_UNAVAILABLE),
                    reason::SERVER_UNAVAILABLE,
                    format!("session store unavailable: {}", e.message),
                );
            }
            (Op::LoadSession, Ok(v)) => {
                self.loading.filters = Some(v);
                self.finish_load();
            }
            (Op::LoadQos2, Ok(v)) => {
                self.loading.qos2 = Some(v);
                self.finish_load();
            }
            (Op::ProbeOldSession, Ok(Some(bytes))) => {
                // §3.1.2.4: a clean start discards any previous session. A new persistent
                // session has already overwritten the kv records, so only the backlog goes.
                if !self.persistent() {
                    self.delete_session_records();
                }
                let old = session_store::decode(&bytes).ok();
                self.delete_subscription(old.and_then(|s| s.backend_name));
            }
            (Op::ProbeOldSession, Ok(None)) | (Op::DropOldSession, Ok(_)) => {}
            (Op::ProbeOldSession | Op::DropOldSession, Err(e)) => {
                self.log(
                    LogLevel::Warn,
                    format!("could not discard the earlier session: {}", e.message),
                );
            }
            (Op::SaveSession { generation }, Ok(_)) => {
                self.save_in_flight = false;
                self.saved_generation = self.saved_generation.max(generation);
                self.save_session();
                self.flush_replies();
            }
            (Op::SaveSession { .. }, Err(e)) => {
                let reason = format!("could not store the session: {}", e.message);
                self.disconnect(reason::UNSPECIFIED_ERROR, reason);
            }
            (Op::SaveQos2 { generation }, Ok(_)) => {
                self.qos2_save_in_flight = false;
                self.qos2_saved = self.qos2_saved.max(generation);
                self.save_qos2();
                self.flush_acks();
            }
            (Op::SaveQos2 { .. }, Err(e)) => {
                let reason = format!("could not store the QoS 2 state: {}", e.message);
                self.disconnect(reason::UNSPECIFIED_ERROR, reason);
            }
            (Op::StoreRetained, result) => self.backend_op_done(token, result.map(|_| ())),
            _ => {}
        }
    }
}
