//! SaslHandshake and SaslAuthenticate on the simulated host, whose SASL outcomes the tests
//! give by hand (the simulated host runs no SASL of its own).

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, MetadataRequest, SaslAuthenticateRequest, SaslAuthenticateResponse,
    SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use magnetar_sdk::testing::SimHost;
use magnetar_sdk::{Action, ErrorKind, Event, OpError, Principal, SaslOutcome, SaslSuccess};

use super::KafkaConnection;
use crate::config::Config;
use crate::test_wire;

const MECHANISMS: [&str; 3] = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"];

fn sim() -> SimHost<KafkaConnection> {
    let mechanisms: Vec<String> = MECHANISMS.iter().map(|m| m.to_string()).collect();
    SimHost::new(
        1_000,
        KafkaConnection::new(Config::default()).with_sasl_mechanisms(mechanisms.into()),
    )
}

fn send<Q: Encodable + HeaderVersion>(
    host: &mut SimHost<KafkaConnection>,
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &Q,
) {
    host.data(&test_wire::request(
        key,
        version,
        correlation_id,
        "test",
        body,
    ));
}

fn receive<R: Decodable + HeaderVersion>(
    host: &mut SimHost<KafkaConnection>,
    version: i16,
    correlation_id: i32,
) -> R {
    let closed = host.closed().map(str::to_string);
    test_wire::response(&host.take_sent(), version, correlation_id)
        .unwrap_or_else(|| panic!("no response (closed: {closed:?})"))
}

fn handshake(host: &mut SimHost<KafkaConnection>, version: i16, mechanism: &'static str) -> i16 {
    let body = SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism));
    send(host, ApiKey::SaslHandshake, version, 1, &body);
    let r: SaslHandshakeResponse = receive(host, version, 1);
    let listed: Vec<&str> = r.mechanisms.iter().map(|m| m.as_str()).collect();
    assert_eq!(listed, MECHANISMS);
    r.error_code
}

fn authenticate(host: &mut SimHost<KafkaConnection>, version: i16, token: &[u8]) {
    let body = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::copy_from_slice(token));
    send(host, ApiKey::SaslAuthenticate, version, 2, &body);
}

/// The last SASL step the connection asked of the host: (token, mechanism, response).
fn sasl_step(host: &mut SimHost<KafkaConnection>) -> (u64, String, Vec<u8>) {
    let steps: Vec<_> = host
        .pending()
        .iter()
        .filter_map(|a| match a {
            Action::AuthenticateSasl {
                token,
                mechanism,
                response,
            } => Some((*token, mechanism.clone(), response.clone())),
            _ => None,
        })
        .collect();
    // The outcomes are given by hand (`Event::SaslResult`): the steps stay pending in the
    // simulated host, and the connection ignores their later completion.
    steps.into_iter().last().expect("a SASL step pending")
}

fn success(final_data: &[u8]) -> Result<SaslOutcome, OpError> {
    Ok(SaslOutcome::Success(SaslSuccess {
        principal: Principal {
            user: "alice".into(),
            tenant: "acme".into(),
            namespace: "default".into(),
        },
        final_data: final_data.to_vec(),
    }))
}

fn anonymous_logins(host: &mut SimHost<KafkaConnection>) -> usize {
    host.take_actions()
        .iter()
        .filter(|a| matches!(a, Action::Authenticate { .. }))
        .count()
}

#[test]
fn plain_through_the_host_then_requests_are_served_as_the_principal() {
    for version in 0..=2 {
        let mut host = sim();
        assert_eq!(handshake(&mut host, 1, "PLAIN"), 0);
        authenticate(&mut host, version, b"\0alice\0alice-secret");
        let (token, mechanism, response) = sasl_step(&mut host);
        assert_eq!(mechanism, "PLAIN");
        assert_eq!(response, b"\0alice\0alice-secret");
        host.feed(Event::SaslResult {
            token,
            result: success(b""),
        });
        let r: SaslAuthenticateResponse = receive(&mut host, version, 2);
        assert_eq!(r.error_code, 0);
        assert!(r.auth_bytes.is_empty());
        host.take_actions();
        send(
            &mut host,
            ApiKey::Metadata,
            12,
            3,
            &MetadataRequest::default(),
        );
        host.run();
        let _: kafka_protocol::messages::MetadataResponse = receive(&mut host, 12, 3);
        assert_eq!(
            anonymous_logins(&mut host),
            0,
            "no anonymous login after SASL"
        );
        assert_eq!(host.closed(), None);
    }
}

#[test]
fn scram_carries_the_challenge_and_the_final_data() {
    let mut host = sim();
    assert_eq!(handshake(&mut host, 1, "SCRAM-SHA-256"), 0);
    authenticate(&mut host, 2, b"n,,n=alice,r=abc");
    let (token, mechanism, response) = sasl_step(&mut host);
    assert_eq!(
        (mechanism.as_str(), &response[..]),
        ("SCRAM-SHA-256", &b"n,,n=alice,r=abc"[..])
    );
    host.feed(Event::SaslResult {
        token,
        result: Ok(SaslOutcome::Challenge(
            b"r=abcdef,s=c2FsdA==,i=4096".to_vec(),
        )),
    });
    let r: SaslAuthenticateResponse = receive(&mut host, 2, 2);
    assert_eq!(
        (r.error_code, &r.auth_bytes[..]),
        (0, &b"r=abcdef,s=c2FsdA==,i=4096"[..])
    );
    authenticate(&mut host, 2, b"c=biws,r=abcdef,p=proof");
    let (token, mechanism, _) = sasl_step(&mut host);
    assert_eq!(mechanism, "SCRAM-SHA-256");
    host.feed(Event::SaslResult {
        token,
        result: success(b"v=signature"),
    });
    let r: SaslAuthenticateResponse = receive(&mut host, 2, 2);
    assert_eq!((r.error_code, &r.auth_bytes[..]), (0, &b"v=signature"[..]));
    assert_eq!(host.closed(), None);
}

#[test]
fn a_refused_step_is_sasl_authentication_failed_then_close() {
    let mut host = sim();
    assert_eq!(handshake(&mut host, 1, "PLAIN"), 0);
    authenticate(&mut host, 1, b"\0alice\0wrong");
    let (token, _, _) = sasl_step(&mut host);
    host.feed(Event::SaslResult {
        token,
        result: Err(OpError {
            kind: ErrorKind::NotAuthorized,
            message: "bad credentials".into(),
        }),
    });
    let r: SaslAuthenticateResponse = receive(&mut host, 1, 2);
    assert_eq!(r.error_code, 58);
    assert!(r
        .error_message
        .is_some_and(|m| m.contains("bad credentials")));
    assert!(host.closed().is_some());
}

#[test]
fn an_unoffered_mechanism_is_refused_with_the_offered_list() {
    let mut host = sim();
    assert_eq!(handshake(&mut host, 1, "GSSAPI"), 33);
    assert!(host.closed().is_some());
}

#[test]
fn out_of_order_requests_are_illegal_sasl_state() {
    // SaslAuthenticate without a handshake: answered, then closed.
    let mut host = sim();
    authenticate(&mut host, 2, b"\0alice\0alice-secret");
    let r: SaslAuthenticateResponse = receive(&mut host, 2, 2);
    assert_eq!(r.error_code, 34);
    assert!(host.closed().is_some());

    // Another request between the handshake and success: closed, no anonymous login.
    let mut host = sim();
    assert_eq!(handshake(&mut host, 1, "PLAIN"), 0);
    host.take_actions();
    send(
        &mut host,
        ApiKey::Metadata,
        12,
        3,
        &MetadataRequest::default(),
    );
    assert!(host.take_sent().is_empty());
    assert!(host
        .closed()
        .is_some_and(|r| r.contains("ILLEGAL_SASL_STATE")));
    assert_eq!(anonymous_logins(&mut host), 0);

    // A second handshake.
    let mut host = sim();
    assert_eq!(handshake(&mut host, 1, "PLAIN"), 0);
    assert_eq!(handshake(&mut host, 1, "PLAIN"), 34);
    assert!(host.closed().is_some());
}

#[test]
fn a_v0_handshake_exchanges_raw_tokens() {
    let mut host = sim();
    assert_eq!(handshake(&mut host, 0, "SCRAM-SHA-512"), 0);
    let first = b"n,,n=alice,r=abc";
    let mut raw = (first.len() as i32).to_be_bytes().to_vec();
    raw.extend_from_slice(first);
    // Split across reads.
    host.data(&raw[..3]);
    assert!(!host
        .pending()
        .iter()
        .any(|a| matches!(a, Action::AuthenticateSasl { .. })));
    host.data(&raw[3..]);
    let (token, mechanism, response) = sasl_step(&mut host);
    assert_eq!(
        (mechanism.as_str(), &response[..]),
        ("SCRAM-SHA-512", &first[..])
    );
    host.feed(Event::SaslResult {
        token,
        result: Ok(SaslOutcome::Challenge(b"r=abcdef".to_vec())),
    });
    assert_eq!(host.take_sent(), b"\0\0\0\x08r=abcdef");
    let last = b"c=biws,r=abcdef,p=x";
    let mut raw = (last.len() as i32).to_be_bytes().to_vec();
    raw.extend_from_slice(last);
    host.data(&raw);
    let (token, _, _) = sasl_step(&mut host);
    host.feed(Event::SaslResult {
        token,
        result: success(b"v=sig"),
    });
    assert_eq!(host.take_sent(), b"\0\0\0\x05v=sig");
    // Requests are framed again.
    send(
        &mut host,
        ApiKey::Metadata,
        12,
        3,
        &MetadataRequest::default(),
    );
    host.run();
    let _: kafka_protocol::messages::MetadataResponse = receive(&mut host, 12, 3);
    assert_eq!(host.closed(), None);
}
