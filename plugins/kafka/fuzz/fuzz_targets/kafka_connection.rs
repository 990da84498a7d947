//! Any bytes into a Kafka connection, in chunks, with the simulated host answering every
//! host call (`magnetar_sdk::testing::SimHost`). Asserts: no panic; once the connection
//! closed, nothing more is sent.
//!
//! Input: records `length, body`, each body one read from the client; after each read the
//! host completes what is pending and the clock moves 100 ms (timers fire).
#![no_main]

use libfuzzer_sys::fuzz_target;
use magnetar_kafka::config::Config;
use magnetar_kafka::connection::KafkaConnection;
use magnetar_sdk::testing::SimHost;

fuzz_target!(|data: &[u8]| {
    let mut host = SimHost::new(1_000, KafkaConnection::new(Config::default()));
    let mut rest = data;
    while let [len, tail @ ..] = rest {
        let (body, after) = tail.split_at(usize::from(*len).min(tail.len()));
        rest = after;
        let was_closed = host.closed().is_some();
        host.data(body);
        host.run();
        host.advance(100);
        let sent = host.take_sent();
        assert!(!(was_closed && !sent.is_empty()), "sent after the close");
    }
});
