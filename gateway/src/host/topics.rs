//! Host calls of topics (ABI 0.2.3): `create`, `delete`, `set-partitions`, `describe` —
//! partitioned topics of the connection's namespace through the backend's admin API.
//!
//! The embedded broker is asked through its admin router in process (the REST API's own
//! handlers, as `web_admin` forwards to them, with the gateway's superuser token); the
//! names are checked and placed in the principal's namespace first, so a plugin reaches its
//! connection's namespace only. Who may: `create` and `set-partitions` as a producer of the
//! topic (Pulsar creates topics on first produce too), `describe` as a consumer, `delete`
//! with the `manage` permission. With an external backend, the same REST calls go over
//! HTTP/1.1 to `[backend] admin_url` (an Apache Pulsar broker's web service, or another
//! process's embedded broker); without one every call fails.
//!
//! And `queues.consumer-count` (ABI 0.2.7): a queue's consumers, from the same API's topic
//! statistics (Pulsar's `consumers` of the queue's subscription, by `consumerName`).

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::Router;
use tower::ServiceExt;

use super::context::{op_error, HostState};
use super::event::Event;
use crate::abi::types::{ErrorKind, OpError};
use crate::abi::v0_2::exports::magnetar::plugin::events2::TopicInfo;
use crate::abi::v0_2::magnetar::plugin::{queues, topics};
use crate::config::ActionName;

/// Largest admin answer read (topic lists of one namespace).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Where the admin API is.
enum Target {
    /// The embedded broker's router, called in process.
    InProcess(Router),
    /// A web service at `host:port`, over HTTP/1.1 (one connection per call).
    Http(String),
}

/// The backend's admin API.
pub struct TopicAdmin {
    target: Target,
    /// `Authorization: Bearer <superuser token>`, if the broker checks tokens.
    token: Option<HeaderValue>,
}

impl TopicAdmin {
    /// The broker's admin `router`, called with `token` (a superuser's JWT, if any).
    pub fn new(router: Router, token: Option<String>) -> TopicAdmin {
        TopicAdmin {
            target: Target::InProcess(router),
            token: token.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()),
        }
    }

    /// The admin API of a web service, `http://host:port` (no TLS yet).
    pub fn http(url: &str, token: Option<String>) -> Result<TopicAdmin, String> {
        let authority = url
            .strip_prefix("http://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| format!("admin URL {url:?}: http://host:port expected"))?;
        Ok(TopicAdmin {
            target: Target::Http(authority.to_string()),
            token: token.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()),
        })
    }

    /// Sends one request to the target.
    async fn send(&self, mut req: Request<Body>) -> Result<axum::response::Response, OpError> {
        match &self.target {
            Target::InProcess(router) => match router.clone().oneshot(req).await {
                Ok(r) => Ok(r),
                Err(never) => match never {},
            },
            Target::Http(authority) => {
                let failed = |e: &dyn std::fmt::Display| {
                    op_error(ErrorKind::Backend, format!("admin API at {authority}: {e}"))
                };
                let host = HeaderValue::from_str(authority).map_err(|e| failed(&e))?;
                req.headers_mut().insert(header::HOST, host);
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(|e| failed(&e))?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| failed(&e))?;
                tokio::spawn(connection);
                let response = sender.send_request(req).await.map_err(|e| failed(&e))?;
                Ok(response.map(Body::new))
            }
        }
    }

    /// One admin request; the answer's body, or the error the plugin gets.
    async fn call(&self, method: Method, path: &str, body: String) -> Result<Vec<u8>, OpError> {
        let mut req = Request::new(Body::from(body));
        *req.method_mut() = method;
        *req.uri_mut() = path
            .parse()
            .map_err(|_| op_error(ErrorKind::InvalidName, "not a valid topic name"))?;
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(t) = &self.token {
            req.headers_mut().insert(header::AUTHORIZATION, t.clone());
        }
        let response = self.send(req).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), MAX_ANSWER)
            .await
            .map_err(|e| op_error(ErrorKind::Backend, format!("reading the admin answer: {e}")))?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let reason = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        let kind = match status {
            StatusCode::NOT_FOUND => ErrorKind::NotFound,
            StatusCode::CONFLICT | StatusCode::BAD_REQUEST => ErrorKind::InvalidName,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ErrorKind::NotAuthorized,
            _ => ErrorKind::Backend,
        };
        Err(op_error(kind, format!("{status}: {reason}")))
    }

    /// The partition count of a topic (0: non-partitioned or unknown).
    async fn partitions(&self, path: &str) -> Result<u32, OpError> {
        let body = self
            .call(Method::GET, &format!("{path}/partitions"), String::new())
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| op_error(ErrorKind::Backend, format!("admin answer: {e}")))?;
        Ok(v.get("partitions")
            .and_then(|p| p.as_u64())
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0))
    }

    /// A JSON list of topic URLs, as short names.
    async fn names(&self, path: &str) -> Result<Vec<String>, OpError> {
        let body = self.call(Method::GET, path, String::new()).await?;
        let urls: Vec<String> = serde_json::from_slice(&body)
            .map_err(|e| op_error(ErrorKind::Backend, format!("admin answer: {e}")))?;
        Ok(urls
            .iter()
            .filter_map(|u| u.rsplit('/').next().map(str::to_string))
            .collect())
    }

    /// The namespace's topics (`namespace_path`: `/admin/v2/persistent/<tenant>/<ns>`).
    async fn describe(
        &self,
        namespace_path: &str,
        names: &[String],
    ) -> Result<Vec<TopicInfo>, OpError> {
        let partitioned = self.names(&format!("{namespace_path}/partitioned")).await?;
        let plain = self.names(namespace_path).await?;
        let mut out = Vec::new();
        for name in &partitioned {
            let partitions = self.partitions(&format!("{namespace_path}/{name}")).await?;
            out.push(TopicInfo {
                name: name.clone(),
                partitions,
            });
        }
        for name in plain {
            let a_partition = name.rsplit_once("-partition-").is_some_and(|(base, n)| {
                n.parse::<u32>().is_ok() && partitioned.iter().any(|p| p == base)
            });
            if !a_partition {
                out.push(TopicInfo {
                    name,
                    partitions: 0,
                });
            }
        }
        out.retain(|t| !t.name.starts_with("__") && (names.is_empty() || names.contains(&t.name)));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }
}

/// How many of the consumers of `subscription`, in the topic statistics `stats` (Pulsar's
/// shape: `subscriptions.<name>.consumers[].consumerName`), have a name starting with
/// `prefix`.
fn consumers_named(stats: &serde_json::Value, subscription: &str, prefix: &str) -> u64 {
    stats
        .get("subscriptions")
        .and_then(|s| s.get(subscription))
        .and_then(|s| s.get("consumers"))
        .and_then(|c| c.as_array())
        .map(|consumers| {
            consumers
                .iter()
                .filter_map(|c| c.get("consumerName").and_then(|n| n.as_str()))
                .filter(|n| n.starts_with(prefix))
                .count() as u64
        })
        .unwrap_or(0)
}

impl TopicAdmin {
    /// The consumers of `subscription` on the topic at `path` whose name starts with
    /// `prefix`; 0 for a topic that does not exist (nobody ever read it).
    async fn consumer_count(
        &self,
        path: &str,
        subscription: &str,
        prefix: &str,
    ) -> Result<u64, OpError> {
        let body = match self
            .call(Method::GET, &format!("{path}/stats"), String::new())
            .await
        {
            Ok(body) => body,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let stats: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| op_error(ErrorKind::Backend, format!("admin answer: {e}")))?;
        Ok(consumers_named(&stats, subscription, prefix))
    }
}

impl queues::Host for HostState {
    /// `consumer-count`: completes with `on-kv-result` (8 bytes, big-endian).
    fn consumer_count(&mut self, conn: u64, token: u64, queue: String, prefix: String) {
        let checked = self.topic_admin("consumer counts").and_then(|admin| {
            let path = self.admin_topic_path(conn, &queue, ActionName::Consume)?;
            Ok((admin, path))
        });
        self.complete_kv_later(conn, token, async move {
            let (admin, path) = checked?;
            admin
                .consumer_count(&path, super::routing::QUEUE_SUBSCRIPTION, &prefix)
                .await
                .map(|n| Some(n.to_be_bytes().to_vec()))
        });
    }
}

impl HostState {
    /// The backend's admin API, or the error `what` gets without one.
    fn topic_admin(&self, what: &str) -> Result<std::sync::Arc<TopicAdmin>, OpError> {
        self.services.topic_admin.clone().ok_or_else(|| {
            op_error(
                ErrorKind::Internal,
                format!("{what} need the embedded broker or [backend] admin_url"),
            )
        })
    }

    /// The admin API's path of the connection's `topic`, once `action` on it is allowed.
    fn admin_topic_path(
        &self,
        conn: u64,
        topic: &str,
        action: ActionName,
    ) -> Result<String, OpError> {
        let url = self.authorized_topic(conn, topic, action)?;
        let rest = url.strip_prefix("persistent://").unwrap_or(&url);
        Ok(format!("/admin/v2/persistent/{rest}"))
    }
}

/// What a `topics` call asks.
enum TopicsCall {
    Create(u32),
    Delete,
    SetPartitions(u32),
    Describe(Vec<String>),
}

impl HostState {
    /// Checks a `topics` call and runs it on the runtime; completes with
    /// `events2.on-topics-result`.
    fn topics_call(&mut self, conn: u64, token: u64, topic: &str, call: TopicsCall) {
        let action = match call {
            TopicsCall::Create(_) | TopicsCall::SetPartitions(_) => ActionName::Produce,
            TopicsCall::Delete => ActionName::Manage,
            TopicsCall::Describe(_) => ActionName::Consume,
        };
        let checked = (|| {
            let admin = self.topic_admin("topics")?;
            let path = match &call {
                TopicsCall::Describe(_) => {
                    let p = self.principal(conn)?;
                    format!("/admin/v2/persistent/{}/{}", p.tenant, p.namespace)
                }
                _ => self.admin_topic_path(conn, topic, action)?,
            };
            if let TopicsCall::Describe(names) = &call {
                for n in names {
                    self.authorized_topic(conn, n, action)?;
                }
            }
            Ok((admin, path))
        })();
        let (admin, path) = match checked {
            Ok(c) => c,
            Err(e) => {
                return self.complete(Event::TopicsResult {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        let name = topic.to_string();
        let events = self.events.clone();
        self.runtime.spawn(async move {
            let outcome =
                match call {
                    TopicsCall::Create(0) => admin
                        .call(Method::PUT, &path, String::new())
                        .await
                        .map(|_| {
                            vec![TopicInfo {
                                name,
                                partitions: 0,
                            }]
                        }),
                    TopicsCall::Create(n) => admin
                        .call(Method::PUT, &format!("{path}/partitions"), n.to_string())
                        .await
                        .map(|_| {
                            vec![TopicInfo {
                                name,
                                partitions: n,
                            }]
                        }),
                    TopicsCall::SetPartitions(n) => admin
                        .call(Method::POST, &format!("{path}/partitions"), n.to_string())
                        .await
                        .map(|_| {
                            vec![TopicInfo {
                                name,
                                partitions: n,
                            }]
                        }),
                    TopicsCall::Delete => match admin.partitions(&path).await {
                        Ok(0) => admin.call(Method::DELETE, &path, String::new()).await,
                        Ok(_) => {
                            admin
                                .call(Method::DELETE, &format!("{path}/partitions"), String::new())
                                .await
                        }
                        Err(e) => Err(e),
                    }
                    .map(|_| Vec::new()),
                    TopicsCall::Describe(names) => admin.describe(&path, &names).await,
                };
            let _ = events
                .send(Event::TopicsResult {
                    conn,
                    token,
                    outcome,
                })
                .await;
        });
    }
}

impl topics::Host for HostState {
    fn create(&mut self, conn: u64, token: u64, topic: String, partitions: u32) {
        self.topics_call(conn, token, &topic, TopicsCall::Create(partitions));
    }

    fn delete(&mut self, conn: u64, token: u64, topic: String) {
        self.topics_call(conn, token, &topic, TopicsCall::Delete);
    }

    fn set_partitions(&mut self, conn: u64, token: u64, topic: String, partitions: u32) {
        self.topics_call(conn, token, &topic, TopicsCall::SetPartitions(partitions));
    }

    fn describe(&mut self, conn: u64, token: u64, names: Vec<String>) {
        self.topics_call(conn, token, "", TopicsCall::Describe(names));
    }
}

#[cfg(test)]
mod tests {
    use super::consumers_named;
    use serde_json::json;

    #[test]
    fn consumers_are_counted_by_name_prefix_on_their_subscription_only() {
        let stats = json!({
            "subscriptions": {
                "magnetar-queue": {"consumers": [
                    {"consumerName": "amqp:ctag-1"},
                    {"consumerName": "amqp:ctag-2"},
                    {"consumerName": "f3a9c"},
                    {}
                ]},
                "other": {"consumers": [{"consumerName": "amqp:x"}]}
            }
        });
        assert_eq!(consumers_named(&stats, "magnetar-queue", "amqp:"), 2);
        assert_eq!(consumers_named(&stats, "magnetar-queue", ""), 3);
        assert_eq!(consumers_named(&stats, "missing", "amqp:"), 0);
        assert_eq!(consumers_named(&json!({}), "magnetar-queue", "amqp:"), 0);
    }
}
