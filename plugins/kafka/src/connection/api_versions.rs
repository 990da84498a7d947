//! ApiVersions (KIP-35), with the request fields and the fallback of KIP-511.
//!
//! - v0-v2: the request is empty; v1+ answers `throttle_time_ms`.
//! - v3 (KIP-511, flexible, request header v2): the client names its software; a name or
//!   version that is not `[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?` is answered with
//!   `INVALID_REQUEST`, as Kafka's broker does.
//! - A version the plugin does not serve (newer than it knows, or negative) is answered with
//!   a **v0** response carrying `UNSUPPORTED_VERSION` and the supported ranges, without
//!   reading past the fixed header (a newer header may not parse): the client then retries
//!   with the highest version both sides know. The connection stays open.
//! - The response header is v0 (the correlation id only) for every version, even the
//!   flexible v3, so that a client reads the error whatever version it sent.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader};
use kafka_protocol::protocol::{Decodable, HeaderVersion};
use kafka_protocol::ResponseError;

use crate::codec::{write_response, Request};

/// The APIs and versions this plugin serves, as ApiVersions lists them. The lower bounds
/// are 0 (the versions KIP-896 removed from Kafka 4.0 and `kafka-protocol` 0.18 are
/// `codec::legacy`'s); the upper ones stop before topic ids
/// replace names (Fetch v13, DeleteTopics v6) and before what is not implemented
/// (ListOffsets v7's max timestamp, KIP-734; OffsetCommit v9 / OffsetFetch v9's member
/// epochs and ListGroups v5's group types, KIP-848; FindCoordinator v5+'s transaction and
/// share-group keys).
pub const SERVED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 0, 9),
    (ApiKey::Fetch, 0, 12),
    (ApiKey::ListOffsets, 0, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 0, 7),
    (ApiKey::DeleteTopics, 0, 5),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::OffsetCommit, 0, 8),
    (ApiKey::OffsetFetch, 0, 8),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 0, 4),
    (ApiKey::DescribeCluster, 0, 1),
];

/// Why an ApiVersions request could not be answered: the connection closes.
#[derive(Debug, thiserror::Error)]
pub enum ApiVersionsError {
    #[error("malformed ApiVersions v{version} request: {reason}")]
    Malformed { version: i16, reason: String },
    #[error("encoding the ApiVersions response: {0}")]
    Encode(String),
}

/// The versions of `key` this plugin serves.
pub fn served(key: ApiKey) -> Option<(i16, i16)> {
    SERVED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, min, max)| (min, max))
}

/// Answers an ApiVersions request into `out`.
pub fn answer(req: &Request, out: &mut Vec<u8>) -> Result<(), ApiVersionsError> {
    let version = req.head.api_version;
    let (min, max) = served(ApiKey::ApiVersions).unwrap_or((0, 0));
    let error = if (min..=max).contains(&version) {
        let request =
            decode(req).map_err(|reason| ApiVersionsError::Malformed { version, reason })?;
        if version >= 3
            && !(valid_software_part(&request.client_software_name)
                && valid_software_part(&request.client_software_version))
        {
            ResponseError::InvalidRequest.code()
        } else {
            0
        }
    } else {
        ResponseError::UnsupportedVersion.code()
    };
    // KIP-511: an unsupported version is answered as v0.
    let response_version = if error == ResponseError::UnsupportedVersion.code() {
        0
    } else {
        version
    };
    let body = ApiVersionsResponse::default()
        .with_error_code(error)
        .with_api_keys(
            SERVED
                .iter()
                .map(|&(key, min, max)| {
                    ApiVersion::default()
                        .with_api_key(key as i16)
                        .with_min_version(min)
                        .with_max_version(max)
                })
                .collect(),
        );
    write_response(
        out,
        req.head.correlation_id,
        ApiVersionsResponse::header_version(response_version),
        &body,
        response_version,
    )
    .map_err(|e| ApiVersionsError::Encode(e.0))
}

/// Decodes the request header and body of a served version.
fn decode(req: &Request) -> Result<ApiVersionsRequest, String> {
    let version = req.head.api_version;
    let mut buf = req.bytes.clone();
    RequestHeader::decode(&mut buf, ApiVersionsRequest::header_version(version))
        .map_err(|e| format!("header: {e}"))?;
    ApiVersionsRequest::decode(&mut buf, version).map_err(|e| format!("body: {e}"))
}

/// KIP-511's rule for `client_software_name` and `client_software_version`.
fn valid_software_part(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: Option<&u8>| c.is_some_and(u8::is_ascii_alphanumeric);
    edge(b.first())
        && edge(b.last())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::valid_software_part as ok;

    #[test]
    fn software_names_follow_kip_511() {
        assert!(ok("librdkafka"));
        assert!(ok("apache-kafka-java"));
        assert!(ok("2.16.1"));
        assert!(ok("a"));
        assert!(!ok(""));
        assert!(!ok("-x"));
        assert!(!ok("x."));
        assert!(!ok("kafka python"));
        assert!(!ok("kafka_python"));
    }
}
