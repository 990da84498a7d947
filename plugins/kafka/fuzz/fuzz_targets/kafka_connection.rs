//! Any bytes into a Kafka connection, in chunks, with the simulated host answering every
//! host call (`magnetar_sdk::testing::SimHost`) and the group coordinator's home on a host
//! of its own, posts and replies carried between them as the gateway's `homes` does.
//! Asserts: no panic (in the connection or in the home); once the connection closed,
//! nothing more is sent.
//!
//! Input: records `length, body`, each body one read from the client, and also posted to
//! the home as is (any bytes a post could carry); after each read the hosts complete what
//! is pending and the clocks move 100 ms (timers fire, sessions expire).
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use magnetar_kafka::config::Config;
use magnetar_kafka::connection::KafkaConnection;
use magnetar_kafka::coordinator::group::Timing;
use magnetar_kafka::coordinator::{GroupHome, DOMAIN};
use magnetar_sdk::testing::SimHost;
use magnetar_sdk::Event;

fuzz_target!(|data: &[u8]| {
    let mut host = SimHost::new(1_000, KafkaConnection::new(Config::default()));
    let mut home = SimHost::new(
        1_000,
        GroupHome::new(Timing {
            initial_rebalance_delay_ms: 0,
            ..Timing::default()
        }),
    );
    let mut routes = HashMap::new();
    let mut rest = data;
    while let [len, tail @ ..] = rest {
        let (body, after) = tail.split_at(usize::from(*len).min(tail.len()));
        rest = after;
        let was_closed = host.closed().is_some();
        host.data(body);
        let stray = home.post(DOMAIN, 0, "t/ns", body.to_vec());
        routes.insert(stray, None);
        for _ in 0..8 {
            host.run();
            let posts = host.take_posts();
            let replies = home.take_replies();
            if posts.is_empty() && replies.is_empty() {
                break;
            }
            for (token, domain, shard, payload) in posts {
                let id = home.post(&domain, shard, "t/ns", payload);
                routes.insert(id, Some(token));
            }
            for (id, payload) in replies {
                if let Some(Some(token)) = routes.remove(&id) {
                    host.feed(Event::HomeReply {
                        token,
                        result: Ok(payload),
                    });
                }
            }
        }
        host.advance(100);
        home.advance(100);
        let sent = host.take_sent();
        assert!(!(was_closed && !sent.is_empty()), "sent after the close");
    }
});
