//! The connection machine against the SDK's simulated host: requests encoded and responses
//! decoded by `kafka-protocol`'s client side, as a Kafka client would.

use bytes::{Buf, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::ResponseError;
use magnetar_sdk::testing::SimHost;
use proptest::prelude::*;

use super::KafkaConnection;
use crate::config::Config;

fn host() -> SimHost<KafkaConnection> {
    SimHost::new(0, KafkaConnection::new(Config::default()))
}

/// `[size][header][body]` of an ApiVersions request of `version`.
fn api_versions_request(version: i16, correlation_id: i32, body: &ApiVersionsRequest) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::ApiVersions as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("test")));
    let mut frame = BytesMut::new();
    header
        .encode(&mut frame, ApiVersionsRequest::header_version(version))
        .unwrap();
    body.encode(&mut frame, version).unwrap();
    let mut out = (frame.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&frame);
    out
}

fn v3_body(name: &'static str) -> ApiVersionsRequest {
    ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str(name))
        .with_client_software_version(StrBytes::from_static_str("1.0"))
}

/// Splits the bytes sent into responses and decodes each as an ApiVersions response of
/// `version`: (correlation id, response).
fn responses(mut sent: &[u8], version: i16) -> Vec<(i32, ApiVersionsResponse)> {
    let mut out = Vec::new();
    while !sent.is_empty() {
        let size = sent.get_i32() as usize;
        let mut frame = bytes::Bytes::copy_from_slice(&sent[..size]);
        sent.advance(size);
        let header =
            ResponseHeader::decode(&mut frame, ApiVersionsResponse::header_version(version))
                .unwrap();
        let body = ApiVersionsResponse::decode(&mut frame, version).unwrap();
        assert!(frame.is_empty(), "trailing bytes in a v{version} response");
        out.push((header.correlation_id, body));
    }
    out
}

#[test]
fn api_versions_v0_to_v3_list_what_is_served() {
    for version in 0..=3 {
        let mut host = host();
        let body = if version >= 3 {
            v3_body("librdkafka")
        } else {
            ApiVersionsRequest::default()
        };
        host.data(&api_versions_request(
            version,
            7 + i32::from(version),
            &body,
        ));
        let got = responses(&host.take_sent(), version);
        assert_eq!(got.len(), 1);
        let (correlation_id, response) = &got[0];
        assert_eq!(*correlation_id, 7 + i32::from(version));
        assert_eq!(response.error_code, 0);
        let listed: Vec<_> = response
            .api_keys
            .iter()
            .map(|k| (k.api_key, k.min_version, k.max_version))
            .collect();
        let served: Vec<_> = super::api_versions::SERVED
            .iter()
            .map(|&(k, min, max)| (k as i16, min, max))
            .collect();
        assert_eq!(listed, served);
        assert_eq!(host.closed(), None);
    }
}

#[test]
fn a_newer_api_versions_is_answered_as_v0_with_unsupported_version() {
    // v4 exists (kafka-protocol encodes it) but is not served; v99 does not exist at all and
    // its header is not even read.
    for (version, request) in [
        (4, api_versions_request(4, 41, &v3_body("librdkafka"))),
        (99, {
            let mut r = vec![0, 0, 0, 12];
            r.extend_from_slice(&(ApiKey::ApiVersions as i16).to_be_bytes());
            r.extend_from_slice(&99i16.to_be_bytes());
            r.extend_from_slice(&42i32.to_be_bytes());
            r.extend_from_slice(&[0xff; 4]);
            r
        }),
    ] {
        let mut host = host();
        host.data(&request);
        let got = responses(&host.take_sent(), 0);
        assert_eq!(got.len(), 1, "v{version}");
        assert_eq!(got[0].0, if version == 4 { 41 } else { 42 });
        assert_eq!(
            got[0].1.error_code,
            ResponseError::UnsupportedVersion.code()
        );
        assert_eq!(got[0].1.api_keys.len(), super::api_versions::SERVED.len());
        assert_eq!(host.closed(), None, "the connection stays open");
        // The client retries with v3 on the same connection.
        host.data(&api_versions_request(3, 43, &v3_body("librdkafka")));
        let got = responses(&host.take_sent(), 3);
        assert_eq!((got[0].0, got[0].1.error_code), (43, 0));
    }
}

#[test]
fn a_bad_software_name_is_an_invalid_request() {
    let mut host = host();
    host.data(&api_versions_request(3, 5, &v3_body("kafka python")));
    let got = responses(&host.take_sent(), 3);
    assert_eq!(got[0].1.error_code, ResponseError::InvalidRequest.code());
    assert_eq!(host.closed(), None);
}

#[test]
fn split_and_pipelined_requests_are_answered_in_order() {
    let mut host = host();
    let mut bytes = api_versions_request(0, 1, &ApiVersionsRequest::default());
    bytes.extend(api_versions_request(1, 2, &ApiVersionsRequest::default()));
    bytes.extend(api_versions_request(2, 3, &ApiVersionsRequest::default()));
    // One byte at a time: nothing is answered before a request is whole.
    let (first, rest) = bytes.split_at(5);
    for b in first {
        host.data(&[*b]);
    }
    assert!(host.take_sent().is_empty());
    host.data(rest);
    let sent = host.take_sent();
    // Responses of v0, v1 and v2 differ only by throttle_time_ms; decode each at its version.
    let mut at = &sent[..];
    for (version, correlation_id) in [(0i16, 1), (1, 2), (2, 3)] {
        let size = 4 + i32::from_be_bytes(at[..4].try_into().unwrap()) as usize;
        let got = responses(&at[..size], version);
        assert_eq!(got[0].0, correlation_id);
        at = &at[size..];
    }
    assert!(at.is_empty());
}

#[test]
fn bad_frames_close_the_connection() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("negative size", (-1i32).to_be_bytes().to_vec()),
        (
            "too large",
            (Config::default().max_request_bytes as i32 + 1)
                .to_be_bytes()
                .to_vec(),
        ),
        ("short header", vec![0, 0, 0, 4, 0, 18, 0, 0]),
        ("unknown api key", {
            let mut r = vec![0, 0, 0, 8];
            r.extend_from_slice(&999i16.to_be_bytes());
            r.extend_from_slice(&[0; 6]);
            r
        }),
        ("not served yet", {
            let mut r = vec![0, 0, 0, 8];
            r.extend_from_slice(&(ApiKey::InitProducerId as i16).to_be_bytes());
            r.extend_from_slice(&[0; 6]);
            r
        }),
        ("old version, truncated header", {
            let mut r = vec![0, 0, 0, 8];
            r.extend_from_slice(&(ApiKey::Produce as i16).to_be_bytes());
            r.extend_from_slice(&2i16.to_be_bytes());
            r.extend_from_slice(&[0; 4]);
            r
        }),
        ("malformed metadata", {
            let mut r = vec![0, 0, 0, 8];
            r.extend_from_slice(&(ApiKey::Metadata as i16).to_be_bytes());
            r.extend_from_slice(&[0; 6]);
            r
        }),
        ("malformed v3 body", {
            let mut r = vec![0, 0, 0, 10];
            r.extend_from_slice(&(ApiKey::ApiVersions as i16).to_be_bytes());
            r.extend_from_slice(&3i16.to_be_bytes());
            r.extend_from_slice(&[0, 0, 0, 1, 0xff, 0xff]);
            r
        }),
    ];
    for (what, bytes) in cases {
        let mut host = host();
        host.data(&bytes);
        assert!(host.closed().is_some(), "{what}");
        assert!(host.take_sent().is_empty(), "{what}");
        // Nothing after the close is read.
        host.data(&api_versions_request(0, 1, &ApiVersionsRequest::default()));
        assert!(host.take_sent().is_empty(), "{what}");
    }
}

proptest! {
    #[test]
    fn any_bytes_never_panic(chunks in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..64), 0..8)
    ) {
        let mut host = host();
        for chunk in chunks {
            host.data(&chunk);
        }
    }

    #[test]
    fn any_api_versions_body_never_panics(version in -2i16..8, body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut host = host();
        let mut r = ((8 + body.len()) as i32).to_be_bytes().to_vec();
        r.extend_from_slice(&(ApiKey::ApiVersions as i16).to_be_bytes());
        r.extend_from_slice(&version.to_be_bytes());
        r.extend_from_slice(&1i32.to_be_bytes());
        r.extend_from_slice(&body);
        host.data(&r);
    }
}
