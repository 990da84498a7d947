//! The upgrade request: which endpoint, which topic and subscription, which query
//! parameters, which token — parsed as Pulsar's servlets parse them
//! (docs/pulsar-websocket-api.md §1, §2), and the HTTP answer when they are refused (§3).
//!
//! Pulsar answers some path errors with 500 (the exception escapes the handler's
//! constructor) and others with 400 (the consumer's subscription): [`Refusal`] keeps those
//! statuses, so a client sees what Pulsar would have said.

use std::collections::BTreeMap;

/// Which handler serves the request (Pulsar's servlets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws/v2/producer`, `/ws/producer`.
    Producer,
    /// `/ws/v2/consumer`, `/ws/consumer`.
    Consumer,
    /// `/ws/v2/reader`, `/ws/reader`.
    Reader,
}

/// Where the client asked to produce or consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub endpoint: Endpoint,
    /// `persistent` (true) or `non-persistent`.
    pub persistent: bool,
    pub tenant: String,
    /// The cluster segment of a v1 path (checked as a name, otherwise unused).
    pub cluster: Option<String>,
    pub namespace: String,
    /// The topic's short name, percent-decoded.
    pub topic: String,
    /// The consumer's subscription, percent-decoded.
    pub subscription: Option<String>,
}

/// An HTTP answer that refuses the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }

    /// A parameter Pulsar's client builders refuse (`IllegalArgumentException`, §3).
    pub fn bad_param(message: impl std::fmt::Display) -> Self {
        Refusal::new(400, format!("Invalid query params: {message}"))
    }

    /// An error that escapes Pulsar's handler constructor: the container's 500.
    pub fn server_error(message: impl Into<String>) -> Self {
        Refusal::new(500, message)
    }
}

/// The servlet context paths (`WebSocket*Servlet.SERVLET_PATH{,_V2}`).
const SERVLETS: [(&str, Endpoint); 6] = [
    ("/ws/v2/producer", Endpoint::Producer),
    ("/ws/v2/consumer", Endpoint::Consumer),
    ("/ws/v2/reader", Endpoint::Reader),
    ("/ws/producer", Endpoint::Producer),
    ("/ws/consumer", Endpoint::Consumer),
    ("/ws/reader", Endpoint::Reader),
];

/// Parses the request path (raw, percent-encoded, without the query).
pub fn parse_path(path: &str) -> Result<Target, Refusal> {
    let endpoint = SERVLETS
        .iter()
        .find(|(prefix, _)| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .map(|(_, e)| *e)
        .ok_or_else(|| Refusal::new(404, "Not Found"))?;
    let parts: Vec<&str> = path.split('/').collect();
    let target = extract_topic_name(endpoint, &parts).map_err(Refusal::server_error)?;
    if endpoint == Endpoint::Consumer {
        let subscription = extract_subscription(&parts).map_err(Refusal::bad_param)?;
        return Ok(Target {
            subscription: Some(subscription),
            ..target
        });
    }
    Ok(target)
}

/// `AbstractWebSocketHandler.extractTopicName`: the errors become 500s.
fn extract_topic_name(endpoint: Endpoint, parts: &[&str]) -> Result<Target, String> {
    let part = |i: usize| parts.get(i).copied().unwrap_or_default();
    if parts.len() < 8 {
        return Err("Invalid topic name format".into());
    }
    if part(1) != "ws" {
        return Err("Invalid topic name format".into());
    }
    let v2 = part(2) == "v2";
    let domain = part(if v2 { 4 } else { 3 });
    let persistent = match domain {
        "persistent" => true,
        "non-persistent" => false,
        _ => return Err(format!("Invalid domain {domain}")),
    };
    let (tenant, cluster, namespace) = if v2 {
        (part(5), None, part(6))
    } else {
        (part(4), Some(part(5)), part(6))
    };
    if tenant.is_empty() || namespace.is_empty() || cluster.is_some_and(str::is_empty) {
        return Err(format!(
            "Invalid namespace format. namespace: {tenant}/{}{namespace}",
            cluster.map(|c| format!("{c}/")).unwrap_or_default()
        ));
    }
    for name in [Some(tenant), cluster, Some(namespace)]
        .into_iter()
        .flatten()
    {
        check_named_entity(name)?;
    }
    // A consumer's last segment is its subscription; the topic is the rest, joined.
    let end = if endpoint == Endpoint::Consumer {
        parts.len() - 1
    } else {
        parts.len()
    };
    let mut joined = part(7).to_string();
    for p in parts.iter().take(end).skip(8) {
        if !p.is_empty() {
            joined.push('/');
            joined.push_str(p);
        }
    }
    let topic = url_decode(&joined).map_err(|e| format!("URLDecoder: {e}"))?;
    if topic.is_empty() {
        return Err(format!(
            "Invalid topic name: {domain}://{tenant}/{namespace}/"
        ));
    }
    Ok(Target {
        endpoint,
        persistent,
        tenant: tenant.to_string(),
        cluster: cluster.map(str::to_string),
        namespace: namespace.to_string(),
        topic,
        subscription: None,
    })
}

/// `ConsumerHandler.extractSubscription`: the errors become 400s.
fn extract_subscription(parts: &[&str]) -> Result<String, String> {
    if parts.len() != 9 {
        return Err("Invalid topic name format".into());
    }
    let last = parts.get(8).copied().unwrap_or_default();
    if last.is_empty() {
        return Err("Empty subscription name".into());
    }
    url_decode(last).map_err(|e| format!("URLDecoder: {e}"))
}

/// `NamedEntity.checkName`: `^[-=:.\w]*$`.
fn check_named_entity(name: &str) -> Result<(), String> {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | ':' | '.'))
    {
        Ok(())
    } else {
        Err(format!("Invalid named entity: {name}"))
    }
}

/// `URLDecoder.decode(s, UTF-8)`: `%XX` escapes and `+` as a space; bytes that are not
/// UTF-8 become U+FFFD, as Java's `String` constructor makes them.
pub fn url_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("Illegal hex characters in escape (%) pattern")?;
                out.push(hex);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The query parameters: `application/x-www-form-urlencoded`, the first value of a
/// repeated key wins (`AbstractWebSocketHandler`: `values[0]`). A malformed escape is
/// Jetty's 400 "Unable to parse URI query".
pub fn parse_query(query: &str) -> Result<BTreeMap<String, String>, Refusal> {
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |_| Refusal::new(400, "Unable to parse URI query");
        let (k, v) = (url_decode(k).map_err(bad)?, url_decode(v).map_err(bad)?);
        params.entry(k).or_insert(v);
    }
    Ok(params)
}

/// The token of the request (`WebSocketHttpServletRequestWrapper`): the `Authorization`
/// header when there is one (a `Bearer` token only; another scheme is no token), else the
/// `token` query parameter, with or without its `Bearer ` prefix.
pub fn token(headers: &[(String, String)], params: &BTreeMap<String, String>) -> Option<String> {
    let bearer = |v: &str| v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    match headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        Some((_, v)) => bearer(v),
        None => params
            .get("token")
            .map(|t| bearer(t).unwrap_or_else(|| t.clone())),
    }
    .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Target {
        parse_path(path).unwrap_or_else(|r| panic!("{path}: {r:?}"))
    }

    fn status(path: &str) -> u16 {
        parse_path(path).map(|_| 101).unwrap_or_else(|r| r.status)
    }

    #[test]
    fn parses_the_v2_endpoints() {
        let p = target("/ws/v2/producer/persistent/acme/iot/temps");
        assert_eq!(
            p,
            Target {
                endpoint: Endpoint::Producer,
                persistent: true,
                tenant: "acme".into(),
                cluster: None,
                namespace: "iot".into(),
                topic: "temps".into(),
                subscription: None,
            }
        );
        let c = target("/ws/v2/consumer/non-persistent/acme/iot/temps/my%20sub");
        assert_eq!(c.endpoint, Endpoint::Consumer);
        assert!(!c.persistent);
        assert_eq!(c.subscription.as_deref(), Some("my sub"));
        let r = target("/ws/v2/reader/persistent/acme/iot/a%2Bb+c");
        assert_eq!((r.endpoint, r.topic.as_str()), (Endpoint::Reader, "a+b c"));
    }

    #[test]
    fn parses_the_v1_endpoints_with_their_cluster() {
        let p = target("/ws/producer/persistent/acme/us-west/iot/temps");
        assert_eq!(p.cluster.as_deref(), Some("us-west"));
        assert_eq!((p.tenant.as_str(), p.namespace.as_str()), ("acme", "iot"));
        let c = target("/ws/consumer/persistent/acme/us-west/iot/temps/sub");
        assert_eq!(c.subscription.as_deref(), Some("sub"));
    }

    #[test]
    fn answers_path_errors_with_pulsars_statuses() {
        // No servlet.
        assert_eq!(status("/ws/v2/producerx/persistent/a/b/c"), 404);
        assert_eq!(status("/ws/v3/consumer/persistent/a/b/c/s"), 404);
        assert_eq!(status("/admin/v2/tenants"), 404);
        // Escapes the handler constructor: 500.
        assert_eq!(status("/ws/v2/producer/persistent/a/b"), 500);
        assert_eq!(status("/ws/v2/producer"), 500);
        assert_eq!(
            status("/ws/v2/producer/persistent/a/b/"),
            500,
            "empty topic"
        );
        assert_eq!(status("/ws/v2/producer/durable/a/b/c"), 500);
        assert_eq!(status("/ws/v2/producer/persistent/a%20b/ns/c"), 500);
        assert_eq!(status("/ws/v2/reader/persistent/a/ns/c%zz"), 500);
        assert_eq!(status("/ws/v2/consumer/persistent/a/b"), 500);
        // The consumer's subscription: 400.
        assert_eq!(status("/ws/v2/consumer/persistent/a/b/topic"), 400);
        let r = parse_path("/ws/v2/consumer/persistent/a/b/topic/").unwrap_err();
        assert_eq!(
            r,
            Refusal::new(400, "Invalid query params: Empty subscription name")
        );
        assert_eq!(status("/ws/v2/consumer/persistent/a/b/topic/x/y"), 400);
        assert_eq!(status("/ws/v2/consumer/persistent/a/b/topic/%zz"), 400);
    }

    #[test]
    fn a_producer_topic_keeps_extra_segments_for_the_host_to_judge() {
        let p = target("/ws/v2/producer/persistent/a/b/c/d//");
        assert_eq!(p.topic, "c/d");
    }

    #[test]
    fn query_first_value_wins_and_is_form_decoded() {
        let q = parse_query("a=1&b=x+y%2B&a=2&flag&=v&&c=%E2%9C%93").unwrap();
        assert_eq!(q.get("a").map(String::as_str), Some("1"));
        assert_eq!(q.get("b").map(String::as_str), Some("x y+"));
        assert_eq!(q.get("flag").map(String::as_str), Some(""));
        assert_eq!(q.get("c").map(String::as_str), Some("✓"));
        assert_eq!(parse_query("a=%4").unwrap_err().status, 400);
    }

    #[test]
    fn token_from_the_header_wins_over_the_query() {
        let h = |v: &str| vec![("authorization".to_string(), v.to_string())];
        let q = parse_query("token=fromquery").unwrap();
        assert_eq!(token(&h("Bearer abc"), &q).as_deref(), Some("abc"));
        assert_eq!(
            token(&h("Basic abc"), &q),
            None,
            "a header of another scheme"
        );
        assert_eq!(token(&[], &q).as_deref(), Some("fromquery"));
        let q = parse_query("token=Bearer%20xyz").unwrap();
        assert_eq!(token(&[], &q).as_deref(), Some("xyz"));
        assert_eq!(token(&[], &BTreeMap::new()), None);
    }
}
