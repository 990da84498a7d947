//! A WebSocket echo service for the gateway's web port (`web = true`), written only against
//! `magnetar-sdk` and its envelope, [`magnetar_sdk::web`]: the smallest plugin in message
//! mode, and the one the web port's tests talk to.
//!
//! - `/ws/echo` is accepted (with subprotocol `echo` if the client offers it); every text
//!   and binary message comes back as it came; the text `close` makes the plugin close with
//!   code 4000 and reason `bye`;
//! - `/ws/silent` is never answered (the host's answer deadline gives the client a 503);
//! - any other path is refused with 404 and a text body, as Pulsar refuses an unknown topic.
#![forbid(unsafe_code)]

use magnetar_sdk::web::{Decoder, Direction, Frame, Request, Response};
use magnetar_sdk::{Conn, ConnInfo, Connection, Plugin};

/// Largest frame taken from the host; the host's own limit on messages is lower.
const MAX_FRAME: usize = 16 * 1024 * 1024;

pub struct WebEcho;

/// One WebSocket: frames in, frames out.
pub struct WebEchoConn {
    decoder: Decoder,
}

impl Plugin for WebEcho {
    type Connection = WebEchoConn;

    fn new(_config: &str) -> Result<Self, String> {
        Ok(WebEcho)
    }

    fn open(&mut self, _conn: Conn, _info: ConnInfo) -> WebEchoConn {
        WebEchoConn {
            decoder: Decoder::new(Direction::ToPlugin, MAX_FRAME),
        }
    }
}

/// The answer to the upgrade request; `None` leaves it unanswered.
pub fn answer(request: &Request) -> Option<Response> {
    match request.path.as_str() {
        "/ws/echo" => {
            let offered = request
                .header("sec-websocket-protocol")
                .is_some_and(|v| v.split(',').any(|p| p.trim() == "echo"));
            let accept = Response::switching_protocols();
            Some(if offered {
                accept.with_header("sec-websocket-protocol", "echo")
            } else {
                accept
            })
        }
        "/ws/silent" => None,
        path => Some(Response::refuse(404, format!("no endpoint at {path}"))),
    }
}

/// What to send back for one frame from the host.
pub fn reply(frame: Frame) -> Option<Frame> {
    match frame {
        Frame::Request(r) => answer(&r).map(Frame::Response),
        Frame::Text(t) if t == "close" => Some(Frame::Close {
            code: 4000,
            reason: "bye".into(),
        }),
        Frame::Text(t) => Some(Frame::Text(t)),
        Frame::Binary(b) => Some(Frame::Binary(b)),
        Frame::Response(_) | Frame::Close { .. } => None,
    }
}

impl Connection for WebEchoConn {
    fn on_data(&mut self, conn: Conn, data: Vec<u8>) {
        self.decoder.push(&data);
        let mut out = Vec::new();
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Some(r) = reply(frame) {
                        r.encode_into(&mut out);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    conn.close(&e.to_string());
                    return;
                }
            }
        }
        if !out.is_empty() {
            conn.send(&out);
        }
    }
}

magnetar_sdk::export_plugin!(WebEcho);

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, protocols: Option<&str>) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
            query: String::new(),
            headers: protocols
                .map(|p| vec![("sec-websocket-protocol".into(), p.into())])
                .unwrap_or_default(),
            peer: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn answers() {
        assert_eq!(
            answer(&request("/ws/echo", None)),
            Some(Response::switching_protocols())
        );
        let with = answer(&request("/ws/echo", Some("x, echo"))).unwrap();
        assert_eq!(
            with.headers,
            [("sec-websocket-protocol".into(), "echo".into())]
        );
        assert_eq!(answer(&request("/ws/silent", None)), None);
        assert_eq!(answer(&request("/ws/other", None)).unwrap().status, 404);
        assert_eq!(
            reply(Frame::Text("close".into())),
            Some(Frame::Close {
                code: 4000,
                reason: "bye".into()
            })
        );
    }
}
