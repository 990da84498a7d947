//! Any bytes into the MQTT 3.1.1 decoder (`codec::decode` on a 3.1.1 connection; a CONNECT
//! naming level 5 goes to the 5.0 decoder from here too): the framing promises hold
//! ([`check_decode`]), and a decoded packet survives re-encoding — by the plugin's own server
//! encoders where it has one (PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP) and by the client-side
//! encoder of this crate for every packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use magnetar_mqtt::codec::{self, Inbound, Publish};
use magnetar_mqtt_fuzz::{assert_decodes_to, check_decode, encode_client, publish_flags};

fuzz_target!(|data: &[u8]| {
    let Some((packet, _)) = check_decode(data, false) else {
        return;
    };
    // A CONNECT is encoded by the Protocol Level it carries, whatever the flag says.
    if let Some(bytes) = encode_client(&packet, false) {
        assert_decodes_to(&bytes, false, &packet);
    }
    let server = match &packet {
        Inbound::Publish(p) => {
            let flags = publish_flags(p);
            // `None`: not a Topic Name the server would send (the connection checks it too).
            let Some(bytes) = codec::publish(&p.topic, flags, &p.payload) else {
                return;
            };
            // The server never sets DUP on a QoS 0 PUBLISH (§3.3.1.1).
            let expected = Inbound::Publish(Publish {
                dup: p.dup && p.qos > 0,
                ..p.clone()
            });
            assert_decodes_to(&bytes, false, &expected);
            return;
        }
        Inbound::Puback(id) => codec::puback(*id),
        Inbound::Pubrec(id, _) => codec::pubrec(*id),
        Inbound::Pubrel(id) => codec::pubrel(*id),
        Inbound::Pubcomp(id) => codec::pubcomp(*id),
        _ => return,
    };
    assert_decodes_to(&server, false, &packet);
});
