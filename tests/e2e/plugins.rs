//! Fault containment: a plugin that panics, spins forever or allocates without bound loses
//! only its own instance; connections of other instances go on, and new connections work.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::harness::{Gateway, Options};

struct Line {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Line {
    fn connect(addr: SocketAddr) -> Line {
        let s = TcpStream::connect(addr).expect("connecting to the echo listener");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Line {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    fn say(&mut self, text: &str) {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .expect("write");
    }

    fn hear(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    fn echo(&mut self, text: &str) -> Option<String> {
        self.say(text);
        self.hear()
    }
}

#[test]
fn misbehaving_plugin_instance_is_replaced_and_others_go_on() {
    let gw = Gateway::start(Options {
        echo_plugin: true,
        ..Default::default()
    });
    let addr = gw.echo.expect("echo listener");
    for misdeed in ["panic", "loop", "alloc"] {
        let mut victim = Line::connect(addr);
        let victim_instance = victim.echo("whoami");
        // Two workers: find a connection served by the other instance.
        let mut bystander = (0..10)
            .map(|_| Line::connect(addr))
            .find_map(|mut l| (l.echo("whoami") != victim_instance).then_some(l))
            .expect("connections are spread over both instances");
        assert_eq!(victim.echo("hello").as_deref(), Some("echo: hello\n"));
        assert_eq!(bystander.echo("hello").as_deref(), Some("echo: hello\n"));

        victim.say(misdeed);
        assert_eq!(
            victim.hear(),
            None,
            "{misdeed}: the trapped instance's connection must be closed"
        );
        assert_eq!(
            bystander.echo("still there?").as_deref(),
            Some("echo: still there?\n"),
            "{misdeed}: a connection of the other instance must keep working"
        );
        for _ in 0..2 {
            let mut fresh = Line::connect(addr);
            assert_eq!(
                fresh.echo("new").as_deref(),
                Some("echo: new\n"),
                "{misdeed}: new connections must be served by a fresh instance"
            );
        }
    }
    let log = gw.log();
    assert!(
        log.contains("plugin instance trapped"),
        "no trap logged:\n{log}"
    );
}
