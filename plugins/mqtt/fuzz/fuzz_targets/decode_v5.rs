//! Any bytes into the MQTT 5.0 decoder (`codec::decode` on a 5.0 connection, and
//! `v5::split_properties`): the framing promises hold ([`check_decode`]); a decoded packet
//! survives re-encoding by the plugin's server encoders where it has one (PUBLISH, the acks,
//! DISCONNECT, AUTH) and by the client-side encoder of this crate for every packet; and any
//! decoded Properties survive `put_properties` → `split_properties`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use magnetar_mqtt::codec::v5::{self, id};
use magnetar_mqtt::codec::{Inbound, Properties, Publish};
use magnetar_mqtt_fuzz::{assert_decodes_to, check_decode, encode_client, publish_flags};

/// Every property identifier the decoder knows, so that all of them round-trip.
const ALL_PROPERTIES: &[u8] = &[
    id::PAYLOAD_FORMAT_INDICATOR,
    id::MESSAGE_EXPIRY_INTERVAL,
    id::CONTENT_TYPE,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
    id::SUBSCRIPTION_IDENTIFIER,
    id::SESSION_EXPIRY_INTERVAL,
    id::ASSIGNED_CLIENT_IDENTIFIER,
    id::SERVER_KEEP_ALIVE,
    id::AUTHENTICATION_METHOD,
    id::AUTHENTICATION_DATA,
    id::REQUEST_PROBLEM_INFORMATION,
    id::WILL_DELAY_INTERVAL,
    id::REQUEST_RESPONSE_INFORMATION,
    id::RESPONSE_INFORMATION,
    id::SERVER_REFERENCE,
    id::REASON_STRING,
    id::RECEIVE_MAXIMUM,
    id::TOPIC_ALIAS_MAXIMUM,
    id::TOPIC_ALIAS,
    id::MAXIMUM_QOS,
    id::RETAIN_AVAILABLE,
    id::USER_PROPERTY,
    id::MAXIMUM_PACKET_SIZE,
    id::WILDCARD_SUBSCRIPTION_AVAILABLE,
    id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    id::SHARED_SUBSCRIPTION_AVAILABLE,
];

fuzz_target!(|data: &[u8]| {
    if let Ok((p, rest)) = v5::split_properties(data, ALL_PROPERTIES) {
        assert!(rest.len() < data.len(), "properties took no bytes");
        let mut bytes = Vec::new();
        v5::put_properties(&mut bytes, &p);
        assert_eq!(
            v5::split_properties(&bytes, ALL_PROPERTIES),
            Ok((p, &[][..]))
        );
    }

    let Some((packet, _)) = check_decode(data, true) else {
        return;
    };
    if let Some(bytes) = encode_client(&packet, true) {
        assert_decodes_to(&bytes, true, &packet);
    }
    let none = Properties::default();
    let server = match &packet {
        Inbound::Publish(p) => {
            let flags = publish_flags(p);
            let bytes = v5::publish(&p.topic, flags, &p.properties, &p.payload);
            // The server never sets DUP on a QoS 0 PUBLISH (§3.3.1.1).
            let expected = Inbound::Publish(Publish {
                dup: p.dup && p.qos > 0,
                ..p.clone()
            });
            assert_decodes_to(&bytes, true, &expected);
            return;
        }
        Inbound::Puback(id) => v5::ack(0x40, *id, 0, &none),
        Inbound::Pubrec(id, reason) => v5::ack(0x50, *id, *reason, &none),
        Inbound::Pubrel(id) => v5::ack(0x62, *id, 0, &none),
        Inbound::Pubcomp(id) => v5::ack(0x70, *id, 0, &none),
        Inbound::Disconnect {
            reason,
            session_expiry,
        } => {
            let p = Properties {
                session_expiry_interval: *session_expiry,
                ..Properties::default()
            };
            v5::disconnect(*reason, &p)
        }
        Inbound::Auth { reason, properties } => v5::auth(*reason, properties),
        _ => return,
    };
    assert_decodes_to(&server, true, &packet);
});
