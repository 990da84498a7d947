//! Indexed topics and topics (ABI 0.2.3) on the real gateway and its embedded broker, driven
//! through the example echo plugin's line commands (`examples/echo-plugin`: `login`,
//! `create`, `grow`, `describe`, `append`, `read`, `bounds`): appends take consecutive
//! indexes per partition, readers hand back whole entries with their first index, the
//! indexes survive a restart, and another tenant sees none of it. On the contract of
//! `examples/two-tenants.toml` (both tenants encrypted at rest).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::harness::{Gateway, Line, Options};

/// A line client of the echo plugin, logged in as `user`.
fn login(addr: SocketAddr, user: &str, password: &str) -> Line {
    let mut line = Line::connect_with(addr, Duration::from_secs(20));
    let answer = line.ask(&format!("login {user} {password}"));
    assert!(answer.starts_with("auth ok "), "{answer}");
    line
}

fn gateway() -> Gateway {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/two-tenants.toml"),
    )
    .expect("examples/two-tenants.toml");
    Gateway::start(Options {
        echo_plugin: true,
        extra: format!("\n{example}\n"),
        ..Default::default()
    })
}

#[test]
fn indexed_appends_take_consecutive_indexes_that_readers_and_restarts_keep() {
    let mut gw = gateway();
    let echo = gw.echo.expect("echo listener");
    let mut alice = login(echo, "alice", "alice-secret");
    assert_eq!(alice.ask("create orders 2"), "topics orders:2");
    assert_eq!(alice.ask("create orders 2").split(' ').nth(1), Some("fail"));
    assert_eq!(alice.ask("append orders-partition-0 a b c"), "appended 0");
    assert_eq!(alice.ask("append orders-partition-0 d"), "appended 3");
    assert_eq!(alice.ask("append orders-partition-1 x y"), "appended 0");
    assert_eq!(alice.ask("append orders-partition-0 e f"), "appended 4");
    assert_eq!(alice.ask("grow orders 3"), "topics orders:3");
    assert_eq!(alice.ask("grow orders 2").split(' ').nth(1), Some("fail"));
    assert_eq!(alice.ask("describe"), "topics orders:3");
    assert_eq!(alice.ask("bounds orders-partition-0"), "bounds 0 5");
    assert_eq!(alice.ask("bounds orders-partition-2"), "bounds empty");
    alice.say("read orders-partition-0 earliest");
    assert!(alice.answer().starts_with("reader "));
    assert_eq!(alice.answer(), "entry 0 a,b,c");
    assert_eq!(alice.answer(), "entry 3 d");
    assert_eq!(alice.answer(), "entry 4 e,f");

    // Another tenant's namespace holds none of it.
    let mut bob = login(echo, "bob", "bob-secret");
    assert_eq!(bob.ask("describe"), "topics");
    assert_eq!(bob.ask("bounds orders-partition-0"), "bounds empty");
    assert_eq!(bob.ask("append orders-partition-0 z"), "appended 0");

    // The index lives in the broker: a restarted gateway goes on from it.
    drop((alice, bob));
    gw.stop();
    gw.spawn();
    let mut alice = login(echo, "alice", "alice-secret");
    assert_eq!(alice.ask("append orders-partition-0 g"), "appended 6");
    alice.say("read orders-partition-0 earliest");
    assert!(alice.answer().starts_with("reader "));
    assert_eq!(alice.answer(), "entry 0 a,b,c");
    assert_eq!(alice.answer(), "entry 3 d");
    assert_eq!(alice.answer(), "entry 4 e,f");
    assert_eq!(alice.answer(), "entry 6 g");
    assert_eq!(alice.ask("bounds orders-partition-0"), "bounds 0 6");
}
