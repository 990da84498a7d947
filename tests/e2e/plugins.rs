//! Plugins as an operator loads them from a plugin directory.
//!
//! Fault containment: a plugin that panics, spins forever or allocates without bound loses
//! only its own instance; connections of other instances go on, and new connections work.
//! ABI versions: a plugin built against an older ABI (a fixture built against 0.1.0) loads
//! and runs; one built against an ABI newer than the gateway's is refused at start.

use crate::harness::{fixture, Gateway, Line, Options};

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

#[test]
fn plugin_built_against_abi_0_1_0_still_loads_and_echoes() {
    older_plugin_loads_and_echoes("echo-plugin-abi-0.1.0.wasm");
}

#[test]
fn plugin_built_against_abi_0_2_0_still_loads_and_echoes() {
    // 0.2.1 added an interface: a 0.2.0 plugin is linked through 0.2.1's bindings (semver).
    older_plugin_loads_and_echoes("echo-plugin-abi-0.2.0.wasm");
}

#[test]
fn plugin_built_against_abi_0_2_2_still_loads_and_echoes() {
    // 0.2.3 added `indexed`, `topics` and the exported `events2`: a 0.2.2 plugin (with
    // `events`, without `events2`) is served through the frozen 0.2.2 bindings.
    older_plugin_loads_and_echoes("echo-plugin-abi-0.2.2.wasm");
}

#[test]
fn plugin_built_against_abi_0_2_3_still_loads_and_echoes() {
    // 0.2.4 added `homes` and the exported `events3`: a 0.2.3 plugin (with `events2`,
    // without `events3`) is served through the frozen 0.2.3 bindings.
    older_plugin_loads_and_echoes("echo-plugin-abi-0.2.3.wasm");
}

#[test]
fn plugin_built_against_abi_0_2_4_still_loads_and_echoes() {
    // 0.2.5 to 0.2.7 added imports only (`quota`, `caps`, `flow`, `durable`, `queues`): a
    // 0.2.4 plugin is linked through 0.2.7's bindings (semver), its exports found by the
    // same rule.
    older_plugin_loads_and_echoes("echo-plugin-abi-0.2.4.wasm");
}

/// An echo plugin built against an older ABI: loads, echoes, calls another family than
/// connection I/O, and is contained and rebuilt like any other.
fn older_plugin_loads_and_echoes(wasm: &str) {
    let gw = Gateway::start(Options {
        echo_plugin: true,
        echo_wasm: Some(fixture(wasm)),
        ..Default::default()
    });
    let mut line = Line::connect(gw.echo.expect("echo listener"));
    assert_eq!(line.echo("hello").as_deref(), Some("echo: hello\n"));
    assert_eq!(
        line.echo("mechanisms").as_deref(),
        Some("SCRAM-SHA-512 SCRAM-SHA-256 PLAIN\n")
    );
    line.say("panic");
    assert_eq!(
        line.hear(),
        None,
        "the trapped instance's connection stays open"
    );
    let mut fresh = Line::connect(gw.echo.expect("echo listener"));
    assert_eq!(fresh.echo("again").as_deref(), Some("echo: again\n"));
}

#[test]
fn plugin_built_against_an_unknown_newer_abi_is_refused_at_start() {
    let log = Gateway::start_refused(Options {
        echo_plugin: true,
        echo_wasm: Some(fixture("echo-plugin-abi-0.3.0.wasm")),
        ..Default::default()
    });
    assert!(
        log.contains("cannot load plugin echo_plugin")
            && log.contains("magnetar:plugin@0.3.0")
            && log.contains("supports 0.1.0, 0.2.1, 0.2.2, 0.2.3"),
        "the refusal does not name the plugin and both versions:\n{log}"
    );
}
