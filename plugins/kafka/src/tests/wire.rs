//! The client side of the wire for the plugin's unit tests: a request framed as a Kafka
//! client frames it, and the one response a connection sent, decoded, both with
//! `kafka-protocol`'s client side.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

/// `[int32 size][request header][body]` for `body` at `version`.
pub(crate) fn request<Q: Encodable + HeaderVersion>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    client_id: &'static str,
    body: &Q,
) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(client_id)));
    let mut frame = BytesMut::new();
    header
        .encode(&mut frame, Q::header_version(version))
        .expect("request header encodes");
    body.encode(&mut frame, version).expect("request encodes");
    let mut out = (frame.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&frame);
    out
}

/// The one response in `sent` (what a connection sent since the last look), `None` if it
/// sent nothing; asserts one whole frame with `correlation_id` and no trailing bytes.
pub(crate) fn response<R: Decodable + HeaderVersion>(
    sent: &[u8],
    version: i16,
    correlation_id: i32,
) -> Option<R> {
    if sent.is_empty() {
        return None;
    }
    assert!(sent.len() >= 4, "a partial response: {sent:?}");
    let size = i32::from_be_bytes([sent[0], sent[1], sent[2], sent[3]]) as usize;
    assert_eq!(sent.len(), 4 + size, "one response");
    let mut frame = Bytes::copy_from_slice(&sent[4..]);
    let header =
        ResponseHeader::decode(&mut frame, R::header_version(version)).expect("response header");
    assert_eq!(header.correlation_id, correlation_id);
    let body = R::decode(&mut frame, version).expect("response decodes");
    assert!(frame.is_empty(), "trailing bytes");
    Some(body)
}

/// One request on the simulated host and its one response, every host call completed
/// first; panics (naming why the connection closed, if it did) when none came.
pub(crate) fn call<Q, R>(
    host: &mut magnetar_sdk::testing::SimHost<crate::connection::KafkaConnection>,
    key: ApiKey,
    version: i16,
    body: &Q,
) -> R
where
    Q: Encodable + HeaderVersion,
    R: Decodable + HeaderVersion,
{
    host.data(&request(key, version, 7, "test", body));
    host.run();
    let closed = host.closed().map(str::to_string);
    response(&host.take_sent(), version, 7)
        .unwrap_or_else(|| panic!("no {key:?} v{version} response (closed: {closed:?})"))
}
