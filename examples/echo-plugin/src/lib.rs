//! A line echo service, written only against `magnetar-sdk`, as a third party would.
//!
//! Every line a client sends comes back prefixed with `echo: `; `whoami` answers with a number
//! that identifies the plugin instance serving the connection. Three lines misbehave on
//! purpose, so that operators (and the gateway's tests) can watch the host contain a bad
//! plugin: `panic` panics, `loop` spins forever, `alloc` allocates without bound. The host
//! must tear down only this instance, close its connections, and re-create it.
//!
//! It also exposes the host's SASL service line by line, so that any SASL client can drive
//! it: `mechanisms` lists what the host offers; `sasl MECHANISM HEX` passes one client
//! message (hex-encoded) to the host and answers `challenge HEX`, `ok USER TENANT HEX` (the
//! mechanism's final data) or `fail`.
#![forbid(unsafe_code)]

use magnetar_sdk::{Conn, ConnInfo, Connection, LogLevel, OpError, Plugin, SaslOutcome};

/// The plugin value: a random number naming this instance.
pub struct Echo {
    instance: u64,
}

/// One connection: bytes of an incomplete line wait here.
pub struct EchoConn {
    instance: u64,
    pending: Vec<u8>,
}

/// Longest line kept; a longer one closes the connection.
const MAX_LINE: usize = 64 * 1024;

impl Plugin for Echo {
    type Connection = EchoConn;

    fn new(_config: &str) -> Result<Self, String> {
        use std::hash::BuildHasher;
        // std seeds RandomState from WASI randomness: a fresh number per instance.
        let instance = std::collections::hash_map::RandomState::new().hash_one(0u8);
        Ok(Echo { instance })
    }

    fn open(&mut self, _conn: Conn, info: ConnInfo) -> EchoConn {
        magnetar_sdk::log(
            LogLevel::Debug,
            &format!("echo: open from {}", info.peer_addr),
        );
        EchoConn {
            instance: self.instance,
            pending: Vec::new(),
        }
    }
}

impl Connection for EchoConn {
    fn on_data(&mut self, conn: Conn, data: Vec<u8>) {
        self.pending.extend_from_slice(&data);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim()
                .to_string();
            match text.as_str() {
                "panic" => panic!("asked to panic"),
                "loop" => spin_forever(),
                "alloc" => allocate_without_bound(),
                "whoami" => conn.send(format!("instance: {}\n", self.instance).as_bytes()),
                "mechanisms" => {
                    conn.send(format!("{}\n", magnetar_sdk::sasl_mechanisms().join(" ")).as_bytes())
                }
                _ if text.starts_with("sasl ") => {
                    let mut parts = text.split_whitespace().skip(1);
                    match (parts.next(), parts.next().and_then(from_hex)) {
                        (Some(mechanism), Some(response)) => {
                            conn.authenticate_sasl(0, mechanism, &response)
                        }
                        _ => conn.send(b"fail usage: sasl MECHANISM HEX\n"),
                    }
                }
                _ => conn.send(format!("echo: {text}\n").as_bytes()),
            }
        }
        if self.pending.len() > MAX_LINE {
            conn.close("line too long");
        }
    }

    fn on_sasl_result(&mut self, conn: Conn, _token: u64, result: Result<SaslOutcome, OpError>) {
        let line = match result {
            Ok(SaslOutcome::Challenge(c)) => format!("challenge {}\n", to_hex(&c)),
            Ok(SaslOutcome::Success(s)) => format!(
                "ok {} {} {}\n",
                s.principal.user,
                s.principal.tenant,
                to_hex(&s.final_data)
            ),
            Err(_) => "fail\n".to_string(),
        };
        conn.send(line.as_bytes());
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn spin_forever() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn allocate_without_bound() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

magnetar_sdk::export_plugin!(Echo);
