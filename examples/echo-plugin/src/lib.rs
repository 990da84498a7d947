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
//!
//! It is written on the SDK's plugin kit: the connection is a sans-IO [`Machine`] that frames
//! lines with [`Input`] and answers through an [`Outbox`], run by the SDK's [`Driver`]; so its
//! tests run natively on the SDK's simulated host.
#![forbid(unsafe_code)]

use std::rc::Rc;

use magnetar_sdk::input::Input;
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::{
    Action, Conn, ConnInfo, Driver, Event, LogLevel, Machine, OpError, Plugin, SaslOutcome,
};

/// The plugin value: a random number naming this instance.
pub struct Echo {
    instance: u64,
    /// The host's SASL mechanisms, asked once.
    mechanisms: Option<Rc<[String]>>,
}

/// One connection: lines in, answers out.
pub struct EchoConn {
    instance: u64,
    mechanisms: Rc<[String]>,
    input: Input,
    out: Outbox,
    closed: bool,
}

/// Longest line kept; a longer one closes the connection.
const MAX_LINE: usize = 64 * 1024;

impl Plugin for Echo {
    type Connection = Driver<EchoConn>;

    fn new(_config: &str) -> Result<Self, String> {
        use std::hash::BuildHasher;
        // std seeds RandomState from WASI randomness: a fresh number per instance.
        let instance = std::collections::hash_map::RandomState::new().hash_one(0u8);
        Ok(Echo {
            instance,
            mechanisms: None,
        })
    }

    fn open(&mut self, conn: Conn, info: ConnInfo) -> Driver<EchoConn> {
        magnetar_sdk::log(
            LogLevel::Debug,
            &format!("echo: open from {}", info.peer_addr),
        );
        let mechanisms = self
            .mechanisms
            .get_or_insert_with(|| Rc::from(magnetar_sdk::sasl_mechanisms()))
            .clone();
        Driver::new(conn, EchoConn::new(self.instance, mechanisms))
    }
}

impl EchoConn {
    /// A connection of plugin instance `instance`, whose host offers `mechanisms`.
    pub fn new(instance: u64, mechanisms: Rc<[String]>) -> Self {
        EchoConn {
            instance,
            mechanisms,
            input: Input::new(MAX_LINE),
            out: Outbox::new(),
            closed: false,
        }
    }

    fn on_line(&mut self, text: &str) {
        match text {
            "panic" => panic!("asked to panic"),
            "loop" => spin_forever(),
            "alloc" => allocate_without_bound(),
            "whoami" => self.say(format!("instance: {}", self.instance)),
            "mechanisms" => self.say(self.mechanisms.join(" ")),
            _ if text.starts_with("sasl ") => {
                let mut parts = text.split_whitespace().skip(1);
                match (parts.next(), parts.next().and_then(from_hex)) {
                    (Some(mechanism), Some(response)) => self.out.push(Action::AuthenticateSasl {
                        token: 0,
                        mechanism: mechanism.to_string(),
                        response,
                    }),
                    _ => self.say("fail usage: sasl MECHANISM HEX".to_string()),
                }
            }
            _ => self.say(format!("echo: {text}")),
        }
    }

    fn on_sasl_result(&mut self, result: Result<SaslOutcome, OpError>) {
        let line = match result {
            Ok(SaslOutcome::Challenge(c)) => format!("challenge {}", to_hex(&c)),
            Ok(SaslOutcome::Success(s)) => format!(
                "ok {} {} {}",
                s.principal.user,
                s.principal.tenant,
                to_hex(&s.final_data)
            ),
            Err(_) => "fail".to_string(),
        };
        self.say(line);
    }

    /// Sends one line.
    fn say(&mut self, mut line: String) {
        line.push('\n');
        self.out.send(line.into_bytes());
    }
}

impl Machine for EchoConn {
    fn apply(&mut self, _now_ms: u64, event: Event) {
        if self.closed {
            return;
        }
        match event {
            Event::Data(bytes) => self.input.push(bytes),
            Event::SaslResult { result, .. } => self.on_sasl_result(result),
            Event::Closed => self.closed = true,
            _ => {}
        }
        while let Ok(Some(line)) = self.input.next_frame(line) {
            self.on_line(String::from_utf8_lossy(&line).trim());
        }
        if !self.closed && self.input.settle(false, &mut self.out).is_err() {
            self.closed = true;
            self.input.clear();
            self.out.push(Action::Close("line too long".into()));
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.out.take()
    }
}

/// Frames a line: the bytes before the next `\n`.
fn line(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, std::convert::Infallible> {
    let frame = buf
        .iter()
        .position(|b| *b == b'\n')
        .and_then(|end| Some((buf.get(..end)?.to_vec(), end + 1)));
    Ok(frame)
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

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_sdk::testing::SimHost;

    fn host() -> SimHost<EchoConn> {
        SimHost::new(0, EchoConn::new(42, Rc::from(vec!["PLAIN".to_string()])))
    }

    #[test]
    fn lines_come_back_whole_however_they_are_split() {
        let mut h = host();
        h.data(b"hel");
        assert!(h.take_sent().is_empty());
        h.data(b"lo\nwho");
        h.data(b"ami\n  spaced  \n");
        assert_eq!(
            String::from_utf8_lossy(&h.take_sent()),
            "echo: hello\ninstance: 42\necho: spaced\n"
        );
        assert!(h.is_reading());
    }

    #[test]
    fn mechanisms_and_a_refused_sasl_step() {
        let mut h = host();
        h.data(b"mechanisms\nsasl PLAIN 00616c69636500736563726574\nsasl PLAIN zz\n");
        assert_eq!(
            String::from_utf8_lossy(&h.take_sent()),
            "PLAIN\nfail usage: sasl MECHANISM HEX\n"
        );
        h.run(); // the simulated host runs no SASL: the step fails
        assert_eq!(h.take_sent(), b"fail\n");
    }

    #[test]
    fn a_line_longer_than_the_limit_closes() {
        let mut h = host();
        h.data(&vec![b'x'; MAX_LINE]);
        assert_eq!(h.closed(), None);
        h.data(b"x");
        assert_eq!(h.closed(), Some("line too long"));
    }
}
