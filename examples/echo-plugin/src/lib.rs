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
//! And the host's indexed topics (ABI 0.2.3), for the gateway's tests: `login USER PASSWORD`
//! (`auth ok TENANT NAMESPACE` or `auth fail KIND`), `create TOPIC N`, `grow TOPIC N`,
//! `drop TOPIC`, `describe [TOPIC...]` (`topics NAME:N ...` or `topics fail KIND`),
//! `append TOPIC V...` (one entry of the values; `appended FIRST_INDEX` or `append fail
//! KIND`), `read TOPIC earliest|latest|time:MS` (`reader ID`, then `entry FIRST_INDEX
//! V,V,...` per entry, acked at once), `bounds TOPIC` (`bounds FIRST LAST` or `bounds
//! empty`), `locate TOPIC INDEX` (`located` or `located none`).
//!
//! It is written on the SDK's plugin kit: the connection is a sans-IO [`Machine`] that frames
//! lines with [`Input`] and answers through an [`Outbox`], run by the SDK's [`Driver`]; so its
//! tests run natively on the SDK's simulated host.
#![forbid(unsafe_code)]

use std::rc::Rc;

use magnetar_sdk::input::Input;
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::{
    Action, Conn, ConnInfo, Credentials, Driver, Event, LogLevel, Machine, OpError, Plugin,
    Position, ReaderSpec, RecordOut, SaslOutcome, UserPassword,
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
    next_token: u64,
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
            next_token: 1,
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// The indexed-topic commands; `false` if `text` is none of them.
    fn on_indexed_line(&mut self, text: &str) -> bool {
        let words: Vec<&str> = text.split_whitespace().collect();
        let token = self.token();
        let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        let topic = words.get(1).map(|t| t.to_string()).unwrap_or_default();
        let action = match (words.first().copied(), words.len()) {
            (Some("login"), 3) => Action::Authenticate {
                token,
                creds: Credentials::Password(UserPassword {
                    user: words[1].to_string(),
                    password: words[2].as_bytes().to_vec(),
                }),
            },
            (Some("create"), 3) => Action::CreateTopic {
                token,
                topic,
                partitions: number(2).unwrap_or(0) as u32,
            },
            (Some("grow"), 3) => Action::SetPartitions {
                token,
                topic,
                partitions: number(2).unwrap_or(0) as u32,
            },
            (Some("drop"), 2) => Action::DeleteTopic { token, topic },
            (Some("describe"), _) => Action::DescribeTopics {
                token,
                names: words[1..].iter().map(|w| w.to_string()).collect(),
            },
            (Some("append"), n) if n > 2 => Action::Append {
                token,
                topic,
                records: words[2..]
                    .iter()
                    .map(|v| RecordOut {
                        key: None,
                        value: Some(v.as_bytes().to_vec()),
                        properties: Vec::new(),
                        event_time_ms: None,
                    })
                    .collect(),
                dedup: None,
            },
            (Some("read"), 3) => {
                let start = match words[2] {
                    "earliest" => Position::Earliest,
                    "latest" => Position::Latest,
                    other => match other.strip_prefix("time:").and_then(|t| t.parse().ok()) {
                        Some(t) => Position::PublishTime(t),
                        None => return false,
                    },
                };
                Action::OpenReader {
                    token,
                    spec: ReaderSpec {
                        topic,
                        start,
                        max_unacked_entries: 16,
                    },
                }
            }
            (Some("bounds"), 2) => Action::Bounds { token, topic },
            (Some("locate"), 3) => Action::Locate {
                token,
                topic,
                index: number(2).unwrap_or(0),
            },
            _ => return false,
        };
        self.out.push(action);
        true
    }

    fn on_indexed_event(&mut self, event: Event) {
        let kind = |e: &OpError| format!("{:?}", e.kind).to_lowercase();
        let line = match event {
            Event::AuthResult { result, .. } => match result {
                Ok(p) => format!("auth ok {} {}", p.tenant, p.namespace),
                Err(e) => format!("auth fail {}", kind(&e)),
            },
            Event::TopicsResult { result, .. } => match result {
                Ok(topics) => {
                    let list: Vec<String> = topics
                        .iter()
                        .map(|t| format!("{}:{}", t.name, t.partitions))
                        .collect();
                    format!("topics {}", list.join(" ")).trim_end().to_string()
                }
                Err(e) => format!("topics fail {}", kind(&e)),
            },
            Event::Appended { result, .. } => match result {
                Ok(a) => format!("appended {}", a.first_index),
                Err(e) => format!("append fail {} {}", kind(&e), e.message),
            },
            Event::SubscribeResult { result, .. } => match result {
                Ok(id) => format!("reader {id}"),
                Err(e) => format!("reader fail {} {}", kind(&e), e.message),
            },
            Event::Entry(e) => {
                self.out.push(Action::Ack {
                    sub: e.reader,
                    delivery_id: e.delivery_id,
                });
                let values: Vec<String> = e
                    .messages
                    .iter()
                    .map(|m| {
                        String::from_utf8_lossy(m.value.as_deref().unwrap_or(b"-")).into_owned()
                    })
                    .collect();
                let first = e.first_index.map_or("none".to_string(), |i| i.to_string());
                format!("entry {first} {}", values.join(","))
            }
            Event::Bounds { result, .. } => match result {
                Ok(b) => match (b.first, b.last) {
                    (Some(f), Some(l)) => format!("bounds {} {}", f.index, l.index),
                    _ => "bounds empty".to_string(),
                },
                Err(e) => format!("bounds fail {}", kind(&e)),
            },
            Event::Position { result, .. } => match result {
                Ok(Some(_)) => "located".to_string(),
                Ok(None) => "located none".to_string(),
                Err(e) => format!("located fail {}", kind(&e)),
            },
            _ => return,
        };
        self.say(line);
    }

    fn on_line(&mut self, text: &str) {
        match text {
            "panic" => panic!("asked to panic"),
            "loop" => spin_forever(),
            "alloc" => allocate_without_bound(),
            "whoami" => self.say(format!("instance: {}", self.instance)),
            "mechanisms" => self.say(self.mechanisms.join(" ")),
            _ if self.on_indexed_line(text) => {}
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
            other => self.on_indexed_event(other),
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
    fn indexed_commands_on_the_simulated_host() {
        let mut h = host();
        h.data(b"login u p\ncreate t 2\nappend t-partition-0 a b\nappend t-partition-0 c\n");
        h.run();
        h.data(b"read t-partition-0 earliest\nbounds t-partition-0\ndescribe\n");
        h.run();
        assert_eq!(
            String::from_utf8_lossy(&h.take_sent()),
            "auth ok tenant ns\ntopics t:2\nappended 0\nappended 2\n\
             reader 1\nbounds 0 2\ntopics t:2\nentry 0 a,b\nentry 2 c\n"
        );
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
