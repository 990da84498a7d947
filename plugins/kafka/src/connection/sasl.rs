//! SASL as a Kafka broker runs it (KIP-43, KIP-152), with the exchange itself done by the
//! host (`authenticate-sasl`): the plugin only carries tokens.
//!
//! - SaslHandshake v0-v1: the client names a mechanism; one the host does not offer
//!   (`sasl-mechanisms`) is answered with `UNSUPPORTED_SASL_MECHANISM` and the offered list,
//!   then the connection closes, as Kafka's `SaslServerAuthenticator` does.
//! - v1 handshake: each token comes in a SaslAuthenticate v0-v2 request and each host
//!   challenge (SCRAM's server-first) or final data (SCRAM's `v=...`, empty for PLAIN) goes
//!   back in its response. A refused step is answered with `SASL_AUTHENTICATION_FAILED` and
//!   the host's message, then the connection closes.
//! - v0 handshake: the tokens that follow are raw, a 4-byte size and the bytes, with no
//!   request header, and so are the server's (KIP-43); a refused step closes the
//!   connection without an answer.
//! - A second handshake, a SaslAuthenticate without a handshake or after success, and any
//!   other request between the handshake and success are `ILLEGAL_SASL_STATE`: answered
//!   where the request is a SASL one, and the connection closes.

use kafka_protocol::messages::{
    RequestHeader, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use magnetar_sdk::{Action, OpError, SaslOutcome};

use super::{decode_request, Auth, KafkaConnection, Op};
use crate::codec::Request;

/// Where the connection is in a SASL exchange.
#[derive(Debug, Default)]
pub(super) enum Sasl {
    /// No handshake yet.
    #[default]
    Idle,
    /// Handshake done: the mechanism, and whether tokens are raw (v0 handshake).
    Ready { mechanism: String, raw: bool },
    /// A token is with the host; `header` is its SaslAuthenticate's (none for a raw token).
    Waiting {
        mechanism: String,
        raw: bool,
        header: Option<RequestHeader>,
    },
    /// Authenticated through SASL.
    Done,
}

impl Sasl {
    /// Tokens come raw: the next bytes are one, not a request.
    pub(super) fn raw(&self) -> bool {
        matches!(self, Sasl::Ready { raw: true, .. })
    }

    /// A handshake was made and the exchange has not succeeded yet.
    pub(super) fn in_progress(&self) -> bool {
        matches!(self, Sasl::Ready { .. } | Sasl::Waiting { .. })
    }
}

/// Cuts one raw SASL token (`[int32 size][bytes]`) out of `buf`.
pub(super) fn raw_token(buf: &[u8], limit: usize) -> Result<Option<(Vec<u8>, usize)>, String> {
    let Some(size) = buf.get(..4) else {
        return Ok(None);
    };
    let size = i32::from_be_bytes([size[0], size[1], size[2], size[3]]);
    let size = usize::try_from(size).map_err(|_| format!("negative SASL token size {size}"))?;
    if size > limit {
        return Err(format!(
            "SASL token of {size} bytes exceeds the limit of {limit}"
        ));
    }
    Ok(buf.get(4..4 + size).map(|token| (token.to_vec(), 4 + size)))
}

impl KafkaConnection {
    pub(super) fn sasl_handshake(&mut self, request: Request) -> Result<(), String> {
        let version = request.head.api_version;
        let (header, body) = decode_request::<SaslHandshakeRequest>(request.bytes, version)?;
        let mechanisms: Vec<StrBytes> = self
            .sasl_mechanisms
            .iter()
            .map(|m| StrBytes::from_string(m.clone()))
            .collect();
        let mechanism = body.mechanism.to_string();
        let (error, reason) = if !matches!(self.sasl, Sasl::Idle) || self.auth != Auth::No {
            (
                ResponseError::IllegalSaslState,
                "SaslHandshake after a handshake or an authentication".to_string(),
            )
        } else if !mechanisms.iter().any(|m| m.as_str() == mechanism) {
            (
                ResponseError::UnsupportedSaslMechanism,
                format!("SASL mechanism {mechanism:?} is not offered"),
            )
        } else {
            let response = SaslHandshakeResponse::default().with_mechanisms(mechanisms);
            self.respond(&header, &response)?;
            self.sasl = Sasl::Ready {
                mechanism,
                raw: version == 0,
            };
            return Ok(());
        };
        let response = SaslHandshakeResponse::default()
            .with_error_code(error.code())
            .with_mechanisms(mechanisms);
        self.respond(&header, &response)?;
        Err(reason)
    }

    pub(super) fn sasl_authenticate(&mut self, request: Request) -> Result<(), String> {
        let version = request.head.api_version;
        let (header, body) = decode_request::<SaslAuthenticateRequest>(request.bytes, version)?;
        match std::mem::take(&mut self.sasl) {
            Sasl::Ready {
                mechanism,
                raw: false,
            } => {
                self.sasl_step(mechanism, false, Some(header), body.auth_bytes.to_vec());
                Ok(())
            }
            other => {
                self.sasl = other;
                let response = SaslAuthenticateResponse::default()
                    .with_error_code(ResponseError::IllegalSaslState.code())
                    .with_error_message(Some(StrBytes::from_static_str(
                        "SaslAuthenticate without a SaslHandshake v1 before it",
                    )));
                self.respond(&header, &response)?;
                Err("SaslAuthenticate out of order (ILLEGAL_SASL_STATE)".into())
            }
        }
    }

    /// A raw token after a v0 handshake.
    pub(super) fn sasl_raw_token(&mut self, token: Vec<u8>) {
        if let Sasl::Ready { mechanism, .. } = std::mem::take(&mut self.sasl) {
            self.sasl_step(mechanism, true, None, token);
        }
    }

    fn sasl_step(
        &mut self,
        mechanism: String,
        raw: bool,
        header: Option<RequestHeader>,
        response: Vec<u8>,
    ) {
        let token = self.ops.start(Op::Sasl);
        self.out.push(Action::AuthenticateSasl {
            token,
            mechanism: mechanism.clone(),
            response,
        });
        self.sasl = Sasl::Waiting {
            mechanism,
            raw,
            header,
        };
    }

    pub(super) fn on_sasl_result(&mut self, result: Result<SaslOutcome, OpError>) {
        let Sasl::Waiting {
            mechanism,
            raw,
            header,
        } = std::mem::take(&mut self.sasl)
        else {
            return;
        };
        let (data, done) = match result {
            Ok(SaslOutcome::Challenge(data)) => (data, false),
            Ok(SaslOutcome::Success(s)) => (s.final_data, true),
            Err(e) => {
                let reason = format!("SASL {mechanism} authentication failed: {}", e.message);
                if let Some(header) = header {
                    let response = SaslAuthenticateResponse::default()
                        .with_error_code(ResponseError::SaslAuthenticationFailed.code())
                        .with_error_message(Some(StrBytes::from_string(format!(
                            "Authentication failed: {}",
                            e.message
                        ))));
                    if let Err(e) = self.respond(&header, &response) {
                        self.close(e);
                        return;
                    }
                }
                self.close(reason);
                return;
            }
        };
        let sent = match header {
            Some(header) => {
                let response = SaslAuthenticateResponse::default().with_auth_bytes(data.into());
                self.respond(&header, &response)
            }
            None => {
                // KIP-43: raw tokens both ways; Kafka sends the mechanism's (possibly empty)
                // response after the last step too.
                match i32::try_from(data.len()) {
                    Ok(size) => {
                        let mut out = size.to_be_bytes().to_vec();
                        out.extend_from_slice(&data);
                        self.out.send(out);
                        Ok(())
                    }
                    Err(_) => Err("SASL token too large".to_string()),
                }
            }
        };
        if let Err(e) = sent {
            self.close(e);
            return;
        }
        if done {
            self.sasl = Sasl::Done;
            self.auth = Auth::Done;
        } else {
            self.sasl = Sasl::Ready { mechanism, raw };
        }
    }
}
