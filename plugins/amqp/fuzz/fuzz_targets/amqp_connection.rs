//! Any bytes into a connection that passed the handshake: the machine never panics, every
//! byte it sends is a valid frame, and whatever the input it ends in a state that answers
//! (it either closed or still takes frames).
#![no_main]

use libfuzzer_sys::fuzz_target;
use magnetar_amqp::codec::frame::write_method;
use magnetar_amqp::codec::method::*;
use magnetar_amqp::codec::{FieldTable, Frame, PROTOCOL_HEADER};
use magnetar_amqp::config::Config;
use magnetar_amqp::connection::AmqpConnection;
use magnetar_sdk::testing::SimHost;

fn method(channel: u16, m: Method) -> Vec<u8> {
    let mut out = Vec::new();
    write_method(&mut out, channel, m);
    out
}

fuzz_target!(|data: &[u8]| {
    let mut h = SimHost::new(0, AmqpConnection::new(Config::default(), 0));
    h.data(&PROTOCOL_HEADER);
    h.data(&method(
        0,
        Method::ConnectionStartOk(ConnectionStartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: b"\0guest\0guest".to_vec(),
            locale: "en_US".into(),
        }),
    ));
    h.run();
    h.data(&method(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk {
            channel_max: 16,
            frame_max: 4096,
            heartbeat: 0,
        }),
    ));
    h.data(&method(
        0,
        Method::ConnectionOpen(ConnectionOpen {
            virtual_host: "/".into(),
            ..Default::default()
        }),
    ));
    h.data(&method(1, Method::ChannelOpen(ChannelOpen::default())));
    // The fuzzer's bytes, in two reads split at its first byte's value.
    let cut = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    h.data(&data[..cut]);
    h.run();
    h.data(&data[cut..]);
    h.run();
    let sent = h.take_sent();
    let mut rest = &sent[..];
    while !rest.is_empty() {
        match Frame::check(rest, 0) {
            Ok(Some((_, n))) => rest = &rest[n..],
            other => panic!("the server sent an invalid frame: {other:?}"),
        }
    }
});
