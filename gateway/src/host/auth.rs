//! Host calls of authentication: `authenticate`, `sasl-mechanisms`, `authenticate-sasl`, and
//! what the host records when one succeeds (the principal, and a connection of its quota).
//! Checks that wait (argon2 verifications, tokens, penalties) run on the runtime, never on
//! the worker; those decided at once (anonymous, a client certificate, a login-cache hit)
//! complete on the worker. Stored credentials never reach the plugin.

use super::context::{op_error, HostState};
use super::event::{Event, SaslStep};
use crate::abi::types::{self, ErrorKind, OpError};
use crate::abi::v0_2::magnetar::plugin::auth;
use crate::quota::Gauge;
use crate::sasl::{self, ScramHash};
use crate::tenancy::{AuthError, Credentials, Principal};

impl HostState {
    /// Records the principal of a successful authentication; `None` if the connection is gone.
    pub fn auth_completed(
        &mut self,
        conn: u64,
        outcome: Result<Principal, OpError>,
    ) -> Option<Result<types::Principal, OpError>> {
        let slot = self.conns.get_mut(&conn)?;
        let services = &self.services;
        let outcome = outcome.and_then(|p| {
            let tenant = services
                .tenancy
                .tenant(&p.tenant)
                .ok_or_else(|| op_error(ErrorKind::NotAuthorized, "the tenant does not exist"))?;
            let meters = services.quotas.meters(
                &p.tenant,
                tenant.limits,
                &p.user,
                services.tenancy.user_limits(&p.user),
            );
            if !meters.admit(Gauge::Connections) {
                tracing::info!(conn, tenant = %p.tenant, user = %p.user, "connection limit reached");
                return Err(op_error(
                    ErrorKind::QuotaExceeded,
                    "too many connections for this tenant or user",
                ));
            }
            if let Some(old) = slot.meters.replace(meters) {
                old.release(Gauge::Connections);
            }
            Ok(p)
        });
        Some(outcome.map(|p| {
            let wire = types::Principal {
                user: p.user.clone(),
                tenant: p.tenant.clone(),
                namespace: p.namespace.clone(),
            };
            slot.principal = Some(p);
            wire
        }))
    }
}

impl auth::Host for HostState {
    /// `authenticate`: checks credentials; completes with `on-auth-result`.
    fn authenticate(&mut self, conn: u64, token: u64, creds: types::Credentials) {
        if !self.knows(conn) {
            return;
        }
        let client_cert = self.conns.get(&conn).and_then(|s| s.client_cert.clone());
        let creds = match creds {
            // A client that proved who it is with a certificate needs no other credentials.
            types::Credentials::Anonymous => match client_cert {
                Some(cn) => Credentials::Certificate(cn),
                None => Credentials::Anonymous,
            },
            types::Credentials::Password(up) => Credentials::Password {
                user: up.user,
                password: up.password,
            },
            types::Credentials::Token(t) => Credentials::Token(t),
        };
        let peer = self.conns.get(&conn).and_then(|s| s.peer);
        // Anonymous, a client certificate, a password the login cache vouches for: decided
        // here, and delivered right after this call (no trip through the runtime).
        if let Some(result) = self.services.tenancy.authenticate_now(&creds, peer) {
            let outcome = result.map_err(|e| {
                tracing::info!(plugin = %self.plugin, conn, ?peer, error = %e, "authentication failed");
                op_error(ErrorKind::NotAuthorized, "not authorized")
            });
            return self.finish_now(Event::AuthResult {
                conn,
                token,
                outcome,
                busy: false,
            });
        }
        let tenancy = self.services.tenancy.clone();
        let events = self.events.clone();
        let plugin = self.plugin.clone();
        self.runtime.spawn(async move {
            let result = tenancy.authenticate(creds, peer).await;
            let busy = matches!(result, Err(AuthError::Busy));
            let outcome = result.map_err(|e| {
                tracing::info!(%plugin, conn, ?peer, error = %e, "authentication failed");
                match e {
                    // Not the client's fault: the protocol's "try again later" (MQTT CONNACK
                    // 3 / 0x88), not "not authorized".
                    AuthError::Busy => op_error(ErrorKind::Backend, "server busy"),
                    _ => op_error(ErrorKind::NotAuthorized, "not authorized"),
                }
            });
            let _ = events
                .send(Event::AuthResult {
                    conn,
                    token,
                    outcome,
                    busy,
                })
                .await;
        });
    }

    /// `sasl-mechanisms`: what `authenticate-sasl` offers, best first.
    fn sasl_mechanisms(&mut self) -> Vec<String> {
        sasl::MECHANISMS.iter().map(|m| m.to_string()).collect()
    }

    /// `authenticate-sasl`: one step of a SASL exchange; completes with `on-sasl-result`.
    fn authenticate_sasl(&mut self, conn: u64, token: u64, mechanism: String, response: Vec<u8>) {
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        let peer = slot.peer;
        let pending = slot.sasl.take();
        let tenancy = self.services.tenancy.clone();
        let events = self.events.clone();
        let plugin = self.plugin.clone();
        let mech = mechanism.clone();
        let refused = move |why: String| {
            tracing::info!(%plugin, conn, ?peer, mechanism = %mech, error = %why, "SASL authentication failed");
            op_error(ErrorKind::NotAuthorized, "not authorized")
        };
        let send = move |outcome: Result<SaslStep, OpError>| async move {
            let _ = events
                .send(Event::SaslResult {
                    conn,
                    token,
                    outcome,
                })
                .await;
        };
        if mechanism == "PLAIN" {
            let parsed = sasl::parse_plain(&response);
            self.runtime.spawn(async move {
                let outcome = match parsed {
                    Ok((user, password)) => tenancy
                        .authenticate(Credentials::Password { user, password }, peer)
                        .await
                        .map(|p| SaslStep::Success(p, Vec::new()))
                        .map_err(|e| refused(e.to_string())),
                    Err(e) => Err(refused(e.to_string())),
                };
                send(outcome).await;
            });
            return;
        }
        let Some(hash) = ScramHash::from_mechanism(&mechanism) else {
            let e = refused(sasl::SaslError::Mechanism(mechanism.clone()).to_string());
            self.runtime.spawn(send(Err(e)));
            return;
        };
        match pending {
            // The client's first message: answer with the server-first challenge.
            None => {
                match sasl::scram_first(hash, &response, |u| tenancy.scram_credential(u, hash)) {
                    Ok((challenge, state)) => {
                        slot.sasl = Some(state);
                        self.runtime.spawn(send(Ok(SaslStep::Challenge(challenge))));
                    }
                    Err(e) => {
                        let e = refused(e.to_string());
                        self.runtime.spawn(send(Err(e)));
                    }
                }
            }
            // The client's final message: check the proof.
            Some(state) => {
                let checked = sasl::scram_final(&state, &response);
                self.runtime.spawn(async move {
                    tenancy.note_attempt(peer, checked.is_ok()).await;
                    let outcome = match checked {
                        Ok(final_data) => match tenancy.principal_of(state.user()) {
                            Some(p) => Ok(SaslStep::Success(p, final_data)),
                            None => Err(refused("the user was deleted".into())),
                        },
                        Err(e) => Err(refused(e.to_string())),
                    };
                    send(outcome).await;
                });
            }
        }
    }
}
